"""Tokenizers: word-level (WikiText convention) and SentencePiece, behind one interface.

Every line of an article ends with <eos>; `n_words` always counts whitespace words + one
<eos> per line, so per-word perplexities are comparable across tokenizers."""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path

import numpy as np

from .articles import Article, RawArticle
from .errors import DataError

EOS, UNK = "<eos>", "<unk>"
META = "tokenizer.json"


def count_words(raw: RawArticle) -> int:
    return sum(len(line.split()) + 1 for line in raw.lines)


class Tokenizer(ABC):
    kind: str

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def unk_id(self) -> int: ...

    @abstractmethod
    def encode_line(self, line: str) -> list[int]:
        """Ids of one line, without the trailing <eos>."""

    @abstractmethod
    def id_to_token(self, i: int) -> str: ...

    @abstractmethod
    def _save(self, out: Path) -> None: ...

    @abstractmethod
    def _fingerprint_bytes(self) -> bytes: ...

    def encode_article(self, raw: RawArticle) -> Article:
        ids: list[int] = []
        for line in raw.lines:
            ids.extend(self.encode_line(line))
            ids.append(self.eos_id)
        return Article(raw.id, raw.title, np.asarray(ids, dtype=np.int32), count_words(raw))

    def decode(self, ids) -> str:
        return " ".join(self.id_to_token(int(i)) for i in ids)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.kind.encode() + self._fingerprint_bytes()).hexdigest()[:12]

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._save(out)
        meta = {"type": self.kind, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint()}
        (out / META).write_text(json.dumps(meta, indent=1))


class WordTokenizer(Tokenizer):
    kind = "word"

    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        if EOS not in self.index or UNK not in self.index:
            raise DataError(f"word vocabulary must contain {EOS} and {UNK}")

    @classmethod
    def build(cls, train_articles: list[RawArticle]) -> "WordTokenizer":
        """Ids by descending frequency (ties: first occurrence) so adaptive-softmax cutoffs work."""
        counts: Counter = Counter()
        for a in train_articles:
            for line in a.lines:
                counts.update(line.split())
                counts[EOS] += 1
        counts.setdefault(UNK, 0)  # WikiText has <unk> as a real type; other corpora need it added
        order = {w: i for i, w in enumerate(counts)}  # Counter keeps insertion (first-seen) order
        return cls(sorted(counts, key=lambda w: (-counts[w], order[w])))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def eos_id(self) -> int:
        return self.index[EOS]

    @property
    def unk_id(self) -> int:
        return self.index[UNK]

    def encode_line(self, line: str) -> list[int]:
        get, unk = self.index.get, self.unk_id
        return [get(w, unk) for w in line.split()]

    def id_to_token(self, i: int) -> str:
        return self.vocab[i]

    def _save(self, out: Path) -> None:
        (out / "vocab.txt").write_text("\n".join(self.vocab) + "\n", encoding="utf-8")

    def _fingerprint_bytes(self) -> bytes:
        return "\n".join(self.vocab).encode()

    @classmethod
    def load(cls, d: Path) -> "WordTokenizer":
        return cls((d / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1])


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    MODEL = "sp.model"

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.model_bytes = Path(model_file).read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)

    @classmethod
    def build(cls, train_articles: list[RawArticle], vocab_size: int, model_type: str = "unigram",
              out_dir: str | Path = ".") -> "SentencePieceTokenizer":
        import sentencepiece as spm

        if model_type not in ("unigram", "bpe"):
            raise DataError(f"sp_model_type must be unigram or bpe, got {model_type!r}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "train.txt"
            with corpus.open("w", encoding="utf-8") as f:
                for a in train_articles:
                    for line in a.lines:
                        if line.strip():
                            f.write(line.strip() + "\n")
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(Path(tmp) / "sp"), vocab_size=vocab_size,
                model_type=model_type,
                # <eos> is appended per line by encode_article, never produced by the model
                unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, eos_piece=EOS, unk_piece="<sp_unk>",
                user_defined_symbols=[UNK],  # keep WikiText's literal <unk> as one piece
                input_sentence_size=200_000, shuffle_input_sentence=True,  # WikiText-2 in < 1 min
                hard_vocab_limit=False,  # small corpora may not support vocab_size pieces
                minloglevel=2,
            )
            shutil.copy(Path(tmp) / "sp.model", out / cls.MODEL)
        return cls(out / cls.MODEL)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode_line(self, line: str) -> list[int]:
        return self.sp.encode(line.strip()) if line.strip() else []

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def _save(self, out: Path) -> None:
        (out / self.MODEL).write_bytes(self.model_bytes)

    def _fingerprint_bytes(self) -> bytes:
        return self.model_bytes

    @classmethod
    def load(cls, d: Path) -> "SentencePieceTokenizer":
        return cls(d / cls.MODEL)


def load_tokenizer(d: str | Path) -> Tokenizer:
    d = Path(d)
    try:
        meta = json.loads((d / META).read_text())
    except FileNotFoundError:
        raise DataError(f"no tokenizer in {d} (missing {META})") from None
    kinds = {"word": WordTokenizer, "sentencepiece": SentencePieceTokenizer}
    if meta.get("type") not in kinds:
        raise DataError(f"{d / META}: unknown tokenizer type {meta.get('type')!r}")
    tok = kinds[meta["type"]].load(d)
    if meta.get("fingerprint") and meta["fingerprint"] != tok.fingerprint():
        raise DataError(f"tokenizer in {d} does not match its recorded fingerprint")
    return tok


def build_tokenizer(cfg, train_articles: list[RawArticle], out_dir: str | Path) -> Tokenizer:
    """Build from the training split per `cfg` (a DataConfig) and save it into out_dir."""
    if cfg.tokenizer == "word":
        tok: Tokenizer = WordTokenizer.build(train_articles)
    elif cfg.tokenizer == "sentencepiece":
        tok = SentencePieceTokenizer.build(train_articles, cfg.sp_vocab_size, cfg.sp_model_type, out_dir)
    else:
        raise DataError(f"unknown tokenizer {cfg.tokenizer!r}; valid: word, sentencepiece")
    tok.save(out_dir)
    return tok
