"""RateLimiter: a token bucket per client, a bounded table, an injected clock."""

from __future__ import annotations

import pytest

from enforcer.dns_garden.limits import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2, burst=3, clock=clock)
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")          # clients are separate
    clock.now += 0.4                   # 0.8 token: not yet
    assert not limiter.allow("a")
    clock.now += 0.1                   # 0.8 + 0.2 = 1 token
    assert limiter.allow("a") and not limiter.allow("a")
    clock.now += 100                   # refills up to the burst, not beyond
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]


def test_clock_stepping_back_refills_nothing() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=1, clock=clock)
    assert limiter.allow("a")
    clock.now -= 50
    assert not limiter.allow("a")
    clock.now += 1
    assert limiter.allow("a")


def test_table_is_bounded_and_evicts_least_recently_used() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=1, max_clients=100, clock=clock)
    assert limiter.allow("victim") is True
    assert not limiter.allow("victim")
    for n in range(99):
        limiter.allow(f"spoofed-{n}")
    assert not limiter.allow("victim")   # recently used: still limited
    for n in range(10_000):
        limiter.allow(f"more-{n}")
        assert len(limiter) <= 100
    assert limiter.allow("victim")       # evicted long ago: back as a full bucket


@pytest.mark.parametrize(("rate", "burst", "max_clients", "what"), [
    (0, 1, 1, "rate"), (-1, 1, 1, "rate"), (1, 0, 1, "burst"), (1, 1, 0, "max_clients")])
def test_bad_parameters_are_named(rate: float, burst: int, max_clients: int, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        RateLimiter(rate, burst, max_clients)
