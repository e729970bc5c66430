"""Data layer: corpora -> articles (text lines) -> token ids, one article at a time."""
from .articles import Article, RawArticle
from .errors import DataError
from .hub import load_hub_split
from .local import load_jsonl, load_text_dir
from .sources import SOURCES, SPLITS, load_articles, load_raw_split
from .synthetic import synthetic_articles
from .tokenizers import (
    EOS,
    UNK,
    SentencePieceTokenizer,
    Tokenizer,
    WordTokenizer,
    build_tokenizer,
    count_words,
    load_tokenizer,
)
from .wikitext import read_wikitext_dir, split_wikitext_articles

__all__ = [
    "Article", "RawArticle", "DataError", "load_hub_split", "load_jsonl", "load_text_dir",
    "SOURCES", "SPLITS", "load_articles", "load_raw_split", "synthetic_articles", "EOS", "UNK",
    "SentencePieceTokenizer", "Tokenizer", "WordTokenizer", "build_tokenizer", "count_words",
    "load_tokenizer", "read_wikitext_dir", "split_wikitext_articles",
]
