"""Waiting for a `python -m askexpert serve` process the deployment benchmarks started (shared by them)."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_healthy(server: subprocess.Popen, url: str, limit_s: float = 90.0) -> None:
    """Return once `url`/health answers 200; RuntimeError if the process exits or `limit_s` passes first."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:  # not listening yet
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not healthy within {limit_s:g} s")
