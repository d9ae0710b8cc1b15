"""askexpert/deploy/breaker.py: closed -> open after `failures` in a row -> half-open after the cool-down, with one
probe that closes or reopens it (a clock of our own: no test waits)."""

from __future__ import annotations

import threading

import pytest

from askexpert.deploy.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def opened(clock: Clock, failures: int = 3, cooldown_s: float = 5.0) -> CircuitBreaker:
    breaker = CircuitBreaker(failures=failures, cooldown_s=cooldown_s, clock=clock)
    for _ in range(failures):
        assert breaker.allow()
        breaker.failure()
    return breaker


def test_it_opens_after_failures_in_a_row(clock) -> None:
    breaker = CircuitBreaker(failures=3, cooldown_s=5.0, clock=clock)
    for _ in range(2):
        breaker.failure()
    breaker.success()  # a success in between: the count starts again
    for _ in range(2):
        breaker.failure()
    assert breaker.state == "closed" and breaker.allow() and breaker.opened == 0
    breaker.failure()
    assert breaker.state == "open" and breaker.opened == 1
    assert not breaker.allow()


def test_open_refuses_until_the_cool_down_ends(clock) -> None:
    breaker = opened(clock)
    clock.now += 4.999
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 0.001
    assert breaker.state == "half-open"


def test_half_open_lets_one_probe_out(clock) -> None:
    breaker = opened(clock)
    clock.now += 5.0
    assert breaker.allow()
    assert not breaker.allow() and not breaker.allow()  # the others wait for the probe's answer
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()
    breaker.failure()
    breaker.failure()  # the count started again at the success: two are not three
    assert breaker.state == "closed" and breaker.opened == 1


def test_a_failed_probe_opens_it_for_another_cool_down(clock) -> None:
    breaker = opened(clock)
    clock.now += 6.0
    assert breaker.allow()
    breaker.failure()  # one failure is enough while probing
    assert breaker.state == "open" and breaker.opened == 2 and not breaker.allow()
    clock.now += 4.0
    assert not breaker.allow()  # counted from the failed probe, not from the first opening
    clock.now += 1.0
    assert breaker.allow()


def test_one_failure_may_open_it(clock) -> None:
    breaker = opened(clock, failures=1, cooldown_s=0.5)
    assert breaker.opened == 1 and breaker.state == "open"
    clock.now += 0.5
    assert breaker.state == "half-open"


def test_many_threads_get_exactly_one_probe(clock) -> None:
    breaker = opened(clock)
    clock.now += 5.0
    start = threading.Barrier(16)
    answers = []

    def ask() -> None:
        start.wait()
        answers.append(breaker.allow())

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [False] * 15 + [True]


def test_the_real_clock_is_monotonic_time() -> None:
    breaker = CircuitBreaker(failures=1, cooldown_s=60.0)
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
