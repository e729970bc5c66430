"""Configs from their sources: defaults <- a checkpoint's config <- YAML files <- --section.key=value
overrides, validated once, at the end."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from .messages import _validated, field_hint, is_text
from .schema import MOVED, Config, ConfigError, to_dict


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
