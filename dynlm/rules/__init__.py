"""Update rules behind one interface (see base.Rule)."""
from __future__ import annotations

from ..config import ConfigError, RuleConfig
from .adam import AdamDecayRule
from .base import Rule, SGDRule, StaticRule
from .dyneval import DynEvalRule, compute_grad_rms
from .learned import LearnedRule

RULES = ("static", "sgd", "dyneval", "adam", "learned")


WEIGHTS = ("lstm", "all")


def adapted_names(lm, cfg: RuleConfig, mode: str, params, weights: str | None = None) -> list[str]:
    """Which weights a rule rewrites: `lstm`, the LSTM weights of the chosen layers, or `all`, every
    weight (Krause et al.: embeddings and softmax too). `weights` (e.g. from a mode name `dyneval@lstm`)
    wins over rule.dyneval_weights (dyneval) / rule.weights (every other rule)."""
    if mode == "static":
        return []
    weights = weights or (cfg.dyneval_weights if mode == "dyneval" else cfg.weights)
    if weights not in WEIGHTS:
        raise ConfigError(f"adapted weights {weights!r}; valid: {', '.join(WEIGHTS)}")
    lstm = lm.lstm_names(cfg.layers or None)
    if weights == "all":
        return [k for k in params if not k.startswith("lstm.") or k in lstm]
    return lstm


def make_rule(mode: str, cfg: RuleConfig, names: list[str], ms=None, learner_state=None) -> Rule:
    if mode == "static":
        return StaticRule()
    if mode == "sgd":
        return SGDRule(cfg.sgd_lr)
    if mode == "dyneval":
        if ms is None:
            raise ValueError("dyneval needs the gradient RMS statistics (MS) of the training data")
        return DynEvalRule(ms, cfg.dyneval_lr, cfg.dyneval_lamb, cfg.dyneval_eps)
    if mode == "adam":
        return AdamDecayRule(cfg.adam_lr, cfg.adam_decay, cfg.max_step)
    if mode == "learned":
        consolidation = learner_consolidation(learner_state) if learner_state is not None else None
        learner_state = learner_parameters(learner_state) if learner_state is not None else None
        rule = LearnedRule(names, cfg.learner, cfg.learner_hidden, cfg.forget_bias, cfg.init_lr, cfg.max_step,
                           cfg.learner_features)
        if learner_state is not None:
            rule.load_state_dict(learner_state)
        if consolidation:
            rule.consolidation = consolidation
        return rule.fused() if cfg.compile else rule
    raise ValueError(f"unknown rule {mode!r}; available: {', '.join(RULES)}")


CONSOLIDATION = "consolidation."  # learner-state keys holding the per-coordinate F the learner was trained with


def with_consolidation(state: dict, consolidation: dict | None) -> dict:
    """A learner's state for a checkpoint: its parameters and, when it reads one, its consolidation input."""
    return {**state, **{CONSOLIDATION + k: v.detach() for k, v in (consolidation or {}).items()}}


def learner_parameters(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(CONSOLIDATION)}


def learner_consolidation(state: dict) -> dict:
    return {k[len(CONSOLIDATION):]: v for k, v in state.items() if k.startswith(CONSOLIDATION)}
