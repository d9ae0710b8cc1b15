"""The edge side's HTTP client for the expert server: deadlines, one circuit breaker per expert, no retries.

An offloaded image either gets the expert's reply within the deadlines or an `OffloadFailed` saying why
(connect, read, HTTP status, open breaker, bad reply); the caller then answers with the generalist. There are
no retries: the edge waits on every reply, and a second try would double the worst-case latency.
"""

from __future__ import annotations

import base64
import threading

import httpx
import numpy as np

from askexpert.deploy.breaker import CircuitBreaker


class OffloadFailed(Exception):
    """Why an offloaded image got no expert answer (a short reason for the CSV's `error` column)."""


class ExpertClient:
    def __init__(
        self,
        server: str,
        experts: list[str],
        token: str | None = None,
        connect_timeout_s: float = 1.0,
        read_timeout_s: float = 5.0,
        breaker_failures: int = 3,
        breaker_cooldown_s: float = 5.0,
        max_connections: int = 4,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=server.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s, pool=None),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            trust_env=False,  # an edge device talks to its near-edge server directly, not through a proxy
        )
        self.breakers = {name: CircuitBreaker(breaker_failures, breaker_cooldown_s) for name in experts}
        self.attempts = 0  # requests that went out (not refused by a breaker)
        self._lock = threading.Lock()

    def ask(self, expert: str, image: np.ndarray) -> dict:
        """The expert's reply ({"logits", "model_version", ...}) for one stored uint8 image (3, S, S)."""
        breaker = self.breakers[expert]
        if not breaker.allow():
            raise OffloadFailed("breaker open")
        with self._lock:
            self.attempts += 1
        body = {"expert": expert, "image": base64.b64encode(np.ascontiguousarray(image).tobytes()).decode("ascii")}
        try:
            response = self.http.post("/predict", json=body)
        except httpx.ConnectTimeout:
            breaker.failure()
            raise OffloadFailed("connect timeout") from None
        except httpx.ReadTimeout:
            breaker.failure()
            raise OffloadFailed("read timeout") from None
        except httpx.HTTPError as err:
            breaker.failure()
            raise OffloadFailed(type(err).__name__) from None
        if response.status_code != 200:
            breaker.failure()
            raise OffloadFailed(f"HTTP {response.status_code}")
        try:
            reply = response.json()
            reply["logits"] = [float(v) for v in reply["logits"]]
            str(reply["model_version"])
        except (ValueError, KeyError, TypeError):
            breaker.failure()
            raise OffloadFailed("bad reply") from None
        breaker.success()
        return reply

    def breakers_opened(self) -> int:
        return sum(b.opened for b in self.breakers.values())

    def close(self) -> None:
        self.http.close()
