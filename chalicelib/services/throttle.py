"""One send rate, one concurrency limit and one back-pressure state towards the SMS gateway,
shared by every sender Lambda through a single DynamoDB item.

**Rate** (`GATEWAY_RATE_PER_SECOND`). The item holds the *theoretical arrival time* (`tat`) of
the next free send slot, as in the generic cell rate algorithm. A sender that has `n` calls to
make reserves `n` consecutive slots `interval` apart with one conditional write (`tat` moves by
`n * interval`), then makes each call no earlier than its slot. Slots are never handed out twice
and never in the past, so however many Lambdas run, the gateway sees at most one call per
`interval`. A sender reserves at most `HORIZON_SECONDS` ahead; jobs that do not fit go back to
SQS with a delay instead of holding a Lambda while they wait.

**Concurrency** (`GATEWAY_CONCURRENCY`). Calls in flight are limited by leased permits kept in
the same item: `held` counts them and `holders` says who holds how many until when, so permits
of a sender that died come back when its lease ends. Taking permits and slots is one write.

**Per operator** (`GATEWAY_RATE_PER_OPERATOR`). A limited operator has its own slots item
(`gateway-limits#<code>`, same algorithm, one conditional write per batch). Its calls leave on
global slots too, at most `late` after their operator slot, and its slots are `late` more than
1 / rate apart (`domain.rate_limit.OperatorSpacing`), so two of its calls are never closer than
1 / rate. Its jobs that get no slot go back to SQS before they take a global slot or a permit.

**Back-pressure** (decided in `chalicelib/domain/rate_limit.py`, pure). Each batch's answers are
counted in the same item, per 10 s bucket over a two-minute window (calls, accepted, overload
answers, retries granted), folded into the write that gives the batch's permits back, so the
window costs no extra request. From the window and the batch:
- overload (429, 503 with Retry-After, latency far above the window's, or fewer than half of the
  calls accepted) halves the sending speed and pauses every sender for the Retry-After;
- bad luck (other 5xx, malformed bodies, timeouts, network errors while most calls succeed)
  leaves the rate alone: the message is retried within a retry budget of ~20% of the calls;
- an outage (twenty calls in a row, none accepted) switches to probing: one call a second for
  everyone, the other jobs back in SQS after PROBING_REQUEUE_SECONDS;
- good answers raise the speed by half per second back to the configured rate.
Jobs that meet a pause go back to SQS without spending one of their attempts. A change of the
controller's state is one more conditional write, made only when it changes.

Each sender grants retries from the window as it last saw it, so senders writing at the same
moment may together overshoot the budget by a batch each; the next batch sees it spent.

One item takes about 1,000 writes a second (DynamoDB's per-partition limit); each batch of up to
`jobs_per_message` calls costs two (admit and release) plus a rare controller change. The
window's counters (up to 13 buckets of five numbers) add up to about 1 KB to the item, so each
write may cost one more write unit than before. Past 1,000 writes a second the item would be
sharded: N items each with rate/N and concurrency/N, a sender picking one at
random per batch (the window then sums the N items when read).

The items' reads and conditional writes are in chalicelib/storage/gateway_limits.py; this module
orchestrates: what it last saw, what to ask for, and what the pure rate arithmetic decides.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from chalicelib.domain.gateway_answer import GatewayResult
from chalicelib.domain.rate_limit import (
    Control,
    GatewayStatus,
    Lease,
    OperatorSlots,
    OperatorSpacing,
    OperatorStatus,
    SharedLimits,
    Tally,
    Verdict,
    bucket_of,
    classify,
    decide,
    on_grid,
    slots_before,
    slots_starting_before,
)
from chalicelib.settings import Settings
from chalicelib.storage.gateway_limits import GatewayLimitsStore

logger = logging.getLogger(__name__)

# How far ahead a sender reserves slots (it waits for them inside its invocation).
HORIZON_SECONDS = 2.0
_ATTEMPTS = 6
# While the gateway seems down, jobs without a probe slot come back after this (plus spread).
PROBING_REQUEUE_SECONDS = 5.0
# A call may leave this much after its slot (thread scheduling); later, it takes the next slot.
LATE_SECONDS = 0.02
# An operator's jobs sent back for want of a slot this recently: it is "deferring".
OPERATOR_DEFERRING_SECONDS = 10.0


class RetryBudget:
    """The retries a batch may still grant (shared by its threads); `taken` are counted in the
    window when the batch's permits are given back."""

    def __init__(self, allowed: int) -> None:
        self._left = allowed
        self.taken = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            self.taken += 1
            return True


