"""Trying again what DynamoDB answered with "try again": a transaction conflict, a throttle, a 500.

botocore retries throttles itself, but never a cancelled transaction; what still reaches the
service after botocore's own attempts is retried here, with jittered exponential backoff, while
the caller's time allows. Anything else (a failed condition, an access denial) is raised at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from chalicelib.domain import Clock
from chalicelib.services.storage import error_code, is_transient

logger = logging.getLogger(__name__)

T = TypeVar("T")

BASE_SECONDS = 0.05
MAX_SECONDS = 2.0
# Tries in all, the first included; a fault that outlasts them is not a passing one.
MAX_ATTEMPTS = 6


class Backoff:
    """Runs a storage call again after a transient failure (full jitter, capped)."""

    def __init__(
        self,
        clock: Clock,
        wait_until: Callable[[datetime], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._wait_until = wait_until or _sleep_until
        self._rng = rng or random.Random()

    def run(
        self,
        call: Callable[[], T],
        *,
        what: str,
        log: dict[str, object],
        remaining: Callable[[], float] | None = None,
        reserve: float = 0.0,
    ) -> T:
        """`call()`, tried again on a transient failure while `remaining()` (seconds) stays
        above `reserve` after the pause; the last failure is raised."""
        attempt = 0
        while True:
            try:
                return call()
            except Exception as exc:
                attempt += 1
                if not is_transient(exc) or attempt >= MAX_ATTEMPTS:
                    raise
                pause = self._rng.uniform(0, min(MAX_SECONDS, BASE_SECONDS * 2**attempt))
                if remaining is not None and remaining() - pause < reserve:
                    raise
                logger.warning(
                    "%s: %s, trying again in %.2f s",
                    what,
                    error_code(exc),
                    pause,
                    extra={**log, "attempt": attempt},
                )
                self._wait_until(self._clock() + timedelta(seconds=pause))


def _sleep_until(moment: datetime) -> None:
    delay = (moment - datetime.now(UTC)).total_seconds()
    if delay > 0:
        time.sleep(delay)
