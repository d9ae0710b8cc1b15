"""The edge side's HTTP client for the expert server: deadlines, one circuit breaker per expert, no retries.

An offloaded image either gets the expert's reply within the deadlines or an `OffloadFailed` saying why
(connect, read, HTTP status, open breaker, bad reply); the caller then answers with the generalist. There are
no retries: the edge waits on every reply, and a second try would double the worst-case latency.

`ask_each` asks several experts for the same image at once (the second expert, docs/deploy.md): each request has
the same deadlines and its own breaker, so the image waits for the slower of the two, never for their sum, and one
expert's failure leaves the other's answer.
"""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from askexpert.deploy.breaker import CircuitBreaker
from askexpert.errors import UserError


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
        version: str | None = None,
        widths: dict[str, int] | None = None,
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
        self.version = version
        self.widths = widths or {}
        self.attempts = 0  # requests that went out (not refused by a breaker)
        self._lock = threading.Lock()
        # the extra requests of `ask_each` (the first goes out on the caller's thread): one per caller in flight
        self._pool = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="askexpert-ask")

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
        if response.status_code in (401, 403):
            raise UserError(f"{self.http.base_url} refused the token (HTTP {response.status_code}): pass --token")
        if response.status_code in (413, 422):
            raise UserError(
                f"{self.http.base_url} refused this export's request (HTTP {response.status_code}: "
                f"{response.text[:200]}): does it serve the same export?"
            )
        if response.status_code != 200:
            breaker.failure()
            raise OffloadFailed(f"HTTP {response.status_code}")
        try:
            reply = response.json()
            reply["logits"] = [float(v) for v in reply["logits"]]
            version = str(reply["model_version"])
            if expert in self.widths and len(reply["logits"]) != self.widths[expert]:
                raise ValueError("logits of another width")
        except (ValueError, KeyError, TypeError):
            breaker.failure()
            raise OffloadFailed("bad reply") from None
        breaker.success()
        if self.version is not None and version != self.version:
            # another export may route and fuse differently: its answer is not this system's answer
            raise OffloadFailed(f"server holds export version {version}, this edge {self.version}")
        return reply

    def ask_each(self, experts: list[str], image: np.ndarray) -> list[dict | OffloadFailed]:
        """Each expert's reply for one image, or the `OffloadFailed` saying why it got none, in `experts`' order: all
        asked concurrently, each under the client's deadlines. A refused token or request (`UserError`) is raised."""
        futures = [self._pool.submit(self._outcome, expert, image) for expert in experts[1:]]
        first = self._outcome(experts[0], image) if experts else None
        return ([first] if experts else []) + [future.result() for future in futures]

    def _outcome(self, expert: str, image: np.ndarray) -> dict | OffloadFailed:
        try:
            return self.ask(expert, image)
        except OffloadFailed as why:
            return why

    def check_server(self) -> str | None:
        """None when the server answers /health; a reason when it cannot be reached. A refused token is fatal."""
        try:
            response = self.http.get("/health")
        except httpx.HTTPError as err:
            return type(err).__name__
        if response.status_code in (401, 403):
            raise UserError(f"{self.http.base_url} refused the token (HTTP {response.status_code}): pass --token")
        return None if response.status_code == 200 else f"/health answered {response.status_code}"

    def breakers_opened(self) -> int:
        return sum(b.opened for b in self.breakers.values())

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.http.close()
