"""Update rules behind one interface (see base.Rule)."""
from __future__ import annotations

from ..config import RuleConfig
from .base import Rule, SGDRule, StaticRule
from .dyneval import DynEvalRule, compute_grad_rms
from .learned import LearnedRule

RULES = ("static", "sgd", "dyneval", "learned")


def adapted_names(lm, cfg: RuleConfig, mode: str, params) -> list[str]:
    """Which weights a rule rewrites: the LSTM weights of the chosen layers; dynamic evaluation with
    rule.dyneval_all_weights adds every other weight (Krause et al.: embeddings and softmax too)."""
    if mode == "static":
        return []
    lstm = lm.lstm_names(cfg.layers or None)
    if mode == "dyneval" and cfg.dyneval_all_weights:
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
    if mode == "learned":
        rule = LearnedRule(names, cfg.learner, cfg.learner_hidden, cfg.forget_bias, cfg.init_lr, cfg.max_step)
        if learner_state is not None:
            rule.load_state_dict(learner_state)
        return rule.compile() if cfg.compile else rule
    raise ValueError(f"unknown rule {mode!r}; available: {', '.join(RULES)}")
