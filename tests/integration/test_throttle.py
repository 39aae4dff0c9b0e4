"""The gateway limits shared by every sender: rate slots, concurrency permits, back-pressure.

Each test builds independent `GatewayThrottle` instances, as separate Lambdas would have, over
one moto table, and moves the test's clock by hand.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from datetime import timedelta

import boto3
import pytest

from chalicelib.domain.gateway_answer import AnswerKind, GatewayResult
from chalicelib.domain.rate_limit import GatewayState
from chalicelib.services.throttle import Admission, GatewayThrottle
from chalicelib.storage.gateway_limits import ITEM_NAME, DynamoGatewayLimits

OK = GatewayResult(AnswerKind.SENT, "OK", 200, 0.01)
REJECTED = GatewayResult(AnswerKind.REJECTED, "HTTP 400", 400, 0.01)
SERVER_ERROR = GatewayResult(AnswerKind.UNAVAILABLE, "HTTP 503", 503, 0.01)
TIMEOUT = GatewayResult(AnswerKind.TIMEOUT, "timeout: ReadTimeout", None, 10.0)
MALFORMED = GatewayResult(AnswerKind.BAD_ANSWER, "HTTP 200 without success code", 200, 0.01)


def rate_limited(retry_after: str | None = None) -> GatewayResult:
    return GatewayResult(AnswerKind.TOO_MANY_REQUESTS, "HTTP 429", 429, 0.01, retry_after)


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


def shared_limits(settings) -> DynamoGatewayLimits:
    """The shared limits item through a client of its own: another Lambda instance's."""
    client = boto3.client("dynamodb", region_name="us-east-1")
    return DynamoGatewayLimits(client, settings.table_name("sequences"))


@pytest.fixture
def make_throttle(services, limits, clock):
    def make() -> GatewayThrottle:
        # Each its own client and cache: another Lambda instance.
        return GatewayThrottle(shared_limits(limits), limits, clock)

    return make


def slots_of(admissions) -> list[float]:
    return sorted(
        admission.start + i * admission.interval
        for admission in admissions
        for i in range(admission.count)
    )


def together(
    senders: list[GatewayThrottle], times: int, ask: Callable[[GatewayThrottle], Admission]
) -> list[Admission]:
    """Every sender asks `times` times, all in parallel threads; what they got."""
    admissions, lock = [], threading.Lock()

    def hammer(throttle: GatewayThrottle) -> None:
        for _ in range(times):
            admission = ask(throttle)
            with lock:
                admissions.append(admission)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return admissions


def test_independent_senders_share_one_rate(make_throttle, clock):
    # Given four senders that each want 10 calls, many times, at the same moment
    senders = [make_throttle() for _ in range(4)]

    def ask(throttle: GatewayThrottle) -> Admission:
        admission = throttle.admit(10)
        throttle.release(admission)
        return admission

    # When they all ask together
    admissions = together(senders, 20, ask)

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
    """Given a limit of 50 calls a second, when a batch of 150 asks to go, then it gets the 100
    slots of the horizon, the next batch waits, and a second later it goes."""
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
    """Given a sender idle for five minutes, when it asks to send again, then its first slot is now
    and the spacing is the limit's, with no saved-up burst."""
    throttle = make_throttle()
    throttle.admit(10)
    clock.advance(minutes=5)
    admission = throttle.admit(10)
    # The first slot is now, not five minutes ago: no burst of saved-up sends.
    assert admission.start == pytest.approx(clock().timestamp(), abs=1e-3)
    assert admission.interval == pytest.approx(1 / 50)


def test_concurrency_permits_are_global_and_come_back(make_throttle, clock):
    """Given two senders sharing 8 permits, when both ask for 6, then the second gets 2, a third
    ask waits, and released permits come back."""
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
    """Given a sender that died holding every permit, when its lease of a minute runs out, then
    another sender gets them."""
    dead, alive = make_throttle(), make_throttle()
    dead.admit(8)  # never released: the Lambda was killed mid-batch
    assert alive.admit(1).count == 0
    clock.advance(seconds=61)
    assert alive.admit(4).permits == 4


