"""The embedded emulator keeps DynamoDB's all-or-nothing transactions after our patch."""

from __future__ import annotations

import pytest
from pynamodb.connection import Connection
from pynamodb.exceptions import TransactWriteError
from pynamodb.transactions import TransactWrite


def test_a_cancelled_transaction_changes_nothing(services):
    """Given items a and b, when a transaction that updates a, adds one, deletes b and fails its
    condition on a missing item is written, then it is refused and no item changed."""
    Sequence = services.models.Sequence
    Sequence("a", value=1).save()
    Sequence("b", value=1).save()
    connection = Connection(region=services.settings.aws_region)

    def doomed_transaction() -> None:
        with TransactWrite(connection=connection) as tx:
            tx.update(Sequence("a"), actions=[Sequence.value.add(5)])
            tx.save(Sequence("new", value=9))
            tx.delete(Sequence("b"))
            missing = Sequence("c")
            tx.update(missing, actions=[Sequence.value.add(1)], condition=Sequence.name.exists())

    with pytest.raises(TransactWriteError):
        doomed_transaction()

    assert Sequence.get("a").value == 1
    assert Sequence.get("b").value == 1
    assert Sequence.count("new") == 0
    assert Sequence.count("c") == 0


def test_a_committed_transaction_changes_everything(services):
    """Given item a, when a transaction updating a and adding another commits, then both writes
    show."""
    Sequence = services.models.Sequence
    Sequence("a", value=1).save()
    with TransactWrite(connection=Connection(region=services.settings.aws_region)) as tx:
        tx.update(Sequence("a"), actions=[Sequence.value.add(5)])
        tx.save(Sequence("new", value=9))
    assert Sequence.get("a").value == 6
    assert Sequence.get("new").value == 9


def _signed(service: str, target: str = "", path: str = "/") -> dict[str, str]:
    scope = f"AKIDEXAMPLE/20261206/us-east-1/{service}/aws4_request"
    return {
        "PATH_INFO": path,
        "HTTP_AUTHORIZATION": f"AWS4-HMAC-SHA256 Credential={scope}, SignedHeaders=host, "
        "Signature=abc",
        "HTTP_X_AMZ_TARGET": target,
    }


def test_requests_that_moto_answers_with_different_apps_never_share_a_dispatch_key() -> None:
    """Given DynamoDB, DynamoDB Streams and SQS requests, when the emulator remembers which app
    answers them, then each kind has its own key, and anything else is dispatched by moto."""
    from devstack.emulator import dispatch_key

    dynamodb = dispatch_key(_signed("dynamodb", "DynamoDB_20120810.UpdateItem"))
    same_api = dispatch_key(_signed("dynamodb", "DynamoDB_20120810.Query"))
    streams = dispatch_key(_signed("dynamodb", "DynamoDBStreams_20120810.GetRecords"))
    sqs = dispatch_key(_signed("sqs", "AmazonSQS.ReceiveMessage"))

    assert dynamodb == same_api
    assert len({dynamodb, streams, sqs}) == 3
    assert dispatch_key(_signed("s3", path="/bucket")) is None
    assert dispatch_key(_signed("dynamodb", path="/moto-api/data.json")) is None
    assert dispatch_key({"PATH_INFO": "/", "HTTP_X_AMZ_TARGET": "AmazonSQS.ListQueues"}) is None


def test_the_emulator_answers_dynamodb_and_sqs_each_from_its_own_service_when_interleaved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given the patched emulator serving over HTTP, when DynamoDB and SQS requests alternate,
    then each is answered by its own service (remembered dispatch mixes nothing up)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from devstack.emulator import patch_moto

    for name, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}.items():
        monkeypatch.setenv(name, value)
    patch_moto()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        url = f"http://127.0.0.1:{server._server.server_port}"
        dynamodb = boto3.client("dynamodb", endpoint_url=url, region_name="us-east-1")
        sqs = boto3.client("sqs", endpoint_url=url, region_name="us-east-1")
        dynamodb.create_table(
            TableName="dispatch",
            KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        queue = sqs.create_queue(QueueName="dispatch")["QueueUrl"]
        for n in range(3):
            dynamodb.put_item(TableName="dispatch", Item={"k": {"S": str(n)}})
            sqs.send_message(QueueUrl=queue, MessageBody=str(n))

        assert dynamodb.scan(TableName="dispatch")["Count"] == 3
        assert sqs.list_queues()["QueueUrls"] == [queue]
        assert dynamodb.list_tables()["TableNames"] == ["dispatch"]
    finally:
        server.stop()


def test_the_local_stack_gives_every_aws_client_enough_connections_for_its_threads() -> None:
    """Given the local stack's process, where all the local Lambdas' threads share one client per
    service, when a client is made, then it keeps LOCAL_POOL_CONNECTIONS connections for reuse
    instead of botocore's 10 (past 10 threads, each request opened and dropped a connection)."""
    import boto3
    from botocore.config import Config

    from devstack.stack import LOCAL_POOL_CONNECTIONS, share_connection_pools_like_lambdas

    share_connection_pools_like_lambdas()
    client = boto3.client(
        "sqs",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(max_pool_connections=10),
    )

    assert client._endpoint.http_session._max_pool_connections == LOCAL_POOL_CONNECTIONS
