"""The schema as the error messages and the override parser see it, and one line per problem: where
the value came from (the YAML file and its line, the --override, or the checkpoint), the key, and
what is wrong with it."""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Annotated, Literal

from pydantic import ValidationError

from .schema import _SECTION, MOVED, Config, ConfigError, Conflict


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
