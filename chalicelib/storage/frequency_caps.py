"""The clients' frequency-cap slots as stored: one item per client in the sequences table
(`frequency-cap#<client id>`, beside the gateway's limits), with one attribute per slot (`s0`,
`s1`, ...: the mailing that took it and until when it is busy).

A slot is taken with one `UpdateItem` whose condition says the slot is free and no busy slot
holds a message of the same mailing already; a failed condition is an answer, and comes back
with the slots as the condition saw them (no second read). What the slots mean is
chalicelib/domain/frequency_cap.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from botocore.exceptions import ClientError

from chalicelib.domain.frequency_cap import CapSlot
from chalicelib.storage.errors import is_conditional_failure

ITEM_PREFIX = "frequency-cap#"

AttributeValue = dict[str, Any]
Item = Mapping[str, AttributeValue]
Slots = list[CapSlot | None]


class FrequencyCapStore(Protocol):
    """The clients' cap slots."""

    def slots(self, client_id: str, limit: int) -> Slots:
        """The client's `limit` slots as they are now (None: never taken or given back)."""
        ...

    def take(
        self, client_id: str, mailing_id: str, index: int, limit: int, now: float, until: float
    ) -> Slots | None:
        """Take slot `index` of the client's `limit` for a message of `mailing_id`, busy until
        `until`, if it is free at `now` and no busy slot holds one of that mailing's messages.
        None when taken; else the slots as the failed condition saw them."""
        ...

    def give_back(self, client_id: str, mailing_id: str, index: int) -> bool:
        """Free slot `index` if a message of `mailing_id` still holds it; False otherwise."""
        ...


class DynamoFrequencyCaps:
    """`FrequencyCapStore` on DynamoDB (a low-level client, created lazily by the caller)."""

    def __init__(self, dynamodb: Any, table: str) -> None:
        self._db = dynamodb
        self._table = table

    def slots(self, client_id: str, limit: int) -> Slots:
        item = self._db.get_item(
            TableName=self._table, Key=_key(client_id), ConsistentRead=True
        ).get("Item")
        return _slots_of(item or {}, limit)

    def take(
        self, client_id: str, mailing_id: str, index: int, limit: int, now: float, until: float
    ) -> Slots | None:
        names = {f"#s{j}": f"s{j}" for j in range(limit)}
        # None of the busy slots is this mailing's (one message per mailing and client).
        not_held = [
            f"(attribute_not_exists(#s{j}) OR #s{j}.m <> :m OR #s{j}.u <= :now)"
            for j in range(limit)
        ]
        free = f"(attribute_not_exists(#s{index}) OR #s{index}.u <= :now)"
        try:
            self._db.update_item(
                TableName=self._table,
                Key=_key(client_id),
                UpdateExpression=f"SET #s{index} = :slot",
                ConditionExpression=" AND ".join([free, *not_held]),
                ExpressionAttributeNames=names,
                ExpressionAttributeValues={
                    ":m": {"S": mailing_id},
                    ":now": _n(now),
                    ":slot": {"M": {"m": {"S": mailing_id}, "u": _n(until)}},
                },
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if is_conditional_failure(exc):
                return _slots_of(exc.response.get("Item") or {}, limit)
            raise
        return None

    def give_back(self, client_id: str, mailing_id: str, index: int) -> bool:
        try:
            self._db.update_item(
                TableName=self._table,
                Key=_key(client_id),
                UpdateExpression=f"REMOVE #s{index}",
                ConditionExpression=f"#s{index}.m = :m",
                ExpressionAttributeNames={f"#s{index}": f"s{index}"},
                ExpressionAttributeValues={":m": {"S": mailing_id}},
            )
        except ClientError as exc:
            if is_conditional_failure(exc):
                return False
            raise
        return True


def _key(client_id: str) -> dict[str, AttributeValue]:
    return {"name": {"S": f"{ITEM_PREFIX}{client_id}"}}


def _slots_of(item: Item, limit: int) -> Slots:
    slots: Slots = []
    for j in range(limit):
        value = item.get(f"s{j}", {}).get("M")
        if value and "S" in value.get("m", {}) and "N" in value.get("u", {}):
            slots.append(CapSlot(value["m"]["S"], float(value["u"]["N"])))
        else:
            slots.append(None)
    return slots


def _n(value: float) -> AttributeValue:
    return {"N": f"{value:.6f}"}
