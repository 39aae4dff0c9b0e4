"""The emulator's faster index queries, responses, conditions and sends answer as moto's own.

Each comparison runs the same requests twice on the same moto world: through our patches, and
with the patched method swapped back to moto's original.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

TABLE = "people"


@pytest.fixture
def dynamodb(aws: None) -> Any:
    client = boto3.client("dynamodb")
    client.create_table(
        TableName=TABLE,
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[
            {"AttributeName": name, "AttributeType": kind}
            for name, kind in (
                ("pk", "S"),
                ("sk", "N"),
                ("grp", "S"),
                ("rank", "N"),
                ("name", "S"),
            )
        ],
        GlobalSecondaryIndexes=[
            _index("by_rank", "grp", "rank", {"ProjectionType": "ALL"}),
            _index("by_name", "grp", "name", {"ProjectionType": "KEYS_ONLY"}),
            _index(
                "by_name_some",
                "grp",
                "name",
                {"ProjectionType": "INCLUDE", "NonKeyAttributes": ["flag"]},
            ),
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    requests = [{"PutRequest": {"Item": _person(n)}} for n in range(90)]
    for start in range(0, len(requests), 25):
        client.batch_write_item(RequestItems={TABLE: requests[start : start + 25]})
    return client


def _index(name: str, hash_key: str, range_key: str, projection: dict) -> dict:
    return {
        "IndexName": name,
        "KeySchema": [
            {"AttributeName": hash_key, "KeyType": "HASH"},
            {"AttributeName": range_key, "KeyType": "RANGE"},
        ],
        "Projection": projection,
    }


def _person(n: int) -> dict[str, Any]:
    item: dict[str, Any] = {
        "pk": {"S": f"p{n % 7}"},
        "sk": {"N": str(n)},
        # Few distinct ranks: ties are ordered by the table's keys.
        "rank": {"N": f"{n % 5}" if n % 3 else f"{n % 5}.50"},
        "flag": {"BOOL": n % 2 == 0},
        "tags": {"L": [{"S": f"t{n}"}, {"N": str(n)}]},
        "info": {"M": {"city": {"S": f"c{n % 4}"}, "zip": {"N": "007"}}},
        "codes": {"SS": [f"x{n}", "y"]},
        "blob": {"B": b"\x00\x01"},
        "nothing": {"NULL": True},
        "padded": {"N": "007"},
    }
    if n % 11:  # some people are in no group: the indexes are sparse
        item["grp"] = {"S": "abc"[n % 3]}
    if n % 13:
        item["name"] = {"S": f"n{n:03d}"}
    return item


@pytest.fixture
def moto_only(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A context in which moto answers queries, serializes and parses as it does unpatched."""
    from moto.core.serialize import JSONSerializer
    from moto.dynamodb.comparisons import ConditionExpressionParser
    from moto.dynamodb.models.table import Table
    from moto.dynamodb.parsing.expressions import UpdateExpressionParser

    @contextlib.contextmanager
    def unpatched() -> Iterator[None]:
        with monkeypatch.context() as patcher:
            patcher.setattr(Table, "query", Table.query.__wrapped__)
            patcher.setattr(
                JSONSerializer,
                "_serialize_type_structure",
                JSONSerializer._serialize_type_structure.__wrapped__,
            )
            patcher.setattr(
                ConditionExpressionParser, "parse", ConditionExpressionParser.parse.__wrapped__
            )
            patcher.setattr(UpdateExpressionParser, "make", UpdateExpressionParser.make.__wrapped__)
            yield

    return unpatched


