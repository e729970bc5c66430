"""`dynlm evaluate`: load a checkpoint, read a split as an article stream, score every mode."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from .cache import CacheSettings
from .checkpoint import CheckpointError, save_checkpoint
from .config import Config, ConfigError, to_dict
from .data.sources import load_articles
from .data.tokenizers import load_tokenizer
from .device import resolve_device
from .evaluate import TokenScores, markdown_table, score, write_results
from .model import LSTMLM
from .report import check_config, log_report, render_report
from .rules import RULES, adapted_names, compute_grad_rms, make_rule
from .data.streams import StreamLayout
from .tracking import Tracker

MODES = (*RULES, "cache")  # cache: the static model read with the neural cache, no weight updates


def run_dir_of(ckpt_path: Path) -> Path:
    """The run directory that holds checkpoints/, tokenizer/, tuned.yaml, grad_rms/."""
    return Path(ckpt_path).resolve().parent.parent


def tokenizer_for(ckpt_path: Path, ck: dict):
    """The tokenizer saved with the run that wrote the checkpoint, checked against it."""
    tok_dir = run_dir_of(ckpt_path) / "tokenizer"
    if not tok_dir.exists():
        raise CheckpointError(f"{ckpt_path}: no tokenizer found at {tok_dir} (expected beside the checkpoints/ folder)")
    tok = load_tokenizer(tok_dir)
    if tok.fingerprint() != ck.get("tokenizer_fingerprint") or tok.vocab_size != ck.get("vocab_size"):
        raise CheckpointError(f"{ckpt_path}: vocabulary mismatch: checkpoint has {ck.get('vocab_size')} types "
                              f"(fingerprint {ck.get('tokenizer_fingerprint')}), tokenizer at {tok_dir} has "
                              f"{tok.vocab_size} ({tok.fingerprint()})")
    return tok


def check_modes(modes: list[str], cfg: Config, available=MODES) -> None:
    """Fail on bad modes or cache settings before any (long) scoring starts."""
    unknown = [m for m in modes if m not in available]
    if unknown or not modes:
        raise ConfigError(f"unknown mode(s) {unknown or modes}; available: {', '.join(available)}")
    if "cache" in modes:
        CacheSettings.from_config(cfg.rule)


def params_fingerprint(params) -> str:
    """sha1 of every weight's name, dtype, shape and bytes: identifies a checkpoint's model."""
    h = hashlib.sha1()
    for k in sorted(params):
        t = params[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def grad_rms_for(run_dir: Path, lm, params, cfg: Config, tok, device) -> dict:
    """dyneval's MS at the evaluation segment length, computed once and kept in RUN/grad_rms/."""
    e, r = cfg.eval, cfg.rule
    names = adapted_names(lm, r, "dyneval", params)
    data = {k: v for k, v in to_dict(cfg.data).items() if k != "cache_dir"}  # which training text
    key = {"params_sha1": params_fingerprint(params), "segment_length": e.segment_length, "streams": e.batch_size,
           "chunks": r.grad_rms_chunks, "boundary": e.boundary, "names": names, "data": json.dumps(data, sort_keys=True)}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = run_dir / "grad_rms" / f"seg{e.segment_length}-{digest}.pt"
    if path.exists():
        saved = torch.load(path, map_location=device, weights_only=True)
        if saved.get("key") == key:
            print(f"dyneval gradient RMS: loaded {path}")
            return saved["ms"]
    layout = StreamLayout(load_articles(cfg.data, "train", tok), e.batch_size, e.segment_length, tok.eos_id,
                          pad_articles=e.boundary == "reset")
    ms = compute_grad_rms(lm, params, layout, names, r.grad_rms_chunks, device, boundary=e.boundary)
    try:
        save_checkpoint({"key": key, "ms": {k: v.cpu() for k, v in ms.items()}}, path)
        print(f"dyneval gradient RMS: computed on {min(r.grad_rms_chunks, len(layout))} training chunks, saved {path}")
    except OSError as err:  # a read-only run directory only costs recomputing next time
        print(f"dyneval gradient RMS: computed, but could not save {path} ({err})")
    return ms


def score_mode(mode: str, lm, params, articles, cfg: Config, device, eos_id: int, ms=None,
               learner_state=None) -> TokenScores:
    """Prequential scores of one mode; `cache` is the static model read with the neural cache."""
    rule_mode = "static" if mode == "cache" else mode
    names = adapted_names(lm, cfg.rule, rule_mode, params)
    rule = make_rule(rule_mode, cfg.rule, names, ms=ms, learner_state=learner_state).to(device)
    e = cfg.eval
    return score(lm, params, articles, eos_id=eos_id, segment_length=e.segment_length, batch_size=e.batch_size,
                 boundary=e.boundary, device=device, bf16=cfg.train.bf16, rule=rule, names=names, desc=mode,
                 cache=CacheSettings.from_config(cfg.rule) if mode == "cache" else None)


def evaluate_checkpoint(ck: dict, ckpt_path: Path, cfg: Config, split: str, modes: list[str], out: Path,
                        tuned: dict | None = None) -> dict:
    """tuned: the tuned baseline values this evaluation runs with (recorded in summary.json)."""
    check_modes(modes, cfg)
    check_config(cfg.report)  # fail before the (long) scoring, not after it
    device = resolve_device(cfg.train.device)
    tok = tokenizer_for(ckpt_path, ck)
    articles = load_articles(cfg.data, split, tok)
    if cfg.eval.max_articles < 0:
        raise ConfigError(f"eval.max_articles must be >= 0 (0 = all), got {cfg.eval.max_articles}")
    articles = articles[: cfg.eval.max_articles] if cfg.eval.max_articles else articles
    if cfg.eval.boundary == "continuous" and 1 < len(articles) <= cfg.eval.batch_size:
        # each stream would read a single article: continuous reading that never crosses a boundary
        print(f"warning: eval.boundary=continuous, but {len(articles)} articles over eval.batch_size="
              f"{cfg.eval.batch_size} streams give each stream one article, so no stream reads across an article "
              f"boundary; set eval.batch_size below {len(articles)}", file=sys.stderr)
    lm = LSTMLM(cfg.model, tok.vocab_size)
    params = {k: v.to(device) for k, v in ck["params"].items()}
    if "learned" in modes and "learner" not in ck:
        raise ConfigError(f"{ckpt_path}: mode 'learned' needs a checkpoint written by `dynlm metatrain`")
    ms = grad_rms_for(run_dir_of(ckpt_path), lm, params, cfg, tok, device) if "dyneval" in modes else None
    results = {mode: score_mode(mode, lm, params, articles, cfg, device, tok.eos_id, ms=ms,
                                learner_state=ck.get("learner")) for mode in modes}
    summary = write_results(out, results, articles, per_word=cfg.data.tokenizer != "word", tokenizer=tok,
                            extra={"tuned": tuned} if tuned else None)
    print(f"\n{split}: {len(articles)} articles, {sum(len(a) for a in articles):,} tokens  ->  {out}")
    print(markdown_table(summary))
    report = render_report(out, cfg.report)
    print(f"report: {report.message}; {', '.join(p.name for p in report.files.values())}")
    with Tracker(cfg.log, out, to_dict(cfg), job_type="evaluate") as tracker:
        tracker.log({f"eval/ppl/{m}": s["ppl"] for m, s in summary["modes"].items()})
        tracker.summary({f"eval/ppl/{m}": s["ppl"] for m, s in summary["modes"].items()})
        log_report(tracker, report)
    return summary
