"""The experiments of Wolf, Chaumond & Delangue (2018) that `dynlm experiment` runs: per experiment,
its YAML override files (experiments/*.yaml; the defaults stay in config/schema.py) at each scale, the modes
it evaluates, the baselines it tunes and the arms it compares. Light to import (the CLI lists it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS_DIR = REPO / "experiments"
RESULTS_FILE = EXPERIMENTS_DIR / "RESULTS.md"
README_FILE = REPO / "README.md"
SCALES = ("cpu", "paper")
CORPUS = {"cpu": "WikiText-2", "paper": "WikiText-103"}
WORD_VOCAB = {"cpu": 33_278, "paper": 267_735}  # WikiText-2 / WikiText-103 word vocabularies (with <eos>)
SPLIT = "valid"  # every experiment reports validation perplexity; test stays untouched
# the compared baselines, each tuned: Krause's dynamic evaluation of all weights and of the LSTM weights
# only (the same weights as the learned rule), plain SGD, the `adam` control (the learned rule's update
# family with hand-set values), the neural cache, and the cache on top of each dynamic method
# (in the order they are tuned and evaluated: the most telling first, so that a stopped run has them)
BASELINES = ("dyneval", "dyneval@lstm", "cache", "dyneval+cache", "adam", "sgd", "adam+cache", "sgd+cache")
PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


def experiment_file(name: str) -> Path:
    """An experiment's YAML file: experiments/NAME, or a preset of the package (protocol_krause.yaml)."""
    own = EXPERIMENTS_DIR / name
    return own if own.exists() or not (PRESETS_DIR / name).exists() else PRESETS_DIR / name

Files = tuple[str, ...] | dict[str, tuple[str, ...]]  # the same files at both scales, or per scale


def at_scale(files: Files, scale: str) -> tuple[str, ...]:
    return files.get(scale, ()) if isinstance(files, dict) else files


# Base static models. Experiments naming the same base (or bases whose settings coincide) share one
# checkpoint; at paper scale the multilayer base is the main 3-layer model itself.
BASES: dict[str, dict[str, tuple[str, ...]]] = {
    "word": {"cpu": ("wt2_cpu_static.yaml",), "paper": ("wt103_paper_static.yaml",)},
    "sentencepiece": {"cpu": ("wt2_cpu_static.yaml", "wt2_cpu_sentencepiece.yaml"),
                      "paper": ("wt103_paper_static.yaml", "wt103_paper_sentencepiece.yaml")},
    "multilayer": {"cpu": ("wt2_cpu_static.yaml", "wt2_cpu_2layer.yaml"), "paper": ("wt103_paper_static.yaml",)},
}
META_FILES = {"cpu": ("wt2_cpu_meta.yaml",), "paper": ("wt103_paper_meta.yaml",)}  # every learned experiment
ABLATION_BUDGET = {"cpu": ("wt2_cpu_ablation.yaml",), "paper": ("wt103_paper_ablation.yaml",)}
SUITE_EVAL = {"cpu": ("wt2_cpu_suite_eval.yaml",)}  # the CPU suite scores 2-level and baselines on a subset


