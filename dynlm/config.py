"""Typed configuration: every default lives here; YAML files and `--section.key=value` flags only override.

Each field declares its type, its allowed values (a Literal) and its range (Field(ge=..)) once, on the
field; pydantic checks them whenever a config is built (load_config, from_dict, a constructor or
dataclasses.replace), so no command has to check them again. Scalars are strict: `true` is not 1 and
`8` is not "8". Unknown keys and wrong values are a ConfigError of one line naming where the value came
from (the YAML file and its line, the --override, or the checkpoint) and the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class Conflict(ValueError):
    """Keys that contradict each other (raised by a config class's __post_init__, which pydantic runs after
    checking each field); `path` is the key the error names, relative to that class."""

    def __init__(self, path: tuple, message: str):
        super().__init__(message)
        self.path = path


def _device(name: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError("expected auto, cpu, cuda or cuda:N")
    return name


# The value types of the fields. Strict: YAML's `yes` or 1 is not a number, nor "8" an int (lr: 1 is a float).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Count = Annotated[int, Strict(), Field(ge=1)]  # at least one
NonNeg = Annotated[int, Strict(), Field(ge=0)]  # 0 has a meaning there: none, all or off
PosFloat = Annotated[float, Strict(), Field(gt=0)]
NonNegFloat = Annotated[float, Strict(), Field(ge=0)]
Fraction = Annotated[float, Strict(), Field(ge=0, lt=1)]  # a dropout, a decay, an interpolation weight
Share = Annotated[float, Strict(), Field(ge=0, le=1)]
Grid = Annotated[list[PosFloat], Field(min_length=1)]  # a tune grid: positive values, at least one
DecayGrid = Annotated[list[NonNegFloat], Field(min_length=1)]  # a decay's grid may start at 0: no decay, a bound, not an edge
Device = Annotated[str, AfterValidator(_device)]
Boundary = Literal["reset", "continuous"]
Split = Literal["train", "valid", "test"]

# Built configs: no extra keys, no inf/nan, and the declared defaults must obey the declared ranges too.
_SCHEMA = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)
_SECTION: dict[type, str] = {}  # config class -> its dotted prefix in Config ("rule.", "data.synthetic.")


def config_class(cls):
    """A dataclass validated by pydantic against its annotations; a bad value is a one-line ConfigError."""
    cls = _pydantic_dataclass(cls, config=_SCHEMA)
    validated_init = cls.__init__

    @functools.wraps(validated_init)
    def __init__(self, *args, **kwargs):
        try:
            validated_init(self, *args, **kwargs)
        except ValidationError as e:
            raise ConfigError(describe(e, type(self))) from None

    cls.__init__ = __init__
    return cls


@config_class
class SyntheticConfig:
    """The bundled synthetic corpus: articles with their own entities and topic words, from a seed."""
    seed: Int = 1234  # the corpus is a pure function of this seed
    n_train: NonNeg = 120  # articles per split
    n_valid: NonNeg = 16  # validation articles
    n_test: NonNeg = 16  # test articles
    min_tokens: Annotated[int, Strict(), Field(ge=10)] = 300  # article length range (tokens incl. <eos>)
    max_tokens: Annotated[int, Strict(), Field(ge=10)] = 2000  # longest article (tokens incl. <eos>)
    topic_share: Share = 0.2  # share of noun slots filled by the article's own topic words (what adaptation exploits)

    def __post_init__(self):
        if self.min_tokens > self.max_tokens:
            raise Conflict(("min_tokens",), f"{self.min_tokens} is above max_tokens={self.max_tokens}")


@config_class
class DataConfig:
    """Where the articles come from and how they become tokens (cached under cache_dir)."""
    source: Literal["synthetic", "wikitext", "hub", "text", "jsonl"] = "synthetic"  # text: PATH/SPLIT/*.txt, one article per file
    path: str = ""  # directory of wikitext files / text files / jsonl files
    hub_name: str = "Salesforce/wikitext"  # source=hub: the datasets hub repository
    hub_config: str = "wikitext-2-v1"  # any wikitext config on the hub
    tokenizer: Literal["word", "sentencepiece"] = "word"  # word: split on spaces, vocabulary from training
    sp_vocab_size: Count = 8000  # sentencepiece: pieces in the vocabulary (what the corpus allows is checked when the tokenizer is built)
    sp_model_type: Literal["unigram", "bpe"] = "unigram"  # sentencepiece: model type
    cache_dir: str = ".cache/dynlm"  # tokenized-corpus cache
    max_articles: NonNeg = 0  # 0 = all articles of a split
    meta_articles: NonNeg = 0  # the last N training articles: meta-training only, not static training (0 = shared)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # source=synthetic: the generated corpus


@config_class
class ModelConfig:
    """The LSTM language model (static weights theta0 plus the weights a rule rewrites)."""
    vocab_size: NonNeg = 0  # 0 = taken from the tokenizer
    emb_size: Count = 128  # word embedding size
    hidden_size: Count = 256  # LSTM units per layer
    n_layers: Count = 1  # LSTM layers
    softmax: Literal["full", "adaptive"] = "full"  # full (tied) | adaptive
    adaptive_cutoffs: list[Count] = field(default_factory=lambda: [2000, 10000])  # softmax=adaptive: vocabulary cluster bounds
    dropout_emb: Fraction = 0.0  # whole-word embedding dropout
    dropout_input: Fraction = 0.1  # locked dropout on the LSTM input
    dropout_hidden: Fraction = 0.1  # locked dropout between LSTM layers
    dropout_output: Fraction = 0.1  # locked dropout before the softmax
    weight_drop: Fraction = 0.0  # DropConnect on the recurrent weights (AWD-LSTM)
    init_range: NonNegFloat = 0.1  # weights start uniform in [-init_range, init_range]


@config_class
class RunConfig:
    """Where and in what precision every command computes (train, metatrain, evaluate, tune)."""
    device: Device = "auto"  # auto | cpu | cuda | cuda:N
    bf16: Bool = False  # autocast to bfloat16 (static training and evaluation; meta-training computes in float32)


@config_class
class TrainConfig:
    """`dynlm train`: the static LM, truncated BPTT over article streams, AdamW, warmup + cosine."""
    batch_size: Count = 16  # parallel article streams
    bptt: Count = 35  # chunk length (truncated BPTT)
    epochs: NonNeg = 4  # passes over the training split (max_steps / max_minutes end training earlier)
    max_steps: NonNeg = 0  # 0 = no limit
    max_minutes: NonNegFloat = 0.0  # wall-clock budget, 0 = none
    lr: NonNegFloat = 3e-3  # AdamW peak learning rate
    weight_decay: NonNegFloat = 1e-6  # AdamW weight decay
    clip: PosFloat = 0.25  # gradient norm clipping
    warmup_steps: NonNeg = 100  # linear warmup of the learning rate
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup: cosine to 5% of lr over the run | constant
    eval_every: Count = 500  # steps between validations (and at every epoch end)
    log_every: Count = 50  # steps between training-loss log lines (and at the last step)
    seed: Int = 0  # initialisation, dropout and reading order
    boundary: Boundary = "reset"  # hidden state at article starts
    max_bad_steps: Count = 5  # consecutive non-finite loss/grad steps (each skipped) before the run stops
    keep_checkpoints: Count = 3  # rotating ckpt_step*.pt files kept (plus last.pt and best.pt)


@config_class
class EvalConfig:
    """How a dynamic model reads text: `evaluate` and `tune` prequentially, segment by segment (--protocol
    sets these); `metatrain` in segments of the same length (its chunk steps), so a learner meta-trains as
    it is evaluated."""
    modes: list[str] = field(default_factory=lambda: ["static"])  # modes `dynlm demo` evaluates (evaluate: --modes)
    segment_length: Count = 20  # tokens per online update, in evaluation and meta-training alike
    batch_size: Count = 8  # parallel article streams
    boundary: Boundary = "reset"  # reset: every article from theta0 and a zero state | continuous: carried across articles
    max_articles: NonNeg = 0  # `evaluate`: score only the first N articles of the split (0 = all); cheaper runs


@config_class
class RuleConfig:
    """Online update rules. `weights` / `dyneval_weights` say which weights a rule rewrites:
    `lstm` (the LSTM weights of `layers`, empty = all layers) or `all` (also embeddings and
    softmax, one copy per stream). A mode name may override it: `dyneval@lstm`, `sgd@all`."""
    layers: list[NonNeg] = field(default_factory=list)  # LSTM layers a rule rewrites (empty = all); checked against the model's layers where one is loaded
    weights: Literal["lstm", "all"] = "lstm"  # what sgd, adam and learned rewrite
    sgd_lr: NonNegFloat = 0.05  # `sgd`: step size per segment
    dyneval_weights: Literal["lstm", "all"] = "all"  # Krause et al. rewrite every weight
    dyneval_lr: NonNegFloat = 2e-5  # Krause: dW = lamb*decrate*(theta0-theta) - lr*g/(MS+eps)
    dyneval_lamb: NonNegFloat = 2e-3  # `dyneval`: decay rate towards theta0 (lambda)
    dyneval_eps: PosFloat = 2e-5  # `dyneval`: epsilon added to MS
    grad_stat: Literal["batch", "stream"] = "batch"  # batch: Krause's gradstat, RMS of the gradient of a batch's mean loss | stream: of each stream's own
    grad_stat_streams: Count = 100  # batch: parallel training streams per gradient (Krause's 100)
    grad_rms_chunks: NonNeg = 0  # training segments averaged for MS (0 = the whole training split, as Krause)
    adam_lr: NonNegFloat = 1e-3  # `adam` control: theta' = theta0 + (1 - decay)(theta - theta0) - lr * clip(g / sqrt(v))
    adam_decay: Fraction = 1e-3  # its constant decay towards theta0 per update
    cache_window: Count = 2000  # neural cache (Grave et al. 2016): positions remembered (their WikiText-2 size)
    cache_theta: NonNegFloat = 0.3  # flatness of the cache attention exp(theta * h_t . h_i)
    cache_lambda: Fraction = 0.1  # p = (1 - lambda) p_LM + lambda p_cache
    learner: Literal["ff", "rnn"] = "ff"  # ff (feed-forward) | rnn (recurrent: previous gates, or a GRU cell if hidden > 0)
    learner_hidden: NonNeg = 0  # 0: gates linear in the features (cheap); > 0: MLP / GRU of this width
    learner_features: Literal["magnitude", "signed"] = "magnitude"  # magnitude (|g|, |step|, |drift|, agreement, F) | signed (v1); a loaded state keeps its own
    forget_bias: Float = 5.0  # sigmoid(5) = 0.993 per update: keep the weights at first
    init_lr: NonNegFloat = 3e-4  # step size of an untrained learner (per tensor, learned)
    max_step: PosFloat = 3.0  # bound on the normalised step, so updates cannot run away
    compile: Bool = True  # torch.compile the learned update of large tensors (a one-off ~30-60 s)


@config_class
class TuneConfig:
    """`dynlm tune`: grid search of each mode's rule.* values on validation text the evaluation does
    not score: after the first `skip_articles` articles of `split`, `articles` articles, or (0) as many
    as give at least `tokens` tokens. A best value on the edge of its grid extends that grid one step
    (up to `max_extensions` times per mode). Per-update rates (sgd_lr, dyneval_lr, dyneval_lamb,
    adam_lr, adam_decay) are given at `reference_segment_length` and scaled by eval.segment_length /
    reference_segment_length. A `MODE+cache` mode keeps MODE's tuned values and the cache's tuned
    theta and grid-searches `combo_axes` (the interpolation weight by default)."""
    split: Split = "valid"  # split tuned on
    articles: NonNeg = 0  # 0 = as many articles as `tokens` needs (tokens 0: the rest of the split)
    tokens: NonNeg = 30000  # Krause et al. tuned on 30k validation tokens (--gridfast)
    skip_articles: NonNeg = 0  # first articles left out (those the evaluation scores)
    modes: list[str] = field(default_factory=lambda: ["sgd", "dyneval", "cache"])  # modes tuned when --modes is not given
    reference_segment_length: Count = 5  # Krause's LSTM segment length, where his grid below lives
    sgd_lr: Grid = field(default_factory=lambda: [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2])  # grid of rule.sgd_lr
    dyneval_lr: Grid = field(default_factory=lambda: [3e-5, 4e-5, 5e-5, 6e-5, 7e-5, 1e-4])  # grid of rule.dyneval_lr (Krause's)
    dyneval_lamb: DecayGrid = field(default_factory=lambda: [1e-3, 2e-3, 3e-3, 5e-3])  # grid of rule.dyneval_lamb (Krause's)
    adam_lr: Grid = field(default_factory=lambda: [3e-5, 1e-4, 3e-4])  # grid of rule.adam_lr
    adam_decay: Annotated[list[Annotated[float, Strict(), Field(ge=0, lt=1)]], Field(min_length=1)] = field(
        default_factory=lambda: [3e-4, 1e-3, 3e-3])  # grid of rule.adam_decay
    cache_theta: Grid = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5, 0.8])  # grid of rule.cache_theta
    cache_lambda: Annotated[list[Annotated[float, Strict(), Field(gt=0, lt=1)]], Field(min_length=1)] = field(
        default_factory=lambda: [0.05, 0.1, 0.15, 0.2, 0.3])  # grid of rule.cache_lambda
    combo_axes: list[Literal["cache_theta", "cache_lambda"]] = field(
        default_factory=lambda: ["cache_lambda"])  # searched for MODE+cache
    max_extensions: NonNeg = 3  # times a grid whose best value is on its edge is extended one step
    # dyneval@lstm's rates lie far from all-weights dyneval's, whose grid it would otherwise share
    grids: dict[str, dict[str, list[Float]]] = field(default_factory=dict)  # a mode's own grids, {MODE: {AXIS: [values]}}, over the shared ones above

    def __post_init__(self):
        hints = _hints(TuneConfig)
        for mode, axes in self.grids.items():
            for axis, values in axes.items():
                if axis not in GRID_AXES:
                    raise Conflict(("grids", mode, axis), f"not a grid (grids: {', '.join(GRID_AXES)})")
                try:  # the same checks as the axis's shared grid
                    TypeAdapter(hints[axis]).validate_python(values)
                except ValidationError as e:
                    raise Conflict(("grids", mode, axis), _problem(e.errors()[0])) from None


# the tune.* grids: the TuneConfig fields named after the rule.* value they search
GRID_AXES = tuple(f.name for f in dataclasses.fields(TuneConfig)
                  if f.name in {r.name for r in dataclasses.fields(RuleConfig)})

@config_class
class MetaConfig:
    """`dynlm metatrain`: the learned update rule, trained through K-step truncated unrolls."""
    unroll: Count = 4  # K chunk steps per meta-gradient
    batch_size: Count = 16  # parallel article streams
    steps: NonNeg = 300  # meta-steps (each: unroll x eval.segment_length tokens per stream), 0 = no limit
    max_tokens: NonNeg = 0  # training tokens, 0 = no limit: max_tokens / (batch_size x unroll x eval.segment_length) meta-steps, so arms with another K read as much; the first of steps, max_tokens and max_minutes ends the run
    max_minutes: NonNegFloat = 0.0  # wall-clock budget, 0 = none
    lr: PosFloat = 3e-3  # outer Adam on the learner
    theta0_lr: NonNegFloat = 0.0  # outer Adam on theta0 (0: theta0 stays the static model's, so `static` stays comparable)
    clip: PosFloat = 1.0  # meta-gradient norm clipping
    second_order: Bool = False  # create_graph through the inner gradients
    checkpoint: Bool = False  # gradient checkpointing of chunk steps: keeps each step's inputs, so memory still grows with K (8.2x from K=4 to 64, vs 13.8x without)
    boundary: Boundary = "reset"  # reset: fast weights back to theta0 at article starts | continuous (3-level)
    ewc_lambda: NonNegFloat = 0.0  # continuous: weight of the Fisher-weighted distance of fast weights from theta0
    consolidation: Literal["ewc", "input", "penalty"] = "ewc"  # the Fisher's roles (continuous): ewc = penalty (ewc_lambda > 0) + learner input | input | penalty
    ewc_chunks: Count = 50  # training chunks for the diagonal Fisher estimate
    static_lr: NonNegFloat = 0.0  # outer Adam on embeddings/softmax too (0 = they stay the long-term memory as is)
    log_every: Count = 20  # meta-steps between log lines (and at the last)
    eval_every: NonNeg = 0  # steps between validations of learned vs static (0 = only at the end)
    valid_articles: NonNeg = 8  # validation articles for those checks (0 = all)
    checkpoint_every: Count = 100  # steps between rotating checkpoints (also on SIGINT/SIGTERM and at the end)
    keep_checkpoints: Count = 3  # rotating checkpoints kept (plus last.pt and best.pt)
    max_bad_steps: Count = 5  # consecutive non-finite meta-steps (each skipped) before the run stops
    seed: Int = 0  # learner initialisation and reading order


@config_class
class ReportConfig:
    """`dynlm report`: plots and the HTML heat-map rendered from an evaluation's tokens.parquet."""
    bin_width: Count = 50  # tokens per position bin of the improvement-vs-position curve
    stream_articles: Count = 4  # consecutive articles (A, B, C, ...) in the stream figure
    smooth_window: Count = 50  # trailing moving-average window (tokens) of the stream figure
    html_articles: NonNeg = 3  # articles shown in heatmap.html
    html_select: Literal["first", "gain"] = "first"  # first (stream order) | gain (largest mean improvement, per mode)
    html_max_tokens: Count = 2000  # tokens shown per article in heatmap.html (keeps the page small)
    color_scale: PosFloat = 1.0  # |NLL difference| in nats that gets the full blue / red


