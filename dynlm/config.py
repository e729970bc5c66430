"""Typed configuration: every default lives here; YAML files and `--section.key=value`
flags only override. Unknown keys and wrong types are errors, not surprises."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class SyntheticConfig:
    """The bundled synthetic corpus: articles with their own entities and topic words, from a seed."""
    seed: int = 1234  # the corpus is a pure function of this seed
    n_train: int = 120  # articles per split
    n_valid: int = 16  # validation articles
    n_test: int = 16  # test articles
    min_tokens: int = 300  # article length range (tokens incl. <eos>)
    max_tokens: int = 2000  # longest article (tokens incl. <eos>)
    topic_share: float = 0.2  # share of noun slots filled by the article's own topic words (what adaptation exploits)


@dataclass
class DataConfig:
    """Where the articles come from and how they become tokens (cached under cache_dir)."""
    source: Literal["synthetic", "wikitext", "hub", "text", "jsonl"] = "synthetic"  # text: PATH/SPLIT/*.txt, one article per file
    path: str = ""  # directory of wikitext files / text files / jsonl files
    hub_name: str = "Salesforce/wikitext"  # source=hub: the datasets hub repository
    hub_config: str = "wikitext-2-v1"  # any wikitext config on the hub
    tokenizer: Literal["word", "sentencepiece"] = "word"  # word: split on spaces, vocabulary from training
    sp_vocab_size: int = 8000  # sentencepiece: pieces in the vocabulary
    sp_model_type: Literal["unigram", "bpe"] = "unigram"  # sentencepiece: model type
    cache_dir: str = ".cache/dynlm"  # tokenized-corpus cache
    max_articles: int = 0  # 0 = all articles of a split
    meta_articles: int = 0  # the last N training articles: meta-training only, not static training (0 = shared)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # source=synthetic: the generated corpus


@dataclass
class ModelConfig:
    """The LSTM language model (static weights theta0 plus the weights a rule rewrites)."""
    vocab_size: int = 0  # 0 = taken from the tokenizer
    emb_size: int = 128  # word embedding size
    hidden_size: int = 256  # LSTM units per layer
    n_layers: int = 1  # LSTM layers
    softmax: Literal["full", "adaptive"] = "full"  # full (tied) | adaptive
    adaptive_cutoffs: list[int] = field(default_factory=lambda: [2000, 10000])  # softmax=adaptive: vocabulary cluster bounds
    dropout_emb: float = 0.0  # whole-word embedding dropout
    dropout_input: float = 0.1  # locked dropout on the LSTM input
    dropout_hidden: float = 0.1  # locked dropout between LSTM layers
    dropout_output: float = 0.1  # locked dropout before the softmax
    weight_drop: float = 0.0  # DropConnect on the recurrent weights (AWD-LSTM)
    init_range: float = 0.1  # weights start uniform in [-init_range, init_range]


@dataclass
class TrainConfig:
    """`dynlm train`: the static LM, truncated BPTT over article streams, AdamW, warmup + cosine."""
    batch_size: int = 16  # parallel article streams
    bptt: int = 35  # chunk length (truncated BPTT)
    epochs: int = 4  # passes over the training split (max_steps / max_minutes end training earlier)
    max_steps: int = 0  # 0 = no limit
    max_minutes: float = 0.0  # wall-clock budget, 0 = none
    lr: float = 3e-3  # AdamW peak learning rate
    weight_decay: float = 1e-6  # AdamW weight decay
    clip: float = 0.25  # gradient norm clipping
    warmup_steps: int = 100  # linear warmup of the learning rate
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup: cosine to 5% of lr over the run | constant
    eval_every: int = 500  # steps between validations (and at every epoch end)
    log_every: int = 50  # steps between training-loss log lines (and at the last step)
    seed: int = 0  # initialisation, dropout and reading order
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = False  # autocast to bfloat16
    boundary: Literal["reset", "continuous"] = "reset"  # hidden state at article starts
    max_bad_steps: int = 5  # consecutive non-finite loss/grad steps (each skipped) before the run stops
    keep_checkpoints: int = 3  # rotating ckpt_step*.pt files kept (plus last.pt and best.pt)


@dataclass
class EvalConfig:
    """How `evaluate` and `tune` read a split: prequential, segment by segment (--protocol sets these)."""
    modes: list[str] = field(default_factory=lambda: ["static"])  # modes `dynlm demo` evaluates (evaluate: --modes)
    segment_length: int = 20  # tokens per online update: meta.chunk's default, so every method reads alike
    batch_size: int = 8  # parallel article streams
    boundary: Literal["reset", "continuous"] = "reset"  # reset: every article from theta0 and a zero state | continuous: carried across articles
    max_articles: int = 0  # `evaluate`: score only the first N articles of the split (0 = all); cheaper runs


@dataclass
class RuleConfig:
    """Online update rules. `weights` / `dyneval_weights` say which weights a rule rewrites:
    `lstm` (the LSTM weights of `layers`, empty = all layers) or `all` (also embeddings and
    softmax, one copy per stream). A mode name may override it: `dyneval@lstm`, `sgd@all`."""
    layers: list[int] = field(default_factory=list)  # LSTM layers a rule rewrites (empty = all)
    weights: Literal["lstm", "all"] = "lstm"  # what sgd, adam and learned rewrite
    sgd_lr: float = 0.05  # `sgd`: step size per segment
    dyneval_weights: Literal["lstm", "all"] = "all"  # Krause et al. rewrite every weight
    dyneval_lr: float = 2e-5  # Krause: dW = lamb*decrate*(theta0-theta) - lr*g/(MS+eps)
    dyneval_lamb: float = 2e-3  # `dyneval`: decay rate towards theta0 (lambda)
    dyneval_eps: float = 2e-5  # `dyneval`: epsilon added to MS
    grad_stat: Literal["batch", "stream"] = "batch"  # batch: Krause's gradstat, RMS of the gradient of a batch's mean loss | stream: of each stream's own
    grad_stat_streams: int = 100  # batch: parallel training streams per gradient (Krause's 100)
    grad_rms_chunks: int = 0  # training segments averaged for MS (0 = the whole training split, as Krause)
    adam_lr: float = 1e-3  # `adam` control: theta' = theta0 + (1 - decay)(theta - theta0) - lr * clip(g / sqrt(v))
    adam_decay: float = 1e-3  # its constant decay towards theta0 per update
    cache_window: int = 2000  # neural cache (Grave et al. 2016): positions remembered (their WikiText-2 size)
    cache_theta: float = 0.3  # flatness of the cache attention exp(theta * h_t . h_i)
    cache_lambda: float = 0.1  # p = (1 - lambda) p_LM + lambda p_cache
    learner: Literal["ff", "rnn"] = "ff"  # ff (feed-forward) | rnn (recurrent: previous gates, or a GRU cell if hidden > 0)
    learner_hidden: int = 0  # 0: gates linear in the features (cheap); > 0: MLP / GRU of this width
    learner_features: Literal["magnitude", "signed"] = "magnitude"  # magnitude (|g|, |step|, |drift|, agreement, F) | signed (v1); a loaded state keeps its own
    forget_bias: float = 5.0  # sigmoid(5) = 0.993 per update: keep the weights at first
    init_lr: float = 3e-4  # step size of an untrained learner (per tensor, learned)
    max_step: float = 3.0  # bound on the normalised step, so updates cannot run away
    compile: bool = True  # torch.compile the learned update of large tensors (a one-off ~30-60 s)


@dataclass
class TuneConfig:
    """`dynlm tune`: grid search of each mode's rule.* values on validation text the evaluation does
    not score: after the first `skip_articles` articles of `split`, `articles` articles, or (0) as many
    as give at least `tokens` tokens. A best value on the edge of its grid extends that grid one step
    (up to `max_extensions` times per mode). Per-update rates (sgd_lr, dyneval_lr, dyneval_lamb,
    adam_lr, adam_decay) are given at `reference_segment_length` and scaled by eval.segment_length /
    reference_segment_length. A `MODE+cache` mode keeps MODE's tuned values and the cache's tuned
    theta and grid-searches `combo_axes` (the interpolation weight by default)."""
    split: str = "valid"  # split tuned on
    articles: int = 0  # 0 = as many articles as `tokens` needs (tokens 0: the rest of the split)
    tokens: int = 30000  # Krause et al. tuned on 30k validation tokens (--gridfast)
    skip_articles: int = 0  # first articles left out (those the evaluation scores)
    modes: list[str] = field(default_factory=lambda: ["sgd", "dyneval", "cache"])  # modes tuned when --modes is not given
    reference_segment_length: int = 5  # Krause's LSTM segment length, where his grid below lives
    sgd_lr: list[float] = field(default_factory=lambda: [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2])  # grid of rule.sgd_lr
    dyneval_lr: list[float] = field(default_factory=lambda: [3e-5, 4e-5, 5e-5, 6e-5, 7e-5, 1e-4])  # grid of rule.dyneval_lr (Krause's)
    dyneval_lamb: list[float] = field(default_factory=lambda: [1e-3, 2e-3, 3e-3, 5e-3])  # grid of rule.dyneval_lamb (Krause's)
    adam_lr: list[float] = field(default_factory=lambda: [3e-5, 1e-4, 3e-4])  # grid of rule.adam_lr
    adam_decay: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])  # grid of rule.adam_decay
    cache_theta: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5, 0.8])  # grid of rule.cache_theta
    cache_lambda: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.15, 0.2, 0.3])  # grid of rule.cache_lambda
    combo_axes: list[str] = field(default_factory=lambda: ["cache_lambda"])  # searched for MODE+cache
    max_extensions: int = 3  # times a grid whose best value is on its edge is extended one step


@dataclass
class MetaConfig:
    """`dynlm metatrain`: the learned update rule, trained through K-step truncated unrolls."""
    unroll: int = 4  # K chunk steps per meta-gradient
    chunk: int = 20  # tokens per chunk step (the online segment length)
    batch_size: int = 16  # parallel article streams
    steps: int = 300  # meta-steps (each: unroll x chunk tokens per stream)
    max_minutes: float = 0.0  # wall-clock budget, 0 = none
    lr: float = 3e-3  # outer Adam on the learner
    theta0_lr: float = 0.0  # outer Adam on theta0 (0: theta0 stays the static model's, so `static` stays comparable)
    clip: float = 1.0  # meta-gradient norm clipping
    second_order: bool = False  # create_graph through the inner gradients
    checkpoint: bool = False  # gradient checkpointing of chunk steps: memory flat in the unroll length
    boundary: Literal["reset", "continuous"] = "reset"  # reset: fast weights back to theta0 at article starts | continuous (3-level)
    ewc_lambda: float = 0.0  # continuous: weight of the Fisher-weighted distance of fast weights from theta0
    ewc_chunks: int = 50  # training chunks for the diagonal Fisher estimate
    static_lr: float = 0.0  # outer Adam on embeddings/softmax too (0 = they stay the long-term memory as is)
    log_every: int = 20  # meta-steps between log lines (and at the last)
    eval_every: int = 0  # steps between validations of learned vs static (0 = only at the end)
    valid_articles: int = 8  # validation articles for those checks (0 = all)
    checkpoint_every: int = 100  # steps between rotating checkpoints (also on SIGINT/SIGTERM and at the end)
    keep_checkpoints: int = 3  # rotating checkpoints kept (plus last.pt and best.pt)
    max_bad_steps: int = 5  # consecutive non-finite meta-steps (each skipped) before the run stops
    seed: int = 0  # learner initialisation and reading order


@dataclass
class ReportConfig:
    """`dynlm report`: plots and the HTML heat-map rendered from an evaluation's tokens.parquet."""
    bin_width: int = 50  # tokens per position bin of the improvement-vs-position curve
    stream_articles: int = 4  # consecutive articles (A, B, C, ...) in the stream figure
    smooth_window: int = 50  # trailing moving-average window (tokens) of the stream figure
    html_articles: int = 3  # articles shown in heatmap.html
    html_select: Literal["first", "gain"] = "first"  # first (stream order) | gain (largest mean improvement, per mode)
    html_max_tokens: int = 2000  # tokens shown per article in heatmap.html (keeps the page small)
    color_scale: float = 1.0  # |NLL difference| in nats that gets the full blue / red