@dataclass(frozen=True)
class Arm:
    """One configuration compared within an experiment (its own meta-training run and evaluation)."""
    name: str  # also its directory name under RUNS/experiments/SCALE/EXPERIMENT/
    files: Files = ()


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    modes: tuple[str, ...]  # evaluated per article on valid
    base: str = "word"  # key of BASES
    tune: tuple[str, ...] = ()  # baselines grid-searched before the evaluation
    files: Files = ()  # over the base (+ meta) files, for every arm
    arms: tuple[Arm, ...] = (Arm("main"),)

    @property
    def learner(self) -> bool:
        """Whether a mode reads a meta-trained learner (`learned`, `learned@all`, `learned+cache`, ...)."""
        return any(m.split("+")[0].split("@")[0] == "learned" for m in self.modes)


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in [
    Experiment("1-level", "static LSTM LM (short-term memory only)", ("static",)),
    # the meta files too, for their eval settings: every dynamic method reads at one segment length,
    # so the baselines are tuned (once, on the shared base) at the length the learned rule uses
    Experiment("baselines", "dynamic evaluation (SGD; RMS + decay prior) and the neural cache, tuned, "
               "on the base model", ("static", *BASELINES), tune=BASELINES,
               files={s: (*META_FILES[s], *SUITE_EVAL.get(s, ())) for s in SCALES}),
    Experiment("2-level", "LSTM + meta-learner rewriting the LSTM weights, reset at article boundaries "
               "(the `article` protocol), against every tuned baseline",
               ("static", "learned", *BASELINES[:3], "learned+cache", *BASELINES[3:]),
               tune=(*BASELINES[:3], "learned+cache", *BASELINES[3:]),
               files=SUITE_EVAL),
    # the learned rule on the weights faithful dyneval adapts (embeddings, LSTM and softmax per stream),
    # on the base and articles of 2-level: its dyneval is the same-weights baseline (tuned there), and
    # adam@all the control for meta-learning (the learned rule's update family on the same weights,
    # two values tuned, nothing meta-trained)
    Experiment("2-level-all", "LSTM + meta-learner rewriting every weight (embeddings, LSTM and softmax, "
               "per stream, as Krause et al.'s dynamic evaluation does), against its update family with "
               "tuned constant gates on the same weights (adam@all), `article` protocol",
               ("static", "learned@all", "adam@all", "learned@all+cache"), tune=("adam@all", "learned@all+cache"),
               files={"cpu": (*SUITE_EVAL["cpu"], "learned_all.yaml", "wt2_cpu_all_tune.yaml"), "paper": ("learned_all.yaml",)}),
    Experiment("krause", "the learned rule, meta-trained for it, and every baseline under Krause et al.'s own "
               "protocol (the `krause` protocol: one stream through the articles, never reset, segments of 5 "
               "tokens), tuned on other validation text",
               ("static", "learned", *BASELINES[:3], "learned+cache", *BASELINES[3:]),
               tune=(*BASELINES[:3], "learned+cache", *BASELINES[3:]),
               files={"cpu": (*SUITE_EVAL["cpu"], "protocol_krause.yaml", "wt2_cpu_krause.yaml"),
                      "paper": ("protocol_krause.yaml",)}),
    Experiment("3-level", "continuous reading across article boundaries, with and without the EWC-style "
               "consolidation towards theta0", ("static", "learned"),
               files={"cpu": ("continuous.yaml", "wt2_cpu_3level.yaml"),
                      "paper": ("continuous.yaml", "wt103_paper_3level.yaml")},
               arms=(Arm("ewc", ("ewc.yaml",)), Arm("ewc-0.01", ("ewc.yaml", "ewc_0.01.yaml")),
                     Arm("ewc-0.0001", ("ewc.yaml", "ewc_0.0001.yaml")), Arm("no-ewc"),
                     # the two roles of the Fisher apart: the learner's input alone, the penalty alone
                     Arm("fisher-input", ("fisher_input.yaml",)), Arm("ewc-penalty", ("ewc.yaml", "ewc_penalty_only.yaml")),
                     # the oracle: the same streams and articles, fast weights reset at every boundary
                     Arm("oracle-reset", ("oracle_reset.yaml",)))),
    Experiment("ablate-learner", "feed-forward vs recurrent meta-learner", ("static", "learned"),
               files=ABLATION_BUDGET, arms=(Arm("ff"), Arm("rnn", ("learner_rnn.yaml",)))),
    Experiment("ablate-order", "first- vs second-order meta-gradients", ("static", "learned"),
               files={"cpu": (*ABLATION_BUDGET["cpu"], "wt2_cpu_order.yaml"), "paper": ABLATION_BUDGET["paper"]}, arms=(Arm("first-order"), Arm("second-order", ("second_order.yaml",)))),
    Experiment("ablate-unroll", "unroll length K of the meta-gradient (k1, k4, k16: the same training tokens "
               "at CPU scale; k1/k16-same-steps: the same outer steps as k4)", ("static", "learned"),
               files=ABLATION_BUDGET, arms=(Arm("k1", ("unroll_1.yaml",)), Arm("k4", ("unroll_4.yaml",)),
                     Arm("k16", ("unroll_16.yaml",)),
                     # the same outer steps as k4 (96 at CPU scale): 1/4 and 4x its tokens
                     Arm("k1-same-steps", {"cpu": ("unroll_1.yaml", "wt2_cpu_same_steps.yaml"), "paper": ("unroll_1.yaml",)}),
                     Arm("k16-same-steps", {"cpu": ("unroll_16.yaml", "wt2_cpu_same_steps.yaml"),
                                            "paper": ("unroll_16.yaml",)}))),
    Experiment("ablate-theta0", "theta0 fixed (the static model's) vs meta-trained with the learner (the "
               "long-term level learned)", ("static", "learned"), files=ABLATION_BUDGET,
               arms=(Arm("fixed"), Arm("learned", ("learned_theta0.yaml",)))),
    Experiment("ablate-layers", "which LSTM layers the meta-learner rewrites (CPU: a 2-layer base)",
               ("static", "learned"), base="multilayer", files=ABLATION_BUDGET,
               arms=(Arm("all"), Arm("layer0", ("adapt_layer_0.yaml",)),
                     Arm("top", {"cpu": ("wt2_cpu_adapt_layer_1.yaml",),
                                 "paper": ("wt103_paper_adapt_layer_2.yaml",)}))),
    Experiment("1-level-sp", "static LM on sentencepiece tokens (per-word perplexity)", ("static",),
               base="sentencepiece"),
    Experiment("2-level-sp", "LSTM + meta-learner on sentencepiece tokens (per-word perplexity)",
               ("static", "learned"), base="sentencepiece", files={"cpu": ("wt2_cpu_sp_meta.yaml",)}),
]}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)} (or 'all')")
    return EXPERIMENTS[name]
