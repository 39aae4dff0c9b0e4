"""The gateway's shared limits in memory: `GatewayLimitsStore` with the DynamoDB item's
conditions (tests/integration/test_gateway_limits_repository.py runs both)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace

from chalicelib.domain.rate_limit import (
    Control,
    Lease,
    OperatorSlots,
    SharedLimits,
    Tally,
    Window,
)


class MemoryGatewayLimits:
    """One process's shared limits: every write is checked and applied under one lock."""

    def __init__(self) -> None:
        self._limits: SharedLimits | None = None
        self._operators: dict[str, OperatorSlots] = {}
        self._lock = threading.Lock()

    def read(self) -> SharedLimits:
        with self._lock:
            if self._limits is None:
                self._limits = SharedLimits()
            return self._limits

    def peek(self) -> SharedLimits:
        with self._lock:
            return self._limits or SharedLimits()

    def reserve(
        self,
        seen: SharedLimits,
        now: float,
        span: float,
        holder: str,
        lease: Lease,
        max_held: int,
        latest_tat: float,
    ) -> SharedLimits | None:
        with self._lock:
            limits = self._limits
            if (
                limits is None
                or limits.version != seen.version
                or limits.held > max_held
                or limits.control.paused_until > now
            ):
                return None
            if seen.tat >= now:
                if not now <= limits.tat <= latest_tat:
                    return None
                tat = limits.tat + span
            else:
                if limits.tat >= now:
                    return None
                tat = now + span
            holders = {**limits.holders, holder: lease}
            return self._set(
                replace(limits, tat=tat, holders=holders, held=limits.held + lease.permits)
            )

    def take_back(self, holder: str, lease: Lease) -> SharedLimits | None:
        with self._lock:
            limits = self._limits
            held = limits.holders.get(holder) if limits else None
            if limits is None or held is None or held.until != lease.until:
                return None
            holders = {k: v for k, v in limits.holders.items() if k != holder}
            return self._set(replace(limits, holders=holders, held=limits.held - lease.permits))

    def record(
        self,
        holder: str | None,
        permits: int,
        bucket: int,
        tally: Tally,
        expired: Sequence[int],
    ) -> SharedLimits | None:
        with self._lock:
            counts = tally.requests or tally.accepts or tally.overloads or tally.retries
            if not (counts or tally.latency) and holder is None:
                return None
            # An update writes the item even where there was none (DynamoDB's upsert).
            limits = self._limits or SharedLimits(holders={}, control=Control())
            released = holder is not None and holder in limits.holders
            if holder is not None and not released and not (counts or tally.latency):
                return None
            if released:
                holders = {k: v for k, v in limits.holders.items() if k != holder}
                limits = replace(limits, holders=holders, held=limits.held - permits)
            buckets = {n: t for n, t in limits.window.buckets.items() if n not in expired}
            buckets[bucket] = buckets.get(bucket, Tally()) + tally
            run = limits.run
            if tally.requests:
                run = 0 if tally.accepts else run + tally.requests
            return self._set(replace(limits, window=Window(buckets), run=run))

    def set_control(
        self, seen_version: int, control: Control, why: str | None, now: float
    ) -> SharedLimits | None:
        with self._lock:
            limits = self._limits
            if limits is None and seen_version == 0:
                limits = SharedLimits()
            if limits is None or limits.version != seen_version:
                return None
            limits = replace(limits, control=control, version=limits.version + 1)
            if why:
                limits = replace(limits, why=why, why_at=now)
            return self._set(limits)

    def read_operator(self, operator_code: str) -> OperatorSlots:
        with self._lock:
            return self._operators.get(operator_code, OperatorSlots())

    def move_operator_slots(
        self, operator_code: str, seen: float, new: float, now: float, deferring: bool
    ) -> bool:
        with self._lock:
            slots = self._operators.get(operator_code)
            slots = slots or OperatorSlots()
            if slots.tat != seen:
                return False
            deferred_at = now if deferring else slots.deferred_at
            self._operators[operator_code] = OperatorSlots(new, deferred_at)
            return True

    def note_operator_deferral(self, operator_code: str, now: float) -> bool:
        with self._lock:
            slots = self._operators.get(operator_code, OperatorSlots())
            self._operators[operator_code] = replace(slots, deferred_at=now)
            return True

    def _set(self, limits: SharedLimits) -> SharedLimits:
        self._limits = limits
        return limits
