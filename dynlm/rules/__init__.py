"""Update rules behind one interface (see base.Rule)."""
from __future__ import annotations

from ..config import ConfigError, RuleConfig
from .base import Rule, SGDRule, StaticRule
from .dyneval import DynEvalRule, compute_grad_rms
from .learned import LearnedRule

RULES = ("static", "sgd", "dyneval", "learned")


def adapted_names(lm, cfg: RuleConfig, mode: str, params) -> list[str]:
    """Which weights a rule rewrites: the LSTM weights of the chosen layers (dyneval may take all)."""
    if mode == "static":
        return []
    if mode == "dyneval" and cfg.dyneval_all_weights:
        # per-stream copies of the embeddings/softmax need a per-stream embedding lookup and softmax
        # in the LM, which it does not have yet: say so instead of failing deep inside
        raise ConfigError("rule.dyneval_all_weights=true is not supported yet (the LM takes per-stream "
                          "copies of its LSTM weights only); use the default, LSTM weights only")
    return lm.lstm_names(cfg.layers or None)


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
