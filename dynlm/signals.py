"""SIGINT/SIGTERM -> a 'stop requested' flag that a training loop polls between steps.

A signal never interrupts a step half-way (or a checkpoint half-written): the handler only records
it, the loop notices at its next step boundary, saves a checkpoint and returns. A second signal
of the same kind means "stop now": the previous handler is restored and the signal re-delivered
(SIGINT -> KeyboardInterrupt, SIGTERM -> the default termination).

    with StopOnSignals() as stop:
        for batch in data:
            train_step(batch)
            if stop.requested:          # or: if stop:
                save_checkpoint(...)
                break
    exit_code = stop.exit_code          # 128 + signal number (130 SIGINT, 143 SIGTERM), else 0

Handlers can only be installed from the main thread; elsewhere the context is inert (never
requested) so library code can use it unconditionally.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_exit_code(sig: int | str) -> int:
    """The shell convention for 'ended by signal N' (128 + N), so `&&` chains stop; sig a number or a
    name ('SIGTERM'); 1 for a name this platform does not know."""
    if isinstance(sig, str):
        return 128 + signal.Signals[sig].value if sig in signal.Signals.__members__ else 1
    return 128 + int(sig)


class StopOnSignals:
    def __init__(self, signals=DEFAULT_SIGNALS, message: str = "will save a checkpoint and stop after this step"):
        self.signals = tuple(signals)
        self.message = message
        self.signum: int | None = None  # the first signal received
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __bool__(self) -> bool:
        return self.requested

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        """The shell convention for 'ended by signal N' (128 + N), so `&&` chains stop; 0 if none."""
        return signal_exit_code(self.signum) if self.signum is not None else 0

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop programmatically (tests, or a rank told by another rank)."""
        if self.signum is None:
            self.signum = int(signum)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == self.signum:
            # second identical signal: the user insists, give them the default behaviour now
            self._restore()
            os.kill(os.getpid(), signum)
            return
        self.request(signum)
        print(f"\n{signal.Signals(signum).name} received: {self.message} "
              f"(send it again to stop immediately)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> "StopOnSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
