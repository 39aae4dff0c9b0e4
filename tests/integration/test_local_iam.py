"""IAM enforced in the local stack (devstack/iam.py): each function's AWS calls are
allowed or denied by its role's statements as AWS would decide, before anything is sent."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.exceptions import ClientError

from devstack import iam, invocation
from tests.conftest import API_TOKEN, GATEWAY_TOKEN
from tests.support.api import JSON_HEADERS, Api, ApiResponse
from tests.support.in_process import in_process_stack
from tests.support.in_process import sqs_event as lambda_sqs_event

REGION, ACCOUNT = "us-east-1", "123456789012"
SCOPE = iam.CallScope(REGION, ACCOUNT)
TABLE = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table"
ROOT = Path(__file__).resolve().parents[2]


def role(*statements: dict[str, Any]) -> iam.Role:
    parsed = tuple(iam.Statement.parse(s, "test") for s in statements)
    return iam.Role("SenderRole", "send_messages", parsed)


def allow(action: Any, resource: Any, **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def decisions(who: iam.Role, service: str, operation: str, params: dict[str, Any]) -> list[str]:
    return [who.decide(r) for r in iam.requests_for(service, operation, params, SCOPE)]


# ---------------------------------------------------------------- actions and resources


def test_a_call_is_allowed_only_with_its_action_on_its_resource() -> None:
    """Given a role that may read and update the messages table, when it reads a message, then
    it is allowed; when it deletes one, or reads the clients table, then it is not."""
    sender = role(allow(["dynamodb:GetItem", "dynamodb:UpdateItem"], f"{TABLE}/sms-messages"))

    assert decisions(sender, "dynamodb", "GetItem", {"TableName": "sms-messages"}) == ["Allow"]
    assert decisions(sender, "dynamodb", "DeleteItem", {"TableName": "sms-messages"}) == [
        "ImplicitDeny"
    ]
    assert decisions(sender, "dynamodb", "GetItem", {"TableName": "sms-clients"}) == [
        "ImplicitDeny"
    ]


def test_an_explicit_deny_wins_over_any_allow() -> None:
    """Given a role allowed every DynamoDB action but denied DeleteItem, when it deletes, then
    the Deny decides."""
    guarded = role(
        allow("dynamodb:*", "*"),
        {"Effect": "Deny", "Action": "dynamodb:DeleteItem", "Resource": f"{TABLE}/*"},
    )

    assert decisions(guarded, "dynamodb", "DeleteItem", {"TableName": "t"}) == ["Deny"]
    assert decisions(guarded, "dynamodb", "PutItem", {"TableName": "t"}) == ["Allow"]


def test_wildcards_match_actions_case_insensitively_and_resources_exactly() -> None:
    """Given `dynamodb:get*` on tables named sms-?-clients, then GetItem matches on sms-a-clients
    and not on sms-ab-clients, nor on SMS-a-clients (resources are case-sensitive)."""
    reader = role(allow("dynamodb:get*", f"{TABLE}/sms-?-clients"))

    assert decisions(reader, "dynamodb", "GetItem", {"TableName": "sms-a-clients"}) == ["Allow"]
    for table in ("sms-ab-clients", "SMS-a-clients"):
        assert decisions(reader, "dynamodb", "GetItem", {"TableName": table}) == ["ImplicitDeny"]


def test_a_query_on_an_index_needs_the_index_not_the_table() -> None:
    """Given Query granted on the messages table only, when the code queries its by_status
    index, then it is denied; granted on the index, it is allowed."""
    params = {"TableName": "sms-messages", "IndexName": "by_status"}
    on_table = role(allow("dynamodb:Query", f"{TABLE}/sms-messages"))
    on_index = role(allow("dynamodb:Query", f"{TABLE}/sms-messages/index/by_status"))

    assert decisions(on_table, "dynamodb", "Query", params) == ["ImplicitDeny"]
    assert decisions(on_index, "dynamodb", "Query", params) == ["Allow"]


def test_a_transaction_is_authorised_per_item_action_on_each_items_table() -> None:
    """Given a role that may put messages and update mailings, when a transaction puts a
    message, updates a mailing and checks a client's condition, then the first two parts are
    allowed and the condition check needs ConditionCheckItem on the clients table."""
    writer = role(
        allow("dynamodb:PutItem", f"{TABLE}/sms-messages"),
        allow("dynamodb:UpdateItem", f"{TABLE}/sms-mailings"),
    )
    transaction = {
        "TransactItems": [
            {"Put": {"TableName": "sms-messages", "Item": {}}},
            {"Update": {"TableName": "sms-mailings", "Key": {}}},
            {"ConditionCheck": {"TableName": "sms-clients", "Key": {}}},
        ]
    }

    requests = iam.requests_for("dynamodb", "TransactWriteItems", transaction, SCOPE)
    assert [(r.action, r.resource) for r in requests] == [
        ("dynamodb:PutItem", f"{TABLE}/sms-messages"),
        ("dynamodb:UpdateItem", f"{TABLE}/sms-mailings"),
        ("dynamodb:ConditionCheckItem", f"{TABLE}/sms-clients"),
    ]
    assert decisions(writer, "dynamodb", "TransactWriteItems", transaction) == [
        "Allow",
        "Allow",
        "ImplicitDeny",
    ]


def test_batch_calls_need_their_own_action_on_every_table_they_name() -> None:
    """Given PutItem and GetItem on the imports table, when the code batch-writes or
    batch-gets it, then both are denied: a batch is not authorised as its single-item form."""
    single = role(allow(["dynamodb:PutItem", "dynamodb:GetItem"], f"{TABLE}/sms-imports"))
    batch = {"RequestItems": {"sms-imports": [], "sms-clients": []}}

    assert [
        (r.action, r.resource) for r in iam.requests_for("dynamodb", "BatchWriteItem", batch, SCOPE)
    ] == [
        ("dynamodb:BatchWriteItem", f"{TABLE}/sms-imports"),
        ("dynamodb:BatchWriteItem", f"{TABLE}/sms-clients"),
    ]
    assert decisions(single, "dynamodb", "BatchWriteItem", batch)[0] == "ImplicitDeny"
    assert decisions(single, "dynamodb", "BatchGetItem", batch)[0] == "ImplicitDeny"


@pytest.mark.parametrize(
    ("operation", "action"),
    [
        ("SendMessage", "sqs:SendMessage"),
        ("SendMessageBatch", "sqs:SendMessage"),
        ("DeleteMessageBatch", "sqs:DeleteMessage"),
        ("ChangeMessageVisibilityBatch", "sqs:ChangeMessageVisibility"),
    ],
)
def test_sqs_batches_are_authorised_as_their_single_action_on_the_queue(
    operation: str, action: str
) -> None:
    """Given a queue URL, then the call is authorised as its single action on the queue ARN."""
    url = f"http://127.0.0.1:5000/{ACCOUNT}/sms-send"

    [request] = iam.requests_for("sqs", operation, {"QueueUrl": url}, SCOPE)

    assert (request.action, request.resource) == (
        action,
        f"arn:aws:sqs:{REGION}:{ACCOUNT}:sms-send",
    )


def test_a_secret_named_by_name_is_authorised_on_its_full_arn() -> None:
    """Given the emulator's ARN of a secret, when the code reads it by name, then the grant on
    the full ARN applies."""
    arn = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:gateway-token-AbCdEf"
    scope = iam.CallScope(REGION, ACCOUNT, {"gateway-token": arn})

    [request] = iam.requests_for(
        "secretsmanager", "GetSecretValue", {"SecretId": "gateway-token"}, scope
    )

    assert role(allow("secretsmanager:GetSecretValue", arn)).decide(request) == "Allow"


# ---------------------------------------------------------------- conditions

REPORT_GRANT = allow(
    ["ses:SendEmail", "ses:SendRawEmail"],
    f"arn:aws:ses:{REGION}:{ACCOUNT}:identity/*",
    Condition={
        "StringEquals": {"ses:FromAddress": "reports@example.com"},
        "ForAllValues:StringEquals": {"ses:Recipients": ["ops@example.com", "cto@example.com"]},
    },
)


def send_raw(source: str, *recipients: str) -> dict[str, Any]:
    return {"Source": source, "Destinations": list(recipients), "RawMessage": {"Data": b""}}


@pytest.mark.parametrize(
    ("params", "verdict"),
    [
        (send_raw("Reports <reports@example.com>", "ops@example.com"), "Allow"),
        (send_raw("reports@example.com", "ops@example.com", "cto@example.com"), "Allow"),
        (send_raw("reports@example.com", "ops@example.com", "someone@example.org"), "ImplicitDeny"),
        (send_raw("other@example.com", "ops@example.com"), "ImplicitDeny"),
    ],
)
def test_the_report_grant_pins_the_sender_and_every_recipient(
    params: dict[str, Any], verdict: str
) -> None:
    """Given the template's SES grant, then a report goes out only from the configured sender
    and only to configured recipients; one stranger among them denies the whole send."""
    assert decisions(role(REPORT_GRANT), "ses", "SendRawEmail", params) == [verdict]


def test_the_addresses_of_a_raw_message_without_parameters_come_from_its_headers() -> None:
    """Given a SendRawEmail with no Source and no Destinations, then SES's keys come from the
    message's From and To headers."""
    data = b"From: reports@example.com\r\nTo: ops@example.com, x@example.org\r\n\r\nhi"

    [request] = iam.requests_for("ses", "SendRawEmail", {"RawMessage": {"Data": data}}, SCOPE)

    assert request.resource.endswith(":identity/reports@example.com")
    assert request.context["ses:recipients"] == ("ops@example.com", "x@example.org")


