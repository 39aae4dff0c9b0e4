"""One page of a listing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass(frozen=True)
class PageOf(Generic[Item]):
    """One page of a listing and the opaque cursor of the next (None at the end)."""

    items: list[Item] = field(default_factory=list)
    next_cursor: str | None = None
