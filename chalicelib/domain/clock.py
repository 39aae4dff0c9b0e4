"""The clock: time is passed in, never read deep inside logic."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware; injected so time-dependent logic is testable."""
