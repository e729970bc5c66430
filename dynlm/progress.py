"""Progress bars that never land in a log file: tqdm on stderr when stderr is a terminal, nothing
otherwise. `cmd > log 2>&1` would else interleave the bars' carriage returns with the result lines
(tqdm keeps redrawing with '\\r' whatever its file is); there the commands print plain log lines
instead (`interactive()` tells them when)."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def interactive() -> bool:
    """Whether stderr is a terminal, i.e. whether a progress bar is drawn (else: plain lines)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    """tqdm on stderr, drawn only on a terminal (tqdm's `disable=None`) and when `enabled`."""
    kwargs.setdefault("mininterval", 2)
    return tqdm(iterable, disable=None if enabled else True, file=sys.stderr, **kwargs)