@dataclass
class BenchConfig:
    """`dynlm bench`: one model (model.*), `batch_size` streams and random Zipfian tokens for every
    measurement; chunks of eval.segment_length tokens (and short_segment), meta-steps of meta.unroll
    chunks, rules as rule.* says."""
    device: str = "auto"  # auto | cpu | cuda | cuda:N (also `dynlm bench --device`)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    threads: int = 0  # torch CPU threads, 0 = torch's default (1 avoids oversubscribing a busy machine)
    vocab_size: int = 10000  # of the random Zipfian tokens
    batch_size: int = 8  # streams, the same for every throughput measurement
    short_segment: int = 5  # the second evaluation segment length (Krause's)
    learner_hidden: int = 16  # width of the extra `learned ff, hidden > 0` row
    warmup: int = 1  # untimed calls per measurement (torch.compile compiles here)
    repeats: int = 3  # timed repeats per measurement; the median is reported
    steps: int = 2  # chunk steps per timed call (meta-training: one meta-step per call)
    memory_unrolls: list[int] = field(default_factory=lambda: [1, 4, 16, 64])  # unroll lengths K of the meta-step memory probes
    memory_batch_size: int = 1  # streams in the memory probes: K=64 without checkpointing keeps 64 steps' graphs
    memory_parallel: int = 2  # probe subprocesses at once on CPU (each measures its own RSS)
    memory_timeout_s: float = 600.0  # per memory probe subprocess
    seed: int = 0  # of the random tokens and weights


