"""The parts of a text over a large audience come from the preview's bounded read: the same
reads as the count alone, a total scaled like the count, and exact on request."""

from __future__ import annotations

from collections import Counter

from chalicelib.domain import AudienceFilter
from chalicelib.services.parts import parts_over
from tests.integration import test_preview_cost as cost

# The bounded preview suite's fixtures and helpers (moto, a clients table, read counting).
dynamodb_reads, models, store = cost.dynamodb_reads, cost.models, cost.store
Directory, preview, SHARD_PASS = cost.Directory, cost.preview, cost.SHARD_PASS

# One GSM-7 part with a Latin tag; two UCS-2 parts with a tag of 64 Cyrillic letters.
TEXT = "Dear {tag}, your discount is ready"
CYRILLIC = "Ж" * 64


def test_the_parts_of_a_large_audience_are_estimated_from_the_bounded_read(
    store, models, dynamodb_reads
):
    # Given 3,000 clients, every other one with a long Cyrillic tag
    Directory(models, seed=5).add(3_000, operator_code="900", tags=("vip", CYRILLIC))
    # When everyone is previewed with a text naming the tag
    summary, reads = preview(store, dynamodb_reads, AudienceFilter())
    parts = parts_over(TEXT, summary, AudienceFilter(), None)
    # Then the reads are the count's alone: one bounded Query per shard
    assert reads.requests == Counter({"Query": cost.CLIENT_SHARDS})
    assert reads.entries <= SHARD_PASS
    # And the parts are UCS-2, one to two a message, and about 1,500 + 2 * 1,500 in all
    assert (parts.encoding, parts.per_message_min, parts.per_message_max) == ("UCS-2", 1, 2)
    assert parts.approximate
    assert abs(parts.total - 4_500) < 0.15 * 4_500


def test_the_parts_are_exact_when_the_whole_audience_is_read(store, models, dynamodb_reads):
    # Given 3,000 clients, every other one with a long Cyrillic tag, one in ten opted out
    Directory(models, seed=6).add(
        3_000, operator_code="900", tags=("vip", CYRILLIC), opted_out_every=10
    )
    # When everyone is previewed exactly
    summary, _ = preview(store, dynamodb_reads, AudienceFilter(), exact=True)
    parts = parts_over(TEXT, summary, AudienceFilter(), None)
    # Then the total is every message's parts: the opted-out (every tenth, all "vip": n % 10
    # is even) get none
    assert not parts.approximate
    assert parts.total == (1_500 - 300) * 1 + 1_500 * 2