@pytest.mark.parametrize(
    ("operator", "values", "context", "holds"),
    [
        ("StringLike", ["ops@*.com"], ("ops@example.com",), True),
        ("StringLike", ["ops@*.com"], ("ops@example.org",), False),
        ("StringLike", ["ops@*.com"], (), False),  # a missing key matches nothing
        ("StringNotEquals", ["a"], (), True),  # ...but a negated operator holds
        ("StringEqualsIfExists", ["a"], (), True),
        ("ForAllValues:StringLike", ["*@example.com"], ("a@example.com", "b@example.com"), True),
        ("ForAllValues:StringLike", ["*@example.com"], ("a@example.com", "b@x.org"), False),
        ("ForAllValues:StringLike", ["*@example.com"], (), True),  # vacuously, as on AWS
        ("ForAnyValue:StringLike", ["*@x.org"], ("a@example.com", "b@x.org"), True),
        ("ForAnyValue:StringLike", ["*@x.org"], ("a@example.com",), False),
        ("ForAnyValue:StringLike", ["*@x.org"], (), False),
    ],
)
def test_condition_operators_decide_as_aws_documents(
    operator: str, values: list[str], context: tuple[str, ...], holds: bool
) -> None:
    """Given one condition, then it holds or not as AWS's policy evaluation documents."""
    [condition] = iam.Condition.parse({operator: {"ses:Recipients": values}})

    assert condition.holds({"ses:recipients": context} if context else {}) is holds


