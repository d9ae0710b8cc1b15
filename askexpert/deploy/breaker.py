"""A circuit breaker per expert: after a few failures in a row, stop asking that expert for a while.

closed     requests go through; `failures` consecutive failures open the breaker.
open       requests are refused at once (the image falls back to the generalist) for `cooldown_s`.
half-open  after the cool-down, one request goes through as a probe: success closes the breaker, failure
           opens it for another cool-down. Other requests stay refused while the probe is out.
Without it a dead server costs every offloaded image a full connect or read deadline.
"""

from __future__ import annotations

import threading
import time


class CircuitBreaker:
    def __init__(self, failures: int = 3, cooldown_s: float = 5.0, clock=time.monotonic):
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._lock = threading.Lock()
        self._in_a_row = 0
        self._opened_at: float | None = None
        self._probing = False
        self.opened = 0  # how many times it opened (reported in the summary)

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half-open" if self.clock() - self._opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        """May a request go out now? (In half-open, only the first caller gets to probe.)"""
        with self._lock:
            if self._opened_at is None:
                return True
            if self.clock() - self._opened_at < self.cooldown_s or self._probing:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        with self._lock:
            self._in_a_row, self._opened_at, self._probing = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self._in_a_row += 1
            if self._probing or (self._opened_at is None and self._in_a_row >= self.failures):
                self._opened_at = self.clock()
                self.opened += 1
            self._probing = False
