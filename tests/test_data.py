"""Data layer tests: strict article splitting, every source, tokenizers, cache, clear errors."""
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dynlm.config import DataConfig, SyntheticConfig
from dynlm.data import (
    DataError, RawArticle, SentencePieceTokenizer, WordTokenizer, build_tokenizer, count_words,
    load_articles, load_hub_split, load_raw_split, load_tokenizer, read_wikitext_dir,
    split_wikitext_articles, synthetic_articles,
)

WT2 = Path(os.environ.get("DYNLM_WIKITEXT2", Path(__file__).resolve().parents[2] / "shared/data/wikitext-2"))
needs_wt2 = pytest.mark.skipif(not (WT2 / "valid.txt").is_file() and not (WT2 / "wiki.valid.tokens").is_file(),
                               reason=f"WikiText-2 not found at {WT2} (set DYNLM_WIKITEXT2)")

LINES = [
    " ", " = Alpha = ", " ", " Alpha is a thing . ", " ",
    " = = History = = ", " ", " It was made . ",
    " = Not a title = ",  # regex matches, but no blank lines around it: stays inside Alpha
    " more text . ", " ",
    " = Beta = ", " ", " Beta too . ", " ",
]


def ntok(arts):
    return sum(count_words(a) for a in arts)


# ---------------------------------------------------------------- strict splitting
def test_strict_split_small():
    arts = split_wikitext_articles(LINES, "valid")
    assert [a.title for a in arts] == ["Alpha", "Beta"]
    assert [a.id for a in arts] == ["valid/00000", "valid/00001"]
    assert arts[0].lines[0] == " " and " = Not a title = " in arts[0].lines
    assert sum(len(a.lines) for a in arts) == len(LINES)  # every line in exactly one article