def test_an_operator_the_evaluator_does_not_know_fails_at_start_up() -> None:
    """Given a statement with a NumericLessThan condition, then reading it fails loudly: a
    condition the evaluator could not test must never be taken as allowed."""
    with pytest.raises(iam.IamConfigError, match="NumericLessThan"):
        iam.Statement.parse(
            allow("s3:GetObject", "*", Condition={"NumericLessThan": {"k": 1}}), "t"
        )


# ---------------------------------------------------------------- the template's roles


def local_resources(**parameters: str) -> iam.LocalResources:
    return iam.LocalResources(
        region=REGION,
        account=ACCOUNT,
        stack_name="sms-local",
        parameters={"GatewayTokenSecretArn": "", **parameters},
    )


def app_functions() -> list[str]:
    from app import app

    return iam.app_functions(app)


def test_every_function_of_the_app_runs_under_a_role_the_template_gives_it() -> None:
    """Given the app and infra/resources.yaml, then every Lambda the app packages (API,
    authorizer, schedules, queue workers) has a role with its own policy, so none runs
    unchecked in the local stack."""
    roles = iam.load_roles(app_functions(), local_resources())

    assert set(roles) == {
        "api_handler",
        "bearer_auth",
        "scheduler_tick",
        "daily_report",
        "advance_mailing",
        "send_messages",
        "import_clients",
    }
    for function, found in roles.items():
        assert any(s.sid != "WriteOwnLambdaLogs" for s in found.statements), function


