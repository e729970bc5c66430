"""`dynlm config`: the resolved configuration as YAML, every key with its one-line doc and, where the
value is not the default, the default. The docs are the field comments of config/schema.py (and the
dataclasses' docstrings for the sections), read from its source, so they are written in one place."""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Literal

import yaml

from .config import Config

WIDTH = 100  # characters of a section's docstring per comment line
VALUE_COLUMN = 44  # where the comments start, for keys and values that fit before it


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field name: its trailing `# comment` in the source of dataclass `cls`} (empty when it has none)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            docs[node.target.id] = next((comments[i] for i in lines if i in comments), "")
    return docs


def section_doc(cls) -> str:
    """The first paragraph of a section's docstring, on one line."""
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(cls.__name__ + "("):  # dataclass' generated signature: no docstring of its own
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def yaml_value(value) -> str:
    """A value as it is written after `key: ` in YAML (lists in flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _choices(hint, doc: str) -> str:
    """'one of a | b' for a Literal field whose doc does not already name every choice."""
    choices = [str(c) for c in typing.get_args(hint)] if typing.get_origin(hint) is Literal else []
    return "one of " + " | ".join(choices) if choices and not all(c in doc for c in choices) else ""


def _key_line(indent: str, name: str, value, default, hint, doc: str) -> str:
    notes = [doc, _choices(hint, doc)]
    if value != default:
        notes.append(f"default {yaml_value(default)}")
    head = f"{indent}{name}: {yaml_value(value)}"
    comment = "; ".join(n for n in notes if n)
    return f"{head.ljust(VALUE_COLUMN)}  # {comment}" if comment else head


def _section(obj, default, indent: str, out: list[str]) -> None:
    hints = typing.get_type_hints(type(obj))
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value, dflt = getattr(obj, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            out += [f"{indent}# {line}" for line in textwrap.wrap(docs[f.name] or section_doc(type(value)), WIDTH)]
            out.append(f"{indent}{f.name}:")
            _section(value, dflt, indent + "  ", out)
        else:
            out.append(_key_line(indent, f.name, value, dflt, hints[f.name], docs[f.name]))


def render_config(cfg: Config, sections: list[str] | None = None) -> str:
    """The YAML text of `cfg` (only `sections`, when given) with a comment on every key; loading it with
    `--config` gives `cfg` back."""
    out: list[str] = []
    default = Config()
    for f in dataclasses.fields(cfg):
        if sections and f.name not in sections:
            continue
        value = getattr(cfg, f.name)
        out += [f"# {line}" for line in textwrap.wrap(section_doc(type(value)), WIDTH)]
        out.append(f"{f.name}:")
        _section(value, getattr(default, f.name), "  ", out)
        out.append("")
    return "\n".join(out)
