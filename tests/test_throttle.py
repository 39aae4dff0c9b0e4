"""The gateway limits shared by every sender: rate slots, concurrency permits, back-pressure.

Each test builds independent `GatewayThrottle` instances, as separate Lambdas would have, over
one moto table, and moves the test's clock by hand.
"""

from __future__ import annotations

import itertools
import threading
from datetime import timedelta

import boto3
import pytest

from chalicelib.gateway import GatewayResult, Outcome
from chalicelib.services.throttle import (
    MIN_SPEED,
    PRESSURE_RUN,
    GatewayThrottle,
    is_pressure,
)

OK = GatewayResult(Outcome.SENT, "OK", 200, 0.01)
REJECTED = GatewayResult(Outcome.REJECTED, "HTTP 400", 400, 0.01)
SERVER_ERROR = GatewayResult(Outcome.RETRY, "HTTP 503", 503, 0.01)
TIMEOUT = GatewayResult(Outcome.RETRY, "timeout: ReadTimeout", None, 10.0)
MALFORMED = GatewayResult(Outcome.RETRY, "HTTP 200 without success code", 200, 0.01)
RATE_LIMITED = GatewayResult(Outcome.RETRY, "HTTP 429", 429, 0.01)


@pytest.fixture
def limits(settings):
    return settings.model_copy(
        update={
            "gateway_rate_per_second": 50.0,
            "gateway_concurrency": 8,
            "gateway_pause_seconds": 2.0,
            "gateway_max_pause_seconds": 10.0,
        }
    )


@pytest.fixture
def make_throttle(services, limits, clock):
    def make() -> GatewayThrottle:
        # Each its own client and cache: another Lambda instance.
        return GatewayThrottle(boto3.client("dynamodb", region_name="us-east-1"), limits, clock)

    return make


def slots_of(admissions) -> list[float]:
    return sorted(
        admission.start + i * admission.interval
        for admission in admissions
        for i in range(admission.count)
    )