def _pages(client: Any, **params: Any) -> list[dict]:
    pages = []
    while len(pages) < 200:
        page = client.query(TableName=TABLE, **params)
        page.pop("ResponseMetadata")
        pages.append(page)
        if "LastEvaluatedKey" not in page:
            break
        params["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    return pages


def _both(client: Any, moto_only: Any, **params: Any) -> tuple[list[dict], list[dict]]:
    ours = _pages(client, **dict(params))
    with moto_only():
        theirs = _pages(client, **dict(params))
    return ours, theirs


GROUP_A = {"ExpressionAttributeValues": {":g": {"S": "a"}}}


def _by_rank(condition: str = "", values: dict | None = None, **extra: Any) -> dict:
    expression = "grp = :g" + (f" AND {condition}" if condition else "")
    return {
        "IndexName": "by_rank",
        "KeyConditionExpression": expression,
        "ExpressionAttributeValues": {":g": {"S": "a"}, **(values or {})},
        **extra,
    }


QUERIES = {
    "whole group": _by_rank(),
    "pages of one": _by_rank(Limit=1),
    "pages of four": _by_rank(Limit=4),
    "backwards in pages": _by_rank(Limit=3, ScanIndexForward=False),
    "rank equal": _by_rank("#r = :r", {":r": {"N": "2"}}, ExpressionAttributeNames={"#r": "rank"}),
    "rank below": _by_rank("#r < :r", {":r": {"N": "3"}}, ExpressionAttributeNames={"#r": "rank"}),
    "rank at most, paged": _by_rank(
        "#r <= :r", {":r": {"N": "3"}}, Limit=2, ExpressionAttributeNames={"#r": "rank"}
    ),
    "rank above, backwards": _by_rank(
        "#r > :r",
        {":r": {"N": "1"}},
        Limit=5,
        ScanIndexForward=False,
        ExpressionAttributeNames={"#r": "rank"},
    ),
    "rank from": _by_rank(
        "#r >= :r", {":r": {"N": "1.5"}}, ExpressionAttributeNames={"#r": "rank"}
    ),
    "rank between, paged": _by_rank(
        "#r BETWEEN :lo AND :hi",
        {":lo": {"N": "1"}, ":hi": {"N": "3"}},
        Limit=3,
        ExpressionAttributeNames={"#r": "rank"},
    ),
    "filtered after the limit": _by_rank(
        "", {":t": {"BOOL": True}}, Limit=4, FilterExpression="flag = :t"
    ),
    "top-level projection": _by_rank(
        ProjectionExpression="padded, pk, #r, codes, #b, #n, info, tags, flag",
        ExpressionAttributeNames={"#r": "rank", "#b": "blob", "#n": "nothing"},
        Limit=6,
    ),
    "nested projection": _by_rank(ProjectionExpression="info.city, tags[0], sk", Limit=6),
    "projection of missing attributes": _by_rank(ProjectionExpression="absent, pk"),
    "count only": _by_rank(Select="COUNT", Limit=7),
    "keys-only index, prefix": {
        "IndexName": "by_name",
        "KeyConditionExpression": "grp = :g AND begins_with(#n, :p)",
        "ExpressionAttributeNames": {"#n": "name"},
        "ExpressionAttributeValues": {":g": {"S": "b"}, ":p": {"S": "n0"}},
        "Limit": 3,
    },
    "include index, backwards": {
        "IndexName": "by_name_some",
        "KeyConditionExpression": "grp = :g",
        "ExpressionAttributeValues": {":g": {"S": "c"}},
        "ScanIndexForward": False,
        "Limit": 4,
    },
    "no such group": {
        "IndexName": "by_rank",
        "KeyConditionExpression": "grp = :g",
        "ExpressionAttributeValues": {":g": {"S": "zzz"}},
    },
    "legacy key conditions": {
        "IndexName": "by_rank",
        "KeyConditions": {
            "grp": {"ComparisonOperator": "EQ", "AttributeValueList": [{"S": "b"}]},
            "rank": {"ComparisonOperator": "GE", "AttributeValueList": [{"N": "2"}]},
        },
        "Limit": 4,
    },
    "legacy query filter (moto's own path)": {
        "IndexName": "by_rank",
        "KeyConditions": {
            "grp": {"ComparisonOperator": "EQ", "AttributeValueList": [{"S": "b"}]},
        },
        "QueryFilter": {
            "flag": {"ComparisonOperator": "EQ", "AttributeValueList": [{"BOOL": True}]}
        },
    },
    "table query (moto's own path)": {
        "KeyConditionExpression": "pk = :p AND sk > :s",
        "ExpressionAttributeValues": {":p": {"S": "p3"}, ":s": {"N": "20"}},
        "Limit": 3,
    },
}


@pytest.mark.parametrize("params", QUERIES.values(), ids=QUERIES.keys())
def test_an_index_query_answers_page_by_page_as_moto_does(dynamodb, moto_only, params):
    """Given a table with an index, when the same query is paged through the patched emulator and
    through moto's own code, then every page is the same."""
    ours, theirs = _both(dynamodb, moto_only, **params)
    assert ours == theirs


def test_the_sample_exercises_ties_sparse_items_and_several_pages(dynamodb, moto_only):
    """Given the sample table, when it is paged four items at a time, then it spans several pages
    with tied sort keys, and both answers agree."""
    ours, theirs = _both(dynamodb, moto_only, **_by_rank(Limit=4))
    ranks = [item["rank"]["N"] for page in ours for item in page["Items"]]
    assert len(ours) > 5
    assert len(ranks) > len(set(ranks))  # ties, ordered by the table's keys
    assert ours == theirs


def test_a_bad_query_fails_as_moto_fails(dynamodb, moto_only):
    """Given a consistent read on an index (not allowed), when it is queried with and without the
    patches, then both fail with the same error."""
    params = {**_by_rank(), "ConsistentRead": True}
    with pytest.raises(ClientError) as ours:
        dynamodb.query(TableName=TABLE, **params)
    with moto_only(), pytest.raises(ClientError) as theirs:
        dynamodb.query(TableName=TABLE, **params)
    assert ours.value.response["Error"] == theirs.value.response["Error"]


# ---------------------------------------------------------------- writes are seen at once


def _group(client: Any, group: str) -> list[tuple[str, str]]:
    pages = _pages(
        client,
        IndexName="by_rank",
        KeyConditionExpression="grp = :g",
        ExpressionAttributeValues={":g": {"S": group}},
        Limit=5,
    )
    return [(i["pk"]["S"], i["sk"]["N"]) for page in pages for i in page["Items"]]


def _key(n: int) -> dict:
    return {"pk": {"S": f"p{n % 7}"}, "sk": {"N": str(n)}}


def _update(client: Any, member: tuple[str, str], expression: str, **params: Any) -> None:
    key = {"pk": {"S": member[0]}, "sk": {"N": member[1]}}
    client.update_item(TableName=TABLE, Key=key, UpdateExpression=expression, **params)


def _agree(client: Any, moto_only: Any, *groups: str) -> None:
    for group in groups:
        ours = _group(client, group)
        with moto_only():
            assert ours == _group(client, group)


def test_a_put_is_seen_by_the_next_query(dynamodb, moto_only):
    """Given an indexed group, when an item is put into it, then the next query finds it, as moto's
    would."""
    before = _group(dynamodb, "a")
    dynamodb.put_item(TableName=TABLE, Item={**_person(1000), "grp": {"S": "a"}})
    after = _group(dynamodb, "a")
    assert set(after) - set(before) == {("p6", "1000")}
    _agree(dynamodb, moto_only, "a")


def test_an_update_that_moves_an_item_between_groups_is_seen(dynamodb, moto_only):
    """Given an item of group a, when an update moves it to group b, then queries find it in b
    only, as moto's would."""
    member = _group(dynamodb, "a")[0]
    _update(dynamodb, member, "SET grp = :b", ExpressionAttributeValues={":b": {"S": "b"}})
    assert member not in _group(dynamodb, "a")
    assert member in _group(dynamodb, "b")
    _agree(dynamodb, moto_only, "a", "b")


def test_an_update_of_the_sort_key_reorders_the_group(dynamodb, moto_only):
    """Given the last item of a group, when its sort key is lowered below all others, then it comes
    first, as in moto's answer."""
    last = _group(dynamodb, "a")[-1]
    _update(
        dynamodb,
        last,
        "SET #r = :low",
        ExpressionAttributeNames={"#r": "rank"},
        ExpressionAttributeValues={":low": {"N": "-1"}},
    )
    assert _group(dynamodb, "a")[0] == last
    _agree(dynamodb, moto_only, "a")


def test_removing_the_index_key_takes_the_item_out_of_the_index(dynamodb, moto_only):
    """Given an item in the index, when its index key is removed, then queries no longer find it,
    as moto's would."""
    member = _group(dynamodb, "c")[2]
    _update(dynamodb, member, "REMOVE grp")
    assert member not in _group(dynamodb, "c")
    _agree(dynamodb, moto_only, "c")


def test_deletes_and_batch_writes_are_seen(dynamodb, moto_only):
    """Given a group, when items are deleted singly and in a batch with a put, then queries see
    every change, as moto's would."""
    first, second = _group(dynamodb, "b")[:2]
    dynamodb.delete_item(TableName=TABLE, Key={"pk": {"S": first[0]}, "sk": {"N": first[1]}})
    dynamodb.batch_write_item(
        RequestItems={
            TABLE: [
                {"DeleteRequest": {"Key": {"pk": {"S": second[0]}, "sk": {"N": second[1]}}}},
                {"PutRequest": {"Item": {**_person(2000), "grp": {"S": "b"}}}},
            ]
        }
    )
    found = _group(dynamodb, "b")
    assert first not in found
    assert second not in found
    assert ("p5", "2000") in found
    _agree(dynamodb, moto_only, "b")


def test_a_committed_transaction_is_seen_and_a_cancelled_one_changes_nothing(dynamodb, moto_only):
    """Given indexed groups, when one transaction commits and another is cancelled by its
    condition, then queries see the first and none of the second."""
    before = {group: _group(dynamodb, group) for group in "abc"}
    moved = before["a"][0]
    dynamodb.transact_write_items(
        TransactItems=[
            {"Put": {"TableName": TABLE, "Item": {**_person(3000), "grp": {"S": "c"}}}},
            {
                "Update": {
                    "TableName": TABLE,
                    "Key": {"pk": {"S": moved[0]}, "sk": {"N": moved[1]}},
                    "UpdateExpression": "SET grp = :c",
                    "ExpressionAttributeValues": {":c": {"S": "c"}},
                }
            },
        ]
    )
    committed = {group: _group(dynamodb, group) for group in "abc"}
    assert moved not in committed["a"]
    assert moved in committed["c"]
    assert ("p4", "3000") in committed["c"]

    with pytest.raises(ClientError):
        dynamodb.transact_write_items(
            TransactItems=[
                {"Put": {"TableName": TABLE, "Item": {**_person(4000), "grp": {"S": "a"}}}},
                {
                    "Update": {
                        "TableName": TABLE,
                        "Key": {"pk": {"S": moved[0]}, "sk": {"N": moved[1]}},
                        "UpdateExpression": "SET grp = :a",
                        "ConditionExpression": "grp = :a",
                        "ExpressionAttributeValues": {":a": {"S": "a"}},
                    }
                },
            ]
        )
    assert {group: _group(dynamodb, group) for group in "abc"} == committed
    _agree(dynamodb, moto_only, "a", "b", "c")


def test_a_partiql_update_is_seen(dynamodb, moto_only):
    """Given an item of group a, when a PartiQL UPDATE moves it to b, then queries find it in b, as
    moto's would."""
    member = _group(dynamodb, "a")[1]
    dynamodb.execute_statement(
        Statement=f"UPDATE {TABLE} SET grp='b' WHERE pk=? AND sk=?",
        Parameters=[{"S": member[0]}, {"N": member[1]}],
    )
    assert member in _group(dynamodb, "b")
    _agree(dynamodb, moto_only, "a", "b")


# ---------------------------------------------------------------- cost


@pytest.fixture
def big_group(aws: None) -> Any:
    client = boto3.client("dynamodb")
    client.create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "grp", "AttributeType": "S"},
        ],
        GlobalSecondaryIndexes=[_index("by_grp", "grp", "pk", {"ProjectionType": "ALL"})],
        BillingMode="PAY_PER_REQUEST",
    )
    requests = [
        {"PutRequest": {"Item": {"pk": {"S": f"k{n:05d}"}, "grp": {"S": "g"}}}} for n in range(2000)
    ]
    for start in range(0, len(requests), 25):
        client.batch_write_item(RequestItems={TABLE: requests[start : start + 25]})
    return client


