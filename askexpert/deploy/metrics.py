"""The expert server's Prometheus metrics, shared across the server's processes.

The LitServe engine answers HTTP in one process and runs the models in another, so the metrics use
prometheus_client's multiprocess mode (the inline engine, one process, uses it too: one code path). Every
process writes its samples into `PROMETHEUS_MULTIPROC_DIR` (a temporary folder the `serve` command creates and
removes, never the working directory) and `/metrics` merges them. The variable must be set before any metric
is created, hence the lazy construction.

- `askexpert_requests_total{path,status}`: HTTP requests answered, by path and status code (4xx/5xx = errors;
  a client that closed its connection mid-body counts as 400);
- `askexpert_request_seconds{path}`: time from the request's arrival to its reply, inside the server;
- `askexpert_batch_size`: requests per model batch (what dynamic batching achieved);
- `askexpert_expert_seconds{expert}`: one expert's model time per batch;
- `askexpert_inference_errors_total{expert}`: batches a model failed on;
- `askexpert_model_loads_total{version}`: exports loaded (startup and every reload).
"""

from __future__ import annotations

from functools import lru_cache

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@lru_cache(maxsize=1)
def metrics() -> dict:
    from prometheus_client import Counter, Histogram

    return {
        "requests": Counter("askexpert_requests", "HTTP requests answered", ["path", "status"]),
        "request_seconds": Histogram(
            "askexpert_request_seconds", "request arrival to reply, in the server", ["path"], buckets=LATENCY_BUCKETS
        ),
        "batch_size": Histogram("askexpert_batch_size", "requests per model batch", buckets=BATCH_BUCKETS),
        "expert_seconds": Histogram(
            "askexpert_expert_seconds", "one expert's model time per batch", ["expert"], buckets=LATENCY_BUCKETS
        ),
        "inference_errors": Counter("askexpert_inference_errors", "batches a model failed on", ["expert"]),
        "model_loads": Counter("askexpert_model_loads", "exports loaded", ["version"]),
    }


def sample_sum(text: str, name: str, label: str = "") -> float:
    """One metric's samples in a `/metrics` page, summed over its label sets (or those containing `label`,
    e.g. 'path="/predict"'). For the clients that read the server's own view (profile --link, benchmarks)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " ")) and label in line
    )


def exposition() -> bytes:
    """All processes' samples in Prometheus' text format."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


class RequestMetricsMiddleware:
    """ASGI middleware counting every HTTP request by path and status, and timing it inside the server."""

    PATHS = ("/predict", "/health", "/metrics", "/info")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import time

        from starlette.requests import ClientDisconnect

        start = time.perf_counter()
        status = {"code": 500}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except ClientDisconnect:
            # the client left mid-body: its fault, not the server's (400, as LitServe counts it), and no
            # traceback in the log; nothing can be answered on a closed connection
            status["code"] = 400
        finally:
            path = scope.get("path", "") if scope.get("path") in self.PATHS else "other"
            m = metrics()
            m["requests"].labels(path, str(status["code"])).inc()
            m["request_seconds"].labels(path).observe(time.perf_counter() - start)