@dataclass(frozen=True)
class Admission:
    """What one sender may do now: `count` calls, the i-th not before `slot(i)`, at most
    `permits` of them in flight; the rest of its calls wait `retry_after` seconds."""

    count: int
    start: float
    interval: float
    permits: int
    retry_after: float
    holder: str | None = None
    # An operator's slots: a call may leave this long after its slot, not later.
    late: float = 0.0

    def slot(self, index: int) -> datetime:
        return datetime.fromtimestamp(self.start + index * self.interval, UTC)

    @classmethod
    def none(cls, retry_after: float) -> Admission:
        return cls(0, 0.0, 0.0, 0, max(0.0, retry_after))


class Slots:
    """Hands out an admission's slots in order, each to the next call that is ready to leave.

    A slot already past is skipped, never used late: a late call would land among the next
    slots' calls and the gateway would see more than the rate. Unused slots are lost; that
    only ever costs speed.
    """

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._next = 0
        self._used: set[int] = set()  # taken out of order by `take_between`
        self._lock = threading.Lock()

    @property
    def last(self) -> datetime:
        """When the admission's last call may leave: checks made for it hold for every call."""
        return self._admission.slot(max(0, self._admission.count - 1))

    def take(self, now: datetime) -> datetime | None:
        """The next slot not yet past, or None when the admission's slots are used up."""
        earliest = now.timestamp() - LATE_SECONDS
        with self._lock:
            while self._next < self._admission.count:
                index = self._next
                self._next += 1
                if index in self._used:
                    continue
                if self._admission.start + index * self._admission.interval >= earliest:
                    return self._admission.slot(index)
        return None

    def take_between(self, earliest: float, latest: float, now: datetime) -> datetime | None:
        """The first free slot in [earliest, latest] (epoch seconds) not yet past, kept for the
        caller (a call of a rate-limited operator: it may leave only then); None if none is."""
        first = max(earliest, now.timestamp() - LATE_SECONDS)
        start, interval = self._admission.start, self._admission.interval
        if self._admission.count == 0:
            return None
        with self._lock:
            index = max(self._next, math.ceil((first - start) / interval - 1e-9))
            while index < self._admission.count and start + index * interval <= latest:
                if index not in self._used:
                    self._used.add(index)
                    return self._admission.slot(index)
                index += 1
        return None