def test_preamble_and_no_title_warn():
    with pytest.warns(UserWarning):
        arts = split_wikitext_articles([" intro text "] + LINES, "train")
    assert [a.title for a in arts] == ["train", "Alpha", "Beta"]
    with pytest.warns(UserWarning):
        arts = split_wikitext_articles([" just text ", " ", " = Fake = ", " more "], "test")
    assert len(arts) == 1 and arts[0].title == "test" and len(arts[0].lines) == 4


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"wiki\.test\.tokens.*test\.txt|test\.txt"):
        read_wikitext_dir(tmp_path, "test")
    (tmp_path / "train.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_wikitext_dir(tmp_path, "train")
    (tmp_path / "valid.txt").write_bytes(b" \n = A = \n \n ok \xff\xfe bad\n")
    with pytest.raises(DataError, match=r"valid\.txt.*byte offset 16"):
        read_wikitext_dir(tmp_path, "valid")
    (tmp_path / "wiki.test.tokens").write_text("\n".join(LINES) + "\n")
    assert len(read_wikitext_dir(tmp_path, "test")) == 2


@needs_wt2
def test_wikitext2_counts():
    train, valid = read_wikitext_dir(WT2, "train"), read_wikitext_dir(WT2, "valid")
    assert (len(train), len(valid)) == (600, 60)
    assert (ntok(train), ntok(valid)) == (2_088_628, 217_646)
    assert train[0].title == "Valkyria Chronicles III"
    tok = WordTokenizer.build(train)
    assert tok.vocab_size == 33_278
    enc = tok.encode_article(valid[0])
    assert len(enc) == enc.n_words == count_words(valid[0])


# ---------------------------------------------------------------- sources
def _write_parquet(root, rows_by_split):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = root / "wikitext-2-v1"
    d.mkdir(parents=True)
    for split, rows in rows_by_split.items():
        pq.write_table(pa.table({"text": rows}), d / f"{split}-00000-of-00001.parquet")


def test_hub_local_parquet(tmp_path):
    # hub rows: file lines with "\n", blank lines as ""
    rows = ["" if line == " " else line + "\n" for line in LINES]
    _write_parquet(tmp_path, {"train": rows, "validation": rows[:5]})
    arts = load_hub_split("Salesforce/wikitext", "wikitext-2-v1", "train", data_files=tmp_path)
    assert arts == split_wikitext_articles(LINES, "train")
    cfg = DataConfig(source="hub", path=str(tmp_path))
    assert [a.title for a in load_raw_split(cfg, "valid")] == ["Alpha"]
    with pytest.raises(DataError, match="test"):
        load_raw_split(cfg, "test")


def test_text_dir(tmp_path):
    (tmp_path / "train" / "sub").mkdir(parents=True)
    (tmp_path / "train" / "a.txt").write_text("\n = First Title = \nbody one two\n")
    (tmp_path / "train" / "sub" / "b_2.txt").write_text("A whole first paragraph that is not a title at all.\nmore\n")
    arts = load_raw_split(DataConfig(source="text", path=str(tmp_path)), "train")
    # a WikiText heading is the title, else the file name, never the first paragraph (issue 17)
    assert [(a.id, a.title) for a in arts] == [("train/a.txt", "First Title"), ("train/sub/b_2.txt", "b_2")]
    assert arts[0].lines == ("", " = First Title = ", "body one two")
    with pytest.raises(DataError, match="valid"):
        load_raw_split(DataConfig(source="text", path=str(tmp_path)), "valid")
    (tmp_path / "train" / "c.txt").write_bytes(b"ok\n\xc3(\n")
    with pytest.raises(DataError, match=r"c\.txt.*byte offset 3"):
        load_raw_split(DataConfig(source="text", path=str(tmp_path)), "train")


def test_text_layout_error_states_the_whole_layout_once(tmp_path):
    """Issue 17: a flat folder of .txt files failed on train/, then on valid/, one folder at a time."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "essay.txt").write_text("some words\n")
    with pytest.raises(DataError) as err:
        load_raw_split(DataConfig(source="text", path=str(tmp_path / "mine")), "train")
    msg = str(err.value)
    assert "\n" not in msg and "has no train/ or valid/ or test/ folder; it holds 1 .txt file(s) directly" in msg
    for split in ("train", "valid", "test"):
        assert f"{tmp_path / 'mine' / split}/" in msg
    assert "only the scored split" in msg and "--split test" in msg and "the file name is the title" in msg
    (tmp_path / "mine" / "test").mkdir()
    with pytest.raises(DataError, match=r"has no train/ or valid/ folder"):
        load_raw_split(DataConfig(source="text", path=str(tmp_path / "mine")), "valid")
    with pytest.raises(DataError, match="does not exist"):
        load_raw_split(DataConfig(source="text", path=str(tmp_path / "nope")), "test")


def test_jsonl(tmp_path):
    recs = [{"text": "line one\nline two", "title": "T1", "id": "x"}, {"text": "solo"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "valid").mkdir()
    (tmp_path / "valid" / "part.jsonl").write_text(json.dumps({"text": "v"}) + "\n")
    cfg = DataConfig(source="jsonl", path=str(tmp_path))
    arts = load_raw_split(cfg, "train")
    assert [(a.id, a.title, a.lines) for a in arts] == [
        ("train/x", "T1", ("line one", "line two")), ("train/00001", "solo", ("solo",))]
    assert len(load_raw_split(cfg, "valid")) == 1
    assert len(load_raw_split(DataConfig(source="jsonl", path=str(tmp_path / "train.jsonl")), "train")) == 2
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_raw_split(cfg, "test")


@pytest.mark.parametrize("line,message", [
    ('{"title": "B", "text": 5}', "'text' must be a string, got 5"),
    ('{"title": "B"}', "no 'text' field"),
    ('{"text": "x", "title": 3}', "'title' must be a string or null, got 3"),
    ('{"text": "x", "id": true}', "'id' must be a string, an integer or null, got true"),
    ('["text", "x"]', "expected a JSON object"),
    ('{"text": "x",', "not valid JSON"),
])
def test_a_bad_jsonl_record_is_one_line_naming_the_file_and_line(tmp_path, line, message):
    """Issue 16, kind 6: not an AttributeError deep in data/local.py."""
    (tmp_path / "train.jsonl").write_text('{"title": "A", "text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_raw_split(DataConfig(source="jsonl", path=str(tmp_path)), "train")
    assert f"train.jsonl, line 2: {message}" in str(e.value) and "\n" not in str(e.value)


def test_the_bad_record_from_the_command_line_touches_nothing(tmp_path, capsys):
    from dynlm.cli import main

    for split in ("train", "valid"):
        (tmp_path / f"{split}.jsonl").write_text('{"title": "A", "text": "a b c"}\n{"title": "B", "text": 5}\n')
    assert main(["train", "--out", str(tmp_path / "run"), "--data.source=jsonl", f"--data.path={tmp_path}",
                 f"--data.cache_dir={tmp_path / 'cache'}", "--log.wandb_mode=disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dynlm train: error: {tmp_path / 'train.jsonl'}, line 2: 'text' must be a string, got 5"
    assert not (tmp_path / "run").exists()


def test_inputs_are_utf8_whatever_the_locale_and_a_byte_order_mark_is_not_text(tmp_path):
    """Issue 16, kind 5 (the data side): a BOM at the start of a text, JSONL or WikiText file is dropped, and
    byte offsets of bad UTF-8 still count it."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "cafe.txt").write_bytes(bom + " = Café = \nLe café est noir .\n".encode())
    [art] = load_raw_split(DataConfig(source="text", path=str(tmp_path)), "train")  # a heading titles it (issue 17)
    assert art.title == "Café" and art.lines[0] == " = Café = "  # with the BOM it would be the file name, cafe
    (tmp_path / "train.jsonl").write_bytes(bom + '{"title": "Café", "text": "crème"}\n'.encode())
    [art] = load_raw_split(DataConfig(source="jsonl", path=str(tmp_path / "train.jsonl")), "train")
    assert (art.title, art.lines) == ("Café", ("crème",))
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / "train.txt").write_bytes(bom + b" \n = Cafe = \n \n x \xc3( \n")
    with pytest.raises(DataError, match=r"train\.txt: invalid UTF-8 at byte offset 21"):  # 3 of them the BOM
        read_wikitext_dir(tmp_path / "wt", "train")
    (tmp_path / "wt" / "train.txt").write_bytes(bom + " \n = Café = \n \n x \n".encode())
    assert [a.title for a in read_wikitext_dir(tmp_path / "wt", "train")] == ["Café"]


