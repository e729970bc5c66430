"""Data and tokenizer set-up shared by every command that reads a corpus."""
from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..data.articles import Article
from ..data.errors import DataError
from ..data.sources import load_articles, load_raw_split
from ..data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer


def prepare_tokenizer(cfg: Config, run_dir: Path) -> Tokenizer:
    """The run's tokenizer: loaded from run_dir/tokenizer, or built from the training split."""
    tok_dir = run_dir / "tokenizer"
    if tok_dir.exists():
        tok = load_tokenizer(tok_dir)
        if tok.kind != cfg.data.tokenizer:  # reusing a run dir with another tokenizer setting
            raise DataError(f"{tok_dir} holds a {tok.kind} tokenizer but data.tokenizer={cfg.data.tokenizer}; "
                            "use a fresh --out directory (or remove that tokenizer)")
        return tok
    tok = build_tokenizer(cfg.data, load_raw_split(cfg.data, "train"), tok_dir)
    tok.save(tok_dir)
    return tok


def prepare_data(cfg: Config, run_dir: Path, splits: list[str]) -> tuple[Tokenizer, dict[str, list[Article]]]:
    tok = prepare_tokenizer(cfg, run_dir)
    return tok, {s: load_articles(cfg.data, s, tok) for s in splits}
