"""Client-side rate limits: exact waits on a fake clock, concurrency with real threads."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from convo._ratelimit import RateLimiter
from convo.errors import InvalidInput

THREAD_TIMEOUT = 5.0


class FakeClock:
    """A clock that only moves when told to, or when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def never_sleep(seconds: float) -> None:
    raise AssertionError(f"slept {seconds} s")


def limiter_on(clock: FakeClock, **limits: Any) -> RateLimiter:
    return RateLimiter(clock=clock, sleep=clock.sleep, **limits)


def take(limiter: RateLimiter, input_tokens: int = 0) -> None:
    with limiter.slot(input_tokens):
        pass


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["requests_per_minute", "input_tokens_per_minute", "max_concurrent"]
)
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_limits_must_be_positive_ints(field: str, value: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        RateLimiter(**{field: value})
    assert caught.value.field == field


@pytest.mark.parametrize("value", [-1, 2.5, None, False])
def test_input_tokens_must_be_a_whole_number(value: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        RateLimiter().slot(value)
    assert caught.value.field == "input_tokens"


# --- no limits -------------------------------------------------------------------------


def test_no_limits_never_sleeps_or_blocks() -> None:
    limiter = RateLimiter(clock=lambda: 0.0, sleep=never_sleep)
    with limiter.slot(10**9), limiter.slot(10**9):
        for _ in range(1_000):
            take(limiter, 10**6)


# --- requests per minute ---------------------------------------------------------------


def test_rpm_waits_exactly_until_the_oldest_request_leaves_the_window() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, requests_per_minute=2)
    take(limiter)  # t=0
    clock.advance(10)
    take(limiter)  # t=10
    clock.advance(5)
    assert clock.sleeps == []
    take(limiter)  # t=15: full until the t=0 request leaves at t=60
    assert clock.sleeps == [45.0]
    assert clock.now == 60.0
    take(limiter)  # t=60: window holds 10 and 60; the t=10 one leaves at 70
    assert clock.sleeps == [45.0, 10.0]
    assert clock.now == 70.0


def test_a_request_exactly_60_seconds_old_has_left_the_window() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, requests_per_minute=1)
    take(limiter)
    clock.advance(60)
    take(limiter)
    assert clock.sleeps == []


# --- input tokens per minute --------------------------------------------------------------


def test_token_limit_waits_until_enough_tokens_leave_the_window() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, input_tokens_per_minute=1_000)
    take(limiter, 600)  # t=0
    clock.advance(20)
    take(limiter, 300)  # t=20: 900 in the window
    clock.advance(10)
    take(limiter, 100)  # t=30: exactly 1,000 fits
    assert clock.sleeps == []
    take(limiter, 1)  # t=30: over by one; the 600 leave at t=60
    assert clock.sleeps == [30.0]
    # t=60: window holds 300 (t=20) + 100 (t=30) + 1 (t=60) = 401; 900 more is
    # over by 301, so both the t=20 and the t=30 requests must leave: t=90.
    take(limiter, 900)
    assert clock.sleeps == [30.0, 30.0]
    assert clock.now == 90.0


def test_zero_token_requests_never_wait_on_the_token_limit() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, input_tokens_per_minute=10)
    take(limiter, 10)
    for _ in range(5):
        take(limiter, 0)
    assert clock.sleeps == []


def test_both_per_minute_limits_wait_for_the_later_of_the_two(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, requests_per_minute=2, input_tokens_per_minute=100)
    take(limiter, 5)  # t=0
    clock.advance(20)
    take(limiter, 90)  # t=20
    clock.advance(10)
    # t=30, 11 tokens: the request limit frees up at t=60 (the t=0 request
    # leaves), but 5 + 90 + 11 is 6 over, so the 90 of t=20 must leave too: t=80.
    with caplog.at_level(logging.INFO, logger="convo.ratelimit"):
        take(limiter, 11)
    assert clock.sleeps == [50.0]
    [record] = caplog.records
    assert record.convo["limit"] == "input_tokens_per_minute"  # type: ignore[attr-defined]


def test_a_request_that_can_never_fit_is_refused_at_once() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, input_tokens_per_minute=1_000)
    with pytest.raises(InvalidInput) as caught:
        limiter.slot(1_001)
    assert caught.value.field == "input_tokens"
    assert "1001" in str(caught.value)
    assert "1000" in str(caught.value)
    # Exactly the limit fits, in an empty window.
    take(limiter, 1_000)
    assert clock.sleeps == []


# --- logging -----------------------------------------------------------------------------


