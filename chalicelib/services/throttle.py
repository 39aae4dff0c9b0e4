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

**Back-pressure.** A 429, or a run of 5xx / timeouts / network errors with no success in between,
halves the sending speed (the rate is multiplied by `speed`) and pauses every sender for a while
(doubling while the failures go on). Jobs that meet a pause go back to SQS without spending one
of their attempts. Each batch that gets through raises the speed again by a step, so sending
returns to the configured rate within seconds of the gateway's recovery.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.gateway import GatewayResult
from chalicelib.gateway import Outcome as Answer
from chalicelib.settings import Settings

logger = logging.getLogger(__name__)

ITEM_NAME = "gateway-limits"
# How far ahead a sender reserves slots (it waits for them inside its invocation).
HORIZON_SECONDS = 2.0
# Back-pressure: the slowest speed (share of the configured rate) and the step back up.
MIN_SPEED = 1 / 16
SPEED_STEP = 0.125
# Pressure answers in a row (shared by all senders) that pause sending; fewer after a pause,
# while the probes find out whether the gateway is back (one unlucky probe is not enough).
PRESSURE_RUN = 5
PROBE_RUN = 3
# Speed-ups are spaced at least this far apart, whichever sender makes them.
RAISE_SPACING_SECONDS = 1.0
_ATTEMPTS = 6
# A call may leave this much after its slot (thread scheduling); later, it takes the next slot.
LATE_SECONDS = 0.02


def is_pressure(result: GatewayResult) -> bool:
    """An answer that says the gateway is overloaded or down (not: this message is bad)."""
    if result.status_code == 429:
        return True
    if result.outcome is not Answer.RETRY:
        return False
    # 5xx, timeouts and network errors; a 200 without the success code is not about load.
    return result.status_code is None or result.status_code >= 500


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
                if self._admission.start + index * self._admission.interval >= earliest:
                    return self._admission.slot(index)
        return None


@dataclass
class _State:
    tat: float = 0.0
    speed: float = 1.0
    paused_until: float = 0.0
    held: int = 0
    holders: dict[str, tuple[int, float]] | None = None
    run: int = 0
    level: int = 0
    raised_at: float = 0.0

    @classmethod
    def of(cls, item: dict[str, Any]) -> _State:
        def number(name: str, default: float = 0.0) -> float:
            value = item.get(name)
            return float(value["N"]) if value and "N" in value else default

        holders = {
            key: (int(value["M"]["n"]["N"]), float(value["M"]["u"]["N"]))
            for key, value in item.get("holders", {}).get("M", {}).items()
        }
        return cls(
            tat=number("tat"),
            speed=number("speed", 1.0),
            paused_until=number("paused_until"),
            held=int(number("held")),
            holders=holders,
            run=int(number("run")),
            level=int(number("level")),
            raised_at=number("raised_at"),
        )


def _n(value: float) -> dict[str, str]:
    # Six decimals: microsecond slots; DynamoDB numbers are exact decimals.
    return {"N": f"{value:.6f}"}


