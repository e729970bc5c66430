"""The config schema: one typed dataclass per section, every default and every allowed value here.

Each field declares its type, its allowed values (a Literal) and its range (Field(ge=..)) once, on the
field; pydantic checks them whenever a config is built (load_config, from_dict, a constructor or
dataclasses.replace), so no command has to check them again. Scalars are strict: `true` is not 1 and
`8` is not "8".
"""
from __future__ import annotations

import dataclasses
import functools
import re
import typing
from dataclasses import field
from typing import Annotated, Literal

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
            from .messages import describe  # (messages imports this module)
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
        from .messages import _problem  # (messages imports this module)
        hints = typing.get_type_hints(TuneConfig, include_extras=True)
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
    profile: list[str] = field(default_factory=list)  # rows to profile after timing (e.g. [learned_ff_seg20]): torch.profiler's top operators, profile_ROW.txt beside the JSON
    profile_calls: Count = 3  # timed calls per profiled row


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
