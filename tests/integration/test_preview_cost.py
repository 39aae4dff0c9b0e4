"""What the audience preview costs: the same DynamoDB reads for a large audience as for one five
times larger, an estimate whose interval holds the true count, and an exact count on request.

Reads are counted as DynamoDB bills them: requests by operation and index entries evaluated
(a filtered Query is billed for every entry it looks at, returned or not).
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from chalicelib.domain import AudienceFilter
from chalicelib.domain.client import Client, ClientFields
from chalicelib.domain.estimate import PREVIEW_ENTRIES, segment_budget
from chalicelib.storage.models import CLIENT_SHARDS
from tests.support.reads import Reads, record_reads

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
# A preview with one look-up reads at most its whole share (and one entry more); an operator
# code without a tag that does not fit adds one filtered pass over the shards.
ONE_SEGMENT = PREVIEW_ENTRIES + 1
SHARD_PASS = CLIENT_SHARDS * (segment_budget(CLIENT_SHARDS) + 1)


@pytest.fixture
def dynamodb_reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    return record_reads(monkeypatch)


@pytest.fixture
def models(aws: None, settings: Any) -> Any:
    from chalicelib.storage.models import build_models

    models = build_models(settings)
    models.Client.create_table(wait=True)
    return models


@pytest.fixture
def store(models: Any, settings: Any) -> Any:
    from pynamodb.connection import Connection

    from chalicelib.storage.clients import DynamoClientRepository

    return DynamoClientRepository(models, Connection(region=settings.aws_region))


class Directory:
    """Clients written straight to the clients table in batches, with seeded random uuid4 ids
    (as the service makes them, and the same on every run)."""

    def __init__(self, models: Any, seed: int) -> None:
        self._model = models.Client
        self._rng = random.Random(seed)
        self._phones = iter(range(10**9))

    def add(self, count: int, *, operator_code: str, tags: tuple[str, ...], opted_out_every=0):
        from chalicelib.storage.clients import client_record

        model = self._model
        with model.batch_write() as batch:
            for n in range(count):
                client_id = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
                phone = f"7{operator_code}{next(self._phones):07d}"
                fields = ClientFields(phone, operator_code, tags[n % len(tags)], "UTC")
                client = Client.new(client_id, fields, NOW)
                if opted_out_every and n % opted_out_every == 0:
                    client = Client(**{**client.__dict__, "opted_out": True})
                batch.save(client_record(model, client))


def preview(
    store: Any, reads: Reads, audience: AudienceFilter, **options: Any
) -> tuple[Any, Reads]:
    """The audience's summary, and the reads it took."""
    before = Reads(Counter(reads.requests), entries=reads.entries)
    summary = store.summarize(audience, 10, **options)
    spent = Reads(reads.requests - before.requests, entries=reads.entries - before.entries)
    return summary, spent


def test_a_tag_audience_five_times_larger_costs_the_same_reads(store, models, dynamodb_reads):
    # Given 1,000 clients tagged vip (one in ten opted out) among 500 others
    directory = Directory(models, seed=17)
    directory.add(1_000, operator_code="900", tags=("vip",), opted_out_every=10)
    directory.add(500, operator_code="901", tags=("new",))
    vip = AudienceFilter(tags=("vip",))
    # When the vip audience is previewed
    small, small_reads = preview(store, dynamodb_reads, vip)
    # Then it fits the bounded read: counted exactly, in one Query
    assert (small.count, small.opted_out, small.approximate) == (1_000, 100, False)
    assert small_reads.requests == Counter({"Query": 1})
    assert small_reads.entries <= ONE_SEGMENT

    # Given 4,000 more vip clients: 5,000 in all
    directory.add(4_000, operator_code="902", tags=("vip",), opted_out_every=10)
    # When it is previewed again
    large, large_reads = preview(store, dynamodb_reads, vip)
    # Then the reads are the same: one Query of at most its share of entries
    assert large_reads.requests == small_reads.requests
    assert large_reads.entries <= ONE_SEGMENT
    # And the count is an estimate whose 95 % interval holds the true 5,000
    assert large.approximate
    assert large.count_low <= 5_000 <= large.count_high
    assert large.count_high - large.count_low < 0.15 * 5_000
    assert abs(large.opted_out - 500) < 150
    # And the sample is still the first ten clients of the audience
    assert len(large.sample_ids) == 10


def test_an_operator_audience_is_estimated_from_a_bounded_pass_over_the_shards(
    store, models, dynamodb_reads
):
    # Given 1,500 clients of operator 900 over several tags (more than one Query's share),
    # among 1,500 of another operator
    directory = Directory(models, seed=900)
    directory.add(1_500, operator_code="900", tags=("vip", "new", ""))
    directory.add(1_500, operator_code="901", tags=("vip",))
    operator = AudienceFilter(operator_codes=("900",))
    # When operator 900's audience is previewed
    small, small_reads = preview(store, dynamodb_reads, operator)
    # Then its interval holds the 1,500, from one Query of its own index and one of each shard
    assert small.approximate
    assert small.count_low <= 1_500 <= small.count_high
    assert small_reads.requests == Counter({"Query": 1 + CLIENT_SHARDS})
    assert small_reads.entries <= ONE_SEGMENT + SHARD_PASS

    # Given 3,500 more of operator 900 (5,000) and the others unchanged
    directory.add(3_500, operator_code="900", tags=("vip", "new", ""))
    # When it is previewed again
    large, large_reads = preview(store, dynamodb_reads, operator)
    # Then it reads the same, and its interval holds the 5,000
    assert large_reads.requests == small_reads.requests
    assert large_reads.entries <= ONE_SEGMENT + SHARD_PASS
    assert large.approximate
    assert large.count_low <= 5_000 <= large.count_high


def test_an_exact_count_on_request_reads_the_whole_audience(store, models, dynamodb_reads):
    # Given 3,000 clients tagged vip, one in five opted out
    Directory(models, seed=3).add(3_000, operator_code="900", tags=("vip",), opted_out_every=5)
    # When the exact count is asked for
    exact, reads = preview(store, dynamodb_reads, AudienceFilter(tags=("vip",)), exact=True)
    # Then it is exact, having read every entry
    assert (exact.count, exact.opted_out, exact.approximate) == (3_000, 600, False)
    assert (exact.count_low, exact.count_high) == (3_000, 3_000)
    assert reads.entries >= 3_000


def test_the_whole_directory_is_estimated_from_a_share_of_each_shard(store, models, dynamodb_reads):
    # Given 3,000 clients, more than the bounded read takes from the shards
    Directory(models, seed=1).add(3_000, operator_code="900", tags=("vip", "new"))
    # When the audience without a filter (everyone) is previewed
    everyone, reads = preview(store, dynamodb_reads, AudienceFilter())
    # Then one Query per shard reads at most its share, and the interval holds the 3,000
    assert reads.requests == Counter({"Query": CLIENT_SHARDS})
    assert reads.entries <= SHARD_PASS
    assert everyone.approximate
    assert everyone.count_low <= 3_000 <= everyone.count_high
