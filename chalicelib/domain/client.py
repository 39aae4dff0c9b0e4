"""A client of the directory: phone, operator code, tag and timezone."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


def default_operator_code(phone: str) -> str:
    """Digits 2-4 of a 7XXXXXXXXXX number: the operator code when none is given."""
    return phone[1:4]


@dataclass(frozen=True)
class Client:
    id: str
    phone: str
    operator_code: str
    tag: str
    timezone: str
    created_at: datetime
    updated_at: datetime
    opted_out: bool = False
