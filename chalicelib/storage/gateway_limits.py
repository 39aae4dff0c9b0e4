"""The gateway's shared limits as stored: one DynamoDB item (`gateway-limits` in the sequences
table) for the slots, permits, controller and window of all senders, and one per rate-limited
operator (`gateway-limits#<code>`).

Every write is one `UpdateItem` whose condition says what the writer saw; a failed condition
is an answer (someone else wrote first: `None` / `False`), anything else is raised. The
arithmetic (which slots, which speed) is the caller's: see chalicelib/domain/rate_limit.py and
chalicelib/services/throttle.py.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.domain.rate_limit import (
    Control,
    Lease,
    OperatorSlots,
    SharedLimits,
    Tally,
    Window,
)
from chalicelib.storage.errors import is_conditional_failure

logger = logging.getLogger(__name__)

ITEM_NAME = "gateway-limits"
# The window's counters: one attribute per kind and bucket, e.g. `r_177342` (ADD creates it).
_COUNTERS = {"r": "requests", "a": "accepts", "o": "overloads", "t": "retries", "l": "latency"}
_COUNTER = re.compile(r"^([raotl])_(\d+)$")

AttributeValue = dict[str, Any]
Item = Mapping[str, AttributeValue]


class GatewayLimitsStore(Protocol):
    """The shared limits item and the operators' slots items."""

    def read(self) -> SharedLimits:
        """The shared limits as they are now (created with the defaults when missing)."""
        ...

    def peek(self) -> SharedLimits:
        """The shared limits as they are now, without creating them (defaults when missing)."""
        ...

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
        """Take `span` seconds of slots and lease `lease.permits` permits to `holder`, if the
        limits are still as `seen` (version, the slots busy or idle, ending by `latest_tat`),
        at most `max_held` permits were held and no pause is running at `now`."""
        ...

    def take_back(self, holder: str, lease: Lease) -> SharedLimits | None:
        """Take back the permits of `holder`'s lease, if it is still that lease."""
        ...

    def record(
        self,
        holder: str | None,
        permits: int,
        bucket: int,
        tally: Tally,
        expired: Sequence[int],
    ) -> SharedLimits | None:
        """One write: `holder`'s permits back (if it still holds them), `tally` counted in
        `bucket`, the `expired` buckets removed. None when nothing was written."""
        ...

    def set_control(
        self, seen_version: int, control: Control, why: str | None, now: float
    ) -> SharedLimits | None:
        """The controller's new state (and why, at `now`), if its version is still
        `seen_version`."""
        ...

    def read_operator(self, operator_code: str) -> OperatorSlots:
        """One operator's slots as they are now."""
        ...

    def move_operator_slots(
        self, operator_code: str, seen: float, new: float, now: float, deferring: bool
    ) -> bool:
        """Move the operator's next free slot from `seen` to `new` (noting a deferral at `now`
        when `deferring`); False when it was not at `seen`."""
        ...

    def note_operator_deferral(self, operator_code: str, now: float) -> bool:
        """Note that the operator's jobs went back to the queue at `now`; False (logged) when
        the write failed: it only costs the status a moment."""
        ...


