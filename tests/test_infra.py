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
from pathlib import Path
from typing import Any

import pytest
import yaml

from chalicelib.models import build_models
from chalicelib.settings import Settings

pytestmark = pytest.mark.infra

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MERGE_TEMPLATE = "infra/resources.yaml"
STAGE = "prod"
# A YAML merge template makes Chalice write the whole template as YAML, whatever the format flag.
TEMPLATE_NAME = "sam.yaml"
PACKAGE_TIMEOUT_SECONDS = 600

# What PynamoDB calls for the service. Transactions need no action of their own: each part is
# authorised as PutItem, UpdateItem, DeleteItem or ConditionCheckItem.
DYNAMODB_ACTIONS = {
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
    "dynamodb:Query",
    "dynamodb:BatchWriteItem",
    "dynamodb:ConditionCheckItem",
    "dynamodb:DescribeTable",
}
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


def statements_by_role(resources: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every policy statement in the stack, grouped by the role it applies to."""
    by_role: dict[str, list[dict[str, Any]]] = {}
    for name, role in of_type(resources, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            by_role.setdefault(name, []).extend(policy["PolicyDocument"]["Statement"])
    for policy in of_type(resources, "AWS::IAM::Policy").values():
        for role in policy["Properties"]["Roles"]:
            by_role.setdefault(role["Ref"], []).extend(
                policy["Properties"]["PolicyDocument"]["Statement"]
            )
    return by_role


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


def render(response_template: str) -> Any:
    """The body API Gateway sends: messageString is substituted as an already-quoted string."""
    return json.loads(response_template.replace("$context.error.messageString", '"Forbidden"'))


# ---------------------------------------------------------------- lint


def test_packaged_template_passes_cfn_lint(template_path: Path) -> None:
    """Given the packaged template, when cfn-lint checks it, then it reports nothing at all."""
    result = subprocess.run(
        [str(BIN / "cfn-lint"), str(template_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    print(result.stdout, result.stderr)
    assert result.returncode == 0, f"cfn-lint found problems:\n{result.stdout}{result.stderr}"


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


def test_message_records_expire_by_the_models_ttl_attribute(resources: dict) -> None:
    """Given messages outlive their mailing, DynamoDB's TTL removes them on the model's field."""
    _, table = tables_by_kind(resources)["messages"]
    ttl = model_for("messages")._ttl_attribute()
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


def test_chalice_policy_file_grants_only_logs(resources: dict) -> None:
    """Given .chalice/policy.json, when Chalice attaches it, then it allows only CloudWatch Logs."""
    for name, role in of_type(resources, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                assert all(a.startswith("logs:") for a in as_list(statement["Action"])), name


def test_dynamodb_is_granted_only_on_this_stacks_tables(resources: dict) -> None:
    """Given the DynamoDB grants, when resolved, then each names one of the stack's tables."""
    tables = {logical_id for logical_id, _ in tables_by_kind(resources).values()}
    for role, statements in statements_by_role(resources).items():
        for table, suffix in dynamodb_grants(statements):
            assert table in tables, f"{role} is granted DynamoDB on {table}"
            assert suffix in ("", "/index/*"), f"{role} is granted {table}{suffix}"


def test_functions_can_use_every_table_with_exactly_the_actions_the_code_needs(
    resources: dict,
) -> None:
    """Given a non-authorizer Lambda, when it uses a table, it may do exactly what PynamoDB does.

    A new Lambda whose role is missing from TablesAccessPolicy fails here, not in production.
    """
    tables = tables_by_kind(resources)
    grants_by_role = {role: dynamodb_grants(s) for role, s in statements_by_role(resources).items()}
    authorizers = authorizer_functions(resources)
    workers = {f: r for f, r in function_roles(resources).items() if f not in authorizers}
    assert "APIHandler" in workers

    for function, role in workers.items():
        grants = grants_by_role.get(role, {})
        for kind, (logical_id, table) in tables.items():
            assert grants.get((logical_id, "")) == DYNAMODB_ACTIONS, (function, kind)
            if table.get("GlobalSecondaryIndexes"):
                assert grants.get((logical_id, "/index/*")) == {"dynamodb:Query"}, (function, kind)
            else:
                assert (logical_id, "/index/*") not in grants, (function, kind)


def test_the_authorizer_cannot_touch_the_tables(resources: dict) -> None:
    """Given the token authorizer, when its role is read, then it has no DynamoDB access."""
    authorizers = authorizer_functions(resources)
    assert authorizers == {"BearerAuth"}
    roles = function_roles(resources)
    statements = statements_by_role(resources)
    for function in authorizers:
        assert dynamodb_grants(statements.get(roles[function], [])) == {}


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


def test_unauthorized_tells_the_client_to_send_a_bearer_token(gateway_responses: dict) -> None:
    """Given a request without a token, when it is rejected, the 401 says which scheme to use."""
    headers = gateway_responses["UNAUTHORIZED"]["ResponseParameters"]["Headers"]
    assert headers["WWW-Authenticate"] == "'Bearer'"