@dataclass
class LogConfig:
    """Where a run writes, and its wandb run (offline without an API key)."""
    out_dir: str = "runs/default"  # run directory (--out)
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto | online | offline | disabled (auto: offline without API key)
    project: str = "dynlm"  # wandb project
    entity: str = ""  # wandb entity (team or user; empty = yours)
    name: str = ""  # wandb run name (empty = generated)
    group: str = ""  # wandb group
    tags: list[str] = field(default_factory=list)  # wandb tags


@dataclass
class Config:
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


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _check_value(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin is Literal:  # a choice: declared once, on the field
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_value(v, item_hint, f"{where}[]") for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _looks_numeric(value):
        return float(value)  # YAML 1.1 reads 3e-5 (no dot) as a string, in files and in lists alike
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a (possibly partial) nested dict, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; "
            f"valid keys under '{where or '.'}': {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _check_value(value, hint, f"{where}{name}")
    return cls(**kwargs)


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """'train.lr=1e-3' -> {'train': {'lr': 0.001}}; the value is parsed as YAML."""
    key, sep, raw = text.lstrip("-").partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    value = yaml.safe_load(raw) if raw != "" else ""
    if isinstance(value, str) and raw.strip() and _looks_numeric(raw):
        value = float(raw)  # yaml reads '1e-3' as a string
    node: dict = {}
    cur = node
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return node


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not a silent override."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(path: Path) -> dict:
    """A config file as a dict; malformed YAML or a repeated key is a ConfigError naming the file and line."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None


def migrate(data: dict) -> dict:
    """A config dict written by an earlier version, in today's keys (checkpoints keep their config)."""
    rule = data.get("rule")
    if isinstance(rule, dict) and "dyneval_all_weights" in rule:
        rule = dict(rule)
        rule["dyneval_weights"] = "all" if rule.pop("dyneval_all_weights") else "lstm"
        data = {**data, "rule": rule}
    return data


def load_config(paths: list[str | Path] = (), overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults <- `base` dict (e.g. a checkpoint's config) <- YAML files <- overrides."""
    data: dict = migrate(base or {})
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        loaded = _load_yaml(p)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at top level")
        try:
            from_dict(Config, merge(data, loaded))
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        data = merge(data, loaded)
    for o in overrides:
        data = merge(data, parse_override(o))
    return from_dict(Config, data)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
