"""Typed configuration: every default lives in `schema`; YAML files and `--section.key=value` flags only
override (`loading`); a bad key or value is a ConfigError of one line naming where it came from and
what is wrong (`messages`).

Each field declares its type, its allowed values (a Literal) and its range (Field(ge=..)) once, on the
field; pydantic checks them whenever a config is built (load_config, from_dict, a constructor or
dataclasses.replace), so no command has to check them again.
"""
from .loading import load_config, load_yaml, merge, migrate, parse_override, parse_value, save_config
from .messages import describe, field_hint, from_dict, is_text
from .schema import (GRID_AXES, MOVED, BenchConfig, Config, ConfigError, Conflict, DataConfig, EvalConfig, LogConfig,
                     MetaConfig, ModelConfig, ReportConfig, RuleConfig, RunConfig, SyntheticConfig, TrainConfig,
                     TuneConfig, check_rule_layers, config_class, meta_steps, step_limit, to_dict)

__all__ = ["GRID_AXES", "MOVED", "BenchConfig", "Config", "ConfigError", "Conflict", "DataConfig", "EvalConfig",
           "LogConfig", "MetaConfig", "ModelConfig", "ReportConfig", "RuleConfig", "RunConfig", "SyntheticConfig",
           "TrainConfig", "TuneConfig", "check_rule_layers", "config_class", "describe", "field_hint", "from_dict",
           "is_text", "load_config", "load_yaml", "merge", "meta_steps", "migrate", "parse_override", "parse_value",
           "save_config", "step_limit", "to_dict"]
