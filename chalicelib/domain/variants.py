"""A/B text variants and the holdout group (pure): which text a client of a mailing gets, or
whether it is held out.

The assignment is a hash of the mailing's and the client's ids, so it is the same every time it
is asked (a re-fan-out, a retry, another sender) and needs nothing stored: the first hash decides
the holdout (`holdout_percent` of the clients, to the hundredth of a percent), a second one picks
the variant by weight among the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

MIN_VARIANTS = 2
MAX_VARIANTS = 5
MAX_HOLDOUT_PERCENT = 50
_SCALE = 10_000  # holdout resolution: hundredths of a percent


@dataclass(frozen=True)
class Variant:
    """One text of an A/B mailing and its share (relative to the other variants' weights)."""

    text: str
    weight: int = 1


def _bucket(*parts: str) -> int:
    """A stable number in [0, 2**64) for `parts` (the same in every process and release)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def in_holdout(mailing_id: str, client_id: str, holdout_percent: int) -> bool:
    """Whether the client is in the mailing's holdout group (never sent, counted apart)."""
    if holdout_percent <= 0:
        return False
    return _bucket("holdout", mailing_id, client_id) % _SCALE < holdout_percent * _SCALE // 100


def variant_of(mailing_id: str, client_id: str, variants: Sequence[Variant]) -> int:
    """The index of the variant the client gets (0 for a mailing with a single text)."""
    total = sum(v.weight for v in variants)
    if len(variants) < 2 or total <= 0:
        return 0
    point = _bucket("variant", mailing_id, client_id) % total
    for index, variant in enumerate(variants):
        if point < variant.weight:
            return index
        point -= variant.weight
    return len(variants) - 1  # unreachable: the weights add up to `total`
