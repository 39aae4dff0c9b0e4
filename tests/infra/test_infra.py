"""The deployable template: `chalice package` merged with infra/resources.yaml, as `make package`.

The app is packaged once for this module (the first run downloads Linux wheels into
.chalice/deployments, later runs reuse them); every test reads the same template.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args

import botocore.client
import pytest
import yaml
from cfnlint.schema import PROVIDER_SCHEMA_MANAGER
from chalice import Chalice

from app import app as chalice_app
from chalicelib import workers
from chalicelib.auth import LoadedTokenVerifier, OidcVerifier, build_verifier
from chalicelib.domain import AudienceFilter
from chalicelib.domain.gateway_answer import AnswerKind, GatewayResult
from chalicelib.metrics import METRICS, MetricsWriter
from chalicelib.services.queues import SQS_MAX_DELAY_SECONDS
from chalicelib.settings import AuthMode, Settings
from chalicelib.storage.models import build_models
from devstack import api as local_api
from devstack import iam
from tests.conftest import API_TOKEN, JSON_HEADERS
from tests.support.in_process import QUEUE_NAMES, REPORT_SENDER, in_process_stack

pytestmark = pytest.mark.infra

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MERGE_TEMPLATE = "infra/resources.yaml"
STAGE = "prod"
# A YAML merge template makes Chalice write the whole template as YAML, whatever the format flag.
TEMPLATE_NAME = "sam.yaml"
PACKAGE_TIMEOUT_SECONDS = 600

# Who may do what, written out so that a change in the code's data access needs a deliberate
# change here (and in infra/resources.yaml). Read from each Lambda's code path:
# PynamoDB get -> GetItem, save -> PutItem, update -> UpdateItem, delete -> DeleteItem,
# query -> Query (on "<kind>/index/<name>" for an index), batch_get -> BatchGetItem; a
# transaction's parts are authorised as the Put/Update/Delete they are (no ConditionCheck parts).
# SendMessageBatch is authorised as sqs:SendMessage; an SQS event source needs CONSUME.
GET, PUT, UPDATE, DELETE = (
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
)
QUERY, BATCH_GET = "dynamodb:Query", "dynamodb:BatchGetItem"
SEND, DEPTH = "sqs:SendMessage", "sqs:GetQueueAttributes"
CONSUME = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"}
AUDIENCE_INDEXES = {
    "clients/index/by_operator": {QUERY},
    "clients/index/by_tag": {QUERY},
    "clients/index/by_shard": {QUERY},
}
TABLE_ACCESS: dict[str, dict[str, set[str]]] = {
    # chalicelib/api: client and mailing CRUD, listings, statistics and GET /metrics (the
    # totals item and the unsettled mailings: keys from due, items by BatchGetItem), POST
    # /reports/daily (keys from by_end); settling on cancel and delete (transactions); opt-outs
    # and the preview's sample (clients); retry-failed (messages back to pending).
    "APIHandler": {
        "clients": {GET, BATCH_GET, PUT, UPDATE, DELETE},
        **AUDIENCE_INDEXES,
        "phones": {GET, PUT, DELETE},
        "mailings": {GET, BATCH_GET, PUT, UPDATE, DELETE},
        "mailings/index/by_created": {QUERY},
        "mailings/index/due": {QUERY},
        "mailings/index/by_end": {QUERY},
        "messages": {QUERY, BATCH_GET, UPDATE},
        "messages/index/by_status": {QUERY},
        # CSV imports: the job and its invalid rows (a put per page), reads, the listing.
        "imports": {PUT, UPDATE, QUERY, BATCH_GET},
        "imports/index/by_created": {QUERY},
        "sequences": {GET},  # GET /gateway and GET /metrics: the senders' shared gateway item
        # Idempotency-Key: claim, read the first request's record, save, give back after a 5xx.
        "idempotency": {GET, PUT, UPDATE, DELETE},
        # The audit trail: an entry per write; GET /audit by target, by actor, or all.
        "audit": {PUT, QUERY},
        "audit/index/by_actor": {QUERY},
        "audit/index/by_time": {QUERY},
    },
    # Scheduler.tick: due mailings, leases, fan-out pages, sweeps, finish.
    "SchedulerTick": {
        "mailings": {GET, UPDATE},
        "mailings/index/due": {QUERY},
        "messages": {PUT, UPDATE},
        "messages/index/by_status": {QUERY},
        **AUDIENCE_INDEXES,
        "clients": {BATCH_GET},  # the reconciler's page of clients (time zones)
        "sequences": {UPDATE},
    },
    # Scheduler.advance: the same for one mailing, read by key instead of from the due index.
    "AdvanceMailing": {
        "mailings": {GET, UPDATE},
        "messages": {PUT, UPDATE},
        "messages/index/by_status": {QUERY},
        **AUDIENCE_INDEXES,
        "clients": {BATCH_GET},  # the reconciler's page of clients (time zones)
        "sequences": {UPDATE},
    },
    # Sender.deliver: one read of the batch's mailing, messages and clients; claims, outcomes
    # (a lost claim learns the message from its failed condition, so no message GetItem).
    "SendMessages": {
        "mailings": {GET, UPDATE},
        "messages": {BATCH_GET, UPDATE},
        "clients": {BATCH_GET},
        "sequences": {GET, PUT, UPDATE},  # the shared gateway limits
    },
    # The daily report: the mailings ending in its window or later (keys from by_end, then the
    # items); it writes nothing.
    "DailyReport": {"mailings/index/by_end": {QUERY}, "mailings": {BATCH_GET}},
    # ClientImports.process: the job and the chunk's record, the phones' owners and those
    # clients (batch gets), new clients, claims and changes (transaction puts), the counts.
    "ImportClients": {
        "imports": {BATCH_GET, GET, UPDATE},
        "clients": {BATCH_GET, GET, PUT},
        "phones": {BATCH_GET, PUT},
    },
}
QUEUE_ACCESS: dict[str, dict[str, set[str]]] = {
    "APIHandler": {
        "FanoutQueue": {SEND, DEPTH},  # kicks; GET /metrics reads the depths
        "SendQueue": {SEND, DEPTH},  # jobs of retried messages
        "SendDeadLetterQueue": {DEPTH},
        "ImportQueue": {SEND},  # the chunks of a CSV import
    },
    # Jobs and continuations; the send queue's depth for the reconciler.
    "SchedulerTick": {"SendQueue": {SEND, DEPTH}, "FanoutQueue": {SEND}},
    "AdvanceMailing": {"FanoutQueue": {*CONSUME, SEND}, "SendQueue": {SEND, DEPTH}},
    "SendMessages": {
        "SendQueue": {*CONSUME, SEND},
        "SendDeadLetterQueue": {SEND},
        "FanoutQueue": {SEND},  # kick when a mailing's last message is out
    },
    "DailyReport": {},
    "ImportClients": {"ImportQueue": CONSUME},
}
AUTHORIZER = "BearerAuth"
# Functions that e-mail the daily report through SES (and so get its addresses).
REPORTERS = {"DailyReport", "APIHandler"}
SEND_EMAIL = {"ses:SendEmail", "ses:SendRawEmail"}
REPORT_RECIPIENTS = "ops@example.com,owner@example.org"

# Queue -> (its dead-letter queue, the function its SQS event source feeds).
QUEUES = {
    "SendQueue": ("SendDeadLetterQueue", "SendMessages"),
    "FanoutQueue": ("FanoutDeadLetterQueue", "AdvanceMailing"),
    "ImportQueue": ("ImportDeadLetterQueue", "ImportClients"),
}
DEAD_LETTER_QUEUES = {"SendDeadLetterQueue", "FanoutDeadLetterQueue", "ImportDeadLetterQueue"}
MAX_RECEIVE_COUNT = 5
FOURTEEN_DAYS = 14 * 24 * 3600
# Lambda's guidance for SQS sources: visibility timeout >= 6 x function timeout (+ window).
VISIBILITY_FACTOR = 6
# Environment variables the functions get that chalicelib.settings does not read.
NON_SETTINGS_VARIABLES = {"POWERTOOLS_SERVICE_NAME"}

STACK_NAME = "sms-prod"
# Settings needs a valid prefix; only the "<prefix>-<kind>" shape matters here.
MODEL_PREFIX = "sms-models"
MODELS = build_models(Settings(table_prefix=MODEL_PREFIX)).all()
KINDS = [model.Meta.table_name.removeprefix(f"{MODEL_PREFIX}-") for model in MODELS]

# Response type -> (status code it must have, or None for API Gateway's own; error code).
GATEWAY_RESPONSES = {
    "UNAUTHORIZED": ("401", "unauthorized"),
    "ACCESS_DENIED": ("403", "forbidden"),
    "MISSING_AUTHENTICATION_TOKEN": ("404", "not_found"),
    "THROTTLED": ("429", "too_many_requests"),
    "DEFAULT_4XX": (None, "request_rejected"),
    "DEFAULT_5XX": (None, "gateway_error"),
}


# ---------------------------------------------------------------- packaging (once)


@pytest.fixture(scope="module")
def template_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Package the app exactly as `make package` does and return the written template."""
    outdir = tmp_path_factory.mktemp("infra") / "package"
    env = dict(os.environ)
    # chalice package needs a region to build its config, though it makes no AWS calls.
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    command = [
        str(BIN / "chalice"),
        "package",
        "--stage",
        STAGE,
        "--merge-template",
        MERGE_TEMPLATE,
        str(outdir),
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=PACKAGE_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"chalice package failed:\n{result.stdout}\n{result.stderr}")
    path = outdir / TEMPLATE_NAME
    assert path.exists(), f"chalice package wrote {sorted(p.name for p in outdir.iterdir())}"
    return path


def test_deployment_package_carries_the_api_reference_page(template_path: Path) -> None:
    """Given the packaged Lambda code, then /docs has what it serves: Swagger UI 5 (vendored
    under chalicelib/, which Chalice ships whole), its licence and the page's own script."""
    with zipfile.ZipFile(template_path.parent / "deployment.zip") as package:
        names = set(package.namelist())
    for name in (
        "chalicelib/apidocs/docs.js",
        "chalicelib/apidocs/swagger-ui/swagger-ui-bundle.js",
        "chalicelib/apidocs/swagger-ui/swagger-ui.css",
        "chalicelib/apidocs/swagger-ui/LICENSE",
    ):
        assert name in names, name


# What only the local stack and the tests use: never in a Lambda.
DEV_ONLY_PREFIXES = ("devstack/", "tests/", "bench/", "docs/", "infra/", "build/")
DEV_ONLY_MODULES = ("moto", "pytest", "playwright", "schemathesis", "werkzeug")


def test_deployment_package_holds_only_runtime_code(template_path: Path) -> None:
    """Given the packaged Lambda code, then it holds the app and chalicelib, and no dev-stack,
    test, benchmark or emulator code: the local stack lives in devstack/, outside the zip."""
    with zipfile.ZipFile(template_path.parent / "deployment.zip") as package:
        names = package.namelist()
    assert "app.py" in names
    assert "chalicelib/workers.py" in names
    own = [name for name in names if name.endswith(".py") and "/" in name]
    assert not [name for name in names if name.startswith(DEV_ONLY_PREFIXES)]
    assert not [name for name in own if name.split("/")[0] in DEV_ONLY_MODULES]
    # Nothing in the shipped code imports the dev stack (it would fail in Lambda).
    with zipfile.ZipFile(template_path.parent / "deployment.zip") as package:
        shipped = {
            name: package.read(name).decode("utf-8", "replace")
            for name in names
            if name.startswith("chalicelib/") and name.endswith(".py")
        }
    imports_devstack = re.compile(r"^\s*(from|import)\s+devstack\b", re.MULTILINE)
    importing = [name for name, text in shipped.items() if imports_devstack.search(text)]
    assert importing == []


@pytest.fixture(scope="module")
def template(template_path: Path) -> dict[str, Any]:
    # Chalice writes intrinsics in their long form (Ref:, Fn::Sub:), so plain YAML reads it.
    return yaml.safe_load(template_path.read_text())


@pytest.fixture(scope="module")
def resources(template: dict[str, Any]) -> dict[str, Any]:
    return template["Resources"]


# ---------------------------------------------------------------- helpers


def of_type(resources: dict[str, Any], kind: str) -> dict[str, Any]:
    return {name: res for name, res in resources.items() if res["Type"] == kind}


