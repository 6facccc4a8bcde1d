"""Graceful stop on SIGINT/SIGTERM: the training loop finishes its step, saves a checkpoint and exits 0."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any


class GracefulInterrupt:
    """Context manager: SIGINT/SIGTERM set `.requested` so the loop can finish its step, save and exit 0.

    A second signal goes to the handler that was installed before (by default: SIGINT raises
    KeyboardInterrupt, SIGTERM terminates the process).
    Signals ignored (SIG_IGN) on entry stay ignored. Previous handlers are restored on exit. Outside the
    main thread (where Python cannot install handlers) it does nothing and `.requested` stays False.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.requested = False
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if not self.requested:
            self.requested = True
            self.received = sig
            return
        previous = self._previous.get(sig)
        self._restore()
        if callable(previous):
            previous(signum, frame)  # e.g. Python's default SIGINT handler raises KeyboardInterrupt
        else:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