def test_a_page_deep_in_a_large_group_is_found_without_walking_the_group(big_group, monkeypatch):
    """Given a group of 2,000 items, when a page starting deep inside it is asked for, then it is
    found by a binary search, without walking the items."""
    from moto.dynamodb.models.table import Table

    query = {
        "TableName": TABLE,
        "IndexName": "by_grp",
        "KeyConditionExpression": "grp = :g",
        "ExpressionAttributeValues": {":g": {"S": "g"}},
        "Limit": 10,
        "ExclusiveStartKey": {"pk": {"S": "k01500"}, "grp": {"S": "g"}},
    }
    big_group.query(**query)  # sorts the group once
    comparisons = _count_calls(monkeypatch, Table, "_item_comes_before_dct")
    monkeypatch.setattr(Table, "all_items", _never)

    page = big_group.query(**query)

    assert [item["pk"]["S"] for item in page["Items"]] == [f"k{n:05d}" for n in range(1501, 1511)]
    assert comparisons() <= 2 * math.ceil(math.log2(2000))


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> Any:
    original = getattr(owner, name)
    calls = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return lambda: len(calls)


def _never(*_: Any) -> Iterator[Any]:
    raise AssertionError("the whole table was read")


# ---------------------------------------------------------------- responses and conditions


def test_attributes_of_every_type_serialize_as_moto_serializes_them(dynamodb, moto_only):
    """Given items holding every attribute type, when they are read and serialized with and without
    the patches, then the answers are byte for byte the same."""
    keys = [_key(n) for n in (1, 2, 11, 26)]
    ours = dynamodb.batch_get_item(RequestItems={TABLE: {"Keys": keys}})["Responses"]
    with moto_only():
        theirs = dynamodb.batch_get_item(RequestItems={TABLE: {"Keys": keys}})["Responses"]
    assert ours == theirs

    from moto.core.serialize import JSONSerializer, XFormedAttributePicker
    from moto.core.utils import get_service_model
    from moto.dynamodb.responses import DynamoResult

    result = DynamoResult({"Items": [_person(n) for n in range(5)], "Count": 5}).result
    operation = get_service_model("dynamodb").operation_model("Query")

    def body() -> str:
        serializer = JSONSerializer(
            operation_model=operation, value_picker=XFormedAttributePicker()
        )
        return serializer.serialize(result)["body"]

    ours_body = body()
    with moto_only():
        assert ours_body == body()