def tables_by_kind(resources: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Template tables keyed by kind ("clients"), read from `${AWS::StackName}-<kind>` names."""
    found = {}
    for logical_id, table in of_type(resources, "AWS::DynamoDB::Table").items():
        name = table["Properties"]["TableName"]
        match = re.fullmatch(r"\$\{AWS::StackName\}-([a-z_]+)", name.get("Fn::Sub", ""))
        assert match, f"{logical_id} is not named ${{AWS::StackName}}-<kind>: {name}"
        found[match.group(1)] = (logical_id, table["Properties"])
    return found


def model_for(kind: str) -> Any:
    return MODELS[KINDS.index(kind)]


def key_schema(schema: list[dict[str, str]]) -> set[tuple[str, str]]:
    return {(key["AttributeName"], key["KeyType"]) for key in schema}


def function_roles(resources: dict[str, Any]) -> dict[str, str]:
    """Function logical id -> logical id of the role it runs as."""
    roles = {}
    for name, function in of_type(resources, "AWS::Serverless::Function").items():
        role = function["Properties"]["Role"]
        assert "Fn::GetAtt" in role, f"{name} runs as a role this stack does not manage: {role}"
        roles[name] = role["Fn::GetAtt"][0]
    return roles


def authorizer_functions(resources: dict[str, Any]) -> set[str]:
    """Functions that API Gateway calls as authorizers (named in the API's swagger)."""
    found = set()
    for api in of_type(resources, "AWS::Serverless::Api").values():
        definitions = api["Properties"]["DefinitionBody"].get("securityDefinitions", {})
        for definition in definitions.values():
            uri = definition.get("x-amazon-apigateway-authorizer", {}).get("authorizerUri", {})
            found.update(re.findall(r"\$\{(\w+)\.Arn\}", uri.get("Fn::Sub", "")))
    return found


NO_VALUE = {"Ref": "AWS::NoValue"}


def widest(statements: list[Any]) -> list[dict[str, Any]]:
    """The statements of the most permissive deployment: both branches of a conditional one
    (`Fn::If`), so a grant that only some parameter values enable is still checked."""
    found = []
    for statement in statements:
        if "Fn::If" in statement:
            _, when_true, when_false = statement["Fn::If"]
            found.extend(branch for branch in (when_true, when_false) if branch != NO_VALUE)
        else:
            found.append(statement)
    return found


def statements_by_role(resources: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every policy statement in the stack, grouped by the role it applies to."""
    by_role: dict[str, list[dict[str, Any]]] = {}
    for name, role in of_type(resources, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            by_role.setdefault(name, []).extend(widest(policy["PolicyDocument"]["Statement"]))
    for policy in of_type(resources, "AWS::IAM::Policy").values():
        for role in policy["Properties"]["Roles"]:
            by_role.setdefault(role["Ref"], []).extend(
                widest(policy["Properties"]["PolicyDocument"]["Statement"])
            )
    return by_role


def grants(statements: list[dict[str, Any]], service: str) -> list[dict[str, Any]]:
    """The Allow statements that name an action of `service` ("ses", "kms", ...)."""
    return [
        statement
        for statement in statements
        if statement["Effect"] == "Allow"
        and any(a.startswith(f"{service}:") for a in as_list(statement["Action"]))
    ]


def roles_granted(resources: dict[str, Any], service: str) -> dict[str, list[dict[str, Any]]]:
    """Role -> its Allow statements naming an action of `service`, for roles that have any."""
    found = {role: grants(s, service) for role, s in statements_by_role(resources).items()}
    return {role: statements for role, statements in found.items() if statements}


def own_policy(resources: dict[str, Any], role: str) -> str:
    """The logical id of the one AWS::IAM::Policy attached to `role` alone."""
    [name] = [
        name
        for name, policy in of_type(resources, "AWS::IAM::Policy").items()
        if policy["Properties"]["Roles"] == [{"Ref": role}]
    ]
    return name


def conditional_statements(resources: dict[str, Any], policy: str) -> dict[str, Any]:
    """Sid -> name of the condition that must hold for the statement to exist in `policy`."""
    statements = resources[policy]["Properties"]["PolicyDocument"]["Statement"]
    return {
        s["Fn::If"][1]["Sid"]: s["Fn::If"][0]
        for s in statements
        if "Fn::If" in s and s["Fn::If"][2] == NO_VALUE
    }


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def table_target(resource: Any) -> tuple[str, str] | None:
    """(table logical id, suffix) for `!GetAtt T.Arn` or `!Sub "${T.Arn}<suffix>"`; else None."""
    if isinstance(resource, dict) and "Fn::GetAtt" in resource:
        logical_id, attribute = resource["Fn::GetAtt"]
        return (logical_id, "") if attribute == "Arn" else None
    if isinstance(resource, dict) and isinstance(resource.get("Fn::Sub"), str):
        match = re.fullmatch(r"\$\{(\w+)\.Arn\}(.*)", resource["Fn::Sub"])
        return (match.group(1), match.group(2)) if match else None
    return None


def dynamodb_grants(statements: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(table logical id, "" or "/index/*") -> DynamoDB actions allowed on it."""
    grants: dict[tuple[str, str], set[str]] = {}
    for statement in statements:
        actions = {a for a in as_list(statement["Action"]) if a.startswith("dynamodb:")}
        if statement["Effect"] != "Allow" or not actions:
            continue
        for resource in as_list(statement["Resource"]):
            target = table_target(resource)
            assert target is not None, f"DynamoDB granted on something not a table: {resource}"
            grants.setdefault(target, set()).update(actions)
    return grants


def queue_target(resource: Any) -> str | None:
    """The queue logical id of `!GetAtt Q.Arn`; None for anything else."""
    if isinstance(resource, dict) and "Fn::GetAtt" in resource:
        logical_id, attribute = resource["Fn::GetAtt"]
        return logical_id if attribute == "Arn" else None
    return None


def sqs_grants(statements: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Queue logical id -> SQS actions allowed on it."""
    grants: dict[str, set[str]] = {}
    for statement in statements:
        actions = {a for a in as_list(statement["Action"]) if a.startswith("sqs:")}
        if statement["Effect"] != "Allow" or not actions:
            continue
        for resource in as_list(statement["Resource"]):
            target = queue_target(resource)
            assert target is not None, f"SQS granted on something not a queue: {resource}"
            grants.setdefault(target, set()).update(actions)
    return grants


def table_access(resources: dict[str, Any], statements: list[dict[str, Any]]) -> dict:
    """DynamoDB grants keyed as TABLE_ACCESS is: "<kind>" or "<kind>/index/<name>"."""
    kinds = {logical_id: kind for kind, (logical_id, _) in tables_by_kind(resources).items()}
    return {
        f"{kinds.get(table, table)}{suffix}": actions
        for (table, suffix), actions in dynamodb_grants(statements).items()
    }


def environment(template: dict[str, Any], function: str) -> dict[str, Any]:
    """The variables a function runs with: SAM merges its own over the Globals."""
    shared = template.get("Globals", {}).get("Function", {}).get("Environment", {})
    own = template["Resources"][function]["Properties"].get("Environment", {})
    return {**shared.get("Variables", {}), **own.get("Variables", {})}


def sqs_event_sources(resources: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Function logical id -> Properties of its one SQS event source."""
    found = {}
    for name, function in of_type(resources, "AWS::Serverless::Function").items():
        events = function["Properties"].get("Events", {})
        sqs = [event["Properties"] for event in events.values() if event["Type"] == "SQS"]
        assert len(sqs) <= 1, f"{name} has {len(sqs)} SQS event sources"
        if sqs:
            found[name] = sqs[0]
    return found


def render(response_template: str) -> Any:
    """The body API Gateway sends: messageString is substituted as an already-quoted string."""
    return json.loads(response_template.replace("$context.error.messageString", '"Forbidden"'))


def evaluate(template: dict[str, Any], expression: Any, parameters: dict[str, str]) -> Any:
    """Resolve the intrinsics that Rules, Conditions and !If values use here, as CloudFormation
    would for these parameter values (the others at their defaults)."""
    if not (isinstance(expression, dict) and len(expression) == 1):
        return expression
    [(function, args)] = expression.items()

    def value(argument: Any) -> Any:
        return evaluate(template, argument, parameters)

    def condition(name: str) -> bool:
        return bool(value(template["Conditions"][name]))

    if function == "Ref":
        if args in parameters:
            return parameters[args]
        return (
            template["Parameters"][args]["Default"]
            if args in template["Parameters"]
            else expression
        )
    if function == "Condition":
        return condition(args)
    if function == "Fn::Equals":
        return value(args[0]) == value(args[1])
    if function == "Fn::Not":
        return not value(args[0])
    if function == "Fn::And":
        return all(value(argument) for argument in args)
    if function == "Fn::Or":
        return any(value(argument) for argument in args)
    if function == "Fn::If":
        return value(args[1] if condition(args[0]) else args[2])
    return expression


def rules_accept(template: dict[str, Any], parameters: dict[str, str]) -> bool:
    """Whether CloudFormation's Rules let a deployment with these parameter values through."""
    for rule in template.get("Rules", {}).values():
        if "RuleCondition" in rule and not evaluate(template, rule["RuleCondition"], parameters):
            continue
        if not all(evaluate(template, a["Assert"], parameters) for a in rule["Assertions"]):
            return False
    return True


def deployed_environment(
    template: dict[str, Any], function: str, parameters: dict[str, str]
) -> dict[str, str]:
    """The variables of `function` whose values these parameters decide, as Lambda gets them."""
    resolved = {
        name: evaluate(template, value, parameters)
        for name, value in environment(template, function).items()
    }
    return {
        name: value
        for name, value in resolved.items()
        if isinstance(value, str) and value != {"Ref": "AWS::NoValue"}
    }


# ---------------------------------------------------------------- lint


def test_packaged_template_passes_cfn_lint(template_path: Path) -> None:
    """Given the packaged template, when cfn-lint checks it, then it reports nothing, not even a
    warning."""
    result = subprocess.run(
        [str(BIN / "cfn-lint"), str(template_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # Warnings count too: cfn-lint exits non-zero for them, and prints every finding.
    assert result.returncode == 0, f"cfn-lint found problems:\n{result.stdout}{result.stderr}"
    assert result.stdout.strip() == "", result.stdout


# checkov lives in its own venv (`make install`): its pins conflict with the app's.
CHECKOV = Path(os.environ.get("CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
CI_ROLE_TEMPLATE = ROOT / "infra" / "ci-role.yaml"


def test_packaged_templates_pass_checkov_with_every_skip_explained(template_path: Path) -> None:
    """Given the packaged template and the CI role's, when checkov scans them, then it finds
    nothing, and every finding suppressed in the template says why."""
    if not os.access(CHECKOV, os.X_OK):
        pytest.fail(f"checkov is not installed at {CHECKOV}: make install")
    env = dict(os.environ)
    # Offline and quick: no download of guidelines or policies from the vendor's API.
    env["BC_SKIP_MAPPING"] = "TRUE"
    result = subprocess.run(
        [
            str(CHECKOV),
            "--framework",
            "cloudformation",
            "--skip-download",
            "--output",
            "json",
            "--file",
            str(template_path),
            "--file",
            str(CI_ROLE_TEMPLATE),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert result.stdout.startswith("{"), f"checkov did not report:\n{result.stderr}"
    report = json.loads(result.stdout)
    results = report["results"]
    failed = [
        f"{f['check_id']} {f['resource']} ({f['file_path']}): {f['check_name']}"
        for f in results["failed_checks"]
    ]
    assert not failed, "checkov findings, fix or skip with a reason:\n" + "\n".join(failed)
    assert not results["parsing_errors"]
    assert report["summary"]["resource_count"] > 0
    unexplained = [
        f"{s['check_id']} {s['resource']}"
        for s in results["skipped_checks"]
        if s["check_result"].get("suppress_comment", "No comment provided")
        in ("", "No comment provided")
    ]
    assert not unexplained, f"skipped without a reason: {unexplained}"
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- tables match the models


def test_the_template_creates_exactly_the_tables_the_models_use(resources: dict) -> None:
    """Given the PynamoDB models, when the stack deploys, then each of their tables exists."""
    assert sorted(tables_by_kind(resources)) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_table_keys_match_the_model(resources: dict, kind: str) -> None:
    """Given a model, when its table is created by the stack, then keys and types are the same.

    PynamoDB's own create_table schema is the reference, so the template cannot drift from code.
    """
    _, table = tables_by_kind(resources)[kind]
    # The schema PynamoDB would send to CreateTable (no public accessor exists for it).
    schema = model_for(kind)._get_schema()

    assert key_schema(table["KeySchema"]) == key_schema(schema["key_schema"])
    assert {a["AttributeName"]: a["AttributeType"] for a in table["AttributeDefinitions"]} == {
        a["AttributeName"]: a["AttributeType"] for a in schema["attribute_definitions"]
    }
    assert not table.get("LocalSecondaryIndexes")
    assert not schema["local_secondary_indexes"]


@pytest.mark.parametrize("kind", KINDS)
def test_table_indexes_match_the_model(resources: dict, kind: str) -> None:
    """Given a model's GSIs, when the service queries one, then the table has it, keyed alike."""
    _, table = tables_by_kind(resources)[kind]
    schema = model_for(kind)._get_schema()

    in_template = {
        gsi["IndexName"]: (key_schema(gsi["KeySchema"]), gsi["Projection"]["ProjectionType"])
        for gsi in table.get("GlobalSecondaryIndexes", [])
    }
    in_model = {
        gsi["index_name"]: (key_schema(gsi["key_schema"]), gsi["projection"]["ProjectionType"])
        for gsi in schema["global_secondary_indexes"]
    }
    assert in_template == in_model


@pytest.mark.parametrize("kind", ["messages", "imports", "audit"])
def test_message_records_expire_by_the_models_ttl_attribute(resources: dict, kind: str) -> None:
    """Given messages outlive their mailing, DynamoDB's TTL removes them on the model's field
    (and the records of a CSV import likewise)."""
    _, table = tables_by_kind(resources)[kind]
    ttl = model_for(kind)._ttl_attribute()
    assert table["TimeToLiveSpecification"] == {"AttributeName": ttl.attr_name, "Enabled": True}


@pytest.mark.parametrize("kind", KINDS)
def test_table_keeps_its_data(resources: dict, kind: str) -> None:
    """Given a deployed table, when the stack is deleted or the table replaced, data survives."""
    logical_id, table = tables_by_kind(resources)[kind]

    assert resources[logical_id]["DeletionPolicy"] == "Retain"
    assert resources[logical_id]["UpdateReplacePolicy"] == "Retain"
    assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert table["SSESpecification"]["SSEEnabled"] is True
    assert table["BillingMode"] == "PAY_PER_REQUEST"


def test_every_table_name_is_a_stack_output(template: dict) -> None:
    """Given a deployed stack, when an operator reads its outputs, then every table is named."""
    tables = {logical_id for logical_id, _ in tables_by_kind(template["Resources"]).values()}
    outputs = {output["Value"].get("Ref") for output in template["Outputs"].values()}
    assert tables <= outputs


# ---------------------------------------------------------------- functions find their tables


def test_every_function_gets_the_stack_name_as_table_prefix(template: dict) -> None:
    """Given any Lambda of the app, when it starts, then TABLE_PREFIX is the stack's name."""
    shared = template.get("Globals", {}).get("Function", {}).get("Environment", {})
    functions = of_type(template["Resources"], "AWS::Serverless::Function")
    assert functions
    for name, function in functions.items():
        own = function["Properties"].get("Environment", {}).get("Variables", {})
        variables = {**shared.get("Variables", {}), **own}
        assert variables.get("TABLE_PREFIX") == {"Ref": "AWS::StackName"}, name


@pytest.mark.parametrize("kind", KINDS)
def test_settings_name_the_tables_the_stack_creates(resources: dict, kind: str) -> None:
    """Given TABLE_PREFIX = stack name, when the code names a table, then that table exists."""
    _, table = tables_by_kind(resources)[kind]
    created = table["TableName"]["Fn::Sub"].replace("${AWS::StackName}", STACK_NAME)
    assert Settings(table_prefix=STACK_NAME).table_name(kind) == created


# ---------------------------------------------------------------- IAM


def test_no_policy_allows_every_action(resources: dict) -> None:
    """Given every policy in the stack, when read, then no action is a wildcard."""
    for role, statements in statements_by_role(resources).items():
        for statement in statements:
            for action in as_list(statement["Action"]):
                assert "*" not in action, f"{role} is allowed {action}"


def test_every_role_of_the_stack_carries_the_permissions_boundary(
    template: dict, resources: dict
) -> None:
    """Given the packaged template, when it creates its roles (Chalice's, one per function), then
    each carries the PermissionsBoundaryArn boundary, a parameter every deploy must give (the
    deploy role may create no role without it)."""
    roles = of_type(resources, "AWS::IAM::Role")
    functions = of_type(resources, "AWS::Serverless::Function")
    parameter = template["Parameters"]["PermissionsBoundaryArn"]

    assert len(roles) == len(functions) == 7
    assert {
        name: role["Properties"].get("PermissionsBoundary") for name, role in roles.items()
    } == {name: {"Ref": "PermissionsBoundaryArn"} for name in roles}
    assert "Default" not in parameter
    boundary = "arn:aws:iam::123456789012:policy/sms-campaigns-prod-function-boundary"
    assert re.fullmatch(parameter["AllowedPattern"], boundary)
    assert not re.fullmatch(parameter["AllowedPattern"], "")


def test_chalice_policy_file_grants_only_logs(resources: dict) -> None:
    """Given .chalice/policy.json, when Chalice attaches it, then it allows only CloudWatch Logs."""
    for name, role in of_type(resources, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                assert all(a.startswith("logs:") for a in as_list(statement["Action"])), name


def test_dynamodb_is_granted_only_on_this_stacks_tables(resources: dict) -> None:
    """Given the DynamoDB grants, when resolved, then each names a table or index of the stack."""
    tables = {logical_id: table for logical_id, table in tables_by_kind(resources).values()}
    for role, statements in statements_by_role(resources).items():
        for table, suffix in dynamodb_grants(statements):
            assert table in tables, f"{role} is granted DynamoDB on {table}"
            if suffix:
                indexes = {
                    gsi["IndexName"] for gsi in tables[table].get("GlobalSecondaryIndexes", [])
                }
                assert suffix.removeprefix("/index/") in indexes, f"{role}: {table}{suffix}"


def test_sqs_is_granted_only_on_this_stacks_queues(resources: dict) -> None:
    """Given the SQS grants, when resolved, then each names one queue of the stack, no pattern."""
    queues = set(of_type(resources, "AWS::SQS::Queue"))
    for role, statements in statements_by_role(resources).items():
        for queue in sqs_grants(statements):
            assert queue in queues, f"{role} is granted SQS on {queue}"


def test_the_access_matrix_covers_exactly_the_apps_functions(resources: dict) -> None:
    """Given a Lambda added to the app, when packaged, then this test makes someone grant it.

    Every function but the authorizer needs a row in TABLE_ACCESS and QUEUE_ACCESS, and each row
    names a function that exists.
    """
    functions = set(of_type(resources, "AWS::Serverless::Function"))
    assert authorizer_functions(resources) == {AUTHORIZER}
    assert set(TABLE_ACCESS) == functions - {AUTHORIZER}
    assert set(QUEUE_ACCESS) == functions - {AUTHORIZER}


@pytest.mark.parametrize("function", sorted(TABLE_ACCESS))
def test_function_can_use_exactly_the_tables_and_indexes_its_code_uses(
    resources: dict, function: str
) -> None:
    """Given a Lambda, when its role is read, then it may do exactly what its code path does."""
    role = function_roles(resources)[function]
    statements = statements_by_role(resources).get(role, [])
    assert table_access(resources, statements) == TABLE_ACCESS[function]


@pytest.mark.parametrize("function", sorted(QUEUE_ACCESS))
def test_function_can_use_exactly_the_queues_its_code_uses(resources: dict, function: str) -> None:
    """Given a Lambda, when its role is read, then it may do exactly what its code and its
    event source mapping do on exactly those queues."""
    role = function_roles(resources)[function]
    assert sqs_grants(statements_by_role(resources).get(role, [])) == QUEUE_ACCESS[function]


def test_the_authorizer_cannot_touch_tables_or_queues(resources: dict) -> None:
    """Given the token authorizer, when its role is read, then it has no DynamoDB or SQS access:
    its own policy only lets it write its logs and, with static tokens, read their secret."""
    role = function_roles(resources)[AUTHORIZER]
    statements = statements_by_role(resources).get(role, [])
    assert dynamodb_grants(statements) == {}
    assert sqs_grants(statements) == {}
    policy = resources[own_policy(resources, role)]["Properties"]["PolicyDocument"]
    assert [statement["Sid"] for statement in widest(policy["Statement"])] == [
        "OwnLogs",
        "ApiTokens",
        "ApiTokensKey",
    ]


def test_no_dynamodb_or_sqs_grant_has_a_wildcard_resource(resources: dict) -> None:
    """Given the stack's policies, when read, then DynamoDB and SQS name each resource."""
    for role, statements in statements_by_role(resources).items():
        for statement in statements:
            services = {a.split(":")[0] for a in as_list(statement["Action"])}
            if services & {"dynamodb", "sqs"}:
                assert "*" not in json.dumps(statement["Resource"]), (role, statement)


def test_each_function_has_its_own_access_policy_and_waits_for_it(resources: dict) -> None:
    """Given a Lambda (every one writes its logs), when deployed, then one policy of its own
    carries its grants and the function (so its SQS event source mapping, which checks the role,
    and its first log line) is created after it."""
    policies = of_type(resources, "AWS::IAM::Policy")
    roles = function_roles(resources)
    for function in of_type(resources, "AWS::Serverless::Function"):
        own = [
            name
            for name, policy in policies.items()
            if policy["Properties"]["Roles"] == [{"Ref": roles[function]}]
        ]
        assert len(own) == 1, (function, own)
        assert own[0] in as_list(resources[function].get("DependsOn", [])), function
    for name, policy in policies.items():
        assert len(policy["Properties"]["Roles"]) == 1, f"{name} is shared between roles"


# ---------------------------------------------------------------- queues and event sources


@pytest.fixture(scope="module")
def queues(resources: dict) -> dict[str, Any]:
    found = {name: res["Properties"] for name, res in of_type(resources, "AWS::SQS::Queue").items()}
    assert set(found) == set(QUEUES) | DEAD_LETTER_QUEUES
    return found


@pytest.fixture(scope="module")
def event_sources(resources: dict) -> dict[str, dict[str, Any]]:
    found = sqs_event_sources(resources)
    assert set(found) == {function for _, function in QUEUES.values()}
    return found


@pytest.mark.parametrize("queue", sorted(QUEUE_NAMES))
def test_queue_is_named_after_the_stack_and_encrypted(queues: dict, queue: str) -> None:
    """Given a queue, when deployed, then its name carries the stack's and SQS encrypts it."""
    assert queues[queue]["QueueName"] == {"Fn::Sub": f"${{AWS::StackName}}-{QUEUE_NAMES[queue]}"}
    assert queues[queue]["SqsManagedSseEnabled"] is True


@pytest.mark.parametrize("queue", sorted(QUEUES))
def test_queue_hides_a_batch_longer_than_its_lambda_can_retry_it(
    resources: dict, queues: dict, event_sources: dict, queue: str
) -> None:
    """Given a batch being processed, when its Lambda is throttled or retried, then SQS does not
    deliver it again meanwhile: visibility >= 6 x the function's timeout plus its batch window."""
    _, function = QUEUES[queue]
    timeout = resources[function]["Properties"]["Timeout"]
    window = event_sources[function].get("MaximumBatchingWindowInSeconds", 0)
    assert queues[queue]["VisibilityTimeout"] >= VISIBILITY_FACTOR * timeout + window


@pytest.mark.parametrize("queue", sorted(QUEUES))
def test_queue_moves_a_message_that_keeps_failing_to_its_dead_letter_queue(
    queues: dict, queue: str
) -> None:
    """Given a message whose processing keeps failing, when received 5 times, it goes to the DLQ."""
    dead_letter_queue, _ = QUEUES[queue]
    assert queues[queue]["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": [dead_letter_queue, "Arn"]},
        "maxReceiveCount": MAX_RECEIVE_COUNT,
    }
    assert "RedrivePolicy" not in queues[dead_letter_queue]


def test_the_sender_counts_dead_letters_at_the_send_queues_max_receive_count(
    template: dict, queues: dict
) -> None:
    """Given a send job failing its last receive, when the sender reports it, then it counts it
    as a dead letter (DlqArrivals) exactly when SQS moves it: the sender's MAX_RECEIVE_COUNT is
    the send queue's redrive maxReceiveCount.

    The template gives the sender no MAX_RECEIVE_COUNT, so the settings' default applies; this
    test keeps the two equal (passing the value in the environment would only be a second
    literal here, since CloudFormation cannot read the queue's policy back). Should the
    environment ever set it, that value is the one compared."""
    variables = environment(template, "SendMessages")
    given = {name: variables[name] for name in ("MAX_RECEIVE_COUNT",) if name in variables}
    sender = Settings.from_env(given)
    assert queues["SendQueue"]["RedrivePolicy"]["maxReceiveCount"] == sender.max_receive_count


@pytest.mark.parametrize("queue", sorted(DEAD_LETTER_QUEUES | {"SendQueue", "ImportQueue"}))
def test_jobs_and_dead_letters_are_kept_fourteen_days(queues: dict, queue: str) -> None:
    """Given an outage, when jobs or dead letters wait, then SQS keeps them its longest, 14 days.

    A standard queue's dead letter keeps its first enqueue time, so a DLQ never keeps less.
    """
    assert queues[queue]["MessageRetentionPeriod"] == FOURTEEN_DAYS


def test_sender_reports_failed_records_so_only_they_come_back(event_sources: dict) -> None:
    """Given a send batch where one record fails, when the sender returns batchItemFailures,
    then Lambda deletes the rest: the mapping must declare ReportBatchItemFailures (Chalice
    cannot; infra/resources.yaml adds it)."""
    source = event_sources["SendMessages"]
    assert source["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert source["Queue"] == {"Fn::GetAtt": ["SendQueue", "Arn"]}
    assert source["BatchSize"] >= 10
    if source["BatchSize"] > 10:
        # SQS event sources take more than 10 records only with a batching window.
        assert source["MaximumBatchingWindowInSeconds"] >= 1


def test_fan_out_kicks_feed_advance_mailing(event_sources: dict) -> None:
    """Given a kick on the fan-out queue, when delivered, then advance_mailing gets it alone;
    it returns no batchItemFailures, so the mapping must not declare that it does."""
    source = event_sources["AdvanceMailing"]
    assert source["Queue"] == {"Fn::GetAtt": ["FanoutQueue", "Arn"]}
    assert source["BatchSize"] == 1
    assert "FunctionResponseTypes" not in source


def test_import_chunks_feed_import_clients_a_few_at_a_time(event_sources: dict) -> None:
    """Given the chunks of a CSV import, when delivered, then import_clients gets each alone
    (it returns no batchItemFailures) and at most a few run at once, so an import of 100,000
    rows neither takes the account's Lambda concurrency nor bursts the tables."""
    source = event_sources["ImportClients"]
    assert source["Queue"] == {"Fn::GetAtt": ["ImportQueue", "Arn"]}
    assert source["BatchSize"] == 1
    assert "FunctionResponseTypes" not in source
    assert 2 <= source["ScalingConfig"]["MaximumConcurrency"] <= 10


def test_no_placeholder_queue_arn_is_left_in_the_template(template_path: Path) -> None:
    """Given the placeholder ARNs in chalicelib/workers.py, when packaged, none is deployed."""
    text = template_path.read_text()
    for placeholder in (workers.SEND_QUEUE_ARN, workers.FANOUT_QUEUE_ARN, workers.IMPORT_QUEUE_ARN):
        assert placeholder not in text
    assert "placeholder" not in text
    # Queues are referenced by GetAtt, never as a literal ARN of some account.
    assert "arn:aws:sqs:" not in text


def declared_schedule(name: str) -> str:
    """The expression a @schedule in chalicelib/workers.py declares (what Chalice packages)."""
    probe = Chalice(app_name="schedule-probe")
    probe.register_blueprint(workers.blueprint)
    [source] = [s for s in probe.event_sources if getattr(s, "name", None) == name]
    return source.schedule_expression.to_string()


def test_the_scheduler_ticks_every_minute_and_the_report_follows_its_parameter(
    resources: dict,
) -> None:
    """Given Chalice's @schedule rules, when packaged, then scheduler_tick runs each minute and
    daily_report on the stack's DailyReportSchedule."""
    schedules = {
        name: event["Properties"]["Schedule"]
        for name, function in of_type(resources, "AWS::Serverless::Function").items()
        for event in function["Properties"].get("Events", {}).values()
        if event["Type"] == "Schedule"
    }
    assert schedules == {
        "SchedulerTick": "rate(1 minute)",
        "DailyReport": {"Ref": "DailyReportSchedule"},
    }
    assert set(resources["DailyReport"]["Properties"]["Events"]) == {"DailyReportEvent"}


@pytest.mark.parametrize(
    ("expression", "accepted"),
    [
        ("cron(0 6 * * ? *)", True),
        ("cron(30 4 ? * MON-FRI *)", True),
        ("rate(12 hours)", True),
        ("0 6 * * *", False),
        ("every day", False),
    ],
)
def test_the_report_schedule_defaults_to_the_code_and_takes_eventbridge_expressions(
    template: dict, expression: str, accepted: bool
) -> None:
    """Given DailyReportSchedule, when left alone, then the report runs when the code says
    (06:00 UTC); when set, CloudFormation takes only an EventBridge cron() or rate()."""
    parameter = template["Parameters"]["DailyReportSchedule"]
    assert parameter["Default"] == declared_schedule("daily_report") == "cron(0 6 * * ? *)"
    assert bool(re.fullmatch(parameter["AllowedPattern"], expression)) is accepted


# ---------------------------------------------------------------- settings and the gateway


def test_every_function_finds_the_queues(template: dict) -> None:
    """Given any Lambda, when it enqueues, then the queue URL settings name the stack's queues."""
    for function in of_type(template["Resources"], "AWS::Serverless::Function"):
        variables = environment(template, function)
        assert variables["SEND_QUEUE_URL"] == {"Ref": "SendQueue"}, function
        assert variables["SEND_DLQ_URL"] == {"Ref": "SendDeadLetterQueue"}, function
        assert variables["FANOUT_QUEUE_URL"] == {"Ref": "FanoutQueue"}, function
        assert variables["IMPORT_QUEUE_URL"] == {"Ref": "ImportQueue"}, function


def test_every_environment_variable_is_a_setting(template: dict) -> None:
    """Given a variable the template sets, when the code starts, then Settings reads it (a typo
    would be ignored silently, leaving the setting at its default)."""
    settings = {name.upper() for name in Settings.model_fields}
    for function in of_type(template["Resources"], "AWS::Serverless::Function"):
        unknown = set(environment(template, function)) - settings - NON_SETTINGS_VARIABLES
        assert not unknown, (function, unknown)


def test_every_function_logs_at_the_stacks_log_level(template: dict) -> None:
    """Given the LogLevel parameter, when deployed, then every Lambda gets it as LOG_LEVEL, and
    it takes exactly the levels the settings accept, the settings' default by default."""
    parameter = template["Parameters"]["LogLevel"]
    levels = get_args(Settings.model_fields["log_level"].annotation)
    for function in of_type(template["Resources"], "AWS::Serverless::Function"):
        assert environment(template, function)["LOG_LEVEL"] == {"Ref": "LogLevel"}, function
    assert parameter["Type"] == "String"
    assert list(parameter["AllowedValues"]) == list(levels)
    assert parameter["Default"] == Settings.model_fields["log_level"].default == "INFO"
    for level in parameter["AllowedValues"]:
        assert Settings.from_env({"LOG_LEVEL": level}).log_level == level


def test_no_function_holds_the_gateway_token_itself(template: dict) -> None:
    """Given the gateway token, when deployed, then it is in no parameter and no environment
    (where lambda:GetFunctionConfiguration would show it); only the sender learns the secret's
    ARN."""
    # No secret passes through the stack: no NoEcho parameter is left to carry one.
    assert "SenderApiToken" not in template["Parameters"]
    assert not [name for name, p in template["Parameters"].items() if p.get("NoEcho")]
    functions = of_type(template["Resources"], "AWS::Serverless::Function")
    for function in functions:
        assert "SENDER_API_TOKEN" not in environment(template, function), function
    holders = {
        function
        for function in functions
        if "SENDER_API_TOKEN_SECRET_ID" in environment(template, function)
    }
    assert holders == {"SendMessages"}
    sender = environment(template, "SendMessages")
    assert sender["SENDER_API_TOKEN_SECRET_ID"] == {"Ref": "GatewayTokenSecretArn"}
    assert sender["SENDER_API_URL"] == {"Ref": "SenderApiUrl"}
    assert "SecretsNote" not in template.get("Metadata", {})


# Function -> (the parameter naming the one secret it may read, the parameter naming that
# secret's customer managed key). No other function may read a secret.
SECRET_READERS = {
    "SendMessages": ("GatewayTokenSecretArn", "GatewayTokenKmsKeyArn"),
    AUTHORIZER: ("ApiTokensSecretArn", "ApiTokensKmsKeyArn"),
}


def test_only_the_sender_and_the_authorizer_read_a_secret_each_its_own(resources: dict) -> None:
    """Given the gateway token's and the API tokens' secrets, when any role asks Secrets Manager,
    then only the sender's and the authorizer's roles may, only GetSecretValue, and each only on
    its own secret."""
    roles = function_roles(resources)
    by_role = roles_granted(resources, "secretsmanager")
    assert set(by_role) == {roles[function] for function in SECRET_READERS}
    for function, (secret, _) in SECRET_READERS.items():
        [statement] = by_role[roles[function]]
        assert as_list(statement["Action"]) == ["secretsmanager:GetSecretValue"], function
        assert as_list(statement["Resource"]) == [{"Ref": secret}], function
        assert "Condition" not in statement, function


def test_the_authorizer_reads_the_tokens_secret_only_with_static_tokens(
    template: dict, resources: dict
) -> None:
    """Given AuthMode oidc, which reads no secret, when the stack deploys, then the authorizer's
    grant on the tokens' secret (and its key) is not there; with static it is."""
    conditions = conditional_statements(resources, "BearerAuthAccessPolicy")
    assert set(conditions) == {"ApiTokens", "ApiTokensKey"}
    key = {"ApiTokensKmsKeyArn": KEY_ARN}
    for parameters, present in (
        (STATIC_STACK, {"ApiTokens"}),
        ({**STATIC_STACK, **key}, {"ApiTokens", "ApiTokensKey"}),
        ({**STATIC_STACK, **key, "AuthMode": "oidc"}, set()),
    ):
        enabled = {
            sid
            for sid, condition in conditions.items()
            if evaluate(template, {"Condition": condition}, parameters)
        }
        assert enabled == present, parameters


@pytest.mark.parametrize("function", sorted(SECRET_READERS))
def test_a_secrets_key_grant_exists_only_for_a_customer_key(
    template: dict, resources: dict, function: str
) -> None:
    """Given a secret under a customer managed key, when its reader reads it, then it may
    decrypt with that key only through Secrets Manager and only for this secret; with the default
    aws/secretsmanager key (parameter left empty) the grant is not there at all."""
    secret, key = SECRET_READERS[function]
    roles = function_roles(resources)
    by_role = roles_granted(resources, "kms")
    assert set(by_role) == {roles[reader] for reader in SECRET_READERS}
    [statement] = by_role[roles[function]]
    assert as_list(statement["Action"]) == ["kms:Decrypt"]
    assert as_list(statement["Resource"]) == [{"Ref": key}]
    assert statement["Condition"] == {
        "StringEquals": {
            "kms:ViaService": {"Fn::Sub": "secretsmanager.${AWS::Region}.amazonaws.com"},
            "kms:EncryptionContext:SecretARN": {"Ref": secret},
        }
    }
    policy = own_policy(resources, roles[function])
    condition = {"Condition": conditional_statements(resources, policy)[statement["Sid"]]}
    assert evaluate(template, condition, STATIC_STACK) is False
    assert evaluate(template, condition, {**STATIC_STACK, key: KEY_ARN}) is True
    assert template["Parameters"][key]["Default"] == ""
    assert (
        template["Parameters"][key]["AllowedPattern"]
        == (template["Parameters"]["GatewayTokenKmsKeyArn"]["AllowedPattern"])
    )


SECRET_ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:sms/gateway-token-AbC123"
KEY_ARN = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        (SECRET_ARN, True),
        (SECRET_ARN.replace("arn:aws:", "arn:aws-cn:"), True),
        # A name or partial ARN would pass Secrets Manager but not the exact IAM grant.
        ("sms/gateway-token", False),
        (SECRET_ARN.removesuffix("-AbC123"), False),
        (SECRET_ARN.replace(":secretsmanager:", ":ssm:"), False),
    ],
)
def test_the_token_secret_parameter_takes_a_full_secret_arn_the_settings_accept(
    template: dict, value: str, accepted: bool
) -> None:
    """Given the GatewayTokenSecretArn parameter, when deploying, then CloudFormation takes only a
    full secret ARN (what IAM matches), and the sender's settings accept what it takes."""
    pattern = template["Parameters"]["GatewayTokenSecretArn"]["AllowedPattern"]
    assert "Default" not in template["Parameters"]["GatewayTokenSecretArn"]
    assert bool(re.fullmatch(pattern, value)) is accepted
    if accepted:
        settings = Settings.from_env({"SENDER_API_TOKEN_SECRET_ID": value})
        assert settings.sender_api_token_secret_id == value


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("", True),
        (KEY_ARN, True),
        ("arn:aws:kms:eu-west-1:123456789012:key/mrk-1234abcd12ab34cd56ef1234567890ab", True),
        # IAM matches a key by its key ARN, never by an alias.
        ("arn:aws:kms:eu-west-1:123456789012:alias/aws/secretsmanager", False),
        ("1234abcd-12ab-34cd-56ef-1234567890ab", False),
    ],
)
def test_the_token_key_parameter_takes_a_key_arn_or_nothing(
    template: dict, value: str, accepted: bool
) -> None:
    """Given the GatewayTokenKmsKeyArn parameter, when deploying, then it is empty or a key ARN."""
    pattern = template["Parameters"]["GatewayTokenKmsKeyArn"]["AllowedPattern"]
    assert bool(re.fullmatch(pattern, value)) is accepted


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("", True),
        ("1/24h", True),
        ("3/7d", True),
        ("20/90m", True),
        ("daily", False),
        ("1/24", False),
    ],
)
def test_the_frequency_cap_parameter_takes_what_the_settings_accept(
    template: dict, value: str, accepted: bool
) -> None:
    """Given the FrequencyCap parameter, when deploying, then a value its pattern lets through is
    one the sender's settings read (empty: no cap), and one they refuse never reaches it."""
    pattern = template["Parameters"]["FrequencyCap"]["AllowedPattern"]
    assert bool(re.fullmatch(pattern, value)) is accepted
    if accepted:
        Settings.from_env({"FREQUENCY_CAP": value})


def test_gateway_url_defaults_to_the_public_gateway_and_settings_accept_it(template: dict) -> None:
    """Given the SenderApiUrl parameter, when left at its default, then it is the public gateway
    and both CloudFormation's pattern and the settings' validation accept it."""
    parameter = template["Parameters"]["SenderApiUrl"]
    assert parameter["Default"] == "https://probe.fbrq.cloud"
    assert re.fullmatch(parameter["AllowedPattern"], parameter["Default"])
    assert not re.fullmatch(parameter["AllowedPattern"], "ftp://probe.fbrq.cloud")
    assert Settings(sender_api_url=parameter["Default"]).sender_api_url == parameter["Default"]


# ---------------------------------------------------------------- authentication

TOKENS_SECRET_ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:sms/prod/tokens-XyZ789"
IDP = "https://id.example.com/realms/sms/protocol/openid-connect"
OIDC = {
    "OidcIssuer": "https://id.example.com/realms/sms",
    "OidcAudience": "sms-admin",
    "OidcJwksUrl": f"{IDP}/certs",
}
SIGN_ON = {
    "OidcClientId": "sms-admin",
    "OidcAuthorizationUrl": f"{IDP}/auth",
    "OidcTokenUrl": f"{IDP}/token",
    "OidcScope": "openid profile",
}
ROLES = {"OidcRolesClaim": "groups", "OidcRoleMap": "sms-admins=admin,sms-ops=operator"}
STATIC_STACK = {"AuthMode": "static", "ApiTokensSecretArn": TOKENS_SECRET_ARN}
OIDC_STACK = {"AuthMode": "oidc", **OIDC, **SIGN_ON}
# Every deployment gives the parameters without a default.
REQUIRED = {"GatewayTokenSecretArn": SECRET_ARN}
# The settings chalicelib.auth and the admin UI read, and the functions that read them.
AUTH_VARIABLES = {
    "AUTH_MODE",
    "API_TOKENS",
    "API_TOKENS_SECRET_ID",
    "OIDC_ISSUER",
    "OIDC_AUDIENCE",
    "OIDC_JWKS_URL",
    "OIDC_CLIENT_ID",
    "OIDC_AUTHORIZATION_URL",
    "OIDC_TOKEN_URL",
    "OIDC_SCOPE",
    "OIDC_ROLES_CLAIM",
    "OIDC_ROLE_MAP",
}
AUTHENTICATING = {AUTHORIZER, "APIHandler"}


def expected_auth_environment(function: str, parameters: dict[str, str]) -> dict[str, str]:
    """The auth variables `function` should run with for these parameter values: the authorizer
    what it checks tokens with, the API what its settings and the admin UI's sign-in need."""
    if function not in AUTHENTICATING:
        return {}
    mode = parameters.get("AuthMode", "static")
    found = {"AUTH_MODE": mode}
    if mode == "static":
        if function == AUTHORIZER:
            found["API_TOKENS_SECRET_ID"] = parameters["ApiTokensSecretArn"]
        return found
    found |= {
        "OIDC_ISSUER": parameters["OidcIssuer"],
        "OIDC_AUDIENCE": parameters["OidcAudience"],
        "OIDC_JWKS_URL": parameters["OidcJwksUrl"],
    }
    if function == AUTHORIZER and parameters.get("OidcRolesClaim"):
        found |= {
            "OIDC_ROLES_CLAIM": parameters["OidcRolesClaim"],
            "OIDC_ROLE_MAP": parameters["OidcRoleMap"],
        }
    if function == "APIHandler" and parameters.get("OidcClientId"):
        found |= {
            "OIDC_CLIENT_ID": parameters["OidcClientId"],
            "OIDC_AUTHORIZATION_URL": parameters["OidcAuthorizationUrl"],
            "OIDC_TOKEN_URL": parameters["OidcTokenUrl"],
        }
        if parameters.get("OidcScope"):
            found["OIDC_SCOPE"] = parameters["OidcScope"]
    return found


def without(parameters: dict[str, str], *names: str) -> dict[str, str]:
    return {name: value for name, value in parameters.items() if name not in names}


@pytest.mark.parametrize(
    ("parameters", "accepted"),
    [
        pytest.param({}, False, id="static-by-default-without-a-secret"),
        pytest.param(STATIC_STACK, True, id="static"),
        pytest.param({**STATIC_STACK, **OIDC, **SIGN_ON}, True, id="static-ignores-oidc"),
        pytest.param({"AuthMode": "oidc"}, False, id="oidc-without-an-issuer"),
        pytest.param({"AuthMode": "oidc", **OIDC}, True, id="oidc"),
        pytest.param(OIDC_STACK, True, id="oidc-with-sign-on"),
        pytest.param(without(OIDC_STACK, "OidcScope"), True, id="oidc-sign-on-default-scope"),
        pytest.param({"AuthMode": "oidc", **without(OIDC, "OidcIssuer")}, False, id="no-issuer"),
        pytest.param(
            {"AuthMode": "oidc", **without(OIDC, "OidcAudience")}, False, id="no-audience"
        ),
        pytest.param({"AuthMode": "oidc", **without(OIDC, "OidcJwksUrl")}, False, id="no-jwks"),
        pytest.param(without(OIDC_STACK, "OidcClientId"), False, id="sign-on-without-client"),
        pytest.param(without(OIDC_STACK, "OidcTokenUrl"), False, id="sign-on-without-token-url"),
        pytest.param(
            without(OIDC_STACK, "OidcAuthorizationUrl"), False, id="sign-on-without-auth-url"
        ),
        pytest.param({**OIDC_STACK, **ROLES}, True, id="oidc-with-roles"),
        pytest.param({**OIDC_STACK, **without(ROLES, "OidcRoleMap")}, False, id="claim-no-map"),
        pytest.param({**OIDC_STACK, **without(ROLES, "OidcRolesClaim")}, False, id="map-no-claim"),
        pytest.param({**STATIC_STACK, **ROLES}, True, id="static-ignores-roles"),
    ],
)
def test_each_auth_mode_is_deployed_only_with_what_it_needs(
    template: dict, parameters: dict[str, str], accepted: bool
) -> None:
    """Given the authentication parameters, when deploying, then CloudFormation's rules refuse
    what chalicelib.settings would refuse: static tokens without their secret, OIDC without the
    issuer, audience and JWKS URL, a sign-on without its client id and both endpoints. Values of
    the other mode are ignored, so switching modes needs no clean-up."""
    assert rules_accept(template, {**REQUIRED, **parameters}) is accepted


@pytest.mark.parametrize(
    "parameters",
    [
        pytest.param(STATIC_STACK, id="static"),
        pytest.param({**STATIC_STACK, **OIDC, **SIGN_ON}, id="static-ignores-oidc"),
        pytest.param({"AuthMode": "oidc", **OIDC}, id="oidc"),
        pytest.param(OIDC_STACK, id="oidc-with-sign-on"),
        pytest.param(without(OIDC_STACK, "OidcScope"), id="oidc-sign-on-default-scope"),
        pytest.param({**OIDC_STACK, "ApiTokensSecretArn": TOKENS_SECRET_ARN}, id="oidc-ignores"),
        pytest.param({**OIDC_STACK, **ROLES}, id="oidc-with-roles"),
        pytest.param({**STATIC_STACK, **ROLES}, id="static-ignores-roles"),
    ],
)
def test_every_function_starts_with_the_auth_settings_of_either_mode(
    template: dict, parameters: dict[str, str]
) -> None:
    """Given a deployment the rules accept, in either mode, when each Lambda starts, then its
    packaged environment passes Settings.from_env; only the authorizer and the API get auth
    settings (the authorizer what checks tokens, the API what its settings and the admin UI's
    sign-in need), nothing of the mode not in use, and never a token itself."""
    given = {**REQUIRED, **parameters}
    assert rules_accept(template, given)
    shared = template["Globals"]["Function"]["Environment"]["Variables"]
    assert not AUTH_VARIABLES & set(shared)
    for function in of_type(template["Resources"], "AWS::Serverless::Function"):
        variables = deployed_environment(template, function, given)
        auth = {name: value for name, value in variables.items() if name in AUTH_VARIABLES}
        assert auth == expected_auth_environment(function, given), function
        settings = Settings.from_env(variables)
        assert settings.api_tokens == (), function
        if function in AUTHENTICATING:
            assert settings.auth_mode == AuthMode(given["AuthMode"]), function

    authorizer = Settings.from_env(deployed_environment(template, AUTHORIZER, given))
    verifier = build_verifier(authorizer, load_tokens=lambda: ["a-token-of-16-chars-or-more"])
    static = given["AuthMode"] == "static"
    assert isinstance(verifier, LoadedTokenVerifier if static else OidcVerifier)
    api = Settings.from_env(deployed_environment(template, "APIHandler", given))
    assert api.single_sign_on is (not static and "OidcClientId" in given)
    if api.single_sign_on:
        assert api.oidc_scope == given.get("OidcScope", "openid")


def test_the_auth_mode_parameter_takes_the_modes_the_settings_know(template: dict) -> None:
    """Given AuthMode, when left alone, then it is the settings' default (static); it takes
    exactly the modes chalicelib.settings accepts."""
    parameter = template["Parameters"]["AuthMode"]
    assert parameter["AllowedValues"] == [mode.value for mode in AuthMode]
    assert parameter["Default"] == Settings().auth_mode.value == "static"


def test_the_tokens_secret_parameter_takes_a_full_secret_arn_or_nothing(template: dict) -> None:
    """Given ApiTokensSecretArn, when deploying, then it takes what GatewayTokenSecretArn takes
    (a full ARN, which the IAM grant matches exactly) or nothing (AuthMode oidc; the rules
    require it with static), and the settings accept what it takes."""
    tokens = template["Parameters"]["ApiTokensSecretArn"]
    gateway = template["Parameters"]["GatewayTokenSecretArn"]
    assert tokens["AllowedPattern"] == "^$|" + gateway["AllowedPattern"]
    assert tokens["Default"] == ""
    assert re.fullmatch(tokens["AllowedPattern"], TOKENS_SECRET_ARN)
    assert not re.fullmatch(tokens["AllowedPattern"], "sms/prod/tokens")
    assert not re.fullmatch(tokens["AllowedPattern"], TOKENS_SECRET_ARN.removesuffix("-XyZ789"))
    settings = Settings.from_env({"API_TOKENS_SECRET_ID": TOKENS_SECRET_ARN})
    assert settings.api_tokens_secret_id == TOKENS_SECRET_ARN


@pytest.mark.parametrize(
    ("parameter", "value", "accepted"),
    [
        ("OidcIssuer", OIDC["OidcIssuer"], True),
        ("OidcIssuer", "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC", True),
        ("OidcIssuer", "http://id.example.com/realms/sms", False),
        ("OidcIssuer", "id.example.com", False),
        ("OidcAudience", "sms-admin", True),
        ("OidcAudience", "api://sms-campaigns", True),
        ("OidcAudience", "two words", False),
        ("OidcJwksUrl", OIDC["OidcJwksUrl"], True),
        ("OidcJwksUrl", "http://id.example.com/certs", False),
        ("OidcClientId", "4f1c2e7d9a", True),
        ("OidcClientId", "x" * 257, False),
        ("OidcClientId", "with space", False),
        ("OidcAuthorizationUrl", SIGN_ON["OidcAuthorizationUrl"], True),
        ("OidcAuthorizationUrl", "http://id.example.com/auth", False),
        ("OidcAuthorizationUrl", 'https://id.example.com/auth"><script>', False),
        ("OidcTokenUrl", SIGN_ON["OidcTokenUrl"], True),
        ("OidcTokenUrl", "https://id.example.com/to ken", False),
        ("OidcScope", "openid profile email", True),
        ("OidcScope", "openid  profile", False),
        ("OidcScope", " openid", False),
        ("OidcScope", "openid " + "s" * 1017, True),
        ("OidcScope", "openid " + "s" * 1018, False),
        ("OidcRolesClaim", "cognito:groups", True),
        ("OidcRolesClaim", "two words", False),
        ("OidcRoleMap", "sms-admins=admin,sms-ops=operator,scrape=metrics", True),
        ("OidcRoleMap", "sms-admins=owner", False),
        ("OidcRoleMap", "sms-admins=admin,", False),
    ],
)
def test_oidc_parameters_take_only_values_the_functions_settings_accept(
    template: dict, parameter: str, value: str, accepted: bool
) -> None:
    """Given an OIDC parameter, when CloudFormation checks a value, then it takes https URLs only
    (the keys and tokens must not travel over plain HTTP) and what the settings' rules allow;
    whatever it takes, the authorizer and the API start with. Empty is always taken: unused."""
    spec = template["Parameters"][parameter]
    assert spec["Default"] == ""
    assert re.fullmatch(spec["AllowedPattern"], "")

    def taken(text: str) -> bool:
        fits = len(text) <= spec.get("MaxLength", len(text))
        return bool(re.fullmatch(spec["AllowedPattern"], text)) and fits

    assert taken(value) is accepted
    if accepted:
        given = {**REQUIRED, **OIDC_STACK, **ROLES, parameter: value}
        for function in AUTHENTICATING:
            Settings.from_env(deployed_environment(template, function, given))


# ---------------------------------------------------------------- API Gateway's own errors


@pytest.fixture(scope="module")
def gateway_responses(resources: dict) -> dict[str, Any]:
    apis = of_type(resources, "AWS::Serverless::Api")
    assert list(apis) == ["RestAPI"]
    return apis["RestAPI"]["Properties"]["GatewayResponses"]


@pytest.mark.parametrize("response_type", sorted(GATEWAY_RESPONSES))
def test_gateway_errors_use_the_service_error_shape(
    gateway_responses: dict, response_type: str
) -> None:
    """Given an error API Gateway raises itself, when the client reads it, it is our JSON shape."""
    status, code = GATEWAY_RESPONSES[response_type]
    response = gateway_responses[response_type]
    # SAM copies only these keys into the API definition; a typo would be dropped silently.
    assert set(response) <= {"StatusCode", "ResponseParameters", "ResponseTemplates"}
    assert set(response.get("ResponseParameters", {})) <= {"Headers", "Paths", "QueryStrings"}

    body = render(response["ResponseTemplates"]["application/json"])

    assert response.get("StatusCode") == status
    assert set(body) == {"error", "message", "details"}
    assert body["error"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    assert body["details"] == []


# What the local server answers for the same errors (devstack/api.py).
LOCAL_GATEWAY_ANSWERS = {
    "UNAUTHORIZED": local_api.UNAUTHORIZED,
    "ACCESS_DENIED": local_api.ACCESS_DENIED,
    "MISSING_AUTHENTICATION_TOKEN": local_api.NO_ROUTE,
}


@pytest.mark.parametrize("response_type", sorted(LOCAL_GATEWAY_ANSWERS))
def test_the_local_server_answers_as_the_gateway_responses_say(
    gateway_responses: dict, response_type: str
) -> None:
    """Given an error API Gateway writes itself, when the local server writes it, then the
    caller reads the same status, code and message as on AWS."""
    response = gateway_responses[response_type]
    body = render(response["ResponseTemplates"]["application/json"])
    assert (int(response["StatusCode"]), body["error"], body["message"]) == (
        LOCAL_GATEWAY_ANSWERS[response_type]
    )


ROUTED = ("GET", "POST", "PUT", "PATCH", "DELETE")


def test_a_method_a_path_lacks_is_a_405_in_the_error_shape(template: dict) -> None:
    """Given every route of the app, when API Gateway gets a method its path does not have, then
    the path's ANY method answers 405 naming the methods it has, in the error shape, as the local
    server does (a new route without one fails here)."""
    paths = template["Resources"]["RestAPI"]["Properties"]["DefinitionBody"]["paths"]
    assert set(paths) == set(chalice_app.routes)
    for path, methods in chalice_app.routes.items():
        allowed = ", ".join(method for method in ROUTED if method in methods)
        integration = paths[path]["x-amazon-apigateway-any-method"][
            "x-amazon-apigateway-integration"
        ]
        assert integration["type"] == "mock", path
        answer = integration["responses"]["default"]
        assert answer["statusCode"] == "405", path
        assert answer["responseParameters"] == {"method.response.header.Allow": f"'{allowed}'"}
        body = json.loads(
            answer["responseTemplates"]["application/json"].replace("$context.httpMethod", "TRACE")
        )
        assert body == {
            "error": "method_not_allowed",
            "message": f"TRACE is not supported here; use {allowed}",
            "details": [],
        }, path


def test_a_throttled_caller_is_told_when_to_retry(gateway_responses: dict) -> None:
    """Given a caller over the stage throttling, when API Gateway refuses it, then it reads a 429
    with a Retry-After header."""
    throttled = gateway_responses["THROTTLED"]
    assert throttled["StatusCode"] == "429"
    assert throttled["ResponseParameters"]["Headers"]["Retry-After"] == "'1'"


def test_unauthorized_tells_the_client_to_send_a_bearer_token(gateway_responses: dict) -> None:
    """Given a request without a token, when it is rejected, the 401 says which scheme to use."""
    headers = gateway_responses["UNAUTHORIZED"]["ResponseParameters"]["Headers"]
    assert headers["WWW-Authenticate"] == "'Bearer'"


def test_gateway_limits_are_parameters_whose_defaults_the_settings_accept(template: dict) -> None:
    """Given the gateway's rate and concurrency limits, when deployed, then each is a stack
    parameter given to the sender, and its default is a value the settings accept."""
    sender = environment(template, "SendMessages")
    values = {}
    for variable, parameter in (
        ("GATEWAY_RATE_PER_SECOND", "GatewayRatePerSecond"),
        ("GATEWAY_CONCURRENCY", "GatewayConcurrency"),
    ):
        assert sender[variable] == {"Ref": parameter}
        values[variable] = str(template["Parameters"][parameter]["Default"])
    settings = Settings.from_env(values)
    assert settings.gateway_rate_per_second == 100
    assert settings.gateway_concurrency == 40


def test_the_api_stage_throttles_every_method_at_its_parameters(
    template: dict, resources: dict
) -> None:
    """Given a flood of API requests, when deployed, then the stage refuses what exceeds the rate
    and burst parameters for every method, before any Lambda runs."""
    [settings] = resources["RestAPI"]["Properties"]["MethodSettings"]
    assert settings == {
        "ResourcePath": "/*",
        "HttpMethod": "*",
        "ThrottlingRateLimit": {"Ref": "ApiThrottlingRateLimit"},
        "ThrottlingBurstLimit": {"Ref": "ApiThrottlingBurstLimit"},
    }
    for parameter in ("ApiThrottlingRateLimit", "ApiThrottlingBurstLimit"):
        assert template["Parameters"][parameter]["Type"] == "Number"
        assert template["Parameters"][parameter]["MinValue"] >= 1


@pytest.mark.parametrize(
    ("function", "parameter"),
    [
        ("SendMessages", "SenderReservedConcurrency"),
        ("SchedulerTick", "SchedulerReservedConcurrency"),
    ],
)
def test_sending_keeps_lambda_concurrency_api_traffic_cannot_take(
    template: dict, resources: dict, function: str, parameter: str
) -> None:
    """Given the sender and the scheduler, when deployed, then each has the concurrency its
    parameter reserves, by default too, and 0 reserves none rather than stopping the function."""
    reserved = resources[function]["Properties"]["ReservedConcurrentExecutions"]
    default = str(template["Parameters"][parameter]["Default"])
    assert int(default) > 0
    assert evaluate(template, reserved, {parameter: default}) == default
    assert evaluate(template, reserved, {parameter: "5"}) == "5"
    assert evaluate(template, reserved, {parameter: "0"}) == {"Ref": "AWS::NoValue"}
    # The API and the workers it feeds share the rest of the account's pool.
    assert "ReservedConcurrentExecutions" not in resources["APIHandler"]["Properties"]


@pytest.mark.parametrize(
    ("value", "deployable"),
    [("", True), ("916=20", True), ("916=20,903=2.5", True), ("916=20;903=10", False)],
)
def test_per_operator_rates_reach_the_sender_as_settings_it_accepts(
    template: dict, value: str, deployable: bool
) -> None:
    """Given per-operator rates as a stack parameter, when deployed, then the sender gets them,
    and a value of the wrong shape is refused by CloudFormation before it reaches a Lambda."""
    sender = environment(template, "SendMessages")
    assert sender["GATEWAY_RATE_PER_OPERATOR"] == {"Ref": "GatewayRatePerOperator"}
    parameter = template["Parameters"]["GatewayRatePerOperator"]
    assert parameter["Default"] == ""
    assert bool(re.fullmatch(parameter["AllowedPattern"], value)) is deployable
    if deployable:
        Settings.from_env({"GATEWAY_RATE_PER_OPERATOR": value})


# ---------------------------------------------------------------- the daily report e-mail


@pytest.mark.parametrize(
    ("sender", "recipients"),
    [("", ""), (REPORT_SENDER, REPORT_RECIPIENTS), (REPORT_SENDER, ""), ("", REPORT_RECIPIENTS)],
)
def test_report_addresses_reach_the_reporters_both_or_neither(
    template: dict, sender: str, recipients: str
) -> None:
    """Given the report parameters, when deploying, then CloudFormation takes both or neither,
    and what it takes reaches the two reporting functions as settings they accept."""
    parameters = {**STATIC_STACK, "ReportSender": sender, "ReportRecipients": recipients}
    both_or_neither = bool(sender) == bool(recipients)

    assert rules_accept(template, parameters) is both_or_neither
    if not both_or_neither:
        return
    for function in REPORTERS:
        variables = deployed_environment(template, function, parameters)
        report = {k: v for k, v in variables.items() if k.startswith("REPORT_")}
        # Absent rather than empty when there is no report.
        assert report == (
            {"REPORT_SENDER": sender, "REPORT_RECIPIENTS": recipients} if sender else {}
        )
        settings = Settings.from_env(report)
        assert settings.report_sender == (sender or None)
        assert ",".join(settings.report_recipients) == recipients


def test_only_the_reporters_get_the_report_addresses(template: dict) -> None:
    """Given the report's addresses, when deployed, then only the two senders of the report have
    them (never Globals: a Lambda added later does not inherit them)."""
    shared = template["Globals"]["Function"]["Environment"]["Variables"]
    assert not {"REPORT_SENDER", "REPORT_RECIPIENTS"} & set(shared)
    holders = {
        function
        for function in of_type(template["Resources"], "AWS::Serverless::Function")
        if {"REPORT_SENDER", "REPORT_RECIPIENTS"} & set(environment(template, function))
    }
    assert holders == REPORTERS


@pytest.mark.parametrize(
    ("value", "sender", "recipients"),
    [
        ("", True, True),
        (REPORT_SENDER, True, True),
        (REPORT_RECIPIENTS, False, True),
        # The settings would strip the spaces, but the SES grant compares exact strings.
        ("ops@example.com, owner@example.org", False, False),
        ("ops@example.com,", False, False),
        ("not-an-address", False, False),
        ("Reports <reports@example.com>", False, False),
    ],
)
def test_report_parameters_take_only_addresses_the_settings_accept(
    template: dict, value: str, sender: bool, recipients: bool
) -> None:
    """Given ReportSender and ReportRecipients, when CloudFormation checks a value, then it takes
    plain addresses only, and the settings accept whatever it takes."""
    parameters = template["Parameters"]
    assert bool(re.fullmatch(parameters["ReportSender"]["AllowedPattern"], value)) is sender
    assert bool(re.fullmatch(parameters["ReportRecipients"]["AllowedPattern"], value)) is recipients
    if sender:
        Settings.from_env({"REPORT_SENDER": value})
    if recipients:
        Settings.from_env({"REPORT_SENDER": REPORT_SENDER, "REPORT_RECIPIENTS": value})


def test_only_the_reporters_may_send_e_mail_and_only_the_report(
    template: dict, resources: dict
) -> None:
    """Given SES, when any role sends e-mail, then only the two reporters may, from the report's
    sender to the report's recipients only, and only when a report is configured."""
    roles = function_roles(resources)
    by_role = roles_granted(resources, "ses")
    assert set(by_role) == {roles[function] for function in REPORTERS}
    for function in REPORTERS:
        [statement] = by_role[roles[function]]
        assert set(as_list(statement["Action"])) == SEND_EMAIL
        assert as_list(statement["Resource"]) == [
            {"Fn::Sub": "arn:${AWS::Partition}:ses:${AWS::Region}:${AWS::AccountId}:identity/*"}
        ]
        assert statement["Condition"] == {
            "StringEquals": {"ses:FromAddress": {"Ref": "ReportSender"}},
            "ForAllValues:StringEquals": {
                "ses:Recipients": {"Fn::Split": [",", {"Ref": "ReportRecipients"}]}
            },
        }
        policy = own_policy(resources, roles[function])
        condition = conditional_statements(resources, policy)[statement["Sid"]]
        assert evaluate(template, {"Condition": condition}, {}) is False
        enabled = {"ReportSender": REPORT_SENDER, "ReportRecipients": REPORT_RECIPIENTS}
        assert evaluate(template, {"Condition": condition}, enabled) is True


def test_the_authorizer_can_send_no_e_mail_and_read_only_the_tokens_secret(
    resources: dict,
) -> None:
    """Given the token authorizer, when its role is read, then it has no SES access, and reads
    (and decrypts) nothing in Secrets Manager but the API tokens' secret."""
    role = function_roles(resources)[AUTHORIZER]
    statements = statements_by_role(resources).get(role, [])
    assert grants(statements, "ses") == []
    resources_of = {
        service: [r for s in grants(statements, service) for r in as_list(s["Resource"])]
        for service in ("secretsmanager", "kms")
    }
    assert resources_of == {
        "secretsmanager": [{"Ref": "ApiTokensSecretArn"}],
        "kms": [{"Ref": "ApiTokensKmsKeyArn"}],
    }


# ---------------------------------------------------------------- logs

LOG_GROUP_NAME = "/sms-campaigns/${{AWS::StackName}}/{function}"
WRITE_LOGS = {"logs:CreateLogStream", "logs:PutLogEvents"}


def log_groups_of_functions(resources: dict[str, Any]) -> dict[str, str]:
    """Function logical id -> logical id of the log group its LoggingConfig names."""
    found = {}
    for name, function in of_type(resources, "AWS::Serverless::Function").items():
        config = function["Properties"].get("LoggingConfig", {})
        assert set(config.get("LogGroup", {})) == {"Ref"}, f"{name} logs to {config}"
        found[name] = config["LogGroup"]["Ref"]
    return found


def test_every_function_logs_to_a_group_of_its_own_with_retention(resources: dict) -> None:
    """Given any Lambda of the package (one added to app.py included), when deployed, then it
    logs to a group of the stack named after it, which keeps LogRetentionDays of logs; no group
    is shared or left unused.

    The group is named by a !Ref, so CloudFormation creates it before the function, and its name
    is not /aws/lambda/<function name>: that group may exist already (Lambda made it), and one
    named after the function could only be created after it, racing Lambda's own."""
    groups = of_type(resources, "AWS::Logs::LogGroup")
    used = log_groups_of_functions(resources)
    assert used
    assert sorted(used.values()) == sorted(groups), "one group per function, each used"
    for function, group in used.items():
        properties = groups[group]["Properties"]
        assert properties == {
            "LogGroupName": {"Fn::Sub": LOG_GROUP_NAME.format(function=function)},
            "RetentionInDays": {"Ref": "LogRetentionDays"},
        }, function


def test_log_groups_outlive_the_stack_but_not_a_failed_first_deploy(resources: dict) -> None:
    """Given the stack deleted, or a group dropped from the template, then the group and its
    last LogRetentionDays of logs stay; given the deploy that creates it rolled back, then it is
    deleted, so the retry does not fail on a group of the same name."""
    for name, group in of_type(resources, "AWS::Logs::LogGroup").items():
        assert group["DeletionPolicy"] == "RetainExceptOnCreate", name
        assert group["UpdateReplacePolicy"] == "Retain", name


def test_log_retention_takes_exactly_the_periods_cloudwatch_logs_accepts(template: dict) -> None:
    """Given LogRetentionDays, when set, then CloudFormation refuses a period CloudWatch Logs
    would refuse mid-deploy, and offers every one it accepts; 30 days by default."""
    schema = PROVIDER_SCHEMA_MANAGER.get_resource_schema("us-east-1", "AWS::Logs::LogGroup")
    accepted = schema.schema["properties"]["RetentionInDays"]["enum"]
    parameter = template["Parameters"]["LogRetentionDays"]
    assert parameter["Type"] == "Number"
    assert parameter["AllowedValues"] == accepted
    assert parameter["Default"] == 30


def test_each_function_may_write_only_to_its_own_log_group(resources: dict) -> None:
    """Given a Lambda's role, when its own policy is read, then it may write log streams and
    events to its group and to no other, and may not create a group (which would have no
    retention)."""
    roles = function_roles(resources)
    for function, group in log_groups_of_functions(resources).items():
        statements = widest(
            resources[own_policy(resources, roles[function])]["Properties"]["PolicyDocument"][
                "Statement"
            ]
        )
        [own] = grants(statements, "logs")
        assert set(own["Action"]) == WRITE_LOGS, function
        assert own["Resource"] == [{"Fn::GetAtt": [group, "Arn"]}], function


# ---------------------------------------------------------------- alarms

# The service's documented EMF metrics (chalicelib/metrics.py writes them, docs/operations.md
# lists them): one namespace, and exactly these two dimensions on the totals an alarm may read.
METRICS_NAMESPACE = "SmsCampaigns"
EMF_METRICS = {
    "GatewayCalls",
    "GatewayErrors",
    "GatewayLatency",
    "MessagesSent",
    "MessagesFailed",
    "MessagesExpired",
    "MessagesRetried",
    "MessagesQueued",
    "DlqArrivals",
    "AuditWriteFailures",
}
EMF_DIMENSIONS = [
    {"Name": "service", "Value": "sms-campaigns"},
    {"Name": "stack", "Value": {"Ref": "AWS::StackName"}},
]
TOPIC = [{"Ref": "AlarmTopic"}]
MISSING_DATA = {"notBreaching", "breaching", "ignore", "missing"}
# Errors alarm of each function -> how it treats missing data. The daily report runs once a day:
# its state must last until the next run, not clear itself five minutes after a failure.
ERRORS_MISSING_DATA = {
    "APIHandler": "notBreaching",
    "BearerAuth": "notBreaching",
    "SchedulerTick": "notBreaching",
    "AdvanceMailing": "notBreaching",
    "SendMessages": "notBreaching",
    "DailyReport": "ignore",
    "ImportClients": "notBreaching",
}


@pytest.fixture(scope="module")
def alarms(resources: dict) -> dict[str, dict[str, Any]]:
    found = {
        name: alarm["Properties"]
        for name, alarm in of_type(resources, "AWS::CloudWatch::Alarm").items()
    }
    assert found
    return found


def watched(alarm: dict[str, Any]) -> list[dict[str, Any]]:
    """The metrics an alarm reads: its own, or those of its metric math."""
    if "MetricName" in alarm:
        return [
            {key: alarm[key] for key in ("Namespace", "MetricName", "Dimensions") if key in alarm}
        ]
    return [query["MetricStat"]["Metric"] for query in alarm["Metrics"] if "MetricStat" in query]


def alarms_on(
    alarms: dict[str, dict[str, Any]], namespace: str, metric: str, dimension: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The alarms that read `metric` of `namespace` with exactly this one dimension."""
    return {
        name: alarm
        for name, alarm in alarms.items()
        for watched_metric in watched(alarm)
        if watched_metric["Namespace"] == namespace
        and watched_metric["MetricName"] == metric
        and watched_metric.get("Dimensions") == [dimension]
    }


def test_every_alarm_notifies_the_topic_when_it_fires_and_when_it_clears(alarms: dict) -> None:
    """Given any alarm, when it fires or clears, then the alarm topic hears of it; it is named
    after the stack (what the deploy role may manage), says what to look at first, and treats
    missing data as chosen, not by default."""
    for name, alarm in alarms.items():
        assert alarm["AlarmActions"] == TOPIC, name
        assert alarm["OKActions"] == TOPIC, name
        assert alarm.get("ActionsEnabled", True) is True, name
        assert alarm["TreatMissingData"] in MISSING_DATA, name
        assert alarm["AlarmName"]["Fn::Sub"].startswith("${AWS::StackName}-"), name
        assert "First:" in alarm["AlarmDescription"], name
        assert len(alarm["AlarmDescription"]) <= 1024, name
    names = [alarm["AlarmName"]["Fn::Sub"] for alarm in alarms.values()]
    assert len(names) == len(set(names))


def test_the_alarm_topic_exists_and_can_mail_the_operator(template: dict, resources: dict) -> None:
    """Given the alarm topic, when deployed, then it is the stack's, an e-mail subscription
    exists exactly when AlarmEmail is set, and the topic's ARN is an output."""
    topic = resources["AlarmTopic"]
    assert topic["Type"] == "AWS::SNS::Topic"
    assert topic["Properties"]["TopicName"] == {"Fn::Sub": "${AWS::StackName}-alarms"}
    [subscription] = of_type(resources, "AWS::SNS::Subscription").values()
    assert subscription["Properties"] == {
        "TopicArn": {"Ref": "AlarmTopic"},
        "Protocol": "email",
        "Endpoint": {"Ref": "AlarmEmail"},
    }
    condition = {"Condition": subscription["Condition"]}
    assert evaluate(template, condition, {}) is False
    assert evaluate(template, condition, {"AlarmEmail": "ops@example.com"}) is True
    pattern = template["Parameters"]["AlarmEmail"]["AllowedPattern"]
    assert re.fullmatch(pattern, "")
    assert re.fullmatch(pattern, "ops@example.com")
    assert not re.fullmatch(pattern, "ops@example.com,owner@example.org")
    assert template["Outputs"]["AlarmTopicArn"]["Value"] == {"Ref": "AlarmTopic"}


def test_the_alarm_topic_is_never_encrypted_with_a_key_cloudwatch_cannot_use(
    template: dict, resources: dict
) -> None:
    """Given the alarm topic, when encrypted, then with the customer managed key the operator
    names; never alias/aws/sns, whose policy keeps CloudWatch out, so no alarm would notify."""
    key = resources["AlarmTopic"]["Properties"]["KmsMasterKeyId"]
    assert "alias/aws/sns" not in json.dumps(resources)
    assert evaluate(template, key, {}) == NO_VALUE
    assert evaluate(template, key, {"AlarmTopicKmsKeyArn": KEY_ARN}) == KEY_ARN
    pattern = template["Parameters"]["AlarmTopicKmsKeyArn"]["AllowedPattern"]
    assert re.fullmatch(pattern, KEY_ARN)
    assert not re.fullmatch(pattern, "arn:aws:kms:eu-west-1:123456789012:alias/aws/sns")


@pytest.mark.parametrize("queue", sorted(DEAD_LETTER_QUEUES))
def test_a_dead_letter_queue_alarms_on_its_first_message(alarms: dict, queue: str) -> None:
    """Given a dead-letter queue, when one message arrives, then an alarm fires; an empty, idle
    queue (which SQS stops reporting) is no alarm."""
    dimension = {"Name": "QueueName", "Value": {"Fn::GetAtt": [queue, "QueueName"]}}
    [alarm] = alarms_on(alarms, "AWS/SQS", "ApproximateNumberOfMessagesVisible", dimension).values()
    assert alarm["Statistic"] == "Maximum"
    assert alarm["Threshold"] == 0
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["EvaluationPeriods"] == 1
    assert alarm["TreatMissingData"] == "notBreaching"


@pytest.mark.parametrize("queue", sorted(QUEUES))
def test_a_queue_alarms_when_its_oldest_message_waits_too_long(
    template: dict, alarms: dict, queue: str
) -> None:
    """Given the send or the fan-out queue, when its oldest message waits longer than
    OldestJobAgeSeconds, then an alarm fires; the default leaves room for the longest delay the
    code itself puts on a job or a kick (SQS's maximum)."""
    dimension = {"Name": "QueueName", "Value": {"Fn::GetAtt": [queue, "QueueName"]}}
    [alarm] = alarms_on(alarms, "AWS/SQS", "ApproximateAgeOfOldestMessage", dimension).values()
    assert alarm["Statistic"] == "Maximum"
    assert alarm["Threshold"] == {"Ref": "OldestJobAgeSeconds"}
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["TreatMissingData"] == "notBreaching"
    default = template["Parameters"]["OldestJobAgeSeconds"]["Default"]
    assert default > SQS_MAX_DELAY_SECONDS


@pytest.mark.parametrize("function", sorted(ERRORS_MISSING_DATA))
def test_every_function_alarms_when_its_invocations_fail(alarms: dict, function: str) -> None:
    """Given any Lambda of the stack, when its invocations fail (raise, time out, cannot start),
    then an alarm fires."""
    dimension = {"Name": "FunctionName", "Value": {"Ref": function}}
    [alarm] = alarms_on(alarms, "AWS/Lambda", "Errors", dimension).values()
    assert alarm["Statistic"] == "Sum"
    assert alarm["Threshold"] == 0
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["TreatMissingData"] == ERRORS_MISSING_DATA[function]
    # Never longer than 5 minutes before anyone hears of it.
    assert alarm["Period"] * alarm["EvaluationPeriods"] <= 300


def test_every_function_of_the_stack_has_an_errors_alarm(resources: dict) -> None:
    """Given a Lambda added to the app, when packaged, then this test makes someone alarm on it."""
    assert set(ERRORS_MISSING_DATA) == set(of_type(resources, "AWS::Serverless::Function"))


def test_the_sender_errors_alarm_waits_for_a_second_failing_minute(alarms: dict) -> None:
    """Given a sender invocation that fails once, when SQS retries it, then no one is paged; when
    two minutes of three have failures, the alarm fires."""
    dimension = {"Name": "FunctionName", "Value": {"Ref": "SendMessages"}}
    [alarm] = alarms_on(alarms, "AWS/Lambda", "Errors", dimension).values()
    assert (alarm["Period"], alarm["EvaluationPeriods"], alarm["DatapointsToAlarm"]) == (60, 3, 2)


def test_the_sender_alarms_when_lambda_throttles_it(alarms: dict) -> None:
    """Given the account's concurrency used up, when Lambda throttles the sender, then an alarm
    fires (SQS keeps the jobs, so sending only slows down: it needs a person, not a retry)."""
    dimension = {"Name": "FunctionName", "Value": {"Ref": "SendMessages"}}
    [alarm] = alarms_on(alarms, "AWS/Lambda", "Throttles", dimension).values()
    assert alarm["Statistic"] == "Sum"
    assert alarm["Threshold"] == 0
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["TreatMissingData"] == "notBreaching"


def test_a_lost_audit_entry_is_an_alarm(alarms: dict) -> None:
    """Given an API write whose audit entry could not be stored, when the metric arrives, then
    the operator is alarmed at the first one, on the metric the code writes."""
    from chalicelib.metrics import METRICS

    alarm = alarms["AuditWriteFailuresAlarm"]
    assert alarm["MetricName"] in METRICS
    assert alarm["MetricName"] == "AuditWriteFailures"
    assert alarm["Namespace"] == Settings().metrics_namespace
    assert alarm["Threshold"] == 0
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["TreatMissingData"] == "notBreaching"


def test_a_stopped_scheduler_tick_is_an_alarm(alarms: dict) -> None:
    """Given the tick's rule disabled or gone, when no tick runs for 10 minutes, then an alarm
    fires: here the missing data is the failure."""
    dimension = {"Name": "FunctionName", "Value": {"Ref": "SchedulerTick"}}
    [alarm] = alarms_on(alarms, "AWS/Lambda", "Invocations", dimension).values()
    assert alarm["Statistic"] == "Sum"
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (1, "LessThanThreshold")
    assert alarm["Period"] * alarm["EvaluationPeriods"] == 600
    assert alarm["TreatMissingData"] == "breaching"


def test_the_gateway_error_rate_alarm_reads_the_senders_metrics(
    template: dict, alarms: dict
) -> None:
    """Given the sender's EMF metrics, when more than GatewayErrorRateThreshold of the gateway
    calls in 5 minutes failed, then an alarm fires; without calls there is no rate to judge."""
    [alarm] = [
        alarm
        for alarm in alarms.values()
        if {m["MetricName"] for m in watched(alarm)} == {"GatewayCalls", "GatewayErrors"}
    ]
    queries = {query["Id"]: query for query in alarm["Metrics"]}
    ids = {
        query["MetricStat"]["Metric"]["MetricName"]: query_id
        for query_id, query in queries.items()
        if "MetricStat" in query
    }
    [result] = [query for query in alarm["Metrics"] if query.get("ReturnData", True)]
    calls, errors = ids["GatewayCalls"], ids["GatewayErrors"]
    assert result["Expression"] == f"IF({calls} > 0, FILL({errors}, 0) / {calls}, 0)"
    for metric_id in (calls, errors):
        stat = queries[metric_id]["MetricStat"]
        assert (stat["Stat"], stat["Period"]) == ("Sum", 300)
        assert queries[metric_id]["ReturnData"] is False
    assert alarm["EvaluationPeriods"] == 1
    assert alarm["Threshold"] == {"Ref": "GatewayErrorRateThreshold"}
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["TreatMissingData"] == "notBreaching"
    parameter = template["Parameters"]["GatewayErrorRateThreshold"]
    assert parameter["Default"] == 0.2
    assert 0 < parameter["MinValue"] <= parameter["Default"] <= parameter["MaxValue"] == 1


def test_emf_alarms_read_the_namespace_and_dimensions_the_functions_write(
    template: dict, alarms: dict
) -> None:
    """Given the service's EMF metrics, when an alarm reads one, then the namespace, the metric
    name and the dimensions are exactly those the functions write: service (their
    POWERTOOLS_SERVICE_NAME) and stack (their TABLE_PREFIX, the stack name). Any difference
    would leave the alarm reading a metric that never gets data."""
    read = [m for alarm in alarms.values() for m in watched(alarm) if m["Namespace"] != "AWS/SQS"]
    emf = [m for m in read if not m["Namespace"].startswith("AWS/")]
    assert emf
    assert Settings().metrics_namespace == METRICS_NAMESPACE
    for function in of_type(template["Resources"], "AWS::Serverless::Function"):
        variables = environment(template, function)
        assert variables["METRICS_NAMESPACE"] == METRICS_NAMESPACE, function
        assert variables["POWERTOOLS_SERVICE_NAME"] == EMF_DIMENSIONS[0]["Value"], function
        assert variables["TABLE_PREFIX"] == EMF_DIMENSIONS[1]["Value"], function
    for metric in emf:
        assert metric["Namespace"] == METRICS_NAMESPACE
        assert metric["MetricName"] in EMF_METRICS
        assert metric["Dimensions"] == EMF_DIMENSIONS


def test_the_gateway_alarm_reads_the_series_the_sender_writes(
    monkeypatch: pytest.MonkeyPatch, alarms: dict
) -> None:
    """Given one send batch with a success and a 5xx (and a lost audit entry), when
    chalicelib.metrics writes its EMF lines, then the line with the totals has exactly the
    namespace, dimensions and metric names the gateway error rate alarm (and the audit alarm)
    reads (the per-class line is another series)."""
    monkeypatch.delenv("POWERTOOLS_METRICS_DISABLED", raising=False)
    lines: list[str] = []
    writer = MetricsWriter(Settings(table_prefix=STACK_NAME), write=lines.append)
    answers = [
        GatewayResult(AnswerKind.SENT, "ok", 200, 0.05),
        GatewayResult(AnswerKind.UNAVAILABLE, "HTTP 503", 503, 0.2),
    ]

    writer.delivery("mailing-1", ["sent", "retry"], answers)
    writer.emit({"AuditWriteFailures": 1})  # as services/audit.py writes it

    totals: dict[str, tuple[str, dict[str, str]]] = {}
    for line in map(json.loads, lines):
        [directive] = line["_aws"]["CloudWatchMetrics"]
        [dimensions] = directive["Dimensions"]
        if "error_class" in dimensions:
            continue  # GatewayErrors per class: a series of its own
        for metric in directive["Metrics"]:
            totals[metric["Name"]] = (directive["Namespace"], {n: line[n] for n in dimensions})
    stack_name = {"Ref": "AWS::StackName"}
    for alarm in alarms.values():
        for metric in watched(alarm):
            if metric["Namespace"].startswith("AWS/"):
                continue
            assert metric["MetricName"] in METRICS
            namespace, dimensions = totals[metric["MetricName"]]
            expected = {
                d["Name"]: STACK_NAME if d["Value"] == stack_name else d["Value"]
                for d in metric["Dimensions"]
            }
            assert (metric["Namespace"], expected) == (namespace, dimensions)
    assert set(METRICS) >= EMF_METRICS


def test_every_alarm_watches_a_resource_of_this_stack(resources: dict, alarms: dict) -> None:
    """Given the alarms on AWS metrics, when resolved, then each names a queue or function of the
    stack by reference, never a literal name of some other deployment."""
    kinds = {"QueueName": "AWS::SQS::Queue", "FunctionName": "AWS::Serverless::Function"}
    for name, alarm in alarms.items():
        for metric in watched(alarm):
            if not metric["Namespace"].startswith("AWS/"):
                continue
            [dimension] = metric["Dimensions"]
            value = dimension["Value"]
            target = value["Ref"] if "Ref" in value else value["Fn::GetAtt"][0]
            assert resources[target]["Type"] == kinds[dimension["Name"]], name


# ---------------------------------------------------------------- the code needs no more


PREFIX = "sms-infra"
ACCOUNT, REGION = "123456789012", "us-east-1"  # moto's


@dataclass
class Recorded:
    """What a code path asked AWS for, keyed as the access matrix is."""

    tables: dict[str, set[str]] = field(default_factory=dict)
    queues: dict[str, set[str]] = field(default_factory=dict)
    other: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def record(calls: list[tuple[str, str, dict]], queue_ids: dict[str, str]) -> Recorded:
    """Map botocore calls to what IAM authorises, as the local stack's IAM does: a transaction
    part by part, a batch as its own action, SendMessageBatch as SendMessage (see the IAM note
    in infra/resources.yaml)."""
    scope = iam.CallScope(REGION, ACCOUNT)
    queue_of = {iam.queue_arn(url, REGION): logical_id for url, logical_id in queue_ids.items()}
    table_arns = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{PREFIX}-"
    found = Recorded()
    for service, operation, params in calls:
        for request in iam.requests_for(service, operation, params, scope):
            if service == "dynamodb":
                key = request.resource.removeprefix(table_arns)
                found.tables.setdefault(key, set()).add(request.action)
            elif service == "sqs":
                found.queues.setdefault(queue_of[request.resource], set()).add(request.action)
            else:
                found.other.setdefault(request.action, []).append(params)
    return found


@pytest.fixture
def aws_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict]]:
    """Every AWS call made through botocore (boto3 and PynamoDB alike), once the test clears it."""
    calls: list[tuple[str, str, dict]] = []
    original = botocore.client.BaseClient._make_api_call

    def recording(self: Any, operation_name: str, api_params: dict) -> Any:
        calls.append((self.meta.service_model.service_name, operation_name, api_params))
        return original(self, operation_name, api_params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", recording)
    return calls


@pytest.fixture
def world(aws: None, clock: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The real services on moto with the stack's queues, a verified report sender and report
    recipients; returns queue URL -> the queue's logical id."""
    with in_process_stack(PREFIX, clock, monkeypatch, report_recipients=REPORT_RECIPIENTS) as stack:
        yield {url: logical_id for logical_id, url in stack.queues.items()}


def missing_grants(resources: dict[str, Any], function: str, needed: Recorded) -> dict:
    """What `needed` asks for that the function's role in the packaged template does not allow."""
    statements = statements_by_role(resources).get(function_roles(resources)[function], [])
    tables, queues = table_access(resources, statements), sqs_grants(statements)
    missing: dict[str, set[str]] = {}
    for key, actions in needed.tables.items():
        missing[key] = actions - tables.get(key, set())
    for key, actions in needed.queues.items():
        missing[key] = actions - queues.get(key, set())
    granted = {a for s in statements for a in as_list(s["Action"])}
    for action in needed.other:
        missing[action] = {action} - granted
    return {key: actions for key, actions in missing.items() if actions}


def assert_report_mail_fits_the_ses_grant(needed: Recorded) -> None:
    """The SES grant's conditions compare exact strings: the From address, and each recipient."""
    for params in needed.other.get("ses:SendRawEmail", []) + needed.other.get("ses:SendEmail", []):
        destination = params.get("Destination", {})
        recipients = params.get("Destinations") or [
            address
            for kind in ("ToAddresses", "CcAddresses", "BccAddresses")
            for address in destination.get(kind, [])
        ]
        assert params["Source"] == REPORT_SENDER
        assert recipients
        assert set(recipients) <= set(REPORT_RECIPIENTS.split(","))


def request(client: Any, method: str, path: str, payload: Any = None) -> Any:
    body = json.dumps(payload).encode() if payload is not None else b""
    response = client.http.request(method, path, headers=JSON_HEADERS, body=body)
    assert response.status_code < 300, (method, path, response.status_code, response.body)
    if response.headers.get("Content-Type", "").startswith("application/json") and response.body:
        return json.loads(response.body)
    return None


def mailing_around(clock: Any) -> dict[str, str]:
    """A mailing that starts in 5 minutes (so creating it kicks the fan-out) and ends in 6 hours."""
    start, end = clock() + timedelta(minutes=5), clock() + timedelta(hours=6)
    return {"text": "Winter sale", "start_at": start.isoformat(), "end_at": end.isoformat()}


def mailing_with_a_failed_message(clock: Any) -> str:
    """Given (written straight to storage): a running mailing with one failed message."""
    from chalicelib.container import services
    from chalicelib.services.mailings import MailingFields
    from chalicelib.storage.models import connection_for, status_key
    from chalicelib.storage.receipts import DynamoReceiptRepository

    current = services()
    Mailing, Message = current.models.Mailing, current.models.Message
    made = current.mailings.create(
        MailingFields(
            text="Hi",
            start_at=clock(),
            end_at=clock() + timedelta(hours=1),
            audience=AudienceFilter(),
            send_window=None,
        )
    )
    Message(
        made.id,
        "client-1",
        message_id=1,
        phone="79001234569",
        status="failed",
        status_key=status_key(made.id, "failed"),
        created_at=clock(),
        updated_at=clock(),
        attempts=1,
    ).save()
    Mailing(made.id).update(actions=[Mailing.count_failed.add(1)])
    # Its id is registered as the fan-out does with DELIVERY_RECEIPTS on, for a receipt.
    lookup = DynamoReceiptRepository(current.models, connection_for(current.settings))
    lookup.register_ids(made.id, 1, ["client-1"], None)
    return made.id


def test_every_route_of_the_api_needs_only_what_its_role_allows(
    resources: dict, world: dict, aws_calls: list, clock: Any
) -> None:
    """Given the API's role in the packaged template, when an operator uses every route once
    (clients, mailings, statistics, metrics, the report), then each AWS call the code makes is
    one the role allows: AccessDenied in production would be the first sign otherwise."""
    from chalice.test import Client

    from app import app

    mailing = mailing_around(clock)
    failed_mailing = mailing_with_a_failed_message(clock)
    aws_calls.clear()
    with Client(app, stage_name="dev") as client:
        request(client, "GET", "/health")
        created = request(client, "POST", "/clients", {"phone": "79001234567", "tag": "vip"})
        client_path = f"/clients/{created['id']}"
        for query in ("", "?tag=vip", "?operator_code=900", "?operator_code=900&tag=vip"):
            request(client, "GET", f"/clients{query}")
        for query in ("?phone=79001234567", "?phone=79001234567&tag=vip"):
            request(client, "GET", f"/clients{query}")
        request(client, "GET", client_path)
        request(client, "PUT", client_path, {"phone": "79001234568", "tag": "vip"})
        request(client, "PATCH", client_path, {"tag": "new"})
        made = request(client, "POST", "/mailings", {**mailing, "filter": {"tags": ["new"]}})
        mailing_path = f"/mailings/{made['id']}"
        request(client, "GET", "/mailings")
        request(client, "GET", mailing_path)
        request(client, "PUT", mailing_path, mailing)
        request(client, "PATCH", mailing_path, {"text": "Winter sale, last days"})
        request(client, "GET", f"{mailing_path}/stats")
        request(client, "GET", f"{mailing_path}/stats?status=pending")
        request(client, "GET", f"/mailings/{failed_mailing}/timeline")
        request(client, "GET", "/stats")
        request(client, "GET", "/metrics")
        request(client, "GET", "/gateway")
        request(client, "POST", "/reports/daily")
        request(client, "POST", "/mailings/preview", {"filter": {"tags": ["new"]}})
        request(client, "POST", f"{mailing_path}/pause")
        request(client, "POST", f"{mailing_path}/resume")
        request(client, "POST", f"/mailings/{failed_mailing}/retry-failed")
        request(client, "POST", "/opt-outs", {"phone": "79001234568"})
        # The gateway's webhooks: a reply kept, a keyword, a receipt; the client's replies.
        request(client, "POST", "/inbound-sms", {"phone": "79001234568", "text": "Thanks"})
        request(client, "POST", "/inbound-sms", {"phone": "79001234568", "text": "STOP"})
        request(client, "POST", "/inbound-sms", {"phone": "79009999999", "text": "?"})
        request(client, "GET", f"{client_path}/replies")
        request(client, "POST", "/delivery-receipts", {"id": 1, "status": "delivered"})
        request(client, "POST", "/delivery-receipts", {"id": 1, "status": "delivered"})
        imported = import_csv(client, "phone,tag\n79001234567,vip\n79001234570,new\nbad,\n")
        request(client, "GET", f"/clients/imports/{imported['id']}")
        request(client, "GET", "/clients/imports")
        request(client, "POST", f"{mailing_path}/cancel")
        request(client, "DELETE", mailing_path)
        request(client, "DELETE", client_path)

    needed = record(aws_calls, world)
    assert_report_mail_fits_the_ses_grant(needed)
    assert missing_grants(resources, "APIHandler", needed) == {}


def import_csv(client: Any, text: str) -> dict[str, Any]:
    headers = {**JSON_HEADERS, "Content-Type": "text/csv"}
    response = client.http.request("POST", "/clients/import", headers=headers, body=text.encode())
    assert response.status_code == 202, response.body
    return json.loads(response.body)


def test_the_import_worker_needs_only_what_its_role_allows(
    resources: dict, world: dict, aws_calls: list
) -> None:
    """Given the import worker's role, when it writes a chunk that creates a client, changes
    one and leaves one alone, and then gets the same chunk again, then every AWS call it makes
    is allowed."""
    import boto3
    from chalice.test import Client

    from app import app

    sqs = boto3.client("sqs")
    [queue] = [url for url, logical_id in world.items() if logical_id == "ImportQueue"]
    with Client(app, stage_name="dev") as client:
        for phone, tag in (("79001234567", "vip"), ("79001234568", "new")):
            request(client, "POST", "/clients", {"phone": phone, "tag": tag})
        import_csv(client, "phone,tag\n79001234567,vip\n79001234568,old\n79001234569,\n")
        [message] = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
        aws_calls.clear()
        event = client.events.generate_sqs_event([message["Body"]], queue_name=f"{PREFIX}-import")
        for _ in range(2):
            client.lambda_.invoke("import_clients", event)

    needed = record(aws_calls, world)
    assert {"phones", "clients", "imports"} <= set(needed.tables)
    assert missing_grants(resources, "ImportClients", needed) == {}


def test_the_authorizer_needs_only_what_its_role_allows(
    template: dict, resources: dict, aws: None, clock: Any, aws_calls: list
) -> None:
    """Given the authorizer configured as the stack does with static tokens (the secret's ARN in
    API_TOKENS_SECRET_ID), when API Gateway invokes it twice, then its only AWS call is one
    GetSecretValue on exactly the secret its role may read, and the token is let through."""
    import boto3
    from chalice.test import Client

    from app import app
    from chalicelib.container import Services, use_services

    created = boto3.client("secretsmanager").create_secret(
        Name="sms-prod/api-tokens", SecretString=f"{API_TOKEN},another-token-0123456789"
    )
    arn = created["ARN"]
    # What Secrets Manager calls the secret is what the parameter takes and the grant names.
    assert re.fullmatch(template["Parameters"]["ApiTokensSecretArn"]["AllowedPattern"], arn)
    given = {**REQUIRED, "AuthMode": "static", "ApiTokensSecretArn": arn}
    settings = Settings.from_env(deployed_environment(template, AUTHORIZER, given))
    use_services(Services.build(settings, clock=clock))
    event = {
        "type": "TOKEN",
        "authorizationToken": f"Bearer {API_TOKEN}",
        "methodArn": "arn:aws:execute-api:us-east-1:123456789012:abc123/api/GET/clients",
    }
    try:
        aws_calls.clear()
        with Client(app, stage_name="dev") as client:
            answers = [client.lambda_.invoke("bearer_auth", event).payload for _ in range(2)]
    finally:
        use_services(None)

    for answer in answers:
        [statement] = answer["policyDocument"]["Statement"]
        assert statement["Effect"] == "Allow"
    assert [(service, operation) for service, operation, _ in aws_calls] == [
        ("secretsmanager", "GetSecretValue")
    ]
    [(_, _, params)] = aws_calls
    role = function_roles(resources)[AUTHORIZER]
    [grant] = grants(statements_by_role(resources)[role], "secretsmanager")
    assert [evaluate(template, r, given) for r in as_list(grant["Resource"])] == [
        params["SecretId"]
    ]
    assert "secretsmanager:GetSecretValue" in as_list(grant["Action"])


def test_the_scheduled_report_needs_only_what_its_role_allows(
    resources: dict, world: dict, aws_calls: list, clock: Any
) -> None:
    """Given the daily report's role, when the scheduled Lambda runs, then every AWS call it
    makes is allowed, and the e-mail it sends meets the SES grant's conditions."""
    from chalice.test import Client

    from app import app

    with Client(app, stage_name="dev") as client:
        request(client, "POST", "/mailings", mailing_around(clock))
        aws_calls.clear()
        event = client.events.generate_cw_event("Scheduled Event", "aws.events", {}, [])
        client.lambda_.invoke("daily_report", event)

    needed = record(aws_calls, world)
    assert "ses:SendRawEmail" in needed.other or "ses:SendEmail" in needed.other
    assert_report_mail_fits_the_ses_grant(needed)
    assert missing_grants(resources, "DailyReport", needed) == {}