def test_independent_senders_share_one_rate(make_throttle, clock):
    # Given four senders that each want 10 calls, many times, at the same moment
    senders = [make_throttle() for _ in range(4)]
    admissions, lock = [], threading.Lock()

    def hammer(throttle: GatewayThrottle) -> None:
        for _ in range(20):
            admission = throttle.admit(10)
            throttle.release(admission)
            with lock:
                admissions.append(admission)

    # When they all ask together
    threads = [threading.Thread(target=hammer, args=(s,)) for s in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then the slots they got are one rate: 50 a second, never two closer than 1/50 s
    slots = slots_of(admissions)
    now = clock().timestamp()
    assert slots[0] >= now - 1e-6
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert min(gaps) >= 1 / 50 - 1e-6
    # And no one reserves beyond the 2 s horizon: 100 slots at most, the rest told to wait
    assert len(slots) == 100
    assert slots[-1] <= now + 2.0
    refused = [a for a in admissions if a.count == 0]
    assert refused
    assert all(a.retry_after > 0 for a in refused)


def test_a_batch_larger_than_the_horizon_gets_part_and_a_wait(make_throttle, clock):
    throttle = make_throttle()
    first = throttle.admit(150)
    assert first.count == 100  # 2 s at 50/s
    throttle.release(first)
    later = throttle.admit(10)
    assert later.count == 0
    assert later.retry_after == pytest.approx(1 / 50, abs=1e-3)
    clock.advance(seconds=1)
    assert throttle.admit(10).count == 10


def test_idle_time_is_not_saved_up_as_a_burst(make_throttle, clock):
    throttle = make_throttle()
    throttle.admit(10)
    clock.advance(minutes=5)
    admission = throttle.admit(10)
    # The first slot is now, not five minutes ago: no burst of saved-up sends.
    assert admission.start == pytest.approx(clock().timestamp(), abs=1e-3)
    assert admission.interval == pytest.approx(1 / 50)


def test_concurrency_permits_are_global_and_come_back(make_throttle, clock):
    one, two = make_throttle(), make_throttle()
    first = one.admit(6)
    assert first.permits == 6
    second = two.admit(6)
    # Only 8 calls may be in flight across all senders.
    assert second.permits == 2
    third = one.admit(3)
    assert third.count == 0
    assert third.retry_after > 0
    one.release(first)
    assert two.admit(3).permits == 3


def test_permits_of_a_sender_that_died_come_back_after_its_lease(make_throttle, clock):
    dead, alive = make_throttle(), make_throttle()
    dead.admit(8)  # never released: the Lambda was killed mid-batch
    assert alive.admit(1).count == 0
    clock.advance(seconds=61)
    assert alive.admit(4).permits == 4


def test_a_429_pauses_everyone_and_halves_the_rate(make_throttle, clock):
    reporter, other = make_throttle(), make_throttle()
    reporter.admit(1)
    # When the gateway answers 429 once
    reporter.report([OK, RATE_LIMITED])
    # Then every sender is told to wait for the pause
    paused = other.admit(10)
    assert paused.count == 0
    assert paused.retry_after == pytest.approx(2.0, abs=0.01)
    # And afterwards probes with one call, at half the rate
    clock.advance(seconds=2.1)
    probe = other.admit(10)
    assert probe.count == 1
    assert probe.interval == pytest.approx(2 / 50)
    other.release(probe)
    # And once a probe gets through, whole batches go again
    other.report([OK])
    assert other.admit(10).count == 10


def test_a_run_of_server_errors_pauses_sending_but_scattered_ones_do_not(make_throttle, clock):
    throttle = make_throttle()
    # Scattered failures among successes: no slow-down (the gateway is working)
    for _ in range(10):
        throttle.report([SERVER_ERROR, OK])
    assert throttle.admit(1).interval == pytest.approx(1 / 50)
    # A run of failures with no success in between, across batches: pause
    for _ in range(PRESSURE_RUN - 1):
        throttle.report([TIMEOUT])
    assert throttle.admit(1).count == 1
    throttle.report([SERVER_ERROR])
    assert throttle.admit(1).count == 0


def test_bad_answers_that_are_not_about_load_do_not_slow_sending(make_throttle):
    throttle = make_throttle()
    for _ in range(3 * PRESSURE_RUN):
        throttle.report([MALFORMED, REJECTED])
    assert throttle.admit(1).count == 1
    assert [is_pressure(r) for r in (OK, REJECTED, MALFORMED, SERVER_ERROR, TIMEOUT)] == [
        False,
        False,
        False,
        True,
        True,
    ]


def test_pauses_double_while_the_gateway_stays_down_up_to_the_maximum(make_throttle, clock):
    throttle = make_throttle()
    pauses = []
    for _ in range(5):
        throttle.report([SERVER_ERROR] * PRESSURE_RUN)
        waiting = throttle.admit(1)
        pauses.append(round(waiting.retry_after, 1))
        clock.advance(seconds=waiting.retry_after + 0.01)
    assert pauses == [2.0, 4.0, 8.0, 10.0, 10.0]
    # The speed bottoms out, it never stops altogether
    assert throttle.admit(1).interval == pytest.approx(1 / (50 * MIN_SPEED))


def test_sending_speeds_back_up_when_the_gateway_recovers(make_throttle, clock):
    throttle = make_throttle()
    for _ in range(3):
        throttle.report([RATE_LIMITED])
        clock.advance(seconds=throttle.admit(1).retry_after + 0.01)
    assert throttle.admit(1).interval == pytest.approx(1 / (50 * 0.125))
    # When batches succeed again, the speed climbs a step per second to the configured rate
    seconds = 0
    while throttle.admit(1).interval > 1 / 50 + 1e-9:
        throttle.report([OK] * 5)
        clock.advance(seconds=1.01)
        seconds += 1
        assert seconds < 20
    assert seconds <= 8


def test_slots_are_spaced_on_the_clock_they_are_used_with(make_throttle, clock):
    throttle = make_throttle()
    admission = throttle.admit(5)
    moments = [admission.slot(i) for i in range(5)]
    assert moments[0] == clock()
    assert moments[-1] - moments[0] == timedelta(seconds=4 / 50)


@pytest.mark.parametrize(
    ("environment", "named"),
    [
        ({"GATEWAY_RATE_PER_SECOND": "0"}, "GATEWAY_RATE_PER_SECOND"),
        ({"GATEWAY_RATE_PER_SECOND": "fast"}, "GATEWAY_RATE_PER_SECOND"),
        ({"GATEWAY_CONCURRENCY": "0"}, "GATEWAY_CONCURRENCY"),
        (
            {"GATEWAY_PAUSE_SECONDS": "30", "GATEWAY_MAX_PAUSE_SECONDS": "10"},
            "GATEWAY_MAX_PAUSE_SECONDS",
        ),
    ],
)
def test_bad_gateway_limits_are_refused_at_start_by_name(environment, named):
    from chalicelib.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match=named):
        Settings.from_env(environment)


def test_a_slot_already_past_is_skipped_never_used_late(clock):
    from chalicelib.services.throttle import Admission, Slots

    # Given an admission of four slots 0.1 s apart, starting now
    start = clock().timestamp()
    slots = Slots(Admission(4, start, 0.1, 4, 0.1))
    assert slots.last == clock() + timedelta(seconds=0.3)
    # When the first call is ready on time, it gets the first slot
    assert slots.take(clock()) == clock()
    # When the next is ready only 0.15 s later, the second slot is gone: it gets the third
    assert slots.take(clock() + timedelta(seconds=0.15)) == clock() + timedelta(seconds=0.2)
    # And when the slots are used up, there is none: the call goes back to the queue
    assert slots.take(clock() + timedelta(seconds=0.35)) is None