def test_one_condition_on_many_items_is_judged_item_by_item(dynamodb):
    """Given a condition that an item must not exist, when it is used on a put and in a
    transaction, then it fails only for the item that exists, and the cancelled transaction
    writes nothing."""
    condition = {"ConditionExpression": "attribute_not_exists(pk)"}
    dynamodb.put_item(TableName=TABLE, Item=_person(500), **condition)
    with pytest.raises(ClientError) as taken:
        dynamodb.put_item(TableName=TABLE, Item=_person(500), **condition)
    assert taken.value.response["Error"]["Code"] == "ConditionalCheckFailedException"
    dynamodb.put_item(TableName=TABLE, Item=_person(501), **condition)

    with pytest.raises(ClientError) as cancelled:
        dynamodb.transact_write_items(
            TransactItems=[
                {"Put": {"TableName": TABLE, "Item": _person(n), **condition}}
                for n in (502, 500, 503)
            ]
        )
    reasons = [r["Code"] for r in cancelled.value.response["CancellationReasons"]]
    assert reasons == ["None", "ConditionalCheckFailed", "None"]
    assert "Item" not in dynamodb.get_item(TableName=TABLE, Key=_key(502))


def test_an_invalid_condition_is_refused_every_time_as_moto_refuses_it(dynamodb, moto_only):
    """Given a condition with an unused attribute name, when it is used twice, then it is refused
    both times with moto's own validation error."""

    def refusal() -> dict:
        with pytest.raises(ClientError) as refused:
            dynamodb.put_item(
                TableName=TABLE,
                Item=_person(600),
                ConditionExpression="attribute_not_exists(#a)",
                ExpressionAttributeNames={"#a": "pk", "#unused": "sk"},
            )
        return refused.value.response["Error"]

    first, again = refusal(), refusal()
    with moto_only():
        theirs = refusal()
    assert first == again == theirs
    assert first["Code"] == "ValidationException"