def test_a_function_without_a_policy_in_the_template_stops_the_stack(tmp_path: Path) -> None:
    """Given a new Lambda `purge_old` that no policy in the template names, when the roles are
    loaded, then start-up fails naming its role instead of running it unchecked."""
    with pytest.raises(iam.IamConfigError, match="PurgeOldRole"):
        iam.load_roles([*app_functions(), "purge_old"], local_resources())


def test_an_intrinsic_the_evaluator_cannot_resolve_stops_the_stack(tmp_path: Path) -> None:
    """Given a copy of the template whose sender grant uses Fn::ImportValue, then loading the
    roles fails naming it."""
    text = (ROOT / "infra" / "resources.yaml").read_text()
    changed = text.replace(
        "              - !GetAtt SendDeadLetterQueue.Arn\n",
        "              - !ImportValue shared-dlq-arn\n",
        1,
    )
    assert changed != text
    copy = tmp_path / "resources.yaml"
    copy.write_text(changed)

    with pytest.raises(iam.IamConfigError, match="Fn::ImportValue"):
        iam.load_roles(app_functions(), local_resources(), copy)


def test_the_templates_conditional_grants_follow_the_parameters() -> None:
    """Given no report sender, then no role may send e-mail; given one, the daily report may
    send from it to its recipients, and only the API and the report may."""
    without = iam.load_roles(app_functions(), local_resources())
    given = iam.load_roles(
        app_functions(),
        local_resources(ReportSender="r@example.com", ReportRecipients="a@example.com"),
    )
    send = iam.requests_for(
        "ses", "SendRawEmail", send_raw("r@example.com", "a@example.com"), SCOPE
    )

    assert {f for f, r in without.items() if r.decide(send[0]) == "Allow"} == set()
    assert {f for f, r in given.items() if r.decide(send[0]) == "Allow"} == {
        "api_handler",
        "daily_report",
    }


def test_the_template_is_read_with_short_and_long_intrinsic_forms(tmp_path: Path) -> None:
    """Given the template rewritten in long form (as `chalice package` writes it), then the
    roles are the same as from the short form."""
    long_form = tmp_path / "long.yaml"
    template = iam.load_template(ROOT / "infra" / "resources.yaml")
    long_form.write_text(yaml.safe_dump(template))

    assert iam.load_roles(app_functions(), local_resources(), long_form) == iam.load_roles(
        app_functions(), local_resources()
    )


# ---------------------------------------------------------------- enforcement


@pytest.fixture
def enforced(services: Any) -> Any:
    """The sender's role from a one-statement policy, enforced for the test."""
    from chalicelib.settings import Settings

    settings: Settings = services.settings
    sender = role(allow("dynamodb:GetItem", f"{TABLE}/{settings.table_name('mailings')}"))
    iam.enforce(iam.Enforcer({"send_messages": sender}, ACCOUNT))
    yield services
    iam.enforce(None)