class DynamoGatewayLimits:
    """`GatewayLimitsStore` on DynamoDB (a low-level client, created lazily by the caller)."""

    def __init__(self, dynamodb: Any, table: str) -> None:
        self._db = dynamodb
        self._table = table

    # ---------------------------------------------------------------- the shared item

    def read(self) -> SharedLimits:
        item = self._get(ITEM_NAME)
        if item is None:
            self._create()
            item = self._get(ITEM_NAME) or {}
        return _limits_of(item)

    def peek(self) -> SharedLimits:
        return _limits_of(self._get(ITEM_NAME) or {})

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
        values = {
            ":now": _n(now),
            ":span": _n(span),
            ":k": {"N": str(lease.permits)},
            ":max_held": {"N": str(max_held)},
            ":ver": {"N": str(seen.version)},
            ":lease": {"M": {"n": {"N": str(lease.permits)}, "u": _n(lease.until)}},
        }
        # Unchanged limits (an item written before the controller existed has no version).
        common = f"{_same_version(seen.version)} AND held <= :max_held AND paused_until <= :now"
        if seen.tat >= now:
            # Busy: append to the reserved slots, if they still end where the caller saw them.
            values[":last"] = _n(latest_tat)
            update = "SET tat = tat + :span, holders.#h = :lease, held = held + :k"
            condition = f"tat >= :now AND tat <= :last AND {common}"
        else:
            # Idle: the first slot is now (unused slots of the past are not saved up).
            update = "SET tat = :now + :span, holders.#h = :lease, held = held + :k"
            condition = f"tat < :now AND {common}"
        return self._try_update(
            UpdateExpression=update,
            ConditionExpression=condition,
            ExpressionAttributeNames={"#h": holder},
            ExpressionAttributeValues=values,
        )

    def take_back(self, holder: str, lease: Lease) -> SharedLimits | None:
        return self._try_update(
            UpdateExpression="REMOVE holders.#h SET held = held - :k",
            ConditionExpression="holders.#h.u = :u",
            ExpressionAttributeNames={"#h": holder},
            ExpressionAttributeValues={":k": {"N": str(lease.permits)}, ":u": _n(lease.until)},
        )

    def record(
        self,
        holder: str | None,
        permits: int,
        bucket: int,
        tally: Tally,
        expired: Sequence[int],
    ) -> SharedLimits | None:
        names: dict[str, str] = {}
        values: dict[str, AttributeValue] = {}
        adds: list[str] = []
        sets: list[str] = []
        for short, name in _COUNTERS.items():
            amount = getattr(tally, name)
            if amount:
                names[f"#{short}"] = f"{short}_{bucket}"
                values[f":{short}"] = _n(amount) if short == "l" else {"N": str(int(amount))}
                adds.append(f"#{short} :{short}")
        if tally.requests:
            # Calls in a row with none accepted, across senders: an outage when long.
            names["#run"] = "run"
            if tally.accepts:
                sets.append("#run = :zero")
                values[":zero"] = {"N": "0"}
            else:
                adds.append("#run :failed")
                values[":failed"] = {"N": str(tally.requests)}
        if not adds and holder is None:
            return None
        removes: list[str] = []
        for number in expired:
            for short in _COUNTERS:
                names[f"#x{len(removes)}"] = f"{short}_{number}"
                removes.append(f"#x{len(removes)}")

        def expression(extra_removes: list[str], extra_sets: list[str]) -> str:
            clauses = [
                ("ADD", adds),
                ("REMOVE", extra_removes + removes),
                ("SET", extra_sets + sets),
            ]
            return " ".join(f"{verb} {', '.join(parts)}" for verb, parts in clauses if parts)

        if holder is not None:
            released = self._try_update(
                UpdateExpression=expression(["holders.#h"], ["held = held - :k"]),
                # Else its lease ended and another sender took the permits back already.
                ConditionExpression="attribute_exists(holders.#h)",
                ExpressionAttributeNames={**names, "#h": holder},
                ExpressionAttributeValues={**values, ":k": {"N": str(permits)}},
            )
            if released is not None or not adds:
                return released
        return self._update(
            UpdateExpression=expression([], []),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    def set_control(
        self, seen_version: int, control: Control, why: str | None, now: float
    ) -> SharedLimits | None:
        values = {
            ":speed": _n(control.speed),
            ":until": _n(control.paused_until),
            ":probing": {"N": str(int(control.probing))},
            ":cut": _n(control.cut_at),
            ":raised": _n(control.raised_at),
            ":one": {"N": "1"},
            ":zero": {"N": "0"},
            ":ver": {"N": str(seen_version)},
        }
        reason = ""
        if why:
            # For operators (GET /gateway): in the write this decision makes anyway.
            reason = ", why = :why, why_at = :now"
            values.update({":why": {"S": why}, ":now": _n(now)})
        return self._try_update(
            UpdateExpression=(
                "SET speed = :speed, paused_until = :until, probing = :probing, "
                "cut_at = :cut, raised_at = :raised, ver = if_not_exists(ver, :zero) + :one"
                + reason
            ),
            # One decision per state, whichever sender makes it first.
            ConditionExpression=_same_version(seen_version),
            ExpressionAttributeValues=values,
        )

    # ---------------------------------------------------------------- per operator

    def read_operator(self, operator_code: str) -> OperatorSlots:
        item = self._get(_operator_item(operator_code)) or {}
        numbers = {name: float(value["N"]) for name, value in item.items() if "N" in value}
        return OperatorSlots(numbers.get("tat", 0.0), numbers.get("deferred_at"))

    def move_operator_slots(
        self, operator_code: str, seen: float, new: float, now: float, deferring: bool
    ) -> bool:
        update = "SET tat = :new"
        values = {":new": _n(new), ":seen": _n(seen)}
        if deferring:  # some of the batch's jobs of this operator go back to the queue
            update += ", deferred_at = :now"
            values[":now"] = _n(now)
        condition = "tat = :seen"
        if seen == 0:
            condition = "attribute_not_exists(tat) OR tat = :seen"
        try:
            self._db.update_item(
                TableName=self._table,
                Key={"name": {"S": _operator_item(operator_code)}},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if is_conditional_failure(exc):
                return False
            raise
        return True

    def note_operator_deferral(self, operator_code: str, now: float) -> bool:
        try:
            self._db.update_item(
                TableName=self._table,
                Key={"name": {"S": _operator_item(operator_code)}},
                UpdateExpression="SET deferred_at = :now",
                ExpressionAttributeValues={":now": _n(now)},
            )
        except (ClientError, BotoCoreError):
            logger.warning("could not note an operator's deferred jobs", exc_info=True)
            return False
        return True

    # ---------------------------------------------------------------- requests

    def _get(self, name: str) -> Item | None:
        item: Item | None = self._db.get_item(
            TableName=self._table, Key={"name": {"S": name}}, ConsistentRead=True
        ).get("Item")
        return item

    def _update(self, **request: Any) -> SharedLimits:
        """One UpdateItem on the shared item; the limits as they are now."""
        response = self._db.update_item(
            TableName=self._table,
            Key={"name": {"S": ITEM_NAME}},
            ReturnValues="ALL_NEW",
            **request,
        )
        return _limits_of(response["Attributes"])

    def _try_update(self, **request: Any) -> SharedLimits | None:
        """A conditional `_update`; None when its condition does not hold."""
        try:
            return self._update(**request)
        except ClientError as exc:
            if is_conditional_failure(exc):
                return None
            raise

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
                    "probing": zero,
                    "cut_at": zero,
                    "raised_at": zero,
                    "ver": zero,
                    "run": zero,
                    "held": zero,
                    "holders": {"M": {}},
                },
                ConditionExpression="attribute_not_exists(#name)",
                ExpressionAttributeNames={"#name": "name"},
            )
        except ClientError as exc:
            if not is_conditional_failure(exc):
                raise