def test_a_429_pauses_everyone_for_its_retry_after_and_halves_the_rate(make_throttle, clock):
    reporter, other = make_throttle(), make_throttle()
    admission = reporter.admit(2)
    # When the gateway answers one call of a batch with 429 and Retry-After: 3
    reporter.release(admission, [OK, rate_limited("3")])
    # Then every sender is told to wait for the Retry-After
    paused = other.admit(10)
    assert paused.count == 0
    assert paused.retry_after == pytest.approx(3.0, abs=0.01)
    # And afterwards sends at half the rate
    clock.advance(seconds=3.1)
    resumed = other.admit(10)
    assert resumed.count == 10
    assert resumed.interval == pytest.approx(2 / 50)


def test_the_status_shows_another_senders_429_pause_and_its_reason(make_throttle, clock):
    reporter, watcher = make_throttle(), make_throttle()
    reporter.release(reporter.admit(10), [OK] * 10)
    # When one sender's batch meets a 429 with Retry-After: 4
    clock.advance(seconds=1)
    reporter.release(reporter.admit(2), [OK, rate_limited("4")])
    # Then an operator asking any other instance sees the pause, its reason and when it came
    status = watcher.status()
    assert status.state is GatewayState.PAUSED
    assert status.pause_left == pytest.approx(4.0, abs=0.01)
    assert status.current_rate == 0.0
    assert status.speed * status.configured_rate == pytest.approx(25.0)
    assert status.why == "the gateway asked to slow down"
    assert status.why_at == pytest.approx(clock().timestamp())
    assert (status.answers.calls, status.answers.accepted, status.answers.overload) == (12, 11, 1)
    assert status.degraded
    # And after the pause, slowed at half the rate, the reason still shown
    clock.advance(seconds=5)
    later = watcher.status()
    assert later.state is GatewayState.SLOWED
    assert later.current_rate == pytest.approx(25.0)
    assert later.why == "the gateway asked to slow down"


def test_the_status_of_a_gateway_never_used_is_normal_and_writes_nothing(make_throttle, limits):
    # Given no shared item yet (no sender has run)
    throttle = make_throttle()
    # When an operator asks for the status
    status = throttle.status()
    # Then it is normal at the configured rate, with no calls counted
    assert status.state is GatewayState.NORMAL
    assert status.current_rate == status.configured_rate == 50.0
    assert status.accept_ratio is None
    assert not status.degraded
    # And the item was not created by asking
    client = boto3.client("dynamodb", region_name="us-east-1")
    key = {"name": {"S": ITEM_NAME}}
    assert "Item" not in client.get_item(TableName=limits.table_name("sequences"), Key=key)


def test_a_sender_knows_the_status_it_last_saw_without_asking(make_throttle):
    """Given a sender that released three OK answers, when it asks for the status it knows, then it
    has the three calls and a normal state, with no read."""
    throttle = make_throttle()
    assert throttle.known_status() is None
    throttle.release(throttle.admit(3), [OK, OK, OK])
    known = throttle.known_status()
    assert known is not None
    assert known.answers.calls == 3
    assert known.state is GatewayState.NORMAL


def test_scattered_server_errors_do_not_slow_sending(make_throttle, clock):
    # Given a gateway failing one call in four at random (not overloaded)
    throttle = make_throttle()
    for _ in range(40):
        admission = throttle.admit(4)
        # When each batch comes back with one failure
        throttle.release(admission, [SERVER_ERROR, OK, OK, OK] if _ % 2 else [OK, TIMEOUT, OK, OK])
        clock.advance(seconds=0.1)
    # Then every sender still sends at the full rate
    admission = throttle.admit(10)
    assert admission.count == 10
    assert admission.interval == pytest.approx(1 / 50)


