"""The back-pressure benchmark's arithmetic, on synthetic sandbox ledgers (no stack, no network)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.backpressure import (
    deliverable_count,
    delivery_figures,
    minimum_seconds,
    outage_figures,
    storm_figures,
    verdicts,
)
from bench.delivery import client_phone

CREATED = 1_000.0


def ledger(
    accepted: list[tuple[int, float]], requests: list[tuple[int, float, str]]
) -> dict[str, Any]:
    """A ledger shaped as `GET /_sandbox/ledger` returns it."""
    return {
        "accepted": [
            {"msg_id": msg_id, "phone": 79_000_000_000 + msg_id, "text": "x", "accepted_at": at}
            for msg_id, at in accepted
        ],
        "requests": [
            {"received_at": at, "outcome": outcome, "msg_id": msg_id}
            for msg_id, at, outcome in requests
        ],
        "duplicates": [],
    }


def steady_calls(start: float, until: float, per_second: int) -> list[tuple[int, float, str]]:
    """`per_second` "ok" calls a second, evenly spaced, from `start` to `until`."""
    count = round((until - start) * per_second)
    return [(n, start + n / per_second, "ok") for n in range(count)]


def test_phones_with_a_rejected_suffix_are_not_deliverable() -> None:
    # Given the benchmark's first 20 clients and the gateway rejecting phones ending in 7
    phones = [client_phone(n) for n in range(20)]

    # When the deliverable messages are counted
    count = deliverable_count(phones, ("7",))

    # Then the two phones ending in 7 are left out, and nothing is without a suffix
    assert count == 18
    assert deliverable_count(phones, ()) == 20


def test_a_storm_or_outage_adds_its_length_to_the_minimum_time() -> None:
    # Given 750 messages at 25/s
    # When the minimum is asked for with and without a 60 s outage
    # Then it is 30 s of sending, plus the outage when nothing can be delivered
    assert minimum_seconds(750, 25.0) == 30.0
    assert minimum_seconds(750, 25.0, 60.0) == 90.0


def test_a_message_counts_once_at_its_first_acceptance_and_late_ones_miss_the_end() -> None:
    # Given 4 messages at 2/s: #1, #2 (accepted twice, a slow answer retried) and #3 accepted,
    # #3 after the end at +5 s, and #4 rejected with 400
    book = ledger(
        accepted=[(1, CREATED + 1), (2, CREATED + 2), (2, CREATED + 3), (3, CREATED + 6)],
        requests=[
            (1, CREATED + 1, "ok"),
            (4, CREATED + 1.5, "400"),
            (2, CREATED + 2, "slow"),
            (2, CREATED + 3, "ok"),
            (3, CREATED + 4, "5xx"),
            (3, CREATED + 6, "ok"),
        ],
    )

    # When its figures are computed
    figures = delivery_figures(
        book,
        audience=4,
        deliverable=3,
        rate=2.0,
        created_at=CREATED,
        deadline=CREATED + 5,
        stopped_at=CREATED + 9,
    )

    # Then 2 of 3 deliverable were accepted before the end, all finished at +6 s (3x the 2 s
    # minimum), and 4 settled messages (3 accepted, 1 rejected) over 6 s make 0.67/s
    assert figures["accepted"] == 3
    assert figures["accepted_before_end"] == 2
    assert figures["accepted_before_end_share"] == pytest.approx(2 / 3, abs=1e-4)
    assert figures["finished_after_seconds"] == 6.0
    assert figures["minimum_seconds"] == 2.0
    assert figures["over_minimum"] == 3.0
    assert figures["messages_per_second"] == pytest.approx(4 / 6, abs=0.01)
    assert figures["accepted_per_second"] == 0.5
    assert figures["calls_per_second"] == 1.0
    # And the senders used half of the 2/s limit: 6 calls over 6 s
    assert figures["calls_share_of_rate"] == 0.5
    assert figures["gateway_answers"] == {"400": 1, "5xx": 1, "ok": 3, "slow": 1}


def test_a_mailing_that_never_finished_is_measured_until_the_benchmark_stopped() -> None:
    # Given 3 deliverable messages of which only 2 were ever accepted
    book = ledger(
        accepted=[(1, CREATED + 1), (2, CREATED + 2)],
        requests=[(1, CREATED + 1, "ok"), (2, CREATED + 2, "ok"), (3, CREATED + 3, "5xx")],
    )

    # When its figures are computed, the benchmark having stopped watching at +10 s
    figures = delivery_figures(
        book,
        audience=3,
        deliverable=3,
        rate=1.0,
        created_at=CREATED,
        deadline=CREATED + 8,
        stopped_at=CREATED + 10,
    )

    # Then it has no time to finish, and its throughput spreads over the 10 s watched
    assert figures["finished_after_seconds"] is None
    assert figures["over_minimum"] is None
    assert figures["messages_per_second"] == 0.2


def test_a_storm_reports_the_densest_second_the_rate_during_429s_and_the_recovery() -> None:
    # Given 20 calls/s for 10 s, one call a second during a 429 storm from +10 to +20 s, and
    # 20 calls/s again from +25 s
    calls = (
        steady_calls(CREATED, CREATED + 10, 20)
        + [(0, CREATED + 10 + s, "429") for s in range(1, 10)]
        + steady_calls(CREATED + 25, CREATED + 35, 20)
    )
    book = ledger(accepted=[], requests=calls)

    # When the storm's figures are computed against a limit of 20/s
    figures = storm_figures(book, rate=20.0, storm_from=CREATED + 10, storm_until=CREATED + 20)

    # Then the densest window is the limit, 9 calls in the storm's 9.5 settled seconds, and the
    # rate was back at 90% one second after sending resumed, 6 s after the storm
    assert figures["densest_one_second_window"] == 20
    assert figures["densest_over_limit"] == 1.0
    assert figures["calls_per_second_during_429s"] == pytest.approx(9 / 9.5, abs=0.01)
    assert figures["recovery_seconds"] == 6.0


def test_an_outage_reports_the_probing_rate_and_none_when_the_rate_never_came_back() -> None:
    # Given 2 probes a second during a 60 s outage and only 5 calls a second after it
    probes = [(0, CREATED + s / 2, "outage") for s in range(1, 120)]
    after = steady_calls(CREATED + 60, CREATED + 80, 5)
    book = ledger(accepted=[], requests=probes + after)

    # When the outage's figures are computed against a limit of 20/s
    figures = outage_figures(book, rate=20.0, outage_from=CREATED, outage_until=CREATED + 60)

    # Then about 2 calls/s were made during it, and 90% of the rate was never reached again
    assert figures["calls_per_second_during_outage"] == pytest.approx(2.0, abs=0.01)
    assert figures["recovery_seconds"] is None


def test_targets_compare_faults_with_the_healthy_run() -> None:
    # Given (a) at 90% accepted before the end and 15 messages/s, (d) at 25 messages/s, a (b)
    # that kept within the limit and a (c) that probed at 0.5/s and recovered in 12 s
    results = {
        "a": {"accepted_before_end_share": 0.9, "messages_per_second": 15.0},
        "d": {"messages_per_second": 25.0},
        "b": {"rate": 25.0, "densest_over_limit": 1.04, "calls_per_second_during_429s": 0.8},
        "c": {"calls_per_second_during_outage": 0.5, "recovery_seconds": 12.0},
    }

    # When the targets are checked
    met = {
        (c["scenario"], c["target"].split()[0]): (c["value"], c["met"]) for c in verdicts(results)
    }

    # Then (a) misses both (90% < 95%, 60% < 70% of (d)), (b) meets both, (c) probes slowly
    # enough but recovers too late
    assert met[("a", ">=")] == (0.9, False)
    assert met[("a", "throughput")] == (0.6, False)
    assert met[("b", "densest")] == (1.04, True)
    assert met[("b", "calls/s")] == (0.8, True)
    assert met[("c", "<=")] == (0.5, True)
    assert met[("c", "90%")] == (12.0, False)