def _limits_of(item: Item) -> SharedLimits:
    """The shared limits of a stored item (an empty one: the defaults)."""

    def number(name: str, default: float = 0.0) -> float:
        value = item.get(name)
        return float(value["N"]) if value and "N" in value else default

    holders = {
        key: Lease(int(value["M"]["n"]["N"]), float(value["M"]["u"]["N"]))
        for key, value in item.get("holders", {}).get("M", {}).items()
    }
    counts: dict[int, dict[str, float]] = {}
    for name, value in item.items():
        match = _COUNTER.match(name)
        if match and "N" in value:
            bucket = counts.setdefault(int(match[2]), {})
            bucket[_COUNTERS[match[1]]] = float(value["N"])
    buckets = {
        number_: Tally(
            requests=int(c.get("requests", 0)),
            accepts=int(c.get("accepts", 0)),
            overloads=int(c.get("overloads", 0)),
            retries=int(c.get("retries", 0)),
            latency=c.get("latency", 0.0),
        )
        for number_, c in counts.items()
    }
    control = Control(
        speed=number("speed", 1.0),
        paused_until=number("paused_until"),
        probing=bool(number("probing")),
        cut_at=number("cut_at"),
        raised_at=number("raised_at"),
    )
    why = item.get("why", {}).get("S")
    return SharedLimits(
        tat=number("tat"),
        held=int(number("held")),
        holders=holders,
        control=control,
        version=int(number("ver")),
        run=int(number("run")),
        window=Window(buckets),
        why=why if isinstance(why, str) else None,
        why_at=number("why_at") if "why_at" in item else None,
    )


def _n(value: float) -> AttributeValue:
    # Six decimals: microsecond slots; DynamoDB numbers are exact decimals.
    return {"N": f"{value:.6f}"}


def _operator_item(operator_code: str) -> str:
    """The name of one operator's slots item, beside the global one."""
    return f"{ITEM_NAME}#{operator_code}"


def _same_version(version: int) -> str:
    """The controller's state is at `version` (an item written before the controller existed
    has no version: it is version 0)."""
    if version == 0:
        return "(attribute_not_exists(ver) OR ver = :ver)"
    return "ver = :ver"
