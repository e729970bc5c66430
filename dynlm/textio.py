"""Text files as dynlm reads and writes them, whatever the locale (LC_ALL=C included):

* UTF-8 always, never the locale's encoding; a byte-order mark at the start of an input (some editors
  write one) is not part of the text, so inputs are read as utf-8-sig.
* JSON is strict (RFC 8259), which has no NaN or Infinity: a non-finite number (a diverged perplexity)
  is written as null. `number` reads such a null back as inf where a number is expected.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

ENCODING = "utf-8"
INPUT_ENCODING = "utf-8-sig"  # also reads plain UTF-8; drops a leading byte-order mark


def read_text(path) -> str:
    return Path(path).read_text(encoding=INPUT_ENCODING)


def write_text(path, text: str) -> None:
    """Written to a temporary sibling and renamed into place: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding=ENCODING)
    os.replace(tmp, path)


def open_csv(path, mode: str = "r"):
    """A csv file opened as the csv module wants it (newline=""), in UTF-8."""
    return open(path, mode, encoding=INPUT_ENCODING if "r" in mode else ENCODING, newline="")


def finite(obj):
    """`obj` with every non-finite float (inf, -inf, nan) replaced by None, in nested dicts, lists, tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "ndim", 1) == 0:  # numpy/torch scalars
        return finite(obj.item())
    return obj


def dumps(obj, **kw) -> str:
    """Strict JSON: non-finite numbers become null (see `finite`); json.dumps raises rather than write NaN."""
    return json.dumps(finite(obj), allow_nan=False, **kw)


def write_json(path, obj, indent: int | None = 2, **kw) -> None:
    write_text(path, dumps(obj, indent=indent, **kw) + "\n")


def read_json(path):
    return json.loads(read_text(path))


def number(x) -> float:
    """A number read back from our JSON: null (a non-finite value when written) is inf, e.g. a diverged ppl."""
    return math.inf if x is None else float(x)


def safe_console() -> None:
    """Printing never crashes on a character the console's encoding lacks (LC_ALL=C: ASCII): it is
    written as a \\x escape instead. Files are not affected (they are always UTF-8)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")
