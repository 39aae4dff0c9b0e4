"""Inbound SMS: a client's reply, and whether it asks to stop the mailings.

A reply opts its sender out when it is made only of an opt-out keyword: case, surrounding and
repeated whitespace do not matter ("  stop ", "Стоп"), anything else does ("STOP IT", "stop?").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

# What a stored reply keeps of a long text (an SMS of many parts is still a few hundred).
REPLY_TEXT_LIMIT = 1600


def normalise(text: str) -> str:
    """The text as keywords are compared: case-folded, whitespace collapsed and trimmed."""
    return " ".join(text.split()).casefold()


def is_opt_out(text: str, keywords: Iterable[str]) -> bool:
    """Whether `text` is only one of `keywords`."""
    wanted = normalise(text)
    return bool(wanted) and any(wanted == normalise(keyword) for keyword in keywords)


class InboundResult(StrEnum):
    OPTED_OUT = "opted_out"  # a keyword: the client is opted out now
    ALREADY_OPTED_OUT = "already_opted_out"  # a keyword from a client opted out before
    STORED = "stored"  # another reply: kept on the client's page
    UNKNOWN_PHONE = "unknown_phone"  # no client has the number: counted, not kept


@dataclass(frozen=True)
class InboundReply:
    """A reply a client sent, as kept on its page (newest first)."""

    id: str
    client_id: str
    phone: str
    text: str
    received_at: datetime


@dataclass(frozen=True)
class InboundCounts:
    """Every inbound SMS so far, by what it did."""

    replies: int = 0
    opt_outs: int = 0
    unknown: int = 0
