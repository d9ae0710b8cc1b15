"""How askexpert times a call and sums up the times: the one timer and percentile helper.

`profile --link` (the link's round trip and upload), `edge` (the latency per image it reports as p50/p95/p99)
and the benchmarks measure with these, so their figures mean the same thing. Warm-up calls come first and are
never counted (the first calls allocate, pick kernels, open connections); each call is timed on its own with
`time.perf_counter`. A median is `statistics.median`; any other percentile comes from `percentiles` (linear
interpolation between the closest ranks, as `numpy.percentile`, of which that median is the 50th).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np


def time_calls(call: Callable[[], object], repeats: int, warmups: int = 0) -> list[float]:
    """Seconds of each of `repeats` calls of `call()`, after `warmups` calls that are not timed."""
    for _ in range(warmups):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def time_for(call: Callable[[], object], seconds: float) -> list[float]:
    """Seconds of each call of `call()`, called again and again until `seconds` have passed."""
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def percentiles(values: Iterable[float], qs: Iterable[float], method: str = "linear") -> dict[str, float]:
    """{"p50": ..., ...}: the `qs` percentiles of `values` (at least one value).

    `method`: "linear" (numpy's default), or "exclusive": `statistics.quantiles`' default, which extrapolates past
    the extremes of a small sample (whole-number percentiles only). `profile --link` has always judged the
    uplink's spread by its exclusive quartiles, and its note must not change with this helper."""
    if method == "exclusive":
        cuts = statistics.quantiles(list(values), n=100)  # the 1st to the 99th percentile
        return {f"p{q:g}": cuts[int(q) - 1] for q in qs}
    values = np.asarray(values, dtype=np.float64)
    return {f"p{q:g}": float(np.percentile(values, q, method=method)) for q in qs}
