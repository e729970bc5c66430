"""Evaluation modes and protocols: what a column of a comparison table means.

A mode is `RULE[@WEIGHTS][+cache]`:

- RULE: `static` (no update), `sgd`, `dyneval` (Krause et al.'s RMS rule with a decay prior),
  `adam` (the learned rule's update family with hand-set values: the control for meta-learning),
  `learned` (the meta-learned rule), or `cache` alone (the static model with the neural cache);
- `@lstm` / `@all`: which weights the rule rewrites (default: rule.dyneval_weights for dyneval,
  rule.weights for the others);
- `+cache`: the neural cache of Grave et al. on top, keyed by the *adapted* model's hidden states
  and mixed with the adapted model's distribution.

A protocol says how a split is read; every comparison table names it:

- `article`: each article from theta0 and a zero state (reset at article boundaries), segments of
  20 tokens (read by 16 parallel streams by default; with resets their number changes no score):
  the paper's 2-level setting;
- `krause`: one stream through the whole split, never reset, segments of 5 tokens: Krause et al.'s
  dynamic evaluation protocol.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, EvalConfig

RULE_MODES = ("static", "sgd", "dyneval", "adam", "learned")
WEIGHTS = ("lstm", "all")
PRESETS = Path(__file__).parent / "presets"
PROTOCOLS = {  # the eval settings that define each protocol (the presets hold them, and a default stream count)
    # every article from theta0 and a zero state: how many streams read them in parallel changes nothing
    "article": {"segment_length": 20, "boundary": "reset"},
    "krause": {"segment_length": 5, "batch_size": 1, "boundary": "continuous"},
}


@dataclass(frozen=True)
class Mode:
    rule: str  # one of RULE_MODES
    weights: str | None = None  # lstm | all | None (the config's default for the rule)
    cache: bool = False

    @property
    def name(self) -> str:
        if self.rule == "static" and self.cache and self.weights is None:
            return "cache"
        return self.rule + (f"@{self.weights}" if self.weights else "") + ("+cache" if self.cache else "")

    @property
    def adapts(self) -> bool:
        return self.rule != "static"

    @property
    def base(self) -> "Mode":
        """The same mode without the cache (whose tuned values a `+cache` mode starts from)."""
        return Mode(self.rule, self.weights, False)


# the rule.* values each rule is tuned over (`dynlm tune`); a `+cache` mode adds the cache's
RULE_KEYS = {"static": (), "sgd": ("sgd_lr",), "dyneval": ("dyneval_lr", "dyneval_lamb"),
             "adam": ("adam_lr", "adam_decay"), "learned": ()}
CACHE_KEYS = ("cache_theta", "cache_lambda")


def tuned_keys(mode: Mode) -> tuple[str, ...]:
    """The rule.* values that `dynlm tune` chooses for this mode (and `evaluate` takes from tuned.yaml)."""
    return RULE_KEYS[mode.rule] + (CACHE_KEYS if mode.cache else ())


def parse_mode(text: str) -> Mode:
    """'dyneval@lstm+cache' -> Mode('dyneval', 'lstm', True); a bad name is a ConfigError."""
    raw = text.strip()
    body, plus, extra = raw.partition("+")
    if plus and extra != "cache":
        raise ConfigError(f"mode {raw!r}: only '+cache' can be added to a mode")
    rule, at, weights = body.partition("@")
    if rule == "cache" and not at:
        if plus:
            raise ConfigError(f"mode {raw!r}: 'cache' already is the static model with the cache")
        return Mode("static", None, True)
    if rule not in RULE_MODES:
        raise ConfigError(f"unknown mode {raw!r}; modes are RULE[@lstm|@all][+cache] with RULE one of "
                          f"{', '.join(RULE_MODES)}, or cache")
    if at and weights not in WEIGHTS:
        raise ConfigError(f"mode {raw!r}: adapted weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if at and rule == "static":
        raise ConfigError(f"mode {raw!r}: the static model adapts no weights")
    return Mode(rule, weights or None, bool(plus))


def parse_modes(modes) -> list[Mode]:
    """Modes from a list or a comma-separated string; at least one, no duplicates."""
    items = [m for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    if not items:
        raise ConfigError("no modes given")
    parsed = [parse_mode(m) for m in items]
    names = [m.name for m in parsed]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"mode(s) given twice: {', '.join(dup)}")
    return parsed


def protocol_preset(name: str) -> Path:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
    return PRESETS / f"protocol_{name}.yaml"


def protocol_slug(e: EvalConfig) -> str:
    """A file-name form of the protocol: `article`, `krause`, or e.g. `seg35-8streams-reset`."""
    name = protocol_of(e)
    return name if name in PROTOCOLS else f"seg{e.segment_length}-{e.batch_size}streams-{e.boundary}"


def protocol_of(e: EvalConfig) -> str:
    """The protocol an evaluation ran under, by its settings: `article`, `krause`, or a description."""
    for name, settings in PROTOCOLS.items():
        if all(getattr(e, k) == v for k, v in settings.items()):
            return name
    return (f"custom ({e.batch_size} stream{'s' * (e.batch_size != 1)}, segment {e.segment_length}, "
            f"{e.boundary} at article boundaries)")