def test_five_failures_in_a_row_among_successes_do_not_pause_sending(make_throttle, clock):
    # Given a gateway that fails one call in four at random, one call per batch: now and then
    # five in a row fail (about once in 1,400 calls), while the gateway is not overloaded
    throttle = make_throttle()
    answers = [OK, OK, OK] * 10 + [SERVER_ERROR, TIMEOUT, SERVER_ERROR, SERVER_ERROR, TIMEOUT]
    for answer in answers:
        throttle.release(throttle.admit(1), [answer])
        clock.advance(seconds=0.05)
    # Then no sender is paused or slowed down
    admission = throttle.admit(10)
    assert admission.count == 10
    assert admission.interval == pytest.approx(1 / 50)


def test_an_outage_is_probed_one_call_a_second_and_sending_climbs_back(make_throttle, clock):
    one, two = make_throttle(), make_throttle()
    # Given two senders whose calls all fail (the gateway is down)
    for sender in (one, two) * 3:
        admission = sender.admit(10)
        sender.release(admission, [SERVER_ERROR] * admission.count)
    # Then each batch may make one call, at most one a second for all senders together
    clock.advance(seconds=2)
    probe, other = one.admit(10), two.admit(10)
    assert probe.count == 1
    # And the calls that got no probe slot wait a few seconds, not one: a backlog does not
    # bounce through the queue every second while the gateway is down
    assert probe.retry_after >= 5.0
    assert other.count <= 1
    assert other.count == 0 or other.start - probe.start >= 1.0 - 1e-6
    one.release(probe)
    two.release(other)
    # When a probe gets through, sending climbs back to the configured rate within seconds
    clock.advance(seconds=1)
    one.release(one.admit(1), [OK])
    seconds = 0.0
    while (admission := two.admit(5)).interval > 1 / (0.9 * 50):
        two.release(admission, [OK] * admission.count)
        clock.advance(seconds=0.5)
        seconds += 0.5
        assert seconds <= 10


def test_bad_answers_that_are_not_about_load_do_not_slow_sending(make_throttle):
    """Given many malformed and rejected answers, when the next batch is admitted, then it is
    spaced at the full rate."""
    throttle = make_throttle()
    for _ in range(20):
        throttle.release(throttle.admit(2), [MALFORMED, REJECTED])
    assert throttle.admit(1).interval == pytest.approx(1 / 50)


def test_the_window_counts_every_senders_calls_in_the_writes_they_already_make(
    make_throttle, clock
):
    one, two = make_throttle(), make_throttle()
    # Given a quiet window: a few retries allowed
    assert one.retry_budget().take()
    # When two senders each report 100 calls, 10 retries granted between them
    for sender in (one, two):
        for _ in range(10):
            sender.release(sender.admit(10), [OK] * 10, retries=1)
            clock.advance(seconds=0.25)
    # Then the last to write sees both senders' calls: 20% of 200 calls plus the reserve, less
    # the retries
    budget = two.retry_budget()
    granted = sum(budget.take() for _ in range(100))
    assert granted == 40 + 10 - 20
    # And two minutes later the window has forgotten them
    clock.advance(minutes=3)
    two.release(two.admit(1), [OK])
    fresh = two.retry_budget()
    assert sum(fresh.take() for _ in range(100)) == 10


def test_an_item_written_before_the_controller_existed_still_works(make_throttle, clock):
    # Given the shared item as the previous version left it (no controller version or state)
    boto3.client("dynamodb", region_name="us-east-1").put_item(
        TableName="sms-test-sequences",
        Item={
            "name": {"S": "gateway-limits"},
            **{key: {"N": "0"} for key in ("tat", "paused_until", "held", "run", "level")},
            "speed": {"N": "1"},
            "raised_at": {"N": "0"},
            "holders": {"M": {}},
        },
    )
    throttle = make_throttle()
    # When a sender sends and the gateway answers 429
    admission = throttle.admit(5)
    assert admission.count == 5
    throttle.release(admission, [rate_limited("2")] * 5)
    # Then the controller's pause takes effect for every sender
    assert make_throttle().admit(1).retry_after == pytest.approx(2.0, abs=0.01)


