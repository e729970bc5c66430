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
    return build_tokenizer(cfg.data, load_raw_split(cfg.data, "train"), tok_dir)  # saved atomically


def prepare_data(cfg: Config, run_dir: Path, splits: list[str], role: str = "") -> tuple[Tokenizer, dict[str, list[Article]]]:
    """role 'static' or 'meta': which share of the training articles that stage reads (data.meta_articles)."""
    tok = prepare_tokenizer(cfg, run_dir)
    out = {s: load_articles(cfg.data, s, tok) for s in splits}
    if "train" in out and role:
        out["train"] = training_share(out["train"], cfg.data.meta_articles, role)
    return tok, out


def training_share(articles: list[Article], meta_articles: int, role: str) -> list[Article]:
    """The last `meta_articles` training articles are meta-training's alone: the learner then learns
    to adapt on text the static model has not memorised, as it will have to at test time."""
    if not meta_articles:
        return articles
    if not 0 < meta_articles < len(articles):
        raise DataError(f"data.meta_articles={meta_articles} must be between 1 and the {len(articles)} "
                        "training articles minus one (0 = static and meta-training both read them all)")
    return articles[:-meta_articles] if role == "static" else articles[-meta_articles:]