def test_one_update_expression_on_many_items_updates_each_as_moto_does(dynamodb, moto_only):
    """Given one update expression (a counter from nothing, a value, a list append), when it
    updates a new item, existing items and the items of a transaction with different values,
    then every item ends as unpatched moto leaves it, and a bad expression is refused each time
    with moto's own error."""
    update = {
        "UpdateExpression": "SET #n = if_not_exists(#n, :zero) + :one, tag = :t, "
        "tags = list_append(if_not_exists(tags, :none), :more) REMOVE nothing",
        "ExpressionAttributeNames": {"#n": "count"},
    }

    def values(tag: str) -> dict[str, Any]:
        return {
            ":zero": {"N": "0"},
            ":one": {"N": "1"},
            ":t": {"S": tag},
            ":none": {"L": []},
            ":more": {"L": [{"S": tag}]},
        }

    def scenario(base: int) -> tuple[list[dict], dict]:
        dynamodb.put_item(TableName=TABLE, Item=_person(base))
        for n, tag in ((base, "a"), (base, "b"), (base + 1, "new")):
            dynamodb.update_item(
                TableName=TABLE, Key=_key(n), ExpressionAttributeValues=values(tag), **update
            )
        dynamodb.transact_write_items(
            TransactItems=[
                {
                    "Update": {
                        "TableName": TABLE,
                        "Key": _key(n),
                        "ExpressionAttributeValues": values(f"t{n - base}"),
                        **update,
                    }
                }
                for n in (base, base + 1, base + 2)
            ]
        )
        items = []
        for n in (base, base + 1, base + 2):
            item = dynamodb.get_item(TableName=TABLE, Key=_key(n))["Item"]
            # The person's own attributes name its number; what the updates wrote does not.
            items.append({k: item[k] for k in ("count", "tag")} | {"added": item["tags"]["L"][-3:]})
        with pytest.raises(ClientError) as refused:
            dynamodb.update_item(
                TableName=TABLE,
                Key=_key(base),
                UpdateExpression="SET #n = :one,",
                ExpressionAttributeNames={"#n": "count"},
                ExpressionAttributeValues={":one": {"N": "1"}},
            )
        return items, refused.value.response["Error"]

    ours, ours_again = scenario(800), scenario(810)
    with moto_only():
        theirs = scenario(820)
    assert ours == ours_again == theirs
    assert [item["count"]["N"] for item in ours[0]] == ["3", "2", "1"]
    assert ours[1]["Code"] == "ValidationException"