def test_a_denied_call_fails_with_awss_error_and_changes_nothing(
    enforced: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Given the sender's role without PutItem, when the sender writes a mailing through
    boto3, then it gets AccessDeniedException with AWS's message, the denial is logged, and the
    item was never written."""
    import boto3

    table = enforced.settings.table_name("mailings")
    client = boto3.client("dynamodb", region_name=REGION)

    with invocation.running("send_messages"), pytest.raises(ClientError) as denied:
        client.put_item(TableName=table, Item={"mailing_id": {"S": "m-1"}})

    error = denied.value.response["Error"]
    assert error["Code"] == "AccessDeniedException"
    assert error["Message"] == (
        f"User: arn:aws:sts::{ACCOUNT}:assumed-role/SenderRole/send_messages is not authorized "
        f"to perform: dynamodb:PutItem on resource: {TABLE}/{table} because no identity-based "
        "policy allows the dynamodb:PutItem action"
    )
    assert "IAM denied send_messages" in caplog.text
    assert "Item" not in client.get_item(TableName=table, Key={"mailing_id": {"S": "m-1"}})


def test_pynamodb_calls_are_checked_too(enforced: Any) -> None:
    """Given the same role, when the sender updates a mailing's counter through PynamoDB, then
    it fails as PynamoDB fails on AWS's AccessDenied; the read it is allowed goes through."""
    import boto3
    from pynamodb.exceptions import UpdateError

    Mailing = enforced.models.Mailing
    table = enforced.settings.table_name("mailings")
    boto3.client("dynamodb", region_name=REGION).put_item(
        TableName=table, Item={"mailing_id": {"S": "m-1"}, "count_sent": {"N": "0"}}
    )

    with invocation.running("send_messages"):
        with pytest.raises(UpdateError) as denied:
            Mailing("m-1").update(actions=[Mailing.count_sent.add(1)])
        assert denied.value.cause_response_code == "AccessDeniedException"
        assert Mailing.get("m-1").count_sent == 0


def test_calls_outside_an_invocation_and_of_unknown_functions(enforced: Any) -> None:
    """Given enforcement, then the stack's own calls (no invocation) are not checked, and a
    function the enforcer has no role for is denied everything."""
    import boto3

    table = enforced.settings.table_name("mailings")
    client = boto3.client("dynamodb", region_name=REGION)

    client.put_item(TableName=table, Item={"mailing_id": {"S": "m-2"}})
    with invocation.running("purge_old"), pytest.raises(ClientError) as denied:
        client.get_item(TableName=table, Key={"mailing_id": {"S": "m-2"}})

    assert "assumed-role/<no role known for purge_old>" in denied.value.response["Error"]["Message"]


# ---------------------------------------------------------------- the functions, enforced
# Each Lambda driven once in-process, on moto with real queues, under its role from
# infra/resources.yaml, as the local stack runs it: a call its role lacks fails here as on AWS.

PREFIX = "sms-iam"
REPORT_RECIPIENTS = "ops@example.com"


@dataclass
class World:
    """The services on moto, each function's role enforced, and a way to run each function."""

    services: Any
    queues: dict[str, str]  # logical id -> URL
    lambdas: Any  # chalice.test.Client
    gateway: Any
    clock: Any
    denials: list[str]

    def request(self, method: str, path: str, body: Any = None, **headers: str) -> ApiResponse:
        api = Api(self.lambdas.http, headers={**JSON_HEADERS, **headers})
        with invocation.running(iam.API_FUNCTION):
            return api.call(method, path, body)

    def invoke(self, function: str, event: Any) -> Any:
        """Run one of app.py's Lambdas as the local stack does: its handler, a context with a
        real timeout (chalice.test's allows 3 s), tagged with the function's name."""
        from app import app
        from devstack.poller import LambdaContext

        context = LambdaContext(
            function_name=function,
            invoked_function_arn=f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{function}",
            log_stream_name="test",
            timeout_seconds=120,
        )
        with invocation.running(function):
            return app.handler_map[function](event, context)

    def scheduled_event(self) -> Any:
        return self.lambdas.events.generate_cw_event("Scheduled Event", "aws.events", {}, [])

    def take(self, queue: str) -> list[str]:
        """The bodies waiting in a queue, removed from it (outside any invocation)."""
        import boto3

        sqs, url, bodies = boto3.client("sqs", region_name=REGION), self.queues[queue], []
        while answer := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages"):
            for message in answer:
                bodies.append(message["Body"])
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        return bodies


def sqs_event(bodies: list[str], queue: str) -> dict[str, Any]:
    """A Lambda SQS event from one of the stack's queues (by its name after the prefix)."""
    return lambda_sqs_event(bodies, f"arn:aws:sqs:{REGION}:{ACCOUNT}:{PREFIX}-{queue}")


@pytest.fixture
def world(
    aws: None,
    clock: Any,
    sandbox: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> Iterator[World]:
    from chalice.test import Client

    from app import app

    overrides = getattr(request, "param", {})  # indirect parametrisation: more settings
    with in_process_stack(
        PREFIX,
        clock,
        monkeypatch,
        sender_api_url=sandbox.url,
        sender_api_token=GATEWAY_TOKEN,
        report_recipients=REPORT_RECIPIENTS,
        **overrides,
    ) as stack:
        iam.enforce(
            iam.for_local_stack(app, stack.settings, account=ACCOUNT, queue_urls=stack.queues)
        )
        try:
            with Client(app, stage_name="dev") as lambdas:
                yield World(stack.services, stack.queues, lambdas, sandbox, clock, [])
        finally:
            iam.enforce(None)


def denials(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("IAM denied")]


def start_mailing(world: World, *phones: str) -> str:
    """Given clients and a mailing that starts now, fanned out into send jobs."""
    for phone in phones:
        assert world.request("POST", "/clients", {"phone": phone}).status_code == 201
    start, end = world.clock(), world.clock() + timedelta(hours=6)
    made = world.request(
        "POST",
        "/mailings",
        {"text": "Winter sale", "start_at": start.isoformat(), "end_at": end.isoformat()},
    )
    assert made.status_code == 201, made.body
    # Its creation kicks the fan-out (it starts now); the next tick finds nothing left to do.
    for kick in world.take("FanoutQueue"):
        world.invoke("advance_mailing", sqs_event([kick], "fanout"))
    world.invoke("scheduler_tick", world.scheduled_event())
    return made.json["id"]


def test_a_duplicate_send_job_is_skipped_under_the_senders_role(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a mailing whose jobs the sender has delivered, when SQS delivers the same jobs
    again (as it may), then the sender, under its own role, reads the messages it lost the
    claim on and skips them: nothing fails, nothing is sent twice, nothing is denied."""
    start_mailing(world, "79001230001", "79001230002")
    jobs = world.take("SendQueue")
    assert world.invoke("send_messages", sqs_event(jobs, "send")) == {"batchItemFailures": []}

    again = world.invoke("send_messages", sqs_event(jobs, "send"))

    assert again == {"batchItemFailures": []}
    assert sorted(world.gateway.accepted_ids().values()) == [1, 1]
    assert denials(caplog) == []


# One sender thread: on the shared test clock, one thread's wait moves time for all of them.
@pytest.mark.parametrize(
    "world",
    [{"gateway_rate_per_operator": (("900", 50.0),), "sender_concurrency": 1}],
    indirect=True,
)
def test_per_operator_limits_work_under_the_senders_role(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Given operator 900 with a rate of its own, when the sender delivers a batch of its jobs
    under its own role, then it reserves the operator's slots in its item and sends them (on
    the batch's global slots or on slots of their own), and nothing is denied."""
    import boto3

    start_mailing(world, "79001230001", "79001230002", "79001230003")
    jobs = world.take("SendQueue")
    assert world.invoke("send_messages", sqs_event(jobs, "send")) == {"batchItemFailures": []}

    assert sorted(world.gateway.accepted_ids().values()) == [1, 1, 1]
    slots = boto3.client("dynamodb", region_name=REGION).get_item(
        TableName=f"{PREFIX}-sequences", Key={"name": {"S": "gateway-limits#900"}}
    )
    assert float(slots["Item"]["tat"]["N"]) > 0
    assert denials(caplog) == []


def test_a_client_record_that_does_not_deserialise_fails_only_its_own_message(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Given two clients of a mailing, one of whose records is corrupt, when the sender reads
    them (the batch read fails, so one by one) under its role, then the good client gets its
    SMS and only the corrupt one's message fails."""
    import boto3

    mailing = start_mailing(world, "79001230001", "79001230002")
    [corrupt, *_] = [c["id"] for c in world.request("GET", "/clients").json["items"]]
    boto3.client("dynamodb", region_name=REGION).update_item(
        TableName=f"{PREFIX}-clients",
        Key={"client_id": {"S": corrupt}},
        UpdateExpression="SET created_at = :n",
        ExpressionAttributeValues={":n": {"N": "1"}},
    )

    world.invoke("send_messages", sqs_event(world.take("SendQueue"), "send"))

    stats = world.request("GET", f"/mailings/{mailing}/stats").json["stats"]
    assert (stats["sent"], stats["failed"]) == (1, 1), stats
    assert denials(caplog) == []


def test_a_csv_import_with_an_invalid_row_is_accepted_and_written_under_the_roles(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a CSV file with one invalid row, when it is posted (API role) and its chunk is
    written by the import worker (its role), then the API answers 202 with the bad row, and
    the valid rows become clients."""
    text = b"phone,tag\n79001230001,vip\n79001230002,\nbad,\n"

    answer = world.request("POST", "/clients/import", text, **{"Content-Type": "text/csv"})
    assert answer.status_code == 202, answer.body
    for chunk in world.take("ImportQueue"):
        world.invoke("import_clients", sqs_event([chunk], "import"))

    job = world.request("GET", f"/clients/imports/{answer.json['id']}").json
    assert (job["created"], job["invalid"]) == (2, 1), job
    assert denials(caplog) == []


def test_the_fan_out_worker_and_the_daily_report_run_under_their_roles(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a mailing created to start later (its creation kicks the fan-out), when the
    fan-out worker handles the kick and the scheduled report runs, then both do their work
    with what their roles allow: the report is e-mailed."""
    start, end = world.clock() + timedelta(minutes=5), world.clock() + timedelta(hours=6)
    made = world.request(
        "POST",
        "/mailings",
        {"text": "Later", "start_at": start.isoformat(), "end_at": end.isoformat()},
    )
    assert made.status_code == 201, made.body

    for kick in world.take("FanoutQueue"):
        world.invoke("advance_mailing", sqs_event([kick], "fanout"))
    world.invoke("daily_report", world.scheduled_event())

    assert denials(caplog) == []


def test_each_api_request_runs_as_the_api_handler_and_its_authorizer_as_itself() -> None:
    """Given chalice local's gateway as the local stack serves it, when a request reaches a
    route behind an authorizer, then the authorizer runs as its own function and the route as
    api_handler, so each call is checked against the right role."""
    from chalice import AuthResponse, Chalice
    from chalice.config import Config

    from devstack.api import TaggedGateway

    app = Chalice(app_name="tagging")
    seen: list[tuple[str, str | None]] = []

    def running_as() -> str | None:
        current = invocation.current()
        return current.function if current is not None else None

    @app.authorizer()
    def gatekeeper(auth_request: Any) -> AuthResponse:
        seen.append(("authorizer", running_as()))
        return AuthResponse(routes=["*"], principal_id="someone")

    @app.route("/", authorizer=gatekeeper)
    def index() -> dict[str, str]:
        seen.append(("route", running_as()))
        return {}

    gateway = TaggedGateway(app, Config.create(chalice_app=app, lambda_timeout=30))
    answer = gateway.handle_request("GET", "/", {"authorization": "Bearer x"}, b"")

    assert answer["statusCode"] == 200
    assert seen == [("authorizer", "gatekeeper"), ("route", "api_handler")]
    assert invocation.current() is None


def test_the_authorizer_reads_its_tokens_secret_by_name_under_its_role(
    aws: None, clock: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Given static tokens in a secret the settings name by its name (the grant names the full
    ARN), when the authorizer checks a token, then it reads the secret under its own role and
    lets the token through; the API's role may not read it."""
    import boto3

    from app import app
    from chalicelib.container import Services, use_services
    from chalicelib.settings import Settings
    from devstack.poller import LambdaContext

    secrets = boto3.client("secretsmanager", region_name=REGION)
    secrets.create_secret(Name="sms-iam/api-tokens", SecretString=API_TOKEN)
    monkeypatch.delenv("API_TOKENS", raising=False)
    monkeypatch.delenv("AUTH_MODE", raising=False)
    settings = Settings(table_prefix=PREFIX, api_tokens_secret_id="sms-iam/api-tokens")
    use_services(Services.build(settings, clock=clock))
    enforcer = iam.for_local_stack(
        app, settings, account=ACCOUNT, queue_urls={}, secrets_client=secrets
    )
    iam.enforce(enforcer)
    event = {
        "type": "TOKEN",
        "authorizationToken": f"Bearer {API_TOKEN}",
        "methodArn": f"arn:aws:execute-api:{REGION}:{ACCOUNT}:abc123/api/GET/clients",
    }
    context = LambdaContext(
        function_name="bearer_auth",
        invoked_function_arn=f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:bearer_auth",
        log_stream_name="test",
        timeout_seconds=30,
    )
    try:
        with invocation.running("bearer_auth"):
            answer = app.handler_map["bearer_auth"](event, context)
        with invocation.running(iam.API_FUNCTION), pytest.raises(ClientError) as denied:
            secrets.get_secret_value(SecretId="sms-iam/api-tokens")
    finally:
        iam.enforce(None)
        use_services(None)

    [statement] = answer["policyDocument"]["Statement"]
    assert statement["Effect"] == "Allow"
    assert denied.value.response["Error"]["Code"] == "AccessDeniedException"
    assert [m for m in denials(caplog) if "bearer_auth" in m] == []
