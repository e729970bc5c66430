"""One entry point per split: raw articles from any source, and tokenized articles (cached)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .articles import Article, RawArticle
from .errors import DataError
from .hub import load_hub_split
from .local import load_jsonl, load_text_dir
from .synthetic import synthetic_articles
from .wikitext import read_wikitext_dir

SOURCES = ("synthetic", "wikitext", "hub", "text", "jsonl")
SPLITS = ("train", "valid", "test")
CACHE_VERSION = 1  # bump when the cached format or tokenization semantics change


def load_raw_split(cfg, split: str) -> list[RawArticle]:
    """Articles of `split` from `cfg.source` (a DataConfig), truncated to cfg.max_articles."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if cfg.source in ("wikitext", "text", "jsonl") and not cfg.path:
        raise DataError(f"data.source={cfg.source} needs data.path (a directory or file)")
    if cfg.source == "synthetic":
        arts = synthetic_articles(cfg.synthetic, split)
    elif cfg.source == "wikitext":
        arts = read_wikitext_dir(cfg.path, split)
    elif cfg.source == "hub":  # data.path, if set, is a local copy of the hub's parquet files
        arts = load_hub_split(cfg.hub_name, cfg.hub_config, split, data_files=cfg.path or None)
    elif cfg.source == "text":
        arts = load_text_dir(cfg.path, split)
    else:
        arts = load_jsonl(cfg.path, split)
    if not arts:  # nothing to read would otherwise surface later as an obscure layout error
        where = f" ({cfg.path})" if cfg.path else ""
        raise DataError(f"the {split!r} split of data.source={cfg.source}{where} has no articles")
    return arts[: cfg.max_articles] if cfg.max_articles > 0 else arts


def _files_signature(path: str) -> list:
    """Sizes and mtimes of the corpus files, so edited files invalidate the cache."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def cache_key(cfg, split: str, tokenizer) -> str:
    key = {"v": CACHE_VERSION, "source": cfg.source, "split": split, "tok": tokenizer.fingerprint(),
           "max_articles": cfg.max_articles}
    if cfg.source == "synthetic":
        key["synthetic"] = dataclasses.asdict(cfg.synthetic)
    elif cfg.source == "hub" and not cfg.path:
        key["hub"] = [cfg.hub_name, cfg.hub_config]
    else:
        key["path"] = str(Path(cfg.path).resolve())
        key["files"] = _files_signature(cfg.path)
        if cfg.source == "hub":
            key["hub_config"] = cfg.hub_config
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _save(path: Path, arts: list[Article]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(a) for a in arts], dtype=np.int64)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, ids=np.concatenate([a.ids for a in arts]) if arts else np.zeros(0, np.int32),
                 lengths=lengths, n_words=np.array([a.n_words for a in arts], dtype=np.int64),
                 art_ids=np.array([a.id for a in arts], dtype=str),
                 titles=np.array([a.title for a in arts], dtype=str))
        os.replace(tmp, path)  # atomic: readers never see a half-written cache
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(path: Path) -> list[Article]:
    with np.load(path, allow_pickle=False) as z:
        ids, lengths = z["ids"], z["lengths"]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return [Article(str(i), str(t), ids[offsets[k]:offsets[k + 1]], int(n))
                for k, (i, t, n) in enumerate(zip(z["art_ids"], z["titles"], z["n_words"]))]


def load_articles(cfg, split: str, tokenizer) -> list[Article]:
    """Tokenized articles of `split`, from cfg.cache_dir when this exact corpus+tokenizer was seen."""
    path = Path(cfg.cache_dir) / f"{cfg.source}-{split}-{cache_key(cfg, split, tokenizer)}.npz"
    if path.is_file():
        try:
            return _load(path)
        except Exception:  # a corrupt cache is rebuilt, never fatal
            path.unlink(missing_ok=True)
    arts = [tokenizer.encode_article(a) for a in load_raw_split(cfg, split)]
    _save(path, arts)
    return arts
