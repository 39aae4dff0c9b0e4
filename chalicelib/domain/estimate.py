"""How many clients an audience selects, from a bounded read of its index segments.

Client ids are random (uuid4), and every segment of an audience lists its clients in client id
order. So the first k entries of a segment of N clients end at an id that is the k-th smallest of
N uniform draws: where it lies in the id space (a fraction u) tells N. (k - 1) / u is an unbiased
estimate of N, with variance N (N - k + 1) / (k - 2); a segment that ends within its read is
counted exactly. The figures of several segments add up, and so do their variances.

When the audience is not itself a segment (an operator code without a tag lies in the by-operator
index ordered by tag first), a sample of the shards, filtered on the code, gives a share of
matches p among the entries read, and the shards' estimated sizes give N: the count is p N. The
share's uncertainty is Agresti-Coull's (sound with no or few matches).

The margin is a 95 % interval under the normal approximation (1.96 standard errors); the
statistical tests in tests/unit/test_audience_estimate.py check that it holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Index entries a preview reads at most across its segments (each segment gets an equal share).
PREVIEW_ENTRIES = 1000
# A segment's share never falls below this: an estimate needs at least 3 entries, and a handful
# more keeps one segment's error from swamping the sum.
MIN_SEGMENT_ENTRIES = 8
# The 95 % two-sided quantile of the normal distribution.
Z95 = 1.96
# The leading hex digits of a uuid4 that are random (the 13th is the version, always 4).
ID_DIGITS = 12
_ID_SPACE = float(1 << (4 * ID_DIGITS))


@dataclass(frozen=True)
class SegmentRead:
    """What one bounded read from the start of an index segment saw."""

    evaluated: int  # entries read, before any filter
    matched: int  # of those, entries in the audience (all of them when nothing is filtered)
    opted_out: int  # of the matched, clients who opted out
    last_id: str | None  # the client id of the last entry read; None: the segment ended


@dataclass(frozen=True)
class AudienceCount:
    """An audience's size: exact, or an estimate with its 95 % interval [low, high]."""

    count: int
    opted_out: int
    approximate: bool
    low: int
    high: int


def segment_budget(segments: int, total: int = PREVIEW_ENTRIES) -> int:
    """The entries to read from each of `segments` so that they read about `total` in all."""
    return max(total // max(segments, 1), MIN_SEGMENT_ENTRIES)


def id_fraction(client_id: str) -> float:
    """Where a uuid lies in the id space, in (0, 1), from its leading random hex digits."""
    digits = client_id.replace("-", "")[:ID_DIGITS]
    position: int = int(digits, 16)
    return (position + 0.5) / _ID_SPACE


@dataclass(frozen=True)
class _Part:
    count: float
    opted_out: float
    variance: float
    seen: int  # clients actually read: the count cannot be lower


def _segment_size(read: SegmentRead) -> tuple[float, float]:
    """A cut-off segment's estimated size (entries, before any filter) and its variance."""
    assert read.last_id is not None
    k = max(read.evaluated, 1)
    size = max((k - 1) / id_fraction(read.last_id), float(k))
    # The formula needs k >= 3; a shorter read (never made here) gets the widest it allows.
    return size, size * (size - k + 1) / max(k - 2, 1)


def _whole_segments(reads: Sequence[SegmentRead]) -> _Part:
    """Segments whose every entry is in the audience: each one counted or estimated."""
    count = opted_out = variance = 0.0
    seen = 0
    for read in reads:
        seen += read.matched
        if read.last_id is None:
            count += read.matched
            opted_out += read.opted_out
            continue
        size, size_variance = _segment_size(read)
        count += size
        opted_out += size * read.opted_out / read.evaluated
        variance += size_variance
    return _Part(count, opted_out, variance, seen)


def _filtered_segments(reads: Sequence[SegmentRead], at_least: int) -> _Part:
    """Random segments (shards) of which the audience is a share: matches among the entries
    read, scaled by the segments' estimated sizes; never fewer than `at_least` seen elsewhere."""
    ended = [r for r in reads if r.last_id is None]
    cut = [r for r in reads if r.last_id is not None]
    count = float(sum(r.matched for r in ended))
    opted_out = float(sum(r.opted_out for r in ended))
    seen = max(sum(r.matched for r in reads), at_least)
    if not cut:
        return _Part(count, opted_out, 0.0, seen)
    sizes = [_segment_size(r) for r in cut]
    size = sum(s for s, _ in sizes)
    size_variance = sum(v for _, v in sizes)
    evaluated = sum(r.evaluated for r in cut)
    matched = sum(r.matched for r in cut)
    share = matched / evaluated
    # Agresti-Coull: two successes and two failures added, so no matches still has a width.
    adjusted = (matched + 2) / (evaluated + 4)
    share_variance = adjusted * (1 - adjusted) / (evaluated + 4)
    count += share * size
    if matched:
        opted_out += share * size * sum(r.opted_out for r in cut) / matched
    variance = size**2 * share_variance + share**2 * size_variance
    return _Part(count, opted_out, variance, seen)


def estimate_audience(
    whole: Sequence[SegmentRead],
    filtered: Sequence[SegmentRead] = (),
    *,
    filtered_at_least: int = 0,
) -> AudienceCount:
    """The audience made of the `whole` segments and the `filtered` share of other segments
    (of which `filtered_at_least` clients are known to exist); exact when every segment ended
    within its read."""
    parts = [_whole_segments(whole), _filtered_segments(filtered, filtered_at_least)]
    approximate = any(r.last_id is not None for r in (*whole, *filtered))
    count = round(sum(max(p.count, p.seen) for p in parts))
    opted_out = min(round(sum(p.opted_out for p in parts)), count)
    if not approximate:
        return AudienceCount(count, opted_out, False, count, count)
    margin = Z95 * math.sqrt(sum(p.variance for p in parts))
    seen = sum(p.seen for p in parts)
    low = max(math.floor(count - margin), seen)
    high = max(math.ceil(count + margin), count)
    return AudienceCount(count, opted_out, True, low, high)
