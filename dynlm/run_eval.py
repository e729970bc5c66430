"""`dynlm evaluate`: load a checkpoint, read a split as an article stream, score every mode."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import Config, ConfigError, to_dict
from .data.sources import load_articles
from .data.tokenizers import load_tokenizer
from .device import resolve_device
from .evaluate import markdown_table, score, write_results
from .model import LSTMLM
from .rules import RULES, adapted_names, compute_grad_rms, make_rule
from .data.streams import StreamLayout
from .tracking import Tracker

MODES = RULES


def tokenizer_for(ckpt_path: Path, ck: dict):
    """The tokenizer saved with the run that wrote the checkpoint, checked against it."""
    tok_dir = ckpt_path.resolve().parent.parent / "tokenizer"
    if not tok_dir.exists():
        raise CheckpointError(f"{ckpt_path}: no tokenizer found at {tok_dir} (expected beside the checkpoints/ folder)")
    tok = load_tokenizer(tok_dir)
    if tok.fingerprint() != ck.get("tokenizer_fingerprint") or tok.vocab_size != ck.get("vocab_size"):
        raise CheckpointError(f"{ckpt_path}: vocabulary mismatch: checkpoint has {ck.get('vocab_size')} types "
                              f"(fingerprint {ck.get('tokenizer_fingerprint')}), tokenizer at {tok_dir} has "
                              f"{tok.vocab_size} ({tok.fingerprint()})")
    return tok


def evaluate_checkpoint(ck: dict, ckpt_path: Path, cfg: Config, split: str, modes: list[str], out: Path) -> dict:
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ConfigError(f"unknown mode(s) {unknown or modes}; available: {', '.join(MODES)}")
    device = resolve_device(cfg.train.device)
    tok = tokenizer_for(ckpt_path, ck)
    articles = load_articles(cfg.data, split, tok)
    lm = LSTMLM(cfg.model, tok.vocab_size)
    params = {k: v.to(device) for k, v in ck["params"].items()}
    if "learned" in modes and "learner" not in ck:
        raise ConfigError(f"{ckpt_path}: mode 'learned' needs a checkpoint written by `dynlm metatrain`")
    e = cfg.eval
    ms = None
    if "dyneval" in modes:
        train_layout = StreamLayout(load_articles(cfg.data, "train", tok), e.batch_size, e.segment_length, tok.eos_id)
        names = adapted_names(lm, cfg.rule, "dyneval", params)
        ms = compute_grad_rms(lm, params, train_layout, names, cfg.rule.grad_rms_chunks, device)
    results = {}
    for mode in modes:
        names = adapted_names(lm, cfg.rule, mode, params)
        rule = make_rule(mode, cfg.rule, names, ms=ms, learner_state=ck.get("learner")).to(device)
        results[mode] = score(lm, params, articles, eos_id=tok.eos_id, segment_length=e.segment_length,
                              batch_size=e.batch_size, boundary=e.boundary, device=device, bf16=cfg.train.bf16,
                              rule=rule, names=names, desc=mode)
    summary = write_results(out, results, articles, per_word=cfg.data.tokenizer != "word")
    print(f"\n{split}: {len(articles)} articles, {sum(len(a) for a in articles):,} tokens  ->  {out}")
    print(markdown_table(summary))
    with Tracker(cfg.log, out, to_dict(cfg), job_type="evaluate") as tracker:
        tracker.log({f"eval/ppl/{m}": s["ppl"] for m, s in summary["modes"].items()})
        tracker.summary({f"eval/ppl/{m}": s["ppl"] for m, s in summary["modes"].items()})
    return summary