class GatewayThrottle:
    """The shared limits; one instance per process, used by every sender thread."""

    def __init__(
        self,
        dynamodb: Any,
        settings: Settings,
        clock: Callable[[], datetime],
        lease_seconds: float | None = None,
    ) -> None:
        self._db = dynamodb
        self._table = settings.table_name("sequences")
        self._rate = settings.gateway_rate_per_second
        self._concurrency = settings.gateway_concurrency
        self._pause = settings.gateway_pause_seconds
        self._max_pause = settings.gateway_max_pause_seconds
        self._lease = lease_seconds or float(settings.claim_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._known: _State | None = None

    # ---------------------------------------------------------------- admission

    def admit(self, wanted: int) -> Admission:
        """Reserve slots and permits for up to `wanted` calls (one write when all goes well)."""
        if wanted <= 0:
            return Admission.none(0)
        state, fresh = (self._known, False) if self._known else (self._read(), True)
        for _ in range(_ATTEMPTS):
            now = self._now()
            if state.paused_until > now:
                return Admission.none(state.paused_until - now)
            interval = 1.0 / (self._rate * state.speed)
            horizon = max(HORIZON_SECONDS, interval)
            base = max(state.tat, now)
            room = math.floor((now + horizon - base) / interval + 1e-9)
            if room <= 0:
                return Admission.none(base - now - horizon + interval)
            free = self._concurrency - state.held
            if free <= 0 and (not fresh or self._reclaim(state, now)):
                # What this sender knew may be stale, or leases just came back: look again.
                state, fresh = self._read(), True
                continue
            if free <= 0:
                return Admission.none(1.0)
            # Just after a slow-down, one probe call per sender until one gets through: a gateway
            # that is still down costs one attempt per sender, not one per job.
            count = min(wanted, room, 1 if state.level else wanted)
            permits = min(count, free)
            holder = uuid.uuid4().hex[:12]  # short: the item holds one per sender
            new = self._reserve(state, now, count, interval, permits, holder)
            if new is None:  # the item changed since it was read: read it again and retry
                state, fresh = self._read(), True
                continue
            start = new.tat - count * interval
            return Admission(count, start, interval, permits, interval, holder)
        return Admission.none(0.5)

    def paused_for(self) -> float:
        """Seconds left of a back-pressure pause as this sender last saw the item (no request)."""
        state = self._known
        return max(0.0, state.paused_until - self._now()) if state else 0.0

    def release(self, admission: Admission) -> None:
        """Give back the permits of an admission whose calls are over."""
        if admission.holder is None:
            return
        # None: its lease ended and another sender took the permits back already.
        self._try_update(
            UpdateExpression="REMOVE holders.#h SET held = held - :k",
            ConditionExpression="attribute_exists(holders.#h)",
            ExpressionAttributeNames={"#h": admission.holder},
            ExpressionAttributeValues={":k": {"N": str(admission.permits)}},
        )

    # ---------------------------------------------------------------- back-pressure

    def report(self, results: Sequence[GatewayResult]) -> None:
        """Adjust the shared speed to what the gateway answered one batch."""
        if not results:
            return
        limited = any(r.status_code == 429 for r in results)
        pressure = sum(is_pressure(r) for r in results)
        working = len(results) - pressure
        state = self._known or self._read()
        if limited or (pressure and not working):
            run = self._add_run(pressure)
            if limited or run >= (PROBE_RUN if state.level else PRESSURE_RUN):
                self._slow_down(state, "rate limited" if limited else f"{run} failures in a row")
        elif working and (state.run or state.speed < 1.0 or state.level):
            self._speed_up(state)

    def _add_run(self, pressure: int) -> int:
        return self._update(
            UpdateExpression="ADD #run :n",
            ExpressionAttributeNames={"#run": "run"},
            ExpressionAttributeValues={":n": {"N": str(pressure)}},
        ).run

    def _slow_down(self, state: _State, why: str) -> None:
        now = self._now()
        pause = min(self._max_pause, self._pause * 2**state.level)
        speed = max(MIN_SPEED, state.speed / 2)
        slowed = self._try_update(
            UpdateExpression=(
                "SET speed = :speed, paused_until = :until, #run = :zero, #level = #level + :one"
            ),
            # One slow-down per episode, whichever sender sees it first.
            ConditionExpression="paused_until <= :now",
            ExpressionAttributeNames={"#run": "run", "#level": "level"},
            ExpressionAttributeValues={
                ":speed": _n(speed),
                ":until": _n(now + pause),
                ":zero": {"N": "0"},
                ":one": {"N": "1"},
                ":now": _n(now),
            },
        )
        if slowed is None:
            self._read()
            return
        logger.warning(
            "gateway under pressure (%s): sending paused and slowed down",
            why,
            extra={
                "pause_seconds": round(pause, 1),
                "rate_per_second": round(self._rate * speed, 2),
            },
        )

    def _speed_up(self, state: _State) -> None:
        now = self._now()
        if now - state.raised_at < RAISE_SPACING_SECONDS and state.run == 0:
            return
        speed = min(1.0, state.speed + SPEED_STEP)
        raised = self._try_update(
            UpdateExpression="SET speed = :speed, raised_at = :now, #run = :zero, #level = :zero",
            ConditionExpression="speed = :old AND raised_at <= :spaced",
            ExpressionAttributeNames={"#run": "run", "#level": "level"},
            ExpressionAttributeValues={
                ":speed": _n(speed),
                ":old": _n(state.speed),
                ":now": _n(now),
                ":zero": {"N": "0"},
                ":spaced": _n(now - RAISE_SPACING_SECONDS if state.run == 0 else now),
            },
        )
        if raised is None:
            self._read()

    # ---------------------------------------------------------------- storage

    def _reserve(
        self, state: _State, now: float, count: int, interval: float, permits: int, holder: str
    ) -> _State | None:
        """Slots and permits in one conditional write; None if the item changed meanwhile."""
        span = count * interval
        names = {"#h": holder}
        values = {
            ":now": _n(now),
            ":span": _n(span),
            ":k": {"N": str(permits)},
            ":max_held": {"N": str(self._concurrency - permits)},
            ":speed": _n(state.speed),
            ":lease": {"M": {"n": {"N": str(permits)}, "u": _n(now + self._lease)}},
        }
        common = "speed = :speed AND held <= :max_held AND paused_until <= :now"  # unchanged limits
        if state.tat >= now:
            # Busy: append to the reserved slots, if they still end where this sender saw them.
            values[":last"] = _n(now + max(HORIZON_SECONDS, interval) - span + 1e-6)
            update = "SET tat = tat + :span, holders.#h = :lease, held = held + :k"
            condition = f"tat >= :now AND tat <= :last AND {common}"
        else:
            # Idle: the first slot is now (unused slots of the past are not saved up).
            update = "SET tat = :now + :span, holders.#h = :lease, held = held + :k"
            condition = f"tat < :now AND {common}"
        return self._try_update(
            UpdateExpression=update,
            ConditionExpression=condition,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    def _reclaim(self, state: _State, now: float) -> bool:
        """Take back permits whose lease ended (their sender died); True if any came back."""
        back = False
        for holder, (count, until) in (state.holders or {}).items():
            if until >= now:
                continue
            taken = self._try_update(
                UpdateExpression="REMOVE holders.#h SET held = held - :k",
                ConditionExpression="holders.#h.u = :u",
                ExpressionAttributeNames={"#h": holder},
                ExpressionAttributeValues={":k": {"N": str(count)}, ":u": _n(until)},
            )
            if taken is not None:
                back = True
                logger.warning("gateway permits of an expired lease taken back: %d", count)
        return back

    def _update(self, **request: Any) -> _State:
        """One UpdateItem on the shared item; the item as it is now."""
        response = self._db.update_item(
            TableName=self._table,
            Key={"name": {"S": ITEM_NAME}},
            ReturnValues="ALL_NEW",
            **request,
        )
        return self._remember(response["Attributes"])

    def _try_update(self, **request: Any) -> _State | None:
        """A conditional `_update`; None when its condition does not hold."""
        try:
            return self._update(**request)
        except ClientError as exc:
            if _conditional(exc):
                return None
            raise

    def _read(self) -> _State:
        item = self._db.get_item(
            TableName=self._table, Key={"name": {"S": ITEM_NAME}}, ConsistentRead=True
        ).get("Item")
        if item is None:
            self._create()
            item = self._db.get_item(
                TableName=self._table, Key={"name": {"S": ITEM_NAME}}, ConsistentRead=True
            )["Item"]
        return self._remember(item)

    def _create(self) -> None:
        zero = {"N": "0"}
        try:
            self._db.put_item(
                TableName=self._table,
                Item={
                    "name": {"S": ITEM_NAME},
                    "tat": zero,
                    "speed": {"N": "1"},
                    "paused_until": zero,
                    "held": zero,
                    "holders": {"M": {}},
                    "run": zero,
                    "level": zero,
                    "raised_at": zero,
                },
                ConditionExpression="attribute_not_exists(#name)",
                ExpressionAttributeNames={"#name": "name"},
            )
        except ClientError as exc:
            if not _conditional(exc):
                raise

    def _remember(self, item: dict[str, Any]) -> _State:
        state = _State.of(item)
        with self._lock:
            self._known = state
        return state

    def _now(self) -> float:
        return self._clock().timestamp()


def _conditional(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"