class GatewayThrottle:
    """The shared limits; one instance per process, used by every sender thread."""

    def __init__(
        self,
        limits: GatewayLimitsStore,
        settings: Settings,
        clock: Callable[[], datetime],
        lease_seconds: float | None = None,
    ) -> None:
        self._limits = limits
        self._rate = settings.gateway_rate_per_second
        self._concurrency = settings.gateway_concurrency
        self._pause = settings.gateway_pause_seconds
        self._max_pause = settings.gateway_max_pause_seconds
        self._lease = lease_seconds or float(settings.claim_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._known: SharedLimits | None = None
        self._operators = settings.operator_rates
        self._operator_tat: dict[str, float] = {}
        self._deferral_noted: dict[str, float] = {}

    # ---------------------------------------------------------------- admission

    def admit(self, wanted: int) -> Admission:
        """Reserve slots and permits for up to `wanted` calls (one write when all goes well)."""
        if wanted <= 0:
            return Admission.none(0)
        state, fresh = (self._known, False) if self._known else (self._read(), True)
        for _ in range(_ATTEMPTS):
            now = self._now()
            control = state.control
            if control.paused_until > now:
                return Admission.none(control.paused_until - now)
            interval = control.interval(self._rate)
            horizon = max(HORIZON_SECONDS, interval)
            base = max(state.tat, now)
            room = slots_before(base, now + horizon, interval)
            if room <= 0:
                return Admission.none(self._later(control, base - now - horizon + interval))
            free = self._concurrency - state.held
            if free <= 0 and (not fresh or self._reclaim(state, now)):
                # What this sender knew may be stale, or leases just came back: look again.
                state, fresh = self._read(), True
                continue
            if free <= 0:
                return Admission.none(1.0)
            # While the gateway seems down, one probe call per batch (and one a second in all).
            count = min(room, control.batch_limit(wanted))
            permits = min(count, free)
            holder = uuid.uuid4().hex[:12]  # short: the item holds one per sender
            new = self._reserve(state, now, count, interval, permits, holder)
            if new is None:  # the item changed since it was read: read it again and retry
                state, fresh = self._read(), True
                continue
            start = new.tat - count * interval
            later = self._later(control, interval)
            return Admission(count, start, interval, permits, later, holder)
        return Admission.none(0.5)

    # ---------------------------------------------------------------- per operator

    def limited(self, operator_code: str) -> bool:
        """Whether `operator_code` has a rate of its own (GATEWAY_RATE_PER_OPERATOR)."""
        return operator_code in self._operators

    def expected_slots(self) -> tuple[float, float]:
        """Where the next global slot begins and how far apart the slots are, as this sender
        last saw the shared item (no request): where a batch's operator slots should fall."""
        state = self._known
        now = self._now()
        if state is None:
            return now, 1 / self._rate
        return max(state.tat, now), state.control.interval(self._rate)

    def admit_operator(
        self, operator_code: str, wanted: int, not_before: float, until: float, grid: float
    ) -> Admission:
        """Reserve slots of one rate-limited operator for up to `wanted` calls, none before
        `not_before` and all beginning before `until` (epoch seconds): one conditional write on
        the operator's own item. The first slot is on the grid `not_before + k * grid` (where
        the batch's global slots are expected). Each call still needs a global slot within
        `late` of its own (see OperatorSpacing); the calls that got none wait `retry_after`."""
        spacing = OperatorSpacing(self._operators[operator_code])
        interval = spacing.interval_on(grid)
        tat = self._operator_tat.get(operator_code, 0.0)
        for _ in range(_ATTEMPTS):
            now = self._now()
            base = on_grid(max(tat, now), not_before, grid)
            count = min(wanted, slots_starting_before(base, until, interval))
            if count <= 0:
                self._note_deferral(operator_code, now)
                return Admission.none(base - now)
            new = base + count * interval
            written = self._limits.move_operator_slots(operator_code, tat, new, now, count < wanted)
            if written:
                self._operator_tat[operator_code] = new
                if count < wanted:
                    self._deferral_noted[operator_code] = now
                return Admission(count, base, interval, 0, max(0.0, new - now), late=spacing.late)
            tat = self._read_operator(operator_code).tat
        return Admission.none(0.5)

    def operator_limits_status(self, now: datetime | None = None) -> list[OperatorStatus]:
        """Per rate-limited operator, as the shared items have it now (one read each): its
        rate, what its slots allow, how far ahead they are taken and whether its jobs went back
        to the queue for want of a slot in the last OPERATOR_DEFERRING_SECONDS."""
        moment = (now or self._clock()).timestamp()
        status = []
        for code, rate in sorted(self._operators.items()):
            slots = self._read_operator(code)
            deferred_at = slots.deferred_at
            status.append(
                OperatorStatus(
                    code=code,
                    configured_rate=rate,
                    max_rate=round(1 / OperatorSpacing(rate).interval_on(1 / self._rate), 3),
                    reserved_ahead_seconds=round(max(0.0, slots.tat - moment), 3),
                    deferring=deferred_at is not None
                    and moment - deferred_at < OPERATOR_DEFERRING_SECONDS,
                )
            )
        return status

    def _note_deferral(self, operator_code: str, now: float) -> None:
        """Record for the status that this operator's jobs go back to the queue: at most one
        write a second per sender, and a failed one only costs the status a moment."""
        if now - self._deferral_noted.get(operator_code, -math.inf) < 1.0:
            return
        self._deferral_noted[operator_code] = now
        self._limits.note_operator_deferral(operator_code, now)

    def _read_operator(self, operator_code: str) -> OperatorSlots:
        slots = self._limits.read_operator(operator_code)
        self._operator_tat[operator_code] = slots.tat
        return slots

    @staticmethod
    def _later(control: Control, wait: float) -> float:
        """How long calls that got no slot wait: while probing, long enough that a backlog does
        not bounce through SQS every second (and still comes back soon after a recovery)."""
        return max(wait, PROBING_REQUEUE_SECONDS) if control.probing else wait

    def gateway_works(self) -> bool:
        """Whether the gateway worked (most calls of the window accepted, no probing) when this
        sender last saw the item (no request)."""
        state = self._known
        return state is not None and not state.control.probing and state.window.works(self._now())

    def expected_room(self, wanted: int) -> tuple[int, float]:
        """How many of `wanted` calls a batch may expect to make, as this sender last saw the
        item (no request): one while probing; and how long the others should wait."""
        state = self._known
        if state is None:
            return wanted, 0.0
        allowed = state.control.batch_limit(wanted)
        return allowed, self._later(state.control, 0.0) if allowed < wanted else 0.0

    def paused_for(self) -> float:
        """Seconds left of a back-pressure pause as this sender last saw the item (no request)."""
        state = self._known
        return max(0.0, state.control.paused_until - self._now()) if state else 0.0

    def retry_budget(self) -> RetryBudget:
        """The retries the window allows now, as this sender last saw it (no request)."""
        state = self._known or self._read()
        return RetryBudget(state.window.retry_budget(self._now()))

    def release(
        self,
        admission: Admission,
        answers: Sequence[GatewayResult] = (),
        retries: int = 0,
    ) -> None:
        """Give back the permits of an admission whose calls are over, count its `answers` (and
        the `retries` granted for them) in the window, and adjust the shared speed to them."""
        now = self._now()
        verdicts = [classify(answer, now) for answer in answers]
        latencies = [answer.latency_seconds for answer in answers]
        tally = replace(Tally.of(verdicts, latencies), retries=retries)
        state = self._count(admission, tally, now)
        if not verdicts:
            return
        try:
            self._adjust(state, verdicts, latencies)
        except Exception:  # the answers are counted; the next batch's decision sees them
            logger.warning("could not adjust the gateway's sending speed", exc_info=True)

    # ---------------------------------------------------------------- status

    def status(self) -> GatewayStatus:
        """The shared state as it is now, for operators: one consistent read, no write (no item
        yet: nothing has slowed sending, full rate)."""
        limits = self._limits.peek()
        return self._status_of(limits, tuple(self.operator_limits_status()))

    def known_status(self) -> GatewayStatus | None:
        """The status as this sender last saw the item (no request); None before it saw it."""
        state = self._known
        return self._status_of(state) if state else None

    def _status_of(
        self, state: SharedLimits, operators: tuple[OperatorStatus, ...] = ()
    ) -> GatewayStatus:
        return GatewayStatus.of(
            state.control,
            state.window,
            self._rate,
            self._now(),
            why=state.why,
            why_at=state.why_at,
            operators=operators,
        )

    # ---------------------------------------------------------------- back-pressure

    def _count(self, admission: Admission, tally: Tally, now: float) -> SharedLimits | None:
        """One write: the permits back (if held) and the batch's counts in the window."""
        known = self._known
        recorded = self._limits.record(
            admission.holder,
            admission.permits,
            bucket_of(now),
            tally,
            known.window.expired(now) if known else [],
        )
        return self._remember(recorded) if recorded is not None else None

    def _adjust(
        self, state: SharedLimits | None, verdicts: list[Verdict], latencies: list[float]
    ) -> None:
        """Apply the controller's decision; a conditional write, only when the state changes."""
        state = state or self._known or self._read()
        for _ in range(2):
            now = self._now()
            decision = decide(
                state.control,
                state.window,
                verdicts,
                now,
                run=state.run,
                default_pause=self._pause,
                max_pause=self._max_pause,
                latencies=latencies,
            )
            new = decision.control
            if new == state.control:
                return
            written = self._limits.set_control(state.version, new, decision.why, now)
            if written is not None:
                self._remember(written)
                if decision.why:
                    logger.warning(
                        "gateway back-pressure: %s",
                        decision.why,
                        extra={
                            "pause_seconds": round(max(0.0, new.paused_until - now), 1),
                            "rate_per_second": round(1 / new.interval(self._rate), 2),
                        },
                    )
                return
            state = self._read()

    # ---------------------------------------------------------------- storage

    def _reserve(
        self,
        state: SharedLimits,
        now: float,
        count: int,
        interval: float,
        permits: int,
        holder: str,
    ) -> SharedLimits | None:
        """Slots and permits in one conditional write; None if the item changed meanwhile."""
        span = count * interval
        reserved = self._limits.reserve(
            state,
            now,
            span,
            holder,
            Lease(permits, now + self._lease),
            max_held=self._concurrency - permits,
            # Busy: the reserved slots must still end where this sender saw them.
            latest_tat=now + max(HORIZON_SECONDS, interval) - span + 1e-6,
        )
        return self._remember(reserved) if reserved is not None else None

    def _reclaim(self, state: SharedLimits, now: float) -> bool:
        """Take back permits whose lease ended (their sender died); True if any came back."""
        back = False
        for holder, lease in state.holders.items():
            if lease.until >= now:
                continue
            taken = self._limits.take_back(holder, lease)
            if taken is not None:
                self._remember(taken)
                back = True
                logger.warning("gateway permits of an expired lease taken back: %d", lease.permits)
        return back

    def _read(self) -> SharedLimits:
        return self._remember(self._limits.read())

    def _remember(self, state: SharedLimits) -> SharedLimits:
        with self._lock:
            self._known = state
        return state

    def _now(self) -> float:
        return self._clock().timestamp()