def test_slots_are_spaced_on_the_clock_they_are_used_with(make_throttle, clock):
    """Given an admission of five calls, when its slots are read, then the first is now and they
    are 1/50 s apart on the test's clock."""
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
    """Given a bad gateway limit setting, when the settings are read, then they are refused naming
    it."""
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


# ---------------------------------------------------------------- per operator


@pytest.fixture
def make_operator_throttle(services, limits, clock):
    operator_limits = limits.model_copy(
        update={"gateway_rate_per_operator": (("903", 2.0), ("916", 20.0))}
    )

    def make() -> GatewayThrottle:
        return GatewayThrottle(shared_limits(operator_limits), operator_limits, clock)

    return make


def test_independent_senders_share_one_operators_rate(make_operator_throttle, clock):
    # Given three senders that each want slots for 4 calls of operator 903 (2 a second), many
    # times, over the same 2 s
    senders = [make_operator_throttle() for _ in range(3)]
    start = clock().timestamp()

    # When they all ask together
    admissions = together(
        senders, 5, lambda throttle: throttle.admit_operator("903", 4, start, start + 2.0, 1 / 50)
    )

    # Then their slots are far enough apart that a call leaving as late as allowed and the next
    # one leaving on time are still half a second apart
    slots = slots_of(admissions)
    late = max(a.late for a in admissions)
    assert late > 0
    assert min(b - a for a, b in itertools.pairwise(slots)) - late >= 0.5 - 1e-6
    # And within the 2 s the operator got four slots, the rest were told when to come back
    assert len(slots_of(admissions)) == 4
    refused = [a for a in admissions if a.count == 0]
    assert refused
    assert all(a.retry_after > 0 for a in refused)


def test_one_operators_slots_leave_the_global_rate_and_other_operators_alone(
    make_operator_throttle, clock
):
    throttle = make_operator_throttle()
    start = clock().timestamp()
    # Given operator 903's slots taken for the next 2 s
    assert throttle.admit_operator("903", 10, start, start + 2.0, 1 / 50).count == 4
    assert throttle.admit_operator("903", 1, start, start + 2.0, 1 / 50).count == 0
    # Then operator 916 still has its own, and the global rate all of its slots
    assert throttle.admit_operator("916", 3, start, start + 2.0, 1 / 50).count == 3
    assert throttle.admit(10).count == 10
    # And the status shows which operator is deferring its jobs
    operators = {o.code: o for o in make_operator_throttle().status().operators}
    assert operators["903"].deferring is True
    assert operators["903"].configured_rate == 2.0
    assert operators["903"].reserved_ahead_seconds >= 2.0
    assert operators["916"].deferring is False


def test_an_operators_call_keeps_a_slot_within_its_bound_and_the_others_skip_it(clock):
    from chalicelib.services.throttle import Slots

    # Given an admission of five slots 0.1 s apart, starting now
    start = clock().timestamp()
    slots = Slots(Admission(5, start, 0.1, 5, 0.1))
    # When an operator's call whose slot is 0.15 s from now (at most 0.06 s late) sets one aside
    kept = slots.take_between(start + 0.15, start + 0.21, clock())
    # Then it gets the slot at 0.2 s, and the calls of other operators take the rest in order
    assert kept == clock() + timedelta(seconds=0.2)
    others = [slots.take(clock()) for _ in range(4)]
    assert others == [clock() + timedelta(seconds=s) for s in (0, 0.1, 0.3, 0.4)]
    # And a call whose bound holds no free slot gets none: it never leaves late
    assert slots.take_between(start + 0.41, start + 0.45, clock()) is None
    assert Slots(Admission.none(1.0)).take_between(start, start + 1, clock()) is None