@config_class
class BenchConfig:
    """`dynlm bench`: one model (model.*), `batch_size` streams and random Zipfian tokens for every
    measurement; chunks of eval.segment_length tokens (and short_segment), meta-steps of meta.unroll
    chunks, rules as rule.* says."""
    device: Device = "auto"  # auto | cpu | cuda | cuda:N (also `dynlm bench --device`)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    threads: NonNeg = 0  # torch CPU threads, 0 = torch's default (1 avoids oversubscribing a busy machine)
    vocab_size: Annotated[int, Strict(), Field(ge=2)] = 10000  # of the random Zipfian tokens
    batch_size: Count = 8  # streams, the same for every throughput measurement
    short_segment: Count = 5  # the second evaluation segment length (Krause's)
    learner_hidden: Count = 16  # width of the extra `learned ff, hidden > 0` row
    warmup: NonNeg = 1  # untimed calls per measurement (torch.compile compiles here)
    repeats: Count = 3  # timed repeats per measurement; the median is reported
    steps: Count = 2  # chunk steps per timed call (meta-training: one meta-step per call)
    memory_unrolls: list[Count] = field(default_factory=lambda: [1, 4, 16, 64])  # unroll lengths K of the meta-step memory probes
    memory_batch_size: Count = 1  # streams in the memory probes: K=64 without checkpointing keeps 64 steps' graphs
    memory_parallel: Count = 2  # probe subprocesses at once on CPU (each measures its own RSS)
    memory_timeout_s: PosFloat = 600.0  # per memory probe subprocess
    seed: Int = 0  # of the random tokens and weights


