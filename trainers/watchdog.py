"""A stall watchdog: calls `on_stall(seconds)` once when no `beat()` came for `timeout_s` seconds.

Rank 0's sink beats after every optimizer step; a hung collective, a stuck data
reader or a dead peer then shows up as an alert instead of a silent run. After
firing it waits for the next beat before it can fire again.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class StallWatchdog:
    def __init__(self, timeout_s: float, on_stall: Callable[[float], None], *, poll_s: float | None = None):
        self.timeout_s, self.on_stall = timeout_s, on_stall
        self.poll_s = poll_s if poll_s is not None else min(10.0, max(timeout_s / 4, 0.01))
        self._last = time.monotonic()
        self._fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="seqfoundry-stall-watchdog", daemon=True)

    def start(self) -> "StallWatchdog":
        self._last = time.monotonic()
        self._thread.start()
        return self

    def beat(self) -> None:
        self._last, self._fired = time.monotonic(), False

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle >= self.timeout_s and not self._fired:
                self._fired = True
                self.on_stall(idle)
