"""The delivery benchmark's arithmetic: counted calls and units -> figures per message and $.

The printed figures come from what the meter counted; these tests fix the counts and check the
per-message figures, the itemised $ per million and the verdicts against the issue's targets.
"""

from __future__ import annotations

from collections import Counter

import pytest

from bench.delivery import Meter, report, summarize

STATS = {"status": "finished", "stats": {"total": 2000, "sent": 2000}}


def _meter() -> Meter:
    """2,000 messages' worth of calls: 6,000 write units, 200 read units, 100 SQS requests."""
    meter = Meter(on=True)
    meter.calls = Counter(
        {
            ("dynamodb", "UpdateItem"): 2000,
            ("dynamodb", "TransactWriteItems"): 200,
            ("dynamodb", "GetItem"): 400,
            ("sqs", "SendMessageBatch"): 20,
            ("sqs", "ReceiveMessage"): 60,
            ("sqs", "DeleteMessageBatch"): 20,
        }
    )
    meter.wru = Counter({"UpdateItem": 2000.0, "TransactWriteItems": 4000.0})
    meter.rru = Counter({"GetItem": 200.0})
    meter.lambda_invocations = Counter({"send_messages": 20, "fan_out": 2, "scheduler_tick": 5})
    meter.lambda_seconds = 40.0
    return meter


def test_cost_per_million_is_itemised_from_the_counted_units() -> None:
    # Given 2,000 delivered messages that cost 3 write units, 0.1 read units, 0.05 SQS requests
    # and 0.011 invocations (the scheduler's ticks not counted) each, 40 Lambda seconds in all
    # When the benchmark summarises them
    result = summarize(2000, _meter(), 0.02, 16.0, STATS, [])

    # Then each item is the units per message times its on-demand price, per million messages
    usd = result["usd_per_million"]
    assert usd["dynamodb_writes"] == pytest.approx(3 * 0.625)
    assert usd["dynamodb_reads"] == pytest.approx(0.1 * 0.125)
    assert usd["sqs"] == pytest.approx(0.05 * 0.40)
    assert usd["lambda_requests"] == pytest.approx(0.011 * 0.20)
    assert usd["lambda_duration"] == pytest.approx(40 / 2000 * 0.5 * 16.6667, abs=1e-4)
    assert usd["total"] == pytest.approx(1.875 + 0.0125 + 0.02 + 0.0022 + 0.16667, abs=1e-3)
    # And the requests and units are split by operation
    assert result["per_message"]["dynamodb_requests"] == pytest.approx(1.3)
    assert result["dynamodb_by_operation"]["TransactWriteItems"] == {
        "requests": 0.1,
        "wru": 2.0,
        "rru": 0.0,
    }
    assert result["sqs_by_operation"]["ReceiveMessage"] == pytest.approx(0.03)


def test_report_prints_each_target_with_its_verdict_and_the_peer_beside_2000() -> None:
    # Given the same counts, delivered in 16 s
    result = summarize(2000, _meter(), 0.02, 16.0, STATS, [])

    # When the report is printed
    text = report(result)

    # Then 3 write units meet "at most 3", 1.3 requests meet "at most 1.5", $2.08 misses "< $2"
    lines = text.splitlines()
    assert next(line for line in lines if "DynamoDB write units" in line).endswith("✅")
    assert next(line for line in lines if "DynamoDB requests" in line).endswith("✅")
    total = next(line for line in lines if line.strip().startswith("total"))
    assert "2.076" in total
    assert total.endswith("❌")
    # And 16 s is printed beside the peer's 47.3-54.4 s, meeting the 20 s target
    assert "47.3-54.4 s" in text
    assert "2.96-3.40x as fast" in text
    assert next(line for line in lines if "target <= 20 s" in line).endswith("✅")
    # And each operation has its own line
    assert any(line.split()[:2] == ["GetItem", "0.200"] for line in lines)
    # And the prices are shown with the date they were checked
    assert "prices checked 2026-11-22" in text
    assert "$0.625 per million write units" in text


def test_a_slow_delivery_of_2000_misses_the_time_target() -> None:
    # Given 2,000 messages delivered in 42 s
    text = report(summarize(2000, _meter(), 0.02, 42.0, STATS, []))

    # Then the time target is marked missed
    assert next(line for line in text.splitlines() if "target <= 20 s" in line).endswith("❌")


def test_transactions_are_billed_two_write_units_an_item() -> None:
    # Given a metered transaction of two updates that move no index entry
    meter = Meter(on=True)
    update = {"Update": {"TableName": "t-mailings", "UpdateExpression": "SET a = :a"}}

    # When it is recorded
    meter.record("dynamodb", "TransactWriteItems", {"TransactItems": [update, update]}, {})

    # Then it counts one request and 4 write units, under its operation
    assert meter.calls[("dynamodb", "TransactWriteItems")] == 1
    assert meter.wru["TransactWriteItems"] == 4.0


def test_the_sparse_status_index_is_charged_only_when_a_message_enters_or_leaves_it():
    """Given the message writes of one delivery, when the meter prices them, then a new pending
    message costs no index write and its move to a final status one put, not a move."""
    from bench.delivery import _capacity

    created = {"Put": {"TableName": "sms-messages", "Item": {"client_id": {"S": "c"}}}}
    sent = {
        "Update": {
            "TableName": "sms-messages",
            "UpdateExpression": "SET #0 = :0",
            "ExpressionAttributeNames": {"#0": "status_key"},
        }
    }
    creation = _capacity("dynamodb", "TransactWriteItems", {"TransactItems": [created]}, {})
    outcome = _capacity("dynamodb", "TransactWriteItems", {"TransactItems": [sent]}, {})
    assert creation == (2.0, 0.0)
    assert outcome == (3.0, 0.0)