@config_class
class LogConfig:
    """Where a run writes, and its wandb run (offline without an API key)."""
    out_dir: Annotated[str, Field(min_length=1)] = "runs/default"  # run directory (--out), taken literally: "runs/lr #1" is that directory
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto | online | offline | disabled (auto: offline without API key)
    project: str = "dynlm"  # wandb project
    entity: str = ""  # wandb entity (team or user; empty = yours)
    name: str = ""  # wandb run name (empty = generated)
    group: str = ""  # wandb group
    tags: list[str] = field(default_factory=list)  # wandb tags


@config_class
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    log: LogConfig = field(default_factory=LogConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


# Keys that contradict keys of other sections are checked by the commands they matter to, on the whole
# config: an experiment file alone (ewc.yaml without continuous.yaml) is a partial config.
def check_rule_layers(cfg: Config) -> None:
    """rule.layers may only name layers the model has (evaluate, tune, metatrain: before any work)."""
    n = cfg.model.n_layers
    missing = [layer for layer in cfg.rule.layers if layer >= n]
    if missing:
        raise ConfigError(f"rule.layers={cfg.rule.layers} names layer {missing[0]}, but the model has {n} "
                          f"layer{'s' * (n > 1)} (model.n_layers={n}: layers 0..{n - 1})")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# --- the schema, as the error messages and the override parser need it ---------------------------------
def _hints(cls) -> dict:
    return typing.get_type_hints(cls, include_extras=True)


def _bare(hint):
    """int for Annotated[int, ...]; the hint itself otherwise."""
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _sections(cls: type, prefix: str = "") -> None:
    _SECTION[cls] = prefix
    for name, hint in _hints(cls).items():
        if dataclasses.is_dataclass(_bare(hint)):
            _sections(_bare(hint), f"{prefix}{name}.")


_sections(Config)


def field_hint(path: tuple, cls: type = Config):
    """The declared type of the key at `path` (('data', 'path')), None for a key the schema lacks."""
    hint = cls
    for name in path:
        hint = _bare(hint)
        if not (dataclasses.is_dataclass(hint) and isinstance(name, str) and name in _hints(hint)):
            return None
        hint = _hints(hint)[name]
    return hint


def is_text(hint) -> bool:
    """A str-valued key (a path, a name, a choice): its override value is taken literally, never as YAML."""
    hint = _bare(hint)
    choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
    return hint is str or (bool(choices) and all(isinstance(c, str) for c in choices))


# --- one line per problem ------------------------------------------------------------------------------
def _dotted(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _list_example(value) -> str:
    """How a list is written, from what was given: 100,150 -> [100,150]."""
    text = str(value).strip()
    return f"[{text.strip('()[]')}]" if text else "[]"


def _unknown_key(loc: tuple, cls: type) -> str:
    full = tuple(filter(None, _SECTION.get(cls, "").split("."))) + tuple(loc)
    if full in MOVED:
        return f"{_dotted(full)} is now {_dotted(MOVED[full])}"
    parent = field_hint(loc[:-1], cls)
    names = list(_hints(_bare(parent))) if parent is not None else []
    section = _SECTION.get(cls, "") + _dotted(loc[:-1])
    key = f"{section}.{loc[-1]}" if section else str(loc[-1])
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    if close:
        return f"unknown config key {key} (did you mean {f'{section}.' if section else ''}{close[0]}?)"
    return f"unknown config key {key}; valid keys under {section or 'the top level'}: {', '.join(names)}"


# pydantic's error types in our words; {v} is the value given (repr), {ctx} pydantic's details of the error
_PROBLEMS = {
    "int_type": "expected int, got {v}", "int_parsing": "expected int, got {v}",
    "int_from_float": "expected int, got {v}",
    "float_type": "expected float (a number), got {v}", "float_parsing": "expected float (a number), got {v}",
    "finite_number": "expected a finite number, got {v}",
    "bool_type": "expected true/false, got {v}", "bool_parsing": "expected true/false, got {v}",
    "string_type": "expected a string, got {v} (quote it in YAML)",
    "dataclass_type": "expected a mapping of keys, got {v}",
    "dataclass_args_type": "expected a mapping of keys, got {v}",
    "string_too_short": "must not be empty",
    "too_short": "expected at least {ctx[min_length]} value(s), got {v}",
    "greater_than_equal": "must be >= {ctx[ge]}, got {v}", "greater_than": "must be > {ctx[gt]}, got {v}",
    "less_than_equal": "must be <= {ctx[le]}, got {v}", "less_than": "must be < {ctx[lt]}, got {v}",
    "value_error": "{v}: {ctx[error]}",
}


def _problem(err: dict) -> str:
    """What is wrong with the value, in the schema's words."""
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if isinstance(ctx.get("error"), Conflict):
        return str(ctx["error"])
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        return f"{value!r} is not one of {', '.join(choices)}"
    if kind in ("list_type", "list_parsing"):
        return f"expected a list, written {_list_example(value)}, got {value!r}"
    if kind in _PROBLEMS:
        return _PROBLEMS[kind].format(v=repr(value), ctx=ctx)
    return f"{err['msg']}, got {value!r}"


def _where(origins: dict | None, loc: tuple) -> str | None:
    """Where the value at `loc` (or the section holding it) came from."""
    for n in range(len(loc), 0, -1):
        if origins and loc[:n] in origins:
            return origins[loc[:n]]
    return None


def describe(e: ValidationError, cls: type = Config, origins: dict | None = None) -> str:
    """One line for the first problem of a ValidationError of `cls`: where, the key, what is wrong."""
    errors = e.errors()
    err = errors[0]
    loc = tuple(err["loc"])
    conflict = (err.get("ctx") or {}).get("error")
    if isinstance(conflict, Conflict):  # a __post_init__'s: it names its key
        loc += conflict.path
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    where = _where(origins, loc)
    if err["type"] == "unexpected_keyword_argument":
        text = _unknown_key(loc, cls)
    else:
        key = _SECTION.get(cls, "") + _dotted(loc)
        text = f"{_problem(err)}" if where == f"--{key}" else f"{key}: {_problem(err)}"
    return f"{where}: {text}{more}" if where else f"{text}{more}"


def _validated(cls, data: dict, origins: dict | None = None):
    try:
        return cls.__pydantic_validator__.validate_python(data)
    except ValidationError as e:
        raise ConfigError(describe(e, cls, origins)) from None


def from_dict(cls, data: dict, where: str = ""):
    """Build config class `cls` from a (possibly partial) nested dict, strictly; `where` names its source."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    return _validated(cls, data, {(k,): where.rstrip(": ") for k in data} if where else None)


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --- YAML: files and override values -----------------------------------------------------------------
class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not a silent override,
    and 1e-3 is a number (YAML 1.1 wants a dot: 1.0e-3), as everyone writes it."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _yaml_problem(e: yaml.YAMLError) -> tuple[str, int | None]:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return problem, (mark.line + 1 if mark is not None else None)


def _key_lines(node, path: tuple, lines: dict) -> None:
    """{('train', 'lr'): 3, ...}: the line of every key of a YAML mapping, for the error messages."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = path + (key_node.value,)
            lines[key] = key_node.start_mark.line + 1
            _key_lines(value_node, key, lines)


def load_yaml(path: str | Path) -> tuple[object, dict]:
    """A YAML file (UTF-8, a byte-order mark allowed) as (data, the line of each key); malformed YAML or a
    repeated key is a ConfigError naming the file and line."""
    path = Path(path)
    try:
        loader = _ConfigLoader(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        problem, line = _yaml_problem(e)
        raise ConfigError(f"{path}{f', line {line}' if line else ''}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()
    lines: dict = {}
    _key_lines(node, (), lines)
    return data, lines


def parse_value(raw: str, key: str):
    """An override's value for `key`: literally for str-valued keys (a path keeps its `#` and spaces),
    as YAML otherwise (numbers, true/false, [lists])."""
    hint = field_hint(tuple(key.split(".")))
    if raw == "" or (hint is not None and is_text(hint)):
        return raw
    try:
        return yaml.load(raw, Loader=_ConfigLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"--{key}={raw}: not a valid value ({_yaml_problem(e)[0]})") from None


def parse_override(text: str) -> dict:
    """'train.lr=1e-3' -> {'train': {'lr': 0.001}}; see parse_value."""
    key, sep, raw = text.lstrip("-").partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    node: dict = {}
    cur = node
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = parse_value(raw, key)
    return node


# keys that moved: a checkpoint's config is migrated; a YAML file or an override that uses the old key
# gets an error naming the new one
MOVED = {("train", "device"): ("run", "device"), ("train", "bf16"): ("run", "bf16"),
         ("meta", "chunk"): ("eval", "segment_length")}


def meta_steps(cfg: Config) -> int:
    """The meta-steps a `metatrain` run may take: the smaller of meta.steps and meta.max_tokens' worth
    (at least 1), where set; 0 when neither is (meta.max_minutes alone ends the run)."""
    m = cfg.meta
    return step_limit(m.steps, m.max_tokens, m.batch_size * m.unroll * cfg.eval.segment_length)


def step_limit(steps: int, max_tokens: int, tokens_per_step: int) -> int:
    """min(steps, max_tokens // tokens_per_step), each where set (non-zero); 0 when neither is."""
    limits = [steps] if steps else []
    if max_tokens:
        limits.append(max(1, max_tokens // tokens_per_step))
    return min(limits, default=0)


def migrate(data: dict) -> dict:
    """A config dict written by an earlier version, in today's keys (checkpoints keep their config).
    A moved key fills its new place unless the dict already sets that: meta.chunk was the chunk of
    meta-training and eval.segment_length the segment of evaluation, equal in every shipped config."""
    for (sec, key), (new_sec, new_key) in MOVED.items():
        old = data.get(sec)
        if isinstance(old, dict) and key in old:
            old = dict(old)
            value = old.pop(key)
            new = dict(data.get(new_sec) or {})
            new.setdefault(new_key, value)
            data = {**data, sec: old, new_sec: new}
    rule = data.get("rule")
    if isinstance(rule, dict) and "dyneval_all_weights" in rule:
        rule = dict(rule)
        rule["dyneval_weights"] = "all" if rule.pop("dyneval_all_weights") else "lstm"
        data = {**data, "rule": rule}
    return data


def _mark(origins: dict, data: dict, label, path: tuple = ()) -> None:
    """Record label(path) as where each key of `data` was set (later sources overwrite earlier ones)."""
    for k, v in data.items():
        origins[path + (k,)] = label(path + (k,))
        if isinstance(v, dict):
            _mark(origins, v, label, path + (k,))


def load_config(paths: list[str | Path] = (), overrides: list[str] = (), base: dict | None = None,
                base_name: str = "the checkpoint's config") -> Config:
    """Defaults <- `base` dict (e.g. a checkpoint's config, named `base_name` in errors) <- YAML files <-
    overrides, validated once, at the end: an error names the source that set the bad value last."""
    data: dict = migrate(base or {})
    origins: dict = {}
    _mark(origins, data, lambda _: base_name)
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        loaded, lines = load_yaml(p)
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections (train:, model:, ...) at top level")
        _mark(origins, loaded, lambda path, p=p, lines=lines: f"{p}, line {lines[path]}" if path in lines else str(p))
        data = merge(data, loaded)
    for o in overrides:
        node = parse_override(o)
        key = o.lstrip("-").partition("=")[0]
        _mark(origins, node, lambda _, key=key: f"--{key}")
        data = merge(data, node)
    return _validated(Config, data, origins)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