def test_a_wait_is_logged_once_with_its_limit_and_duration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, requests_per_minute=1)
    with caplog.at_level(logging.INFO, logger="convo.ratelimit"):
        take(limiter, 7)
        clock.advance(15)
        assert caplog.records == []
        take(limiter, 7)
    [record] = caplog.records
    assert record.name == "convo.ratelimit"
    assert record.levelno == logging.INFO
    assert "requests_per_minute" in record.getMessage()
    assert "45.000 s" in record.getMessage()
    assert record.convo == {  # type: ignore[attr-defined]
        "limit": "requests_per_minute",
        "limit_value": 1,
        "wait_seconds": 45.0,
        "input_tokens": 7,
    }


def test_token_wait_names_the_token_limit(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, input_tokens_per_minute=100)
    with caplog.at_level(logging.INFO, logger="convo.ratelimit"):
        take(limiter, 100)
        take(limiter, 1)
    [record] = caplog.records
    assert record.convo["limit"] == "input_tokens_per_minute"  # type: ignore[attr-defined]
    assert record.convo["wait_seconds"] == 60.0  # type: ignore[attr-defined]


# --- concurrency (real threads) ----------------------------------------------------------


def test_concurrency_cap_holds_with_real_threads() -> None:
    limiter = RateLimiter(max_concurrent=2, sleep=never_sleep)
    lock = threading.Lock()
    running = 0
    peak = 0
    finished = 0
    start_together = threading.Barrier(8, timeout=THREAD_TIMEOUT)
    errors: list[BaseException] = []

    def worker() -> None:
        nonlocal running, peak, finished
        try:
            start_together.wait()
            with limiter.slot(1):
                with lock:
                    running += 1
                    peak = max(peak, running)
                time.sleep(0.02)
                with lock:
                    running -= 1
            with lock:
                finished += 1
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(THREAD_TIMEOUT)
    assert errors == []
    assert finished == 8
    assert peak == 2


def test_a_third_request_blocks_until_one_of_two_finishes() -> None:
    limiter = RateLimiter(max_concurrent=2)
    release = threading.Event()
    holding = threading.Barrier(3, timeout=THREAD_TIMEOUT)
    third_entered = threading.Event()

    def hold() -> None:
        with limiter.slot(0):
            holding.wait()
            release.wait(THREAD_TIMEOUT)

    def third() -> None:
        with limiter.slot(0):
            third_entered.set()

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
    holding.wait()  # both holders are inside their slots
    waiter = threading.Thread(target=third)
    waiter.start()
    assert not third_entered.wait(0.1)
    release.set()
    assert third_entered.wait(THREAD_TIMEOUT)
    for thread in [*holders, waiter]:
        thread.join(THREAD_TIMEOUT)


def test_the_slot_is_freed_when_the_block_raises() -> None:
    limiter = RateLimiter(max_concurrent=1)
    with pytest.raises(RuntimeError, match="boom"), limiter.slot(0):
        raise RuntimeError("boom")
    entered = threading.Event()

    def again() -> None:
        with limiter.slot(0):
            entered.set()

    thread = threading.Thread(target=again)
    thread.start()
    thread.join(THREAD_TIMEOUT)
    assert entered.is_set()


def test_concurrency_wait_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RateLimiter(max_concurrent=1)
    entered = threading.Event()

    def second() -> None:
        with limiter.slot(0):
            entered.set()

    with caplog.at_level(logging.INFO, logger="convo.ratelimit"):
        with limiter.slot(0):
            thread = threading.Thread(target=second)
            thread.start()
            deadline = time.monotonic() + THREAD_TIMEOUT
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.005)
            assert not entered.is_set()
        thread.join(THREAD_TIMEOUT)
    assert entered.is_set()
    [record] = caplog.records
    assert record.convo["limit"] == "max_concurrent"  # type: ignore[attr-defined]
    assert record.convo["wait_seconds"] is None  # type: ignore[attr-defined]


def test_waiting_does_not_hold_the_lock_while_sleeping() -> None:
    # A waiter sleeps on the request limit; its sleep returns only once another
    # thread has freed a slot, which needs the limiter's lock.
    clock = FakeClock()
    other_done = threading.Event()
    sleeping = threading.Event()

    def sleep(seconds: float) -> None:
        sleeping.set()
        assert other_done.wait(THREAD_TIMEOUT), "the limiter's lock was held during sleep"
        clock.sleep(seconds)

    limiter = RateLimiter(requests_per_minute=1, max_concurrent=5, clock=clock, sleep=sleep)
    first = limiter.slot(0)
    first.__enter__()  # t=0: the one request of this minute, still running
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            take(limiter)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert sleeping.wait(THREAD_TIMEOUT)
    first.__exit__(None, None, None)  # needs the lock, while the waiter sleeps
    other_done.set()
    thread.join(THREAD_TIMEOUT)
    assert errors == []
    assert clock.sleeps == [60.0]
