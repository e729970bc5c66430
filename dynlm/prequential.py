"""Per-article, per-token evaluation of a language model on an article stream.

Every target token is scored once, prequentially, with the state the model had
before seeing it. The `mode` column names the method; `static` is the 1-level model.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from .cache import CacheSettings, cache_step, clear_rows, empty_cache
from .data.articles import Article
from .textio import open_csv, write_json
from .data.streams import StreamLayout
from .model import LSTMLM, Params
from .progress import progress
from .rules.base import Rule, StaticRule
from .unroll import Stepper


@dataclass
class TokenScores:
    article: np.ndarray  # (N,) index into the article list
    position: np.ndarray  # (N,) position in the article
    token: np.ndarray  # (N,) target token id
    nll: np.ndarray  # (N,) float64 negative log-likelihood in nats
    seconds: float = 0.0
    drift: np.ndarray | None = None  # (C, 3): tokens read, mean and max over streams of the relative weight drift

    def sorted(self) -> "TokenScores":
        order = np.lexsort((self.position, self.article))
        return TokenScores(self.article[order], self.position[order], self.token[order], self.nll[order], self.seconds,
                           self.drift)


DRIFT_EVERY_TOKENS = 200  # tokens per stream between drift measurements (each one pass over the fast weights)


def relative_drift(fast: Params, theta0: Params, theta0_sq: Tensor | None = None) -> Tensor:
    """||theta - theta0|| / ||theta0|| over all adapted weights, per stream: (B,). theta0_sq: the
    denominator's sum of squares, when the caller keeps it (it does not change while reading)."""
    num = sum(torch.linalg.vector_norm((w - theta0[k]).flatten(1), dim=1).square() for k, w in fast.items())
    den = theta0_sq if theta0_sq is not None else sum(theta0[k].square().sum() for k in fast)
    return (num / den).sqrt()


