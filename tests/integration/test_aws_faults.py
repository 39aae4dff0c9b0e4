"""AWS_FAULTS: the service's own AWS calls fail as AWS fails them, after the SDK's own retries.

In-process moto; the service's calls are those made inside an invocation, as the local stack
tags them. Reads that check the outcome are made outside one, so they are never faulted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ReadTimeoutError

from chalicelib.storage.errors import error_code, is_conditional_failure, is_transient
from devstack import invocation
from devstack.faults import AwsFaults, inject_aws_faults, injected_aws_faults
from devstack.stack import ConfigError, LocalConfig

REGION = "us-east-1"


@pytest.fixture
def faults() -> Iterator[Callable[[str], None]]:
    """Turn on the faults an AWS_FAULTS value names; off again after the test."""

    def inject(value: str) -> None:
        inject_aws_faults(AwsFaults.parse(value))

    yield inject
    inject_aws_faults(None)


def client(service: str, attempts: int) -> Any:
    """A client whose SDK makes `attempts` attempts per call (standard retry mode)."""
    config = Config(retries={"total_max_attempts": attempts, "mode": "standard"})
    return boto3.client(service, region_name=REGION, config=config)


def in_invocation(call: Callable[[], Any]) -> Any:
    with invocation.running("send_messages", 60):
        return call()


def test_a_conflict_reaches_transact_write_as_a_transient_cancellation_and_writes_nothing(
    services: Any, faults: Callable[[str], None]
) -> None:
    from pynamodb.connection import Connection
    from pynamodb.exceptions import TransactWriteError
    from pynamodb.transactions import TransactWrite

    Sequence = services.models.Sequence
    # Given every transaction attempt cancelled for a conflict
    faults("conflict=1")

    # When the code writes two items in one transaction
    def write() -> None:
        with TransactWrite(connection=Connection(region=REGION)) as transaction:
            transaction.save(Sequence(name="a", value=1))
            transaction.save(Sequence(name="b", value=2))

    with pytest.raises(TransactWriteError) as raised:
        in_invocation(write)

    # Then it sees DynamoDB's cancellation, a reason per item, a conflict on one, no retry...
    codes = [reason.code if reason else None for reason in raised.value.cancellation_reasons]
    assert sorted(codes, key=str) == [None, "TransactionConflict"]
    assert error_code(raised.value) == "TransactionCanceledException"
    assert is_transient(raised.value)
    assert not is_conditional_failure(raised.value)
    assert injected_aws_faults() == {"conflict": 1, "transactions": 1}
    # ...and nothing was written
    assert list(Sequence.batch_get(["a", "b"])) == []


def test_a_throttle_now_and_then_is_absorbed_by_the_sdk_retries(
    services: Any, faults: Callable[[str], None]
) -> None:
    Sequence = services.models.Sequence
    # Given one DynamoDB attempt in ten throttled
    faults("throttle=0.1,seed=7")

    # When the code saves twenty items
    for n in range(20):
        in_invocation(Sequence(name=f"item-{n}", value=n).save)

    # Then every save succeeded, though some attempts were throttled
    assert injected_aws_faults()["throttle"] >= 2
    assert sorted(item.value for item in Sequence.scan()) == list(range(20))


def test_a_throttle_on_every_attempt_reaches_the_code_after_the_sdk_attempts(
    services: Any, faults: Callable[[str], None]
) -> None:
    table = services.models.Sequence.Meta.table_name
    dynamodb = client("dynamodb", attempts=3)
    item = {"name": {"S": "x"}, "value": {"N": "1"}}
    # Given every DynamoDB attempt throttled
    faults("throttle=1")

    # When the code writes an item
    with pytest.raises(ClientError) as raised:
        in_invocation(lambda: dynamodb.put_item(TableName=table, Item=item))

    # Then it sees the throttle once the SDK has made its three attempts, and nothing was written
    throttles = ("ThrottlingException", "ProvisionedThroughputExceededException")
    assert error_code(raised.value) in throttles
    assert is_transient(raised.value)
    assert injected_aws_faults() == {"throttle": 3}
    assert "Item" not in dynamodb.get_item(TableName=table, Key={"name": {"S": "x"}})


def test_a_dynamodb_500_changes_nothing(services: Any, faults: Callable[[str], None]) -> None:
    Sequence = services.models.Sequence
    Sequence(name="counter", value=5).save()
    dynamodb = client("dynamodb", attempts=2)
    # Given every DynamoDB attempt answered 500
    faults("ddb500=1")

    # When the code adds to a counter
    with pytest.raises(ClientError) as raised:
        in_invocation(
            lambda: dynamodb.update_item(
                TableName=Sequence.Meta.table_name,
                Key={"name": {"S": "counter"}},
                UpdateExpression="ADD #v :one",
                ExpressionAttributeNames={"#v": "value"},
                ExpressionAttributeValues={":one": {"N": "1"}},
            )
        )

    # Then it sees InternalServerError, and the counter is as it was
    assert error_code(raised.value) == "InternalServerError"
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert is_transient(raised.value)
    assert Sequence.get("counter").value == 5


@pytest.fixture
def queue_url(aws: None) -> str:
    return boto3.client("sqs", region_name=REGION).create_queue(QueueName="faults")["QueueUrl"]


def queue_depth(url: str) -> int:
    attributes = boto3.client("sqs", region_name=REGION).get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"])


def test_an_sqs_500_reaches_the_code_after_the_sdk_attempts_and_sends_nothing(
    queue_url: str, faults: Callable[[str], None]
) -> None:
    sqs = client("sqs", attempts=2)
    # Given every SQS attempt answered 500
    faults("sqs500=1")

    # When the code sends a message
    with pytest.raises(ClientError) as raised:
        in_invocation(lambda: sqs.send_message(QueueUrl=queue_url, MessageBody="job"))

    # Then it sees InternalError, and the queue stays empty
    assert error_code(raised.value) == "InternalError"
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert injected_aws_faults() == {"sqs500": 2}
    assert queue_depth(queue_url) == 0


def test_an_sqs_timeout_reaches_the_code_as_a_read_timeout_and_sends_nothing(
    queue_url: str, faults: Callable[[str], None]
) -> None:
    sqs = client("sqs", attempts=2)
    # Given every SQS attempt timing out before it is sent
    faults("sqstimeout=1")

    # When the code sends a message
    with pytest.raises(ReadTimeoutError):
        in_invocation(lambda: sqs.send_message(QueueUrl=queue_url, MessageBody="job"))

    # Then the SDK tried twice and the queue stays empty
    assert injected_aws_faults() == {"sqstimeout": 2}
    assert queue_depth(queue_url) == 0


def test_secrets_manager_throttling_reaches_the_code(
    aws: None, faults: Callable[[str], None]
) -> None:
    secrets = client("secretsmanager", attempts=2)
    secrets.create_secret(Name="gateway-token", SecretString="s3cret")
    # Given every Secrets Manager attempt throttled
    faults("secrets=1")

    # When the code reads the secret
    with pytest.raises(ClientError) as raised:
        in_invocation(lambda: secrets.get_secret_value(SecretId="gateway-token"))

    # Then it sees ThrottlingException after the SDK's attempts
    assert error_code(raised.value) == "ThrottlingException"
    assert injected_aws_faults() == {"secrets": 2}


def test_calls_outside_an_invocation_are_never_faulted(
    services: Any, queue_url: str, faults: Callable[[str], None]
) -> None:
    Sequence = services.models.Sequence
    # Given every fault at its most
    faults("conflict=1,throttle=1,ddb500=1,sqs500=1,sqstimeout=1,secrets=1")

    # When the stack (or a test) writes and sends outside any invocation
    Sequence(name="setup", value=1).save()
    boto3.client("sqs", region_name=REGION).send_message(QueueUrl=queue_url, MessageBody="x")

    # Then everything went through, and nothing was injected
    assert Sequence.get("setup").value == 1
    assert queue_depth(queue_url) == 1
    assert injected_aws_faults() == {}


def test_the_same_seed_gives_the_same_faults(services: Any, faults: Callable[[str], None]) -> None:
    table = services.models.Sequence.Meta.table_name
    dynamodb = client("dynamodb", attempts=1)

    def outcomes(value: str) -> list[bool]:
        faults(value)
        results = []
        for n in range(30):
            try:
                in_invocation(
                    lambda n=n: dynamodb.get_item(TableName=table, Key={"name": {"S": str(n)}})
                )
                results.append(True)
            except ClientError:
                results.append(False)
        return results

    # Given two runs with seed 7 and one with seed 8, each throttling half the attempts
    first, second, other = (
        outcomes("throttle=0.5,seed=7"),
        outcomes("throttle=0.5,seed=7"),
        outcomes("throttle=0.5,seed=8"),
    )

    # Then the same seed failed the same calls, and another seed others
    assert first == second
    assert first != other
    assert 0 < first.count(False) < 30


def test_an_abandoned_invocation_makes_no_aws_or_gateway_call(services: Any, sandbox: Any) -> None:
    import requests

    from devstack.faults import install_call_hooks

    install_call_hooks()
    Sequence = services.models.Sequence

    # Given an invocation Lambda has stopped
    with invocation.running("send_messages", 60) as current:
        current.abandon()

        # When it still writes and calls the gateway, then both are refused
        with pytest.raises(invocation.InvocationAbandoned):
            Sequence(name="late", value=1).save()
        with pytest.raises(invocation.InvocationAbandoned):
            requests.get(f"{sandbox.url}/_sandbox/ledger", timeout=5)

    # Then nothing was written
    assert Sequence.count() == 0


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("conflcit=0.1", "unknown fault 'conflcit'"),
        ("throttle=1.5", "throttle must be a rate between 0 and 1"),
        ("sqs500=-0.1", "sqs500 must be a rate between 0 and 1"),
        ("ddb500", "'ddb500' is not name=value"),
        ("seed=x", "seed must be a whole number"),
    ],
)
def test_a_bad_aws_faults_value_stops_the_stack_naming_the_setting(
    value: str, complaint: str
) -> None:
    # Given AWS_FAULTS with a bad entry, when the stack reads its settings, then it refuses
    with pytest.raises(ConfigError) as raised:
        LocalConfig.from_env({"AWS_FAULTS": value})
    assert "AWS_FAULTS" in str(raised.value)
    assert complaint in str(raised.value)


def test_aws_faults_are_off_unless_set() -> None:
    # Given no AWS_FAULTS, then none are injected; given some, the stack carries them
    assert not LocalConfig.from_env({}).aws_faults.active
    config = LocalConfig.from_env({"AWS_FAULTS": "conflict=0.15, throttle=0.03,seed=7"})
    assert config.aws_faults == AwsFaults(conflict=0.15, throttle=0.03, seed=7)
    assert config.aws_faults.summary() == "conflict=0.15,throttle=0.03,seed=7"
