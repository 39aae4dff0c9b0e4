"""The gateway limits repository's contract, run against DynamoDB (moto) and the in-memory one:
every write holds only when the item is still as its writer saw it."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest

from chalicelib.domain.rate_limit import Control, Lease, SharedLimits, Tally
from chalicelib.storage.gateway_limits import DynamoGatewayLimits, GatewayLimitsStore
from tests.support.memory.gateway_limits import MemoryGatewayLimits

NOW = 1_800_000_000.0
LEASE = Lease(2, NOW + 60)


@pytest.fixture(params=["dynamodb", "memory"])
def limits(request: pytest.FixtureRequest) -> Iterator[GatewayLimitsStore]:
    if request.param == "memory":
        yield MemoryGatewayLimits()
        return
    services = request.getfixturevalue("services")
    client = boto3.client("dynamodb", region_name="us-east-1")
    yield DynamoGatewayLimits(client, services.settings.table_name("sequences"))


def reserve(
    limits: GatewayLimitsStore,
    seen: SharedLimits,
    *,
    holder: str = "a",
    span: float = 2.0,
    lease: Lease = LEASE,
    max_held: int = 8,
    now: float = NOW,
) -> SharedLimits | None:
    return limits.reserve(seen, now, span, holder, lease, max_held, latest_tat=now + 2.0)


def test_the_first_read_creates_the_limits_at_full_speed_with_nothing_held(limits):
    # When the limits are read for the first time
    state = limits.read()
    # Then they are the defaults: no slot taken, no permit held, full speed, version 0
    assert (state.tat, state.held, dict(state.holders), state.version) == (0.0, 0, {}, 0)
    assert state.control == Control()
    assert limits.read() == state


def test_a_peek_does_not_create_the_limits(limits):
    # Given limits only peeked at
    seen = limits.peek()
    # Then they read as the defaults, and a reservation on them finds nothing to write to
    assert seen == SharedLimits()
    assert reserve(limits, seen) is None


def test_a_reservation_from_idle_starts_now_and_leases_the_permits(limits):
    # Given idle limits
    seen = limits.read()
    # When a sender reserves two seconds of slots and two permits
    state = reserve(limits, seen)
    # Then the next free slot is two seconds from now and the sender holds two permits
    assert state is not None
    assert state.tat == pytest.approx(NOW + 2.0)
    assert (state.held, dict(state.holders)) == (2, {"a": LEASE})


def test_a_reservation_on_a_stale_view_is_refused_and_a_fresh_one_appends(limits):
    # Given a sender that reserved slots after another one read the limits
    stale = limits.read()
    first = reserve(limits, stale, holder="a")
    assert first is not None
    # When the other sender reserves on what it saw (idle), the write is refused
    assert reserve(limits, stale, holder="b") is None
    # Then, on a fresh view (busy), its slots follow the first sender's
    state = reserve(limits, first, holder="b", span=1.0, now=NOW + 0.5)
    assert state is not None
    assert state.tat == pytest.approx(NOW + 3.0)
    assert state.held == 4


def test_a_reservation_over_the_permits_or_during_a_pause_is_refused(limits):
    # Given limits where a sender holds two permits
    held = reserve(limits, limits.read())
    assert held is not None
    # Then a reservation that would exceed the concurrency is refused
    assert reserve(limits, held, holder="b", max_held=1, now=NOW + 0.1) is None
    # And, once the controller pauses sending, so is any reservation during the pause
    paused = limits.set_control(held.version, Control(paused_until=NOW + 30), None, NOW)
    assert paused is not None
    assert reserve(limits, paused, holder="b", now=NOW + 1) is None


def test_an_expired_lease_is_taken_back_once(limits):
    # Given a sender holding two permits
    reserve(limits, limits.read())
    # When its lease is taken back, then its permits are free again
    state = limits.take_back("a", LEASE)
    assert state is not None
    assert (state.held, dict(state.holders)) == (0, {})
    # And taking it back again, or another lease of it, does nothing
    assert limits.take_back("a", LEASE) is None
    assert limits.take_back("b", Lease(1, NOW)) is None


def test_a_batch_gives_its_permits_back_and_counts_its_answers(limits):
    # Given a sender holding two permits
    reserve(limits, limits.read())
    # When it records a batch of three calls, two accepted, one granted a retry
    tally = Tally(requests=3, accepts=2, overloads=1, retries=1, latency=0.5)
    state = limits.record("a", 2, 7, tally, [])
    # Then the permits are back and the calls are counted in the bucket
    assert state is not None
    assert (state.held, dict(state.holders), state.run) == (0, {}, 0)
    assert state.window.buckets[7] == tally
    # And recording again for a holder whose permits went back still counts the calls, once
    again = limits.record("a", 2, 7, Tally(requests=1, accepts=1), [])
    assert again is not None
    assert again.held == 0
    assert again.window.buckets[7].requests == 4


def test_calls_in_a_row_with_none_accepted_add_up_until_one_is(limits):
    # Given two batches with no call accepted
    limits.read()
    limits.record(None, 0, 7, Tally(requests=3), [])
    state = limits.record(None, 0, 7, Tally(requests=2), [])
    assert state is not None
    assert state.run == 5
    # When a batch has an accepted call, then the run starts again
    state = limits.record(None, 0, 8, Tally(requests=1, accepts=1), [])
    assert state is not None
    assert state.run == 0


def test_expired_buckets_are_removed_with_the_next_count(limits):
    # Given counts in bucket 7
    limits.read()
    limits.record(None, 0, 7, Tally(requests=1, accepts=1), [])
    # When bucket 20 is counted with bucket 7 expired
    state = limits.record(None, 0, 20, Tally(requests=1, accepts=1), [7])
    # Then only bucket 20 is left
    assert state is not None
    assert set(state.window.buckets) == {20}


def test_nothing_to_count_and_no_permits_writes_nothing(limits):
    limits.read()
    assert limits.record(None, 0, 7, Tally(), []) is None


def test_the_controller_changes_once_per_version_and_says_why(limits):
    # Given limits at version 0
    seen = limits.read()
    # When a sender halves the speed, saying why
    slowed = Control(speed=0.5, cut_at=NOW)
    state = limits.set_control(seen.version, slowed, "the gateway asked to slow down", NOW)
    # Then the controller, its version and the reason change
    assert state is not None
    assert (state.control, state.version) == (slowed, 1)
    assert (state.why, state.why_at) == ("the gateway asked to slow down", NOW)
    # And another sender's decision on version 0 is refused
    assert limits.set_control(seen.version, Control(speed=0.25), None, NOW) is None
    assert limits.read().control == slowed


def test_an_operators_slots_move_only_from_where_the_writer_saw_them(limits):
    # Given an operator without slots taken
    assert limits.read_operator("903").tat == 0.0
    # When a sender moves them from 0 to a second ahead, then they are there
    assert limits.move_operator_slots("903", 0.0, NOW + 1, NOW, deferring=False)
    assert limits.read_operator("903").tat == pytest.approx(NOW + 1)
    # And a sender that saw them at 0 cannot move them
    assert not limits.move_operator_slots("903", 0.0, NOW + 2, NOW, deferring=False)
    # And a move that sends jobs back notes when
    assert limits.move_operator_slots("903", NOW + 1, NOW + 3, NOW + 0.5, deferring=True)
    assert limits.read_operator("903").deferred_at == pytest.approx(NOW + 0.5)


def test_a_deferral_is_noted_without_moving_the_slots(limits):
    # When an operator's jobs go back for want of a slot
    assert limits.note_operator_deferral("916", NOW)
    # Then the status sees when, and the slots are still free
    slots = limits.read_operator("916")
    assert (slots.tat, slots.deferred_at) == (0.0, pytest.approx(NOW))
