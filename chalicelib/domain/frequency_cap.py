"""The frequency cap (pure): at most `limit` messages per client within a rolling `window`,
across all mailings.

A client's cap is `limit` slots. A sender takes one for a message right before its gateway
call (after the claim), marked with the mailing's id (one message per mailing and client) and
busy until `window` after it was taken. A slot whose time is over is free again. Which slot to
try, and what a client's slots as seen mean, is decided here; storage makes the take one
conditional write (chalicelib/storage/frequency_caps.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_CAP = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*([smhd])\s*$")
# More slots than this per client would make every take a long condition; a cap that high is
# no cap an operator means.
MAX_LIMIT = 20


class FrequencyCapInvalid(ValueError):
    """FREQUENCY_CAP is not of the form `N/<number><s|m|h|d>`, e.g. `1/24h`."""


@dataclass(frozen=True)
class FrequencyCap:
    limit: int
    window: timedelta

    @staticmethod
    def parse(value: str) -> FrequencyCap:
        """`1/24h` → one message per 24 hours; N from 1 to MAX_LIMIT, window above zero."""
        match = _CAP.match(value)
        if match is None:
            raise FrequencyCapInvalid(
                f"FREQUENCY_CAP must look like 1/24h (N/<number><s|m|h|d>), not {value!r}"
            )
        limit, amount, unit = int(match[1]), int(match[2]), match[3]
        if not 1 <= limit <= MAX_LIMIT:
            raise FrequencyCapInvalid(f"FREQUENCY_CAP allows 1 to {MAX_LIMIT} messages")
        if amount <= 0:
            raise FrequencyCapInvalid("FREQUENCY_CAP's window must be longer than zero")
        return FrequencyCap(limit, timedelta(seconds=amount * _UNITS[unit]))


@dataclass(frozen=True)
class CapSlot:
    """One of a client's slots as stored: which mailing's message took it, busy until when
    (epoch seconds)."""

    mailing_id: str
    until: float

    def busy(self, now: float) -> bool:
        return self.until > now


@dataclass(frozen=True)
class CapLook:
    """What a client's slots, as seen at `now`, say about a message of `mailing_id`: `held`
    (its slot is taken already: a job delivered again, or a retry), else the first `free`
    slot (None: the cap is reached)."""

    held: int | None
    free: int | None


def look(slots: Sequence[CapSlot | None], mailing_id: str, now: float) -> CapLook:
    """Read a client's `slots` (None: never taken) for a message of `mailing_id` at `now`."""
    for index, slot in enumerate(slots):
        if slot is not None and slot.mailing_id == mailing_id and slot.busy(now):
            return CapLook(held=index, free=None)
    for index, slot in enumerate(slots):
        if slot is None or not slot.busy(now):
            return CapLook(held=None, free=index)
    return CapLook(held=None, free=None)
