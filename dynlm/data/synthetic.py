"""A fair miniature of Wikipedia for dynamic LMs, generated from a seed (no corpus text).

What a static LM can learn: a shared ~1500-word background vocabulary (Zipfian, with
part-of-speech templates, so word order is predictable). What only adaptation can
exploit: each article has its own entities (fresh made-up names that occur in no other
article, plus a handful from a shared pool of ~2000) and ~30 topic words (from a pool
of ~3000) that recur heavily inside the article but are unpredictable across articles.
Lines follow WikiText: ' = Title = ' and ' = = Section = = ' between ' ' lines,
paragraphs of space-separated tokens, sentences ending with ' . '."""
from __future__ import annotations

import random
from functools import lru_cache

from ..config import SyntheticConfig
from .articles import RawArticle
from .errors import DataError

SPLITS = ("train", "valid", "test")
FUNCTION_WORDS = {  # real function words keep the text readable
    "D": ["the", "a", "its", "this", "their", "each", "an", "that"],
    "P": ["of", "in", "on", "with", "by", "from", "to", "for", "at", "during", "after", "near"],
    "C": ["and", "but", "while", "although", "because"],
}
N_BACKGROUND = {"N": 700, "V": 350, "A": 300, "R": 100}  # + function words ~ 1500 types
N_TOPIC_POOL, N_ENTITY_POOL = 3000, 2000
TOPIC_PER_ARTICLE = 30
# Part-of-speech templates: E entity, T topic word, N noun, V verb, A adjective, R adverb.
TEMPLATES = [
    "E V D N P D T", "D T P E V D A N", "E R V D A T", "D A N V D T P D N",
    "P D T , E V D N", "D T V A C D N V R", "E V D T P D A N , C E V D N",
    "D N P E V D T", "D A T P D N V P E", "E C E V D N P D T",
    "D N V D A N P D N", "P D A N , D T V D N", "E , D A N P D T , V D N",
    "D T P D T V A", "E V P D A N C V D T",
]
SECTIONS = ["history", "description", "background", "reception", "legacy", "career",
            "geography", "design", "early life", "development", "aftermath", "notes"]
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
          "gr", "kl", "st", "th", "sh", "tr", "h", "j"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
CODAS = ["", "", "n", "r", "s", "l", "k", "th", "m"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def _words(rng: random.Random, n: int, sylls: tuple[int, int], suffix: str, taken: set) -> list[str]:
    out = []
    while len(out) < n:
        w = "".join(_syllable(rng) for _ in range(rng.randint(*sylls))) + suffix
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def _zipf_cum(n: int, s: float = 1.0) -> list[float]:
    cum, total = [], 0.0
    for r in range(1, n + 1):
        total += 1.0 / r**s
        cum.append(total)
    return cum


@lru_cache(maxsize=4)
def _lexicon(seed: int, n_fresh: tuple[int, ...]):
    """Word pools shared by all splits, and fresh entity names, disjoint per split."""
    rng = random.Random(f"dynlm-synthetic-lexicon/{seed}")
    taken = {w for ws in FUNCTION_WORDS.values() for w in ws} | {w for s in SECTIONS for w in s.split()}
    # suffixes mimic English morphology so the static model can learn word classes
    bg = {
        "N": _words(rng, N_BACKGROUND["N"], (1, 2), "", taken),
        "V": _words(rng, N_BACKGROUND["V"], (1, 2), "ed", taken),
        "A": _words(rng, N_BACKGROUND["A"], (1, 2), "al", taken),
        "R": _words(rng, N_BACKGROUND["R"], (1, 2), "ly", taken),
    }
    topic_pool = _words(rng, N_TOPIC_POOL, (2, 3), "", taken)
    entity_pool = _words(rng, N_ENTITY_POOL, (2, 3), "", taken)
    fresh = {split: _words(rng, n, (2, 4), "", taken) for split, n in zip(SPLITS, n_fresh)}
    return bg, topic_pool, entity_pool, fresh


MAX_FRESH = 6


def synthetic_articles(cfg: SyntheticConfig, split: str) -> list[RawArticle]:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for the synthetic corpus; valid: {', '.join(SPLITS)}")
    counts = (cfg.n_train, cfg.n_valid, cfg.n_test)
    bg, topic_pool, entity_pool, fresh = _lexicon(cfg.seed, tuple(n * MAX_FRESH for n in counts))
    bg_cum = {k: _zipf_cum(len(v)) for k, v in bg.items()}
    fn_cum = {k: _zipf_cum(len(v), 0.8) for k, v in FUNCTION_WORDS.items()}
    n = counts[SPLITS.index(split)]
    arts = []
    for i in range(n):
        rng = random.Random(f"dynlm-synthetic/{cfg.seed}/{split}/{i}")
        names = fresh[split][i * MAX_FRESH:(i + 1) * MAX_FRESH][: rng.randint(3, MAX_FRESH)]
        entities = names + rng.sample(entity_pool, rng.randint(2, 5))
        topics = rng.sample(topic_pool, TOPIC_PER_ARTICLE)
        lines = _article_lines(rng, rng.randint(cfg.min_tokens, cfg.max_tokens), cfg.topic_share, entities, topics,
                               bg, bg_cum, fn_cum)
        if i == 0:
            lines.insert(0, " ")  # like WikiText: the file starts with a blank line
        arts.append(RawArticle(f"{split}/{i:05d}", lines[0 if i else 1][3:-3], tuple(lines)))
    return arts


def _article_lines(rng, target, topic_share, entities, topics, bg, bg_cum, fn_cum) -> list[str]:
    ent_cum = _zipf_cum(len(entities), 1.2)  # the main subject dominates
    top_cum = _zipf_cum(len(topics), 0.9)

    def word(slot: str) -> str:
        if slot == "E":
            return rng.choices(entities, cum_weights=ent_cum)[0]
        if slot == "T" or (slot == "N" and rng.random() < topic_share):
            return rng.choices(topics, cum_weights=top_cum)[0]
        if slot in FUNCTION_WORDS:
            return rng.choices(FUNCTION_WORDS[slot], cum_weights=fn_cum[slot])[0]
        if slot in bg:
            return rng.choices(bg[slot], cum_weights=bg_cum[slot])[0]
        return slot  # punctuation

    title = " ".join(entities[: rng.randint(1, 2)])
    lines = [f" = {title} = ", " "]
    n_tok = sum(len(x.split()) + 1 for x in lines)
    sections = rng.sample(SECTIONS, len(SECTIONS))
    paragraphs_left = rng.randint(1, 3)  # the lead section
    while n_tok < target:
        if paragraphs_left == 0 and sections and target - n_tok > 60:
            lines += [f" = = {sections.pop().capitalize()} = = ", " "]
            n_tok += len(lines[-2].split()) + 2
            paragraphs_left = rng.randint(1, 4)
        sents = []
        for _ in range(rng.randint(2, 6)):
            sents.append(" ".join(word(s) for s in rng.choice(TEMPLATES).split()) + " .")
        lines += [" " + " ".join(sents) + " ", " "]
        n_tok += len(lines[-2].split()) + 2
        paragraphs_left = max(0, paragraphs_left - 1)
    return lines