def score(
    lm: LSTMLM, params: Params, articles: list[Article], *, eos_id: int, segment_length: int,
    batch_size: int, boundary: str = "reset", device=torch.device("cpu"), bf16: bool = False,
    rule: Rule | None = None, names: list[str] = (), desc: str = "static", cache: CacheSettings | None = None,
) -> TokenScores:
    """Prequential per-token NLL of `articles` read as B streams, adapting with `rule` and,
    with `cache`, mixing in the neural cache over each stream's recent hidden states."""
    rule = rule or StaticRule()
    layout = StreamLayout(articles, batch_size, segment_length, eos_id, pad_articles=boundary == "reset")
    weights = {k: v.detach() for k, v in params.items()}
    stepper = Stepper(lm, weights, {k: weights[k] for k in names}, rule, boundary=boundary, bf16=bf16)
    theta0 = stepper.theta0
    reader = stepper.start(layout.n_streams, device)
    memory = empty_cache(layout.n_streams, cache.window, lm.sizes[-1], device, stepper.dtype) if cache else None
    cols: list[list[np.ndarray]] = [[], [], [], []]
    drift, tokens_read = [], 0
    drift_every = max(1, DRIFT_EVERY_TOKENS // segment_length)  # chunks
    theta0_sq = sum(theta0[k].square().sum() for k in reader.fast) if reader.fast else None
    start = time.perf_counter()
    for i, chunk in enumerate(progress(layout, desc=desc, leave=False)):
        chunk = chunk.to(device)
        if memory is not None and boundary == "reset":  # the stepper resets the streams themselves
            memory = clear_rows(memory, chunk.new_article)
        nll, reader, stats = stepper.step(reader, chunk)
        if memory is not None:
            nll, memory = cache_step(memory, stats["out"], nll, chunk.targets, chunk.mask, cache)
        m = chunk.mask
        for col, t in zip(cols, (chunk.article[m], chunk.position[m], chunk.targets[m], nll[m].double())):
            col.append(t.cpu().numpy())
        tokens_read += int(m.sum())
        if reader.fast and (i % drift_every == 0 or i == len(layout) - 1):  # can the weights run away?
            # first apply the decay a sparse row update (rules.base.LazyRows) holds back
            reader.fast, reader.rule_state = rule.materialise(reader.fast, theta0, reader.rule_state)
            d = relative_drift(reader.fast, theta0, theta0_sq)[m.any(1)]
            if len(d):
                drift.append((tokens_read, float(d.mean()), float(d.max())))
    scores = TokenScores(*(np.concatenate(c) for c in cols), seconds=time.perf_counter() - start,
                         drift=np.array(drift) if drift else None)
    expected = sum(len(a) for a in articles)
    assert len(scores.nll) == expected, f"scored {len(scores.nll)} tokens, expected {expected}"
    return scores.sorted()


EARLY_TOKENS = 100  # summary.json's ppl_first100: the first tokens of every article


def perplexity(nll_sum: float, n: int) -> float:
    """exp(mean NLL); inf when that overflows (a rule whose weights diverged), not an OverflowError."""
    if not n:
        return float("nan")
    return math.exp(nll_sum / n) if nll_sum / n < 709 else float("inf")


def per_article_rows(mode: str, articles: list[Article], scores: TokenScores, per_word: bool) -> list[dict]:
    sums = np.bincount(scores.article, weights=scores.nll, minlength=len(articles))
    rows = []
    for i, a in enumerate(articles):
        row = {"mode": mode, "article_id": a.id, "title": a.title, "n_tokens": len(a),
               "nll_sum": float(sums[i]), "ppl": perplexity(float(sums[i]), len(a))}
        if per_word:
            row.update(n_words=a.n_words, word_ppl=perplexity(float(sums[i]), a.n_words))
        rows.append(row)
    return rows


def summarize(results: dict[str, TokenScores], articles: list[Article], per_word: bool) -> dict:
    n_tokens = sum(len(a) for a in articles)
    modes = {}
    for mode, s in results.items():
        total = float(s.nll.sum())
        early = s.position < EARLY_TOKENS  # just after an article boundary: where carried memory helps or hurts
        modes[mode] = {"ppl": perplexity(total, n_tokens), "nll_per_token": total / n_tokens,
                       f"ppl_first{EARLY_TOKENS}": perplexity(float(s.nll[early].sum()), int(early.sum())),
                       "n_tokens": n_tokens, "n_articles": len(articles),
                       "seconds": s.seconds, "tokens_per_s": n_tokens / s.seconds if s.seconds else None}
        if s.drift is not None:  # relative weight drift ||theta - theta0|| / ||theta0||: bounded or not
            modes[mode]["weight_drift"] = {"final_mean": float(s.drift[-1, 1]), "max": float(s.drift[:, 2].max())}
        if per_word:
            modes[mode]["word_ppl"] = perplexity(total, sum(a.n_words for a in articles))
    if "static" in modes:
        for m in modes.values():
            m["rel_change_vs_static"] = m["ppl"] / modes["static"]["ppl"] - 1
    return {"modes": modes}


def write_results(out_dir: Path, results: dict[str, TokenScores], articles: list[Article], per_word: bool,
                  tokenizer=None, extra: dict | None = None) -> dict:
    """per_article.csv, summary.json (strict JSON: a non-finite value, e.g. the perplexity of a mode that
    diverged, is recorded as null) and tokens.parquet (one NLL column per mode; with `tokenizer`
    also a `text` column and the tokenizer kind / <eos> text in the file metadata, for the report)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for mode, s in results.items() for r in per_article_rows(mode, articles, s, per_word)]
    with open_csv(out_dir / "per_article.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = {**summarize(results, articles, per_word), **(extra or {})}  # extra: e.g. the tuned values used
    write_json(out_dir / "summary.json", summary)  # strict JSON: a diverged (inf/nan) perplexity is null
    first = next(iter(results.values()))
    table = {"article_id": [articles[i].id for i in first.article], "position": first.position,
             "token": first.token}
    metadata = None
    if tokenizer is not None:
        # decode each distinct id once; the report colours tokens by their text
        ids, inverse = np.unique(first.token, return_inverse=True)
        table["text"] = np.array([tokenizer.id_to_token(int(i)) for i in ids], dtype=object)[inverse]
        metadata = {"dynlm.tokenizer": tokenizer.kind, "dynlm.eos_text": tokenizer.id_to_token(tokenizer.eos_id)}
    table.update({f"nll_{mode}": s.nll for mode, s in results.items()})
    pq.write_table(pa.table(table, metadata=metadata), out_dir / "tokens.parquet")
    drift = [(mode, int(t), mean, top) for mode, s in results.items() if s.drift is not None
             for t, mean, top in s.drift.tolist()]
    if drift:  # the weight-drift trajectory of each adaptive mode, for the report
        with open_csv(out_dir / "drift.csv", "w") as f:
            w = csv.writer(f)
            w.writerow(["mode", "tokens_read", "drift_mean", "drift_max"])
            w.writerows(drift)
    return summary


def read_scores(out_dir: Path, modes: list[str], articles: list[Article], summary: dict | None = None
                ) -> dict[str, TokenScores]:
    """The scores of `modes` that write_results left in out_dir (tokens.parquet, summary.json, drift.csv),
    as score returned them, for an evaluation that keeps them beside new modes; `summary`: out_dir's
    summary.json when the caller has read it already. ValueError when the directory scored other tokens
    than `articles` hold (other articles, another tokenizer)."""
    table = pq.read_table(out_dir / "tokens.parquet")
    summary = summary if summary is not None else json.loads((out_dir / "summary.json").read_text())
    index = {a.id: i for i, a in enumerate(articles)}
    ids = table.column("article_id").to_pylist()
    if any(i not in index for i in ids):
        raise ValueError(f"{out_dir}: scored articles that this evaluation does not read")
    article = np.array([index[i] for i in ids], dtype=np.int64)
    position, token = table.column("position").to_numpy(), table.column("token").to_numpy()
    want_token = np.concatenate([a.ids for a in articles]) if articles else np.zeros(0, np.int64)
    want_article = np.repeat(np.arange(len(articles)), [len(a) for a in articles])
    if not (np.array_equal(article, want_article) and np.array_equal(token, want_token)):
        raise ValueError(f"{out_dir}: scored other tokens than this evaluation reads")
    drift: dict[str, list] = {}
    if (out_dir / "drift.csv").is_file():
        with open_csv(out_dir / "drift.csv") as f:
            for r in csv.DictReader(f):
                drift.setdefault(r["mode"], []).append((float(r["tokens_read"]), float(r["drift_mean"]),
                                                        float(r["drift_max"])))
    found = {}
    for mode in modes:
        m = summary["modes"][mode]
        seconds = m.get("seconds") or (m["n_tokens"] / m["tokens_per_s"] if m.get("tokens_per_s") else 0.0)
        found[mode] = TokenScores(article, position, token, table.column(f"nll_{mode}").to_numpy(), seconds,
                                  np.array(drift[mode]) if mode in drift else None)
    return found


def markdown_table(summary: dict) -> str:
    lines = ["| mode | ppl | vs static | tokens | tokens/s |", "|---|---|---|---|---|"]
    for mode, m in summary["modes"].items():
        rel = m.get("rel_change_vs_static")
        tps = m.get("tokens_per_s")
        lines.append(f"| {mode} | {m['ppl']:.2f} | {'' if rel is None else f'{100 * rel:+.1f}%'} | "
                     f"{m['n_tokens']} | {'' if tps is None else f'{tps:.0f}'} |")
    return "\n".join(lines)
