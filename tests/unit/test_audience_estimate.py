"""The audience estimate: exact for segments that end within their read, and otherwise within
its stated 95 % interval, checked on random uuids (seeded, so each run sees the same draws)."""

from __future__ import annotations

import random
import uuid

from chalicelib.domain.estimate import (
    PREVIEW_ENTRIES,
    SegmentRead,
    estimate_audience,
    id_fraction,
    segment_budget,
)


def random_ids(rng: random.Random, n: int) -> list[str]:
    """`n` uuid4 strings as the service makes them, drawn from `rng`."""
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def read_whole(ids: list[str], budget: int, opted_out: set[str] = frozenset()) -> SegmentRead:
    """What a Query of `budget` entries from the start of a segment holding `ids` sees."""
    entries = sorted(ids)[:budget]
    ended = len(ids) <= budget
    return SegmentRead(
        evaluated=len(entries),
        matched=len(entries),
        opted_out=sum(i in opted_out for i in entries),
        last_id=None if ended else entries[-1],
    )


def read_filtered(ids: list[str], wanted: set[str], budget: int) -> SegmentRead:
    """What a Query of `budget` entries of a segment holding `ids`, filtered on `wanted`, sees."""
    entries = sorted(ids)[:budget]
    ended = len(ids) <= budget
    return SegmentRead(
        evaluated=len(entries),
        matched=sum(i in wanted for i in entries),
        opted_out=0,
        last_id=None if ended else entries[-1],
    )


def test_a_uuid_lies_where_its_leading_digits_say():
    assert id_fraction("00000000-0000-4000-8000-000000000000") < 1e-12
    assert abs(id_fraction("80000000-0000-4000-8000-000000000000") - 0.5) < 1e-12
    assert 0.999 < id_fraction("ffffffff-ffff-4fff-bfff-ffffffffffff") < 1


def test_segments_that_end_within_their_read_are_counted_exactly():
    # Given two segments that ended within their read, with 7 and 12 clients, 3 opted out
    reads = [SegmentRead(7, 7, 1, None), SegmentRead(12, 12, 2, None)]
    # When the audience is estimated
    result = estimate_audience(reads)
    # Then the count is exact and says so
    assert (result.count, result.opted_out, result.approximate) == (19, 3, False)
    assert (result.low, result.high) == (19, 19)


def test_the_budget_is_shared_by_the_segments_but_never_below_a_floor():
    assert segment_budget(1) == PREVIEW_ENTRIES
    assert segment_budget(16) == PREVIEW_ENTRIES // 16
    assert segment_budget(10_000) == 8


def test_twenty_thousand_random_clients_are_estimated_within_the_margin_from_a_thousand():
    # Given 20,000 clients with random ids in one segment, 10 % of them opted out
    rng = random.Random(16)
    ids = random_ids(rng, 20_000)
    opted_out = set(ids[:2_000])
    # When the first 1,000 entries are read
    result = estimate_audience([read_whole(ids, PREVIEW_ENTRIES, opted_out)])
    # Then the count is approximate, its interval holds the truth and is about ±6 % wide
    assert result.approximate
    assert result.low <= 20_000 <= result.high
    assert 0.04 < (result.high - result.low) / 2 / result.count < 0.08
    # And the opted-out figure is the sample's share of the estimate
    assert abs(result.opted_out - 2_000) < 400


def spread(rng: random.Random, ids: list[str], shards: int = 16) -> list[list[str]]:
    """`ids` spread over `shards` at random, as the hash of a client id spreads them."""
    spread_ids: list[list[str]] = [[] for _ in range(shards)]
    for client_id in ids:
        spread_ids[rng.randrange(shards)].append(client_id)
    return spread_ids


def test_the_interval_holds_the_truth_about_95_times_in_100():
    # Given 250 audiences of 2,000 random clients spread over 16 shards, each shard read from
    # its start for 1/16 of the budget
    rng = random.Random(1600)
    trials, covered, widths = 250, 0, []
    for _ in range(trials):
        shards = spread(rng, random_ids(rng, 2_000))
        # When each is estimated
        result = estimate_audience([read_whole(shard, segment_budget(16)) for shard in shards])
        covered += result.low <= 2_000 <= result.high
        widths.append((result.high - result.low) / 2 / 2_000)
    # Then the stated 95 % interval holds the truth in about 95 % of them (below 91 % would be
    # 3 standard deviations short), and is no wider than it needs to be
    assert covered / trials >= 0.91
    assert sum(widths) / trials < 0.08


def test_the_interval_of_a_filtered_share_holds_the_truth_about_95_times_in_100():
    # Given 150 directories of 2,000 random clients over 16 shards, 500 with the wanted code
    rng = random.Random(901)
    trials, covered = 150, 0
    for _ in range(trials):
        ids = random_ids(rng, 2_000)
        wanted = set(ids[:500])
        reads = [read_filtered(s, wanted, segment_budget(16)) for s in spread(rng, ids)]
        # When the share is estimated from the shards read for 1/16 of the budget each
        result = estimate_audience([], reads)
        covered += result.low <= 500 <= result.high
    # Then its interval holds the truth in about 95 % of them (below 90 %: 3 deviations short)
    assert covered / trials >= 0.90


def test_a_share_of_the_shards_is_estimated_within_its_margin():
    # Given 20,000 random clients over 16 shards, 30 % of them with the operator code wanted
    rng = random.Random(900)
    ids = random_ids(rng, 20_000)
    wanted = set(ids[:6_000])
    shards = spread(rng, ids)
    # When the shards are read for 1/16 of the budget each, filtered on the code
    result = estimate_audience(
        [], [read_filtered(shard, wanted, segment_budget(16)) for shard in shards]
    )
    # Then the estimate's interval holds the 6,000
    assert result.approximate
    assert result.low <= 6_000 <= result.high
    assert (result.high - result.low) / 2 / 6_000 < 0.15


def test_a_filtered_share_that_found_no_match_still_has_an_upper_bound():
    # Given 16 shards of 500 entries each read for 62, none matching
    rng = random.Random(7)
    shards = [random_ids(rng, 500) for _ in range(16)]
    # When estimated
    result = estimate_audience([], [read_filtered(s, set(), segment_budget(16)) for s in shards])
    # Then the count is 0 but the interval admits a small share of the 8,000 entries
    assert (result.count, result.low, result.approximate) == (0, 0, True)
    assert 0 < result.high < 8_000 * 0.02


def test_a_filtered_share_is_never_below_what_was_already_seen_of_it():
    # Given shards where the wanted code was not met, though its own index showed 1,001 clients
    rng = random.Random(8)
    reads = [read_filtered(random_ids(rng, 500), set(), segment_budget(16)) for _ in range(16)]
    # When estimated, knowing those 1,001
    result = estimate_audience([], reads, filtered_at_least=1_001)
    # Then neither the count nor its low end falls below them
    assert result.approximate
    assert result.count >= 1_001
    assert result.low >= 1_001
    assert result.high >= result.count
