"""Overload or bad luck: the answer classification and the shared rate controller.

Pure: no network, no emulator. A fake clock (epoch seconds) moves by hand; `Shared` keeps in
memory what the shared DynamoDB item keeps for every sender (the window's counters and the
controller's state) and applies each batch's answers the way the throttle does.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from chalicelib.domain.gateway_answer import AnswerKind, GatewayResult
from chalicelib.domain.rate_limit import (
    MIN_SPEED,
    WINDOW_SECONDS,
    AnswerMix,
    Control,
    GatewayState,
    GatewayStatus,
    Kind,
    Tally,
    Verdict,
    Window,
    classify,
    decide,
    parse_retry_after,
)
from chalicelib.gateway import classify as read_answer

RATE = 50.0
START = datetime(2026, 12, 6, 12, 0, tzinfo=UTC).timestamp()

OK = GatewayResult(AnswerKind.SENT, "OK", 200, 0.05)
BAD_NUMBER = GatewayResult(AnswerKind.REJECTED, "HTTP 400", 400, 0.05)
SERVER_ERROR = GatewayResult(AnswerKind.SERVER_ERROR, "HTTP 500", 500, 0.05)
TIMEOUT = GatewayResult(AnswerKind.TIMEOUT, "timeout: ReadTimeout", None, 10.0)
REFUSED = GatewayResult(AnswerKind.NETWORK, "network error: ConnectionError", None, 0.001)


def too_many(retry_after: str | None = None) -> GatewayResult:
    return GatewayResult(AnswerKind.TOO_MANY_REQUESTS, "HTTP 429", 429, 0.01, retry_after)


class Shared:
    """The shared item of every sender, in memory: counters by bucket and the controller."""

    def __init__(self, now: float = START) -> None:
        self.now = now
        self.control = Control()
        self.window = Window({})
        self.run = 0

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def report(self, answers: list[GatewayResult], retries: int = 0) -> Control:
        verdicts = [classify(a, self.now) for a in answers]
        latencies = [a.latency_seconds for a in answers]
        tally = Tally.of(verdicts, latencies)
        self.window = self.window.plus(self.now, Tally(retries=retries) + tally)
        self.run = 0 if tally.accepts else self.run + tally.requests
        self.control = decide(
            self.control,
            self.window,
            verdicts,
            self.now,
            run=self.run,
            default_pause=2.0,
            max_pause=30.0,
            latencies=latencies,
        ).control
        return self.control

    def rate(self) -> float:
        return 1 / self.control.interval(RATE)

    def paused(self) -> bool:
        return self.control.paused_until > self.now

    def status(self) -> GatewayStatus:
        return GatewayStatus.of(self.control, self.window, RATE, self.now)


def batches_of(rng: random.Random, share_failing: float, failing: GatewayResult, size: int = 10):
    return [failing if rng.random() < share_failing else OK for _ in range(size)]


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("status", "body", "header", "kind", "wait"),
    [
        (200, '{"code": 0}', None, Kind.SENT, None),
        (400, "bad phone", None, Kind.REJECTED, None),
        (404, "no such route", None, Kind.REJECTED, None),
        (401, "", None, Kind.UNAUTHORIZED, None),
        (429, "slow down", "7", Kind.OVERLOAD, 7.0),
        (429, "slow down", None, Kind.OVERLOAD, None),
        (503, "busy", "2", Kind.OVERLOAD, 2.0),
        (503, "down", None, Kind.BAD_LUCK, None),
        (500, "oops", None, Kind.BAD_LUCK, None),
        (502, "bad gateway", None, Kind.BAD_LUCK, None),
        (200, "<html>", None, Kind.BAD_LUCK, None),
        (200, '{"code": 5}', None, Kind.BAD_LUCK, None),
    ],
)
def test_each_gateway_answer_is_one_kind(status, body, header, kind, wait):
    # Given an HTTP answer as the gateway client reads it, with its Retry-After header
    answer = read_answer(status, body)
    answer = replace(answer, latency_seconds=0.05, retry_after=header)
    # When it is classified, then it is sent, rejected, unauthorized, overload or bad luck
    assert classify(answer, START) == Verdict(kind, wait)


@pytest.mark.parametrize("answer", [TIMEOUT, REFUSED])
def test_timeouts_and_network_errors_are_bad_luck(answer):
    """Given a timeout or a refused connection, when it is classified, then it is bad luck, not
    overload."""
    assert classify(answer, START).kind is Kind.BAD_LUCK


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    # Given a Retry-After as an HTTP-date 30 s from now, or as delta-seconds
    later = format_datetime(datetime.fromtimestamp(START, UTC) + timedelta(seconds=30), True)
    # Then both say how long to wait; a date in the past means now; garbage means nothing
    assert parse_retry_after(later, START) == pytest.approx(30.0)
    assert parse_retry_after("120", START) == 120.0
    assert parse_retry_after(later, START + 60) == 0.0
    assert parse_retry_after("soon", START) is None
    assert parse_retry_after(None, START) is None


# ---------------------------------------------------------------- bad luck


def test_twenty_percent_random_server_errors_never_slow_sending():
    # Given every sender at the full rate, and a gateway failing 20% of calls at random
    shared, rng = Shared(), random.Random(7)
    # When ten minutes of batches (10 calls every 0.2 s) come back
    for _ in range(3000):
        shared.report(batches_of(rng, 0.2, SERVER_ERROR))
        # Then sending is never paused nor slowed
        assert not shared.paused()
        assert shared.rate() == pytest.approx(RATE)
        shared.advance(0.2)


def test_scattered_timeouts_and_a_batch_of_only_failures_do_not_slow_sending():
    # Given a working gateway, with scattered timeouts (seconds long) and one unlucky batch
    shared, rng = Shared(), random.Random(3)
    for _ in range(200):
        shared.report(batches_of(rng, 0.1, TIMEOUT))
        shared.advance(0.2)
    shared.report([SERVER_ERROR, TIMEOUT, SERVER_ERROR])
    # Then the rate is left alone
    assert shared.rate() == pytest.approx(RATE)
    assert not shared.paused()


# ---------------------------------------------------------------- overload


def test_a_429_halves_the_rate_and_pauses_for_its_retry_after():
    # Given sending at the full rate
    shared = Shared()
    shared.report([OK] * 10)
    shared.advance(1)
    # When the gateway answers one call with 429 and Retry-After: 3
    shared.report([OK, too_many("3"), OK])
    # Then every sender waits 3 s, then sends at half the rate
    assert shared.control.paused_until == pytest.approx(shared.now + 3)
    assert shared.rate() == pytest.approx(RATE / 2)


def test_a_batch_of_429s_cuts_once_not_once_per_answer():
    """Given a sender at full rate, when one batch and then another sender report 429s of the same
    moment, then the rate is halved once."""
    shared = Shared()
    shared.report([OK] * 10)
    shared.report([too_many("1")] * 5)
    # Another sender's 429s of the same moment: the same episode
    shared.report([OK, too_many("1")])
    assert shared.rate() == pytest.approx(RATE / 2)


def test_a_429_without_retry_after_pauses_for_the_default_and_a_huge_one_is_capped():
    """Given a 429 without Retry-After and later one asking for a day, when each is reported, then
    sending pauses for the default 2 s, then for the 30 s cap."""
    shared = Shared()
    shared.report([OK] * 10)
    shared.report([OK, too_many()])
    assert shared.control.paused_until == pytest.approx(shared.now + 2.0)
    shared.advance(5)
    shared.report([OK, too_many("86400")])
    assert shared.control.paused_until == pytest.approx(shared.now + 30.0)


def test_an_accept_ratio_below_half_cuts_the_rate():
    # Given a gateway that fails 70% of the calls (still answering some)
    shared, rng = Shared(), random.Random(5)
    # When a few seconds of batches come back
    for _ in range(20):
        shared.report(batches_of(rng, 0.7, SERVER_ERROR))
        shared.advance(0.5)
    # Then the rate was cut, repeatedly (at most once a second)
    assert shared.rate() < RATE / 4
    assert shared.control.speed >= MIN_SPEED


def test_latency_far_above_its_baseline_is_overload_but_a_timeout_is_not():
    # Given a minute of answers in 50 ms
    shared = Shared()
    for _ in range(60):
        shared.report([OK] * 5)
        shared.advance(1)
    # When a batch times out, the rate is left alone
    shared.report([TIMEOUT] * 2 + [OK] * 3)
    assert shared.rate() == pytest.approx(RATE)
    # When most of a batch succeeds but takes 3 s each, the rate is cut
    shared.advance(1)
    slow = GatewayResult(AnswerKind.SENT, "OK", 200, 3.0)
    shared.report([slow] * 4 + [OK])
    assert shared.rate() == pytest.approx(RATE / 2)


# ---------------------------------------------------------------- outage and recovery


def test_an_outage_is_probed_about_once_a_second_until_a_success():
    # Given a gateway that refuses every connection
    shared = Shared()
    shared.report([OK] * 10)
    calls, tat = 0, shared.now
    # When senders keep asking for slots for a minute (as the throttle hands them out)
    for _ in range(600):
        if not shared.paused() and shared.now >= tat:
            batch = [REFUSED] * shared.control.batch_limit(10)
            calls += len(batch)
            tat = shared.now + len(batch) * shared.control.interval(RATE)
            shared.report(batch)
        shared.advance(0.1)
    # Then after the first few calls, the gateway gets one call a second at most
    assert shared.control.probing
    assert calls <= 60 + 20


def test_failed_probes_leave_the_shared_state_as_it_is():
    # Given probing after an outage
    shared = Shared()
    shared.report([REFUSED] * 25)
    probing = shared.control
    assert probing.probing
    # When more probes fail, a second apart, then the state is unchanged (no write needed)
    for _ in range(5):
        shared.advance(1)
        assert shared.report([REFUSED]) == probing


def test_sending_is_back_at_90_percent_of_the_rate_within_10_s_of_recovery():
    # Given probing after an outage
    shared = Shared()
    for _ in range(3):
        shared.report([REFUSED] * 10)
        shared.advance(1)
    assert shared.control.probing
    # When the probe gets through and the batches after it too (one every 0.2 s)
    recovered = shared.now
    shared.report([OK])
    seconds = None
    while shared.now - recovered < 15:
        shared.advance(0.2)
        shared.report([OK] * 10)
        if shared.rate() >= 0.9 * RATE:
            seconds = shared.now - recovered
            break
    # Then the rate climbs back within 10 s, but not at once (no thundering herd)
    assert seconds is not None
    assert 2 <= seconds <= 10


def test_after_an_outage_the_climb_starts_at_a_quarter_and_reaches_90_percent_in_4_s():
    # Given probing after an outage
    shared = Shared()
    for _ in range(3):
        shared.report([REFUSED] * 10)
        shared.advance(1)
    # When the probe gets through
    shared.report([OK])
    recovered = shared.now
    # Then sending restarts at a quarter of the rate, not at once
    assert shared.rate() == pytest.approx(RATE / 4)
    # And with good answers (a batch every 0.2 s) it is at 90% within 4 s
    while shared.rate() < 0.9 * RATE:
        shared.advance(0.2)
        shared.report([OK] * 10)
    assert shared.now - recovered <= 4.01


def test_sending_climbs_back_after_429s_stop():
    """Given a rate cut to an eighth by three episodes of 429s, when answers are all OK again, then
    it climbs back to 90% of the limit within 10 s."""
    shared = Shared()
    shared.report([OK] * 10)
    for _ in range(3):
        shared.report([OK, too_many("1")])
        shared.advance(1.5)
    assert shared.rate() == pytest.approx(RATE / 8)
    start = shared.now
    while shared.rate() < 0.9 * RATE:
        shared.report([OK] * 10)
        shared.advance(0.5)
        assert shared.now - start <= 10


# ---------------------------------------------------------------- retry budget


def test_the_retry_budget_keeps_retries_to_about_a_fifth_of_the_calls():
    # Given a gateway failing half of the calls at random, and senders retrying what failed
    # while the shared budget allows
    shared, rng = Shared(), random.Random(11)
    calls = retries = 0
    for _ in range(1200):  # four minutes of batches, every 0.2 s
        batch = batches_of(rng, 0.5, SERVER_ERROR)
        allowed = shared.window.retry_budget(shared.now)
        granted = min(allowed, sum(a is SERVER_ERROR for a in batch))
        calls, retries = calls + len(batch), retries + granted
        shared.report(batch, retries=granted)
        shared.advance(0.2)
    # Then retries stayed near 20% of the calls, not one per failure (50%)
    assert 0.15 * calls <= retries <= 0.22 * calls


def test_a_quiet_window_still_allows_a_few_retries():
    """Given no calls in the window, when the retry budget is asked, then a few retries (10) are
    still allowed."""
    assert Window({}).retry_budget(START) == 10


# ---------------------------------------------------------------- what operators see


def test_a_healthy_gateway_is_normal_at_the_configured_rate():
    # Given a gateway that accepts every call
    shared = Shared()
    for _ in range(10):
        shared.report([OK] * 10)
        shared.advance(0.2)
    # Then the operator sees it normal, at full rate, every call accepted, nothing degraded
    status = shared.status()
    assert status.state is GatewayState.NORMAL
    assert status.current_rate == status.configured_rate == RATE
    assert status.accept_ratio == 1.0
    assert status.answers == AnswerMix(calls=100, accepted=100, overload=0, retries=0)
    assert not status.degraded


def test_no_calls_yet_is_normal_with_no_accept_ratio():
    """Given no calls yet, when the gateway's status is read, then it is normal, not degraded, with
    no accept ratio."""
    status = Shared().status()
    assert status.state is GatewayState.NORMAL
    assert status.accept_ratio is None
    assert status.answers.calls == 0
    assert not status.degraded


def test_a_429_shows_paused_then_slowed_with_the_rate_it_resumes_at():
    # Given a gateway that answers 429 with Retry-After 4 to a batch
    shared = Shared()
    shared.report([OK] * 10)
    shared.report([too_many("4")] * 10)
    # Then the operator sees it paused for the Retry-After, no call allowed now, half speed after
    status = shared.status()
    assert status.state is GatewayState.PAUSED
    assert status.pause_left == pytest.approx(4.0)
    assert status.current_rate == 0.0
    assert status.speed * status.configured_rate == pytest.approx(RATE / 2)
    assert status.answers.overload == 10
    assert status.degraded
    # When the pause is over, it is slowed: sending at half the rate
    shared.advance(4.5)
    status = shared.status()
    assert status.state is GatewayState.SLOWED
    assert status.pause_left == 0.0
    assert status.current_rate == pytest.approx(RATE / 2)
    assert status.degraded


def test_an_outage_shows_probing_at_one_call_a_second():
    # Given a gateway that refuses every connection, long enough to be an outage
    shared = Shared()
    for _ in range(3):
        shared.report([REFUSED] * 10)
        shared.advance(0.1)
    # Then the operator sees it probing at one call a second, and nothing accepted
    status = shared.status()
    assert status.state is GatewayState.PROBING
    assert status.current_rate == pytest.approx(1.0)
    assert status.accept_ratio == 0.0
    assert status.answers.bad_luck == 30
    assert status.degraded


def test_random_failures_that_do_not_slow_sending_still_show_a_degraded_gateway():
    # Given a gateway failing 30% of calls at random: no overload, sending at full rate
    shared, rng = Shared(), random.Random(5)
    for _ in range(50):
        shared.report(batches_of(rng, 0.3, SERVER_ERROR))
        shared.advance(0.2)
    status = shared.status()
    assert status.state is GatewayState.NORMAL
    assert status.current_rate == pytest.approx(RATE)
    # Then the accept ratio says it is well below a healthy gateway's: degraded
    assert 0.6 < status.accept_ratio < 0.8
    assert status.answers.bad_luck == status.answers.calls - status.answers.accepted
    assert status.degraded


def test_a_few_failures_do_not_make_a_gateway_degraded():
    # Given a healthy gateway that failed 1 call in 20
    shared = Shared()
    for _ in range(10):
        shared.report([OK] * 19 + [SERVER_ERROR])
    # Then it is not degraded; nor is one failed call out of the first few
    assert not shared.status().degraded
    fresh = Shared()
    fresh.report([SERVER_ERROR, OK, OK])
    assert not fresh.status().degraded


def test_the_answer_mix_covers_the_window_only():
    # Given overload answers two minutes ago and good answers since
    shared = Shared()
    shared.report([too_many("1")] * 10)
    shared.advance(WINDOW_SECONDS + 10)
    shared.report([OK] * 10)
    # Then the mix counts only the window's calls
    assert shared.status().answers == AnswerMix(calls=10, accepted=10, overload=0, retries=0)


# ---------------------------------------------------------------- per-operator slots


def test_an_operators_calls_never_come_closer_than_its_rate_however_late_they_leave():
    from chalicelib.domain.rate_limit import OperatorSpacing

    # Given an operator limited to 4 calls a second, its slots laid out on a global grid of
    # 50 calls a second
    spacing = OperatorSpacing(4.0)
    interval = spacing.interval_on(1 / 50)
    slots = [START + i * interval for i in range(40)]
    # When every other call leaves as late as allowed and the rest on time
    rng = random.Random(5)
    departures = [slot + rng.choice((0.0, spacing.late)) for slot in slots]
    # Then no two of its calls are closer than a quarter second: no second ever holds five
    gaps = [b - a for a, b in itertools.pairwise(departures)]
    assert min(gaps) >= 1 / 4 - 1e-9
    # And its slots are on the global grid, about 91% of its rate apart at most
    assert round(interval * 50, 9) == int(round(interval * 50, 9))
    assert 1 / interval >= 0.85 * 4


def test_operator_slots_start_on_the_global_grid_and_count_those_before_the_end():
    from chalicelib.domain.rate_limit import on_grid, slots_before, slots_starting_before

    # Given global slots every 0.02 s from START, and an operator free from START + 0.05
    # Then its first slot is the next global slot, START + 0.06
    assert on_grid(START + 0.05, START, 0.02) == pytest.approx(START + 0.06)
    assert on_grid(START - 3, START, 0.02) == START
    # And slots 0.5 s apart from there that start within 1.2 s are three (0.06, 0.56, 1.06)
    assert slots_starting_before(START + 0.06, START + 1.2, 0.5) == 3
    # While the global horizon counts only slots that end within it
    assert slots_before(START + 0.06, START + 1.2, 0.5) == 2
    assert slots_starting_before(START + 2, START + 1, 0.5) == 0


def test_the_gateway_is_known_to_work_only_while_most_of_many_calls_are_accepted():
    # Given a gateway failing 30% of the calls at random for a few seconds
    shared, rng = Shared(), random.Random(5)
    for _ in range(5):
        shared.report(batches_of(rng, 0.3, SERVER_ERROR))
        shared.advance(1.0)
    # Then it is known to work: a failure there is bad luck (its retry may come back soon)
    assert shared.window.works(shared.now)
    # But a handful of calls, or a window where most calls fail, tells nothing of the kind
    assert not Window({}).plus(START, Tally(requests=5, accepts=5)).works(START)
    failing = Shared()
    for _ in range(5):
        failing.report(batches_of(rng, 0.7, SERVER_ERROR))
        failing.advance(1.0)
    assert not failing.window.works(failing.now)
