"""Tokenizers: word-level (WikiText convention) and SentencePiece, behind one interface.

Every line of an article ends with <eos>; `n_words` always counts whitespace words + one
<eos> per line, so per-word perplexities are comparable across tokenizers."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
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
        """Write the tokenizer into `out_dir` atomically: into a temporary sibling directory first, then
        renamed into place, so a failed or interrupted save never leaves a half-built tokenizer behind
        (a rerun would take it for the run's own and fail on it)."""
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            self._save(tmp)
            meta = {"type": self.kind, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint()}
            (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _replace_dir(new: Path, old: Path) -> None:
    """Rename directory `new` to `old`, replacing whatever `old` held (a rename over a non-empty directory
    fails, so the old one is moved aside first and removed after)."""
    if not old.exists():
        os.replace(new, old)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{old.name}.", suffix=".old", dir=old.parent))
    os.replace(old, aside / old.name)
    os.replace(new, old)
    shutil.rmtree(aside, ignore_errors=True)


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
              out_dir: str | Path | None = None) -> "SentencePieceTokenizer":
        """Train on the training articles, in a temporary directory (nothing is written elsewhere; `save`
        it). A vocab_size below what the corpus needs is a DataError saying the smallest it allows; one
        above what it supports gives fewer pieces, with a note. `out_dir` is ignored (kept for callers)."""
        import sentencepiece as spm

        if model_type not in ("unigram", "bpe"):
            raise DataError(f"sp_model_type must be unigram or bpe, got {model_type!r}")
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "train.txt"
            with corpus.open("w", encoding="utf-8") as f:
                for a in train_articles:
                    for line in a.lines:
                        if line.strip():
                            f.write(line.strip() + "\n")
            try:
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
            except RuntimeError as e:
                raise DataError(_sentencepiece_problem(e, vocab_size)) from None
            tok = cls(Path(tmp) / "sp.model")
        if tok.vocab_size < vocab_size:
            print(f"note: data.sp_vocab_size={vocab_size} is more than this training text supports; the "
                  f"tokenizer has {tok.vocab_size} pieces, the largest it allows", file=sys.stderr)
        return tok

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


def _sentencepiece_problem(e: RuntimeError, vocab_size: int) -> str:
    """sentencepiece's RuntimeError (a C++ assertion) as one line in our terms."""
    text = str(e)
    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", text)
    if m:
        return (f"data.sp_vocab_size={vocab_size} is below the smallest size this training text allows, "
                f"{m.group(2)} (one piece per character it uses, plus <eos> and the unknown pieces); "
                f"set data.sp_vocab_size={m.group(2)} or more")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"sentencepiece could not build a tokenizer with data.sp_vocab_size={vocab_size}: {(lines or ['?'])[-1][:300]}"


def load_tokenizer(d: str | Path) -> Tokenizer:
    d = Path(d)
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
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
    """Build from the training split per `cfg` (a DataConfig) and save it into out_dir (atomically: a
    failed build leaves nothing there)."""
    if cfg.tokenizer == "sentencepiece":
        tok: Tokenizer = SentencePieceTokenizer.build(train_articles, cfg.sp_vocab_size, cfg.sp_model_type)
    else:  # data.tokenizer is word or sentencepiece (config/schema.py)
        tok = WordTokenizer.build(train_articles)
    tok.save(out_dir)
    return tok