def test_unknown_source_and_split():
    from dynlm.config import ConfigError
    with pytest.raises(ConfigError, match="data.source: 'nope' is not one of synthetic, wikitext"):
        DataConfig(source="nope")  # the choices are the field's, checked as the config is built
    with pytest.raises(DataError, match="valid splits"):
        load_raw_split(DataConfig(), "dev")
    assert len(load_raw_split(DataConfig(max_articles=3), "train")) == 3


# ---------------------------------------------------------------- synthetic corpus
SMALL = SyntheticConfig(n_train=30, n_valid=8, n_test=8)


def test_synthetic_deterministic_and_wikitext_shaped():
    a, b = synthetic_articles(SMALL, "train"), synthetic_articles(SMALL, "train")
    assert a == b
    assert synthetic_articles(SyntheticConfig(seed=7, n_train=30), "train") != a
    joined = [line for art in a for line in art.lines]
    assert split_wikitext_articles(joined, "train") == a  # the strict rule recovers the articles
    for art in a:
        assert SMALL.min_tokens <= count_words(art) <= SMALL.max_tokens + 200
        assert all(line.endswith(" . ") for line in art.lines if line.strip() and "=" not in line)


def test_synthetic_entities_and_topics_are_article_specific():
    splits = {s: synthetic_articles(SMALL, s) for s in ("train", "valid", "test")}
    arts = [a for s in splits.values() for a in s]
    counts = [Counter(w for line in a.lines[3:] for w in line.split()) for a in arts]
    df = Counter(w for c in counts for w in c)  # in how many articles a word occurs
    # the title entity is fresh: unique to its article (so disjoint across splits), and recurs in it
    mains = [(a.title.split()[0], c) for a, c in zip(arts, counts)]
    assert all(df[m] == 1 and c[m] >= 1 for m, c in mains)
    assert np.median([c[m] for m, c in mains]) >= 10
    # words frequent inside one article but rare across articles (topics/entities) carry much mass
    bursty = []
    for c in counts:
        n = sum(c.values())
        bursty.append(sum(k for w, k in c.items() if k >= 3 and df[w] <= 0.1 * len(arts)) / n)
    assert np.mean(bursty) > 0.15
    # valid entities are not train entities
    train_words = set().union(*counts[: len(splits["train"])])
    assert not {a.title.split()[0] for a in splits["valid"]} & train_words


