"""`dynlm evaluate`: load a checkpoint, read a split as an article stream, score every mode."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .cache import CacheSettings
from .checkpoint import CheckpointError, check_model_matches, save_checkpoint
from .config import Config, ConfigError, DataConfig, check_rule_layers, load_config, save_config, to_dict
from .data.errors import DataError
from .data.sources import load_articles
from .data.tokenizers import load_tokenizer
from .device import resolve_device
from .prequential import TokenScores, markdown_table, read_scores, score, write_results
from .model import LSTMLM
from .report import log_report, render_report
from .rules import adapted_names, compute_grad_rms, make_rule
from .data.streams import StreamLayout
from .modes import Mode, parse_modes, protocol_of, tuned_keys
from .tracking import Tracker


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


def check_modes(modes: list[str], cfg: Config) -> list[Mode]:
    """Parse the modes and fail on bad names, or on rule.layers the model lacks, before any (long) scoring
    starts (every other rule and cache setting was checked when the config was built)."""
    check_rule_layers(cfg)
    return parse_modes(modes)


def params_fingerprint(params) -> str:
    """sha1 of every weight's name, dtype, shape and bytes: identifies a checkpoint's model."""
    h = hashlib.sha1()
    for k in sorted(params):
        t = params[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_training_data(ck: dict, cfg: Config) -> DataConfig:
    """The text the checkpoint's model was trained on, for dyneval's MS (a statistic of the training
    text, as in Krause et al.): scoring other text (`--data.source=text --data.path=mine`) must neither
    change MS nor need that text's training split, and MS computed once (RUN/grad_rms/) is found again
    under the recorded settings even where the recorded path does not resolve. The current data
    settings instead when they name the same kind of corpus elsewhere (moved: --data.path again)."""
    own = dataclasses.replace(load_config(base=ck["config"]).data, cache_dir=cfg.data.cache_dir)
    moved = (own.source == cfg.data.source and own.source in ("wikitext", "text", "jsonl")
             and own.path != cfg.data.path and not Path(own.path).exists())
    return cfg.data if moved else own


def grad_rms_for(run_dir: Path, lm, params, cfg: Config, tok, device, train_data: DataConfig | None = None) -> dict:
    """dyneval's MS (compute_grad_rms) at the evaluation segment length, for every weight (dyneval on the
    LSTM weights alone takes its subset, so `dyneval` and `dyneval@lstm` share one file), computed once
    and kept in RUN/grad_rms/ under a key of everything it depends on.

    rule.grad_stat=batch (Krause et al.'s gradstat): the gradient of the mean loss over
    rule.grad_stat_streams training streams, read continuously with the shared weights; stream: of each
    stream's own loss over eval.batch_size streams, with eval.boundary. rule.grad_rms_chunks segments
    (chunks of the layout), 0 for the whole training split; of `train_data` (model_training_data), or of
    cfg.data."""
    e, r = cfg.eval, cfg.rule
    names = list(params)
    streams, boundary = (r.grad_stat_streams, "continuous") if r.grad_stat == "batch" else (e.batch_size, e.boundary)
    train_data = train_data or cfg.data
    data = {k: v for k, v in to_dict(train_data).items() if k != "cache_dir"}  # which training text
    key = {"stat": r.grad_stat, "params_sha1": params_fingerprint(params), "segment_length": e.segment_length,
           "streams": streams, "chunks": r.grad_rms_chunks, "boundary": boundary, "names": names,
           "data": json.dumps(data, sort_keys=True)}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = run_dir / "grad_rms" / f"{r.grad_stat}-seg{e.segment_length}-{digest}.pt"
    if path.exists():
        saved = torch.load(path, map_location=device, weights_only=True)
        if saved.get("key") == key:
            print(f"dyneval gradient RMS: loaded {path}")
            return saved["ms"]
    try:
        train = load_articles(train_data, "train", tok)
    except DataError as err:
        raise DataError(f"dyneval's gradient statistics (MS) are computed once per model from its training text "
                        f"(data.source={train_data.source}, data.path={train_data.path!r} as its checkpoint "
                        f"records them), which is not readable from here: {err}") from None
    layout = StreamLayout(train, streams, e.segment_length, tok.eos_id, pad_articles=boundary == "reset")
    n_chunks = len(layout) if r.grad_rms_chunks <= 0 else min(r.grad_rms_chunks, len(layout))
    print(f"dyneval gradient RMS ({r.grad_stat} statistic): {n_chunks} training segments of {layout.n_streams} "
          f"streams x {e.segment_length} tokens")
    ms = compute_grad_rms(lm, params, layout, names, r.grad_rms_chunks, device, boundary=boundary, stat=r.grad_stat)
    try:
        save_checkpoint({"key": key, "ms": {k: v.cpu() for k, v in ms.items()}}, path)
        print(f"dyneval gradient RMS: saved {path}")
    except OSError as err:  # a read-only run directory only costs recomputing next time
        print(f"dyneval gradient RMS: computed, but could not save {path} ({err})")
    return ms


def mode_settings(mode: Mode, cfg: Config, tuned: dict | None) -> tuple[Config, dict[str, tuple]]:
    """The config `mode` runs with: its own tuned values (tuned["modes"][mode name], from RUN/tuned.yaml)
    over `cfg`, except the rule.* keys set explicitly (tuned["explicit"]: --rule.x=y, --config files).
    Also {key: (value, source)} for every value the mode depends on; source is tuned / explicit / config."""
    tuned = tuned or {}
    own = tuned.get("modes", {}).get(mode.name, {})
    explicit = set(tuned.get("explicit", ()))
    use = {k: v for k, v in own.items() if k not in explicit}
    if use:
        cfg = dataclasses.replace(cfg, rule=dataclasses.replace(cfg.rule, **use))
    sources = {k: (getattr(cfg.rule, k), "tuned" if k in use else "explicit" if k in explicit else "config")
               for k in tuned_keys(mode)}
    return cfg, sources


def score_mode(mode: Mode | str, lm, params, articles, cfg: Config, device, eos_id: int, ms=None,
               learner_state=None) -> TokenScores:
    """Prequential scores of one mode (see modes.py): its rule on the weights it adapts, with the neural
    cache over the adapted model's hidden states when it has `+cache`."""
    mode = parse_modes([mode])[0] if isinstance(mode, str) else mode
    names = adapted_names(lm, cfg.rule, mode.rule, params, mode.weights)
    ms = {k: ms[k] for k in names} if mode.rule == "dyneval" and ms is not None else None
    rule = make_rule(mode.rule, cfg.rule, names, ms=ms, learner_state=learner_state).to(device)
    e = cfg.eval
    return score(lm, params, articles, eos_id=eos_id, segment_length=e.segment_length, batch_size=e.batch_size,
                 boundary=e.boundary, device=device, bf16=cfg.run.bf16, rule=rule, names=names, desc=mode.name,
                 cache=CacheSettings.from_config(cfg.rule) if mode.cache else None)


_CODE_DIGEST: list[str] = []


def code_digest() -> str:
    """sha1 of dynlm's own source files: scores kept by one version of the code are not another's."""
    if not _CODE_DIGEST:
        h = hashlib.sha1()
        for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
            h.update(path.read_bytes())
        _CODE_DIGEST.append(h.hexdigest())
    return _CODE_DIGEST[0]


class ModeScoresCache:
    """Per-mode scores of an evaluation in progress (OUT/.modes/MODE.npz), keyed by everything they
    depend on (the weights, the learner, the split, and the mode's whole eval/rule/data/model config),
    so that a long evaluation stopped part-way continues with the modes it has not scored yet."""

    def __init__(self, root: Path, params, learner, split: str):
        self.root, self.split = Path(root), split
        self.weights = params_fingerprint(params) + ("+" + params_fingerprint(learner) if learner else "")

    def path(self, mode: Mode) -> Path:
        return self.root / f"{hashlib.sha1(mode.name.encode()).hexdigest()[:12]}.npz"

    def key(self, mode: Mode, cfg: Config) -> str:
        settings = {k: v for k, v in to_dict(cfg).items() if k in ("eval", "rule", "data", "model")}
        settings["rule"] = {k: v for k, v in settings["rule"].items() if k != "compile"}
        settings["data"] = {k: v for k, v in settings["data"].items() if k != "cache_dir"}
        return json.dumps({"mode": mode.name, "weights": self.weights, "split": self.split, **settings,
                           "bf16": cfg.run.bf16, "device": cfg.run.device, "code": code_digest()},
                          sort_keys=True, default=str)

    def load(self, mode: Mode, cfg: Config) -> TokenScores | None:
        path = self.path(mode)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != self.key(mode, cfg):
                    return None
                drift = z["drift"] if z["drift"].size else None
                return TokenScores(z["article"], z["position"], z["token"], z["nll"], float(z["seconds"]), drift)
        except (OSError, ValueError, KeyError):  # unreadable: score again
            return None

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def save(self, mode: Mode, cfg: Config, scores: TokenScores) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path(mode).with_suffix(".tmp.npz")
        np.savez(tmp, key=np.array(self.key(mode, cfg)), article=scores.article, position=scores.position,
                 token=scores.token, nll=scores.nll, seconds=np.array(scores.seconds),
                 drift=scores.drift if scores.drift is not None else np.zeros((0, 3)))
        tmp.replace(self.path(mode))


def print_settings(settings: dict[str, dict[str, tuple]], cfg: Config, tuned: dict | None) -> None:
    """Before scoring: what every mode runs with and where each value came from; a warning when a
    baseline runs untuned, or was tuned on the articles being scored."""
    print(f"protocol: {protocol_of(cfg.eval)} (eval.segment_length={cfg.eval.segment_length}, "
          f"eval.batch_size={cfg.eval.batch_size}, eval.boundary={cfg.eval.boundary})")
    for name, values in settings.items():
        if values:
            print(f"  {name}: " + ", ".join(f"{k}={v:g} ({src})" for k, (v, src) in values.items()))
    untuned = [n for n, values in settings.items() if any(src == "config" for _, src in values.values())]
    if untuned:
        print(f"warning: {', '.join(untuned)} run{'s' * (len(untuned) == 1)} at config values, not tuned ones "
              f"(`dynlm tune` first, or this comparison is not fair to {'it' if len(untuned) == 1 else 'them'})",
              file=sys.stderr)
    overlap = (tuned or {}).get("overlap")
    if overlap:
        print(f"warning: tuned on text this evaluation scores: {overlap}", file=sys.stderr)


UNK_WARN = 0.10  # a higher share of <unk> targets makes perplexities hard to compare (WikiText-2 valid: 5.4%)


def unknown_tokens(articles, tok) -> dict:
    """How many scored tokens are <unk>: words outside the model's vocabulary, all predicted as one
    type, which flatters perplexity the more of them there are."""
    n = sum(len(a) for a in articles)
    n_unk = int(sum(int((a.ids == tok.unk_id).sum()) for a in articles))
    return {"n_unk": n_unk, "unk_rate": n_unk / n if n else 0.0}


def unknown_note(unknown: dict, tok, source: str) -> str:
    """The stdout line on <unk> tokens; a warning on stderr as well when they are many."""
    rate = unknown["unk_rate"]
    note = (f"unknown tokens: {100 * rate:.1f}% of the scored tokens ({unknown['n_unk']:,}) are <unk>, outside "
            f"the model's {tok.vocab_size:,}-type vocabulary")
    if rate > UNK_WARN:
        hint = (" (the word tokenizer splits on spaces only: separate punctuation from words, as WikiText "
                "does, e.g. 'word ,' not 'word,')" if tok.kind == "word" and source in ("text", "jsonl") else "")
        print(f"warning: {100 * rate:.1f}% of the scored tokens are <unk>: their perplexity is not comparable "
              f"with text the vocabulary covers{hint}", file=sys.stderr)
    return note


def read_earlier(out: Path, modes: list[str], articles) -> dict[str, dict]:
    """For each of `modes`: its scores in the evaluation already in `out`, the values it ran with and
    who scored it (that evaluation's code version and finish time, or what it says it kept)."""
    if not modes:
        return {}
    summary = json.loads((out / "summary.json").read_text())
    scores = read_scores(out, modes, articles, summary)
    source = f"code {summary.get('code', '?')}, finished {summary.get('finished', '?')}"
    return {m: {"scores": scores[m], "settings": (summary.get("settings") or {}).get(m, {}),
                "scored_by": (summary.get("scored_by") or {}).get(m, "this evaluation").replace("this evaluation", source)}
            for m in modes}


def evaluate_checkpoint(ck: dict, ckpt_path: Path, cfg: Config, split: str, modes: list[str], out: Path,
                        tuned: dict | None = None, keep: list[str] = ()) -> dict:
    """tuned: the tuned values per mode this evaluation runs with (see mode_settings; recorded in
    summary.json). keep: modes (of `modes`) whose scores, values and provenance are taken from the
    evaluation already in `out` instead of being computed again (the experiment runner's choice: it
    checks that they ran with the settings and tuned values these would run with)."""
    check_model_matches(ck, cfg, ckpt_path)
    parsed = check_modes(modes, cfg)
    if not any(m.name == "static" for m in parsed):  # every change is measured against the static model
        print("note: mode static added: every mode's change is measured against it")
        parsed = [Mode("static"), *parsed]
    device = resolve_device(cfg.run.device)
    tok = tokenizer_for(ckpt_path, ck)
    articles = load_articles(cfg.data, split, tok)
    articles = articles[: cfg.eval.max_articles] if cfg.eval.max_articles else articles
    if cfg.eval.boundary == "continuous" and 1 < len(articles) <= cfg.eval.batch_size:
        # each stream would read a single article: continuous reading that never crosses a boundary
        print(f"warning: eval.boundary=continuous, but {len(articles)} articles over eval.batch_size="
              f"{cfg.eval.batch_size} streams give each stream one article, so no stream reads across an article "
              f"boundary; set eval.batch_size below {len(articles)}", file=sys.stderr)
    lm = LSTMLM(cfg.model, tok.vocab_size)
    params = {k: v.to(device) for k, v in ck["params"].items()}
    if any(m.rule == "learned" for m in parsed) and "learner" not in ck:
        raise ConfigError(f"{ckpt_path}: mode 'learned' needs a checkpoint written by `dynlm metatrain`")
    runs = {m.name: (m, *mode_settings(m, cfg, tuned)) for m in parsed}
    earlier = read_earlier(out, [m.name for m in parsed if m.name in keep], articles)
    print_settings({name: values for name, (_, _, values) in runs.items() if name not in earlier}, cfg, tuned)
    ms = (grad_rms_for(run_dir_of(ckpt_path), lm, params, cfg, tok, device, model_training_data(ck, cfg))
          if any(m.rule == "dyneval" and m.name not in earlier for m in parsed) else None)
    done = ModeScoresCache(out / ".modes", params, ck.get("learner"), split)
    results = {}
    for name, (m, mode_cfg, _) in runs.items():  # each mode kept as it finishes: an interrupted run resumes
        if name in earlier:
            results[name] = earlier[name]["scores"]
            print(f"{name}: scores of the earlier evaluation in {out} kept ({earlier[name]['scored_by']})")
            continue
        results[name] = done.load(m, mode_cfg)
        if results[name] is None:
            results[name] = score_mode(m, lm, params, articles, mode_cfg, device, tok.eos_id, ms=ms,
                                       learner_state=ck.get("learner"))
            done.save(m, mode_cfg, results[name])
        else:
            print(f"{name}: scores of an earlier, interrupted run of this evaluation reused ({done.path(m)})")
    unknown = unknown_tokens(articles, tok)
    extra = {"protocol": protocol_of(cfg.eval), "checkpoint": str(ckpt_path), "split": split, **unknown,
             "eval": to_dict(cfg.eval), "code": code_digest()[:12],
             "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "settings": {name: earlier[name]["settings"] if name in earlier else
                          {k: {"value": v, "source": src} for k, (v, src) in values.items()}
                          for name, (_, _, values) in runs.items()},
             # who scored each mode: this run, or the earlier evaluation a mode was kept from
             "scored_by": {name: earlier[name]["scored_by"] if name in earlier else "this evaluation"
                           for name in runs}}
    if tuned:
        extra["tuned"] = tuned
    summary = write_results(out, results, articles, per_word=cfg.data.tokenizer != "word", tokenizer=tok,
                            extra=extra)
    done.clear()  # the results are written: a later evaluation into OUT scores afresh
    save_config(cfg, out / "config.yaml")  # what made these numbers, beside them
    print(f"\n{split}: {len(articles)} articles, {sum(len(a) for a in articles):,} tokens, protocol "
          f"{protocol_of(cfg.eval)}  ->  {out}")
    print(markdown_table(summary))
    print(unknown_note(unknown, tok, cfg.data.source))
    report = render_report(out, cfg.report)
    print(f"report: {report.message}; {', '.join(p.name for p in report.files.values())}")
    with Tracker(cfg.log, out, to_dict(cfg), job_type="evaluate") as tracker:
        tracker.log({f"eval/ppl/{m}": s["ppl"] for m, s in summary["modes"].items()})
        tracker.summary({f"eval/ppl/{m}": s["ppl"] for m, s in summary["modes"].items()})
        log_report(tracker, report)
    return summary
