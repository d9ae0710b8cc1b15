"""A few hundred random and mutated requests against a live server (issue 27): it stays up, fails on no input
(no 5xx but 503), answers every error in JSON, logs no traceback and keeps its memory. The driver and the kinds of
input are tests/helpers/serve_fuzz.py's; ENGINES are the engines it runs against."""

from __future__ import annotations

import httpx
import pytest
from helpers.serve_fuzz import KINDS, fuzz
from test_deploy import Server, random_image, request

ENGINES = ["inline"]


def fuzz_a_server(engine: str, export, folder, count: int, seeds: range) -> None:
    server = Server(export, folder, "--engine", engine, "--timeout_s", "1").wait_ready()
    try:
        for seed in seeds:
            report = fuzz(server.port, server.process.pid, count, seed=seed)
            assert not report.broken, "\n".join(report.broken[:20])
            assert report.sent == count and set(report.statuses) == set(KINDS)
            assert sum(c.get("200", 0) for c in report.statuses.values()) > 0  # valid requests in the mix were served
        assert httpx.get(f"{server.url}/health").status_code == 200
        reply = httpx.post(f"{server.url}/predict", json=request("expert_0", random_image()))
        assert reply.status_code == 200 and reply.json()["expert"] == "expert_0"
        log = open(server.log.name).read()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    finally:
        server.kill()


@pytest.mark.parametrize("engine", ENGINES)
def test_random_and_mutated_requests_leave_the_server_up_answering_and_bounded(engine, tiny_export, tmp_path):
    fuzz_a_server(engine, tiny_export[0], tmp_path, count=300, seeds=range(1))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_thousands_of_random_and_mutated_requests(engine, tiny_export, tmp_path):
    fuzz_a_server(engine, tiny_export[0], tmp_path, count=1000, seeds=range(1, 6))