# ---------------------------------------------------------------- tokenizers
def test_word_tokenizer_roundtrip(tmp_path):
    train = split_wikitext_articles(LINES, "train")
    tok = WordTokenizer.build(train)
    assert tok.id_to_token(0) == "=" or tok.id_to_token(0) == "<eos>"  # most frequent first
    enc = tok.encode_article(train[0])
    assert enc.ids.dtype == np.int32 and enc.n_words == count_words(train[0]) == len(enc)
    assert (enc.ids == tok.eos_id).sum() == len(train[0].lines)
    assert tok.decode(enc.ids).split() == " <eos> ".join(train[0].lines).split() + ["<eos>"]
    oov = tok.encode_article(RawArticle("x", "x", (" Alpha zzz ",)))
    assert list(oov.ids) == [tok.index["Alpha"], tok.unk_id, tok.eos_id]
    tok.save(tmp_path)
    tok2 = load_tokenizer(tmp_path)
    assert tok2.vocab == tok.vocab and tok2.fingerprint() == tok.fingerprint()
    assert WordTokenizer.build(train[:1]).fingerprint() != tok.fingerprint()


def test_sentencepiece_tokenizer(tmp_path):
    train = synthetic_articles(SyntheticConfig(n_train=6, max_tokens=600), "train")
    cfg = DataConfig(tokenizer="sentencepiece", sp_vocab_size=200)
    tok = build_tokenizer(cfg, train, tmp_path)
    assert 100 <= tok.vocab_size <= 200 and tok.id_to_token(tok.eos_id) == "<eos>"
    enc = tok.encode_article(train[0])
    assert enc.n_words == count_words(train[0]) and len(enc) >= enc.n_words
    assert (enc.ids == tok.eos_id).sum() == len(train[0].lines)
    tok2 = load_tokenizer(tmp_path)
    assert isinstance(tok2, SentencePieceTokenizer) and tok2.fingerprint() == tok.fingerprint()
    assert np.array_equal(tok2.encode_article(train[0]).ids, enc.ids)


# ---------------------------------------------------------------- cache
def test_cache_hit(tmp_path, monkeypatch):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), max_articles=5)
    tok = WordTokenizer.build(load_raw_split(cfg, "train"))
    first = load_articles(cfg, "valid", tok)
    monkeypatch.setattr(WordTokenizer, "encode_article", lambda *a: pytest.fail("re-tokenized"))
    second = load_articles(cfg, "valid", tok)
    assert [(a.id, a.title, a.n_words) for a in first] == [(a.id, a.title, a.n_words) for a in second]
    assert all(np.array_equal(a.ids, b.ids) and b.ids.dtype == np.int32 for a, b in zip(first, second))
    with pytest.raises(pytest.fail.Exception):  # another split/max_articles is another key
        load_articles(DataConfig(cache_dir=cfg.cache_dir, max_articles=4), "valid", tok)


def test_empty_split_is_an_error_naming_it():
    with pytest.raises(DataError, match="'valid' split of data.source=synthetic has no articles"):
        load_raw_split(DataConfig(synthetic=SyntheticConfig(n_valid=0)), "valid")