# ---------------------------------------------------------------- SQS


def test_sending_does_not_walk_the_queue_and_its_counts_stay_right(aws, monkeypatch):
    """Given a queue of 300 messages, some delayed, when another batch is sent, then no message is
    looked at, and the visible and delayed counts stay right."""
    from moto.sqs.models import Message

    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName="jobs")["QueueUrl"]
    for start in range(0, 300, 10):
        sqs.send_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(n), "MessageBody": f"m{start + n}", "DelaySeconds": 0 if n else 600}
                for n in range(10)
            ],
        )
    looked_at = _count_calls(monkeypatch, Message, "visible")
    looked_at_delay = _count_calls(monkeypatch, Message, "delayed")

    sqs.send_message_batch(
        QueueUrl=url, Entries=[{"Id": str(n), "MessageBody": "more"} for n in range(10)]
    )
    assert looked_at() == 0
    assert looked_at_delay() == 0

    monkeypatch.undo()
    counts = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert counts["ApproximateNumberOfMessages"] == "280"
    assert counts["ApproximateNumberOfMessagesDelayed"] == "30"


def test_a_fifo_queue_still_drops_duplicate_content(aws):
    """Given a FIFO queue with content-based deduplication, when the same body is sent three times,
    then it holds one message."""
    sqs = boto3.client("sqs")
    url = sqs.create_queue(
        QueueName="jobs.fifo",
        Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "true"},
    )["QueueUrl"]
    for _ in range(3):
        sqs.send_message(QueueUrl=url, MessageBody="same", MessageGroupId="g")
    counts = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])[
        "Attributes"
    ]
    assert counts["ApproximateNumberOfMessages"] == "1"


# ---------------------------------------------------------------- memory


def _live(kind: type) -> int:
    gc.collect()
    return sum(1 for thing in gc.get_objects() if type(thing) is kind)


def test_items_a_query_returns_do_not_outlive_the_response(dynamodb):
    """Given repeated queries and an overwrite, when they are done, then no more item objects are
    alive than before."""
    from moto.dynamodb.models.dynamo_type import Item

    _pages(dynamodb, **_by_rank(ProjectionExpression="pk, sk"))
    held = _live(Item)

    for _ in range(5):
        _pages(dynamodb, **_by_rank(Limit=5))
        _pages(dynamodb, **_by_rank(ProjectionExpression="pk, sk"))
    dynamodb.put_item(TableName=TABLE, Item=_person(1))  # overwrites: the old item goes

    assert _live(Item) == held


def test_deleted_sqs_messages_are_not_kept(aws):
    """Given messages sent, received and deleted three times, when they are gone, then no more
    message objects are alive than before."""
    from moto.sqs.models import Message

    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName="jobs")["QueueUrl"]
    held = _live(Message)
    for _ in range(3):
        sqs.send_message_batch(
            QueueUrl=url, Entries=[{"Id": str(n), "MessageBody": "m"} for n in range(10)]
        )
        received = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
        sqs.delete_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(received)
            ],
        )
    assert _live(Message) == held
