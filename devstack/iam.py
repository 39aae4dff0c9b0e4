"""IAM, enforced in the local stack: each function's AWS calls run under its own role.

On AWS every Lambda runs as the role the packaged template gives it, and a call that role does
not allow fails with AccessDenied. The local stack runs every function in one process with one
set of (fake) credentials, so without this the emulator allows everything and a missing grant
shows up only in production. Here the roles' statements are read from infra/resources.yaml
(plus Chalice's own policy file, which every role gets), their intrinsics resolved against the
local stack's real tables, queues, secrets and settings, and every AWS call made inside a tagged
invocation (`devstack.invocation`) is evaluated against the statements of that
invocation's function before it is sent: an explicit Deny wins, else an Allow must match the
action, the resource and its conditions. A denied call raises the ClientError AWS would
answer, and nothing reaches the emulator.

Calls outside any invocation (the stack creating its tables and queues, tests reading state)
are not checked. Limits: only identity-based policies (no resource policies, permissions
boundaries or SCPs), the condition operators the template uses (anything else fails at
start-up), and the request context keys listed in `requests_for`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import getaddresses, parseaddr
from pathlib import Path
from typing import Any

import botocore.client
import yaml
from botocore.exceptions import ClientError

from devstack import invocation

logger = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_TEMPLATE = PROJECT_DIR / "infra" / "resources.yaml"
CHALICE_CONFIG_DIR = PROJECT_DIR / ".chalice"
PARTITION = "aws"
# The Lambda that serves every API route, as `chalice package` names it.
API_FUNCTION = "api_handler"
NO_VALUE = {"Ref": "AWS::NoValue"}


class IamConfigError(ValueError):
    """The roles' policies cannot be evaluated as written: the local stack must not start."""


# ---------------------------------------------------------------- reading the template


class _TemplateLoader(yaml.SafeLoader):
    """Reads CloudFormation's short tags (!Sub, !If, ...) as their long form."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":  # !GetAtt Table.Arn is ["Table", "Arn"] in the long form
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    name = suffix if suffix in ("Ref", "Condition") else f"Fn::{suffix}"
    return {name: value}


_TemplateLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: Path) -> dict[str, Any]:
    """A CloudFormation template in YAML (short or long intrinsic forms) or JSON."""
    try:
        loaded = yaml.load(path.read_text(), Loader=_TemplateLoader)  # noqa: S506 - safe loader
    except (OSError, yaml.YAMLError) as exc:
        raise IamConfigError(f"cannot read the policy template {path}: {exc}") from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("Resources"), dict):
        raise IamConfigError(f"{path} is not a CloudFormation template (no Resources)")
    return loaded


def role_of(function: str) -> str:
    """The logical id of a Chalice function's role (autogen_policy false: one per function)."""
    from chalice.utils import to_cfn_resource_name

    return f"{to_cfn_resource_name(function)}Role"


def app_functions(app: Any) -> list[str]:
    """Every Lambda function `chalice package` makes of the app, by its Chalice name."""
    names = [API_FUNCTION] if app.routes else []
    names += [authorizer.name for authorizer in app.builtin_auth_handlers]
    names += [source.name for source in app.event_sources]
    names += [function.name for function in app.pure_lambda_functions]
    return names


@dataclass(frozen=True)
class LocalResources:
    """What the template's intrinsics stand for in this local stack."""

    region: str
    account: str
    stack_name: str  # the table prefix: tables and queues are named "<stack name>-<kind>"
    parameters: Mapping[str, str]
    # Queue logical id -> the URL of the queue this stack uses for it.
    queue_urls: Mapping[str, str] = field(default_factory=dict)
    # Secret name (or ARN) -> its full ARN, for the secrets the settings name.
    secret_arns: Mapping[str, str] = field(default_factory=dict)


def queue_arn(url: str, region: str) -> str:
    """The ARN of the queue at `url` (…/<account>/<name>)."""
    account, name = url.rstrip("/").split("/")[-2:]
    return f"arn:{PARTITION}:sqs:{region}:{account}:{name}"


class _Resolver:
    """Resolves the intrinsics a policy uses, as CloudFormation would for these values."""

    def __init__(self, template: dict[str, Any], local: LocalResources) -> None:
        self._template = template
        self._local = local
        self._pseudo = {
            "AWS::Region": local.region,
            "AWS::AccountId": local.account,
            "AWS::Partition": PARTITION,
            "AWS::StackName": local.stack_name,
            "AWS::URLSuffix": "amazonaws.com",
        }

    def value(self, expression: Any) -> Any:
        if isinstance(expression, list):
            items = [self.value(item) for item in expression]
            return [item for item in items if item is not NO_VALUE]
        if not isinstance(expression, dict):
            return expression
        if len(expression) == 1:
            [(name, args)] = expression.items()
            if name == "Ref" or name == "Condition" or name.startswith("Fn::"):
                return self._function(name, args)
        resolved = {key: self.value(item) for key, item in expression.items()}
        return {key: item for key, item in resolved.items() if item is not NO_VALUE}

    def condition(self, name: str) -> bool:
        conditions = self._template.get("Conditions", {})
        if name not in conditions:
            raise IamConfigError(f"unknown condition {name!r}")
        return bool(self.value(conditions[name]))

    def _function(self, name: str, args: Any) -> Any:
        if name == "Ref":
            return self._ref(args)
        if name == "Condition":
            return self.condition(args)
        if name == "Fn::If":
            condition, when_true, when_false = args
            return self.value(when_true if self.condition(condition) else when_false)
        if name == "Fn::Equals":
            left, right = (self.value(argument) for argument in args)
            return left == right
        if name == "Fn::Not":
            return not self.value(args[0])
        if name == "Fn::And":
            return all(self.value(argument) for argument in args)
        if name == "Fn::Or":
            return any(self.value(argument) for argument in args)
        if name == "Fn::GetAtt":
            logical_id, attribute = args if isinstance(args, list) else args.split(".", 1)
            return self._attribute(logical_id, attribute)
        if name == "Fn::Sub":
            return self._sub(args)
        if name == "Fn::Join":
            separator, items = args
            return str(separator).join(str(item) for item in self.value(items))
        if name == "Fn::Split":
            separator, text = args
            return str(self.value(text)).split(separator)
        if name == "Fn::Select":
            index, items = args
            return self.value(items)[int(self.value(index))]
        raise IamConfigError(f"cannot evaluate {name} in a policy: {args!r}")

    def _ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in self._pseudo:
            return self._pseudo[name]
        parameters = self._template.get("Parameters", {})
        if name in parameters:
            if name in self._local.parameters:
                return self._local.parameters[name]
            if "Default" in parameters[name]:
                return str(parameters[name]["Default"])
            raise IamConfigError(f"parameter {name} has no value in the local stack")
        resource = self._resource(name)
        kind = resource["Type"]
        if kind == "AWS::DynamoDB::Table":
            return self.value(resource["Properties"]["TableName"])
        if kind == "AWS::SQS::Queue":
            return self._queue_url(name, resource)
        raise IamConfigError(f"cannot resolve Ref {name} ({kind}) in a policy")

    def _resource(self, logical_id: str) -> dict[str, Any]:
        resource = self._template.get("Resources", {}).get(logical_id)
        if not isinstance(resource, dict) or "Type" not in resource:
            raise IamConfigError(f"a policy refers to {logical_id}, which the template lacks")
        return resource

    def _queue_url(self, logical_id: str, resource: dict[str, Any]) -> str:
        if logical_id in self._local.queue_urls:
            return self._local.queue_urls[logical_id]
        name = self.value(resource["Properties"]["QueueName"])
        return f"https://sqs.{self._local.region}.amazonaws.com/{self._local.account}/{name}"

    def _attribute(self, logical_id: str, attribute: str) -> str:
        resource = self._resource(logical_id)
        kind, properties = resource["Type"], resource.get("Properties", {})
        region, account = self._local.region, self._local.account
        if attribute == "Arn" and kind == "AWS::DynamoDB::Table":
            table = self.value(properties["TableName"])
            return f"arn:{PARTITION}:dynamodb:{region}:{account}:table/{table}"
        if attribute == "Arn" and kind == "AWS::SQS::Queue":
            return queue_arn(self._queue_url(logical_id, resource), region)
        if attribute == "Arn" and kind == "AWS::Logs::LogGroup":
            group = self.value(properties["LogGroupName"])
            return f"arn:{PARTITION}:logs:{region}:{account}:log-group:{group}:*"
        raise IamConfigError(f"cannot resolve {logical_id}.{attribute} ({kind}) in a policy")

    def _sub(self, args: Any) -> str:
        text, variables = (args, {}) if isinstance(args, str) else args
        values = {name: self.value(item) for name, item in variables.items()}

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in values:
                return str(values[name])
            if "." in name:
                logical_id, attribute = name.split(".", 1)
                return self._attribute(logical_id, attribute)
            return str(self._ref(name))

        return re.sub(r"\$\{([^}]+)\}", replace, text)


# ---------------------------------------------------------------- statements and evaluation

# Condition operators the evaluator implements; any other in a policy fails at start-up.
_STRING_OPERATORS: dict[str, Callable[[str, str], bool]] = {
    "StringEquals": lambda value, pattern: value == pattern,
    "StringNotEquals": lambda value, pattern: value == pattern,
    "StringEqualsIgnoreCase": lambda value, pattern: value.lower() == pattern.lower(),
    "StringNotEqualsIgnoreCase": lambda value, pattern: value.lower() == pattern.lower(),
    "StringLike": lambda value, pattern: _wildcard(pattern).fullmatch(value) is not None,
    "StringNotLike": lambda value, pattern: _wildcard(pattern).fullmatch(value) is not None,
    "ArnEquals": lambda value, pattern: value == pattern,
    "ArnNotEquals": lambda value, pattern: value == pattern,
    "ArnLike": lambda value, pattern: _wildcard(pattern).fullmatch(value) is not None,
    "ArnNotLike": lambda value, pattern: _wildcard(pattern).fullmatch(value) is not None,
    "Bool": lambda value, pattern: value.lower() == pattern.lower(),
}
_NEGATED = {name for name in _STRING_OPERATORS if "Not" in name}


@functools.lru_cache(maxsize=4096)
def _wildcard(pattern: str) -> re.Pattern[str]:
    """IAM's wildcards: * any run of characters, ? one character; nothing else is special."""
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
        re.DOTALL,
    )


@dataclass(frozen=True)
class Condition:
    """One `Operator: {key: values}` test of a statement's Condition block."""

    operator: str  # e.g. "ForAllValues:StringEquals" as written
    key: str
    values: tuple[str, ...]

    @staticmethod
    def parse(block: Any) -> list[Condition]:
        if not isinstance(block, dict):
            raise IamConfigError(f"a Condition must be a mapping, got {block!r}")
        found = []
        for operator, tests in block.items():
            _check_operator(operator)
            if not isinstance(tests, dict):
                raise IamConfigError(f"condition {operator} must map keys to values")
            for key, values in tests.items():
                listed = values if isinstance(values, list) else [values]
                found.append(Condition(operator, key, tuple(_text(v) for v in listed)))
        return found

    def holds(self, context: Mapping[str, tuple[str, ...]]) -> bool:
        qualifier, _, operator = self.operator.rpartition(":")
        if_exists = operator.endswith("IfExists")
        operator = operator.removesuffix("IfExists")
        test = _STRING_OPERATORS[operator]
        negated = operator in _NEGATED
        present = context.get(self.key.lower())

        def matches(value: str) -> bool:
            hit = any(test(value, pattern) for pattern in self.values)
            return not hit if negated else hit

        if qualifier == "ForAllValues":
            # True when the key is absent or empty, as on AWS: pair it with a check of its own.
            return all(matches(value) for value in present or ())
        if qualifier == "ForAnyValue":
            return any(matches(value) for value in present or ())
        if not present:
            return if_exists or negated
        return any(matches(value) for value in present)


def _check_operator(operator: str) -> None:
    qualifier, _, name = operator.rpartition(":")
    if qualifier not in ("", "ForAllValues", "ForAnyValue"):
        raise IamConfigError(f"condition operator {operator!r} is not implemented locally")
    if name.removesuffix("IfExists") not in _STRING_OPERATORS:
        raise IamConfigError(f"condition operator {operator!r} is not implemented locally")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise IamConfigError(f"a condition value must be a string, got {value!r}")


@dataclass(frozen=True)
class Statement:
    """One resolved policy statement."""

    sid: str
    effect: str  # "Allow" or "Deny"
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    conditions: tuple[Condition, ...] = ()

    @staticmethod
    def parse(raw: Any, where: str) -> Statement:
        if not isinstance(raw, dict):
            raise IamConfigError(f"{where}: a statement must be a mapping, got {raw!r}")
        unknown = set(raw) - {"Sid", "Effect", "Action", "Resource", "Condition"}
        if unknown:
            # NotAction, NotResource, Principal: not written here, so not implemented.
            raise IamConfigError(f"{where}: statement keys {sorted(unknown)} are not supported")
        if raw.get("Effect") not in ("Allow", "Deny"):
            raise IamConfigError(f"{where}: Effect must be Allow or Deny, got {raw.get('Effect')}")
        actions = _strings(raw.get("Action"), where)
        resources = _strings(raw.get("Resource"), where)
        if not actions or not resources:
            raise IamConfigError(f"{where}: a statement needs Action and Resource")
        conditions = Condition.parse(raw["Condition"]) if "Condition" in raw else []
        return Statement(
            str(raw.get("Sid", "")), raw["Effect"], actions, resources, tuple(conditions)
        )

    def applies_to(self, request: Request) -> bool:
        return (
            any(_wildcard(a.lower()).fullmatch(request.action.lower()) for a in self.actions)
            and any(_wildcard(r).fullmatch(request.resource) for r in self.resources)
            and all(condition.holds(request.context) for condition in self.conditions)
        )


def _strings(value: Any, where: str) -> tuple[str, ...]:
    listed = value if isinstance(value, list) else [value] if value is not None else []
    if not all(isinstance(item, str) for item in listed):
        raise IamConfigError(f"{where}: unresolved value in a statement: {value!r}")
    return tuple(listed)


@dataclass(frozen=True)
class Request:
    """One authorisation AWS makes for a call: an action on a resource, with its context."""

    action: str
    resource: str
    # Condition keys (lower case) -> their values.
    context: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Role:
    """A function's role and every statement of the policies attached to it."""

    name: str
    function: str
    statements: tuple[Statement, ...]

    def decide(self, request: Request) -> str:
        """ "Allow", "Deny" (an explicit Deny matched) or "ImplicitDeny", as IAM decides."""
        matched = [s.effect for s in self.statements if s.applies_to(request)]
        if "Deny" in matched:
            return "Deny"
        return "Allow" if "Allow" in matched else "ImplicitDeny"


def load_roles(
    functions: Iterable[str],
    local: LocalResources,
    template_path: Path = DEFAULT_TEMPLATE,
    chalice_dir: Path = CHALICE_CONFIG_DIR,
) -> dict[str, Role]:
    """Function name -> its role with resolved statements; IamConfigError if any cannot be read.

    Each function's role holds the template's AWS::IAM::Policy resources that name it and
    Chalice's own policy file (every role gets it). A function whose role no policy in the
    template names fails too: it would run unchecked here and with logs only on AWS.
    """
    template = load_template(template_path)
    resolver = _Resolver(template, local)
    attached: dict[str, list[Statement]] = {}
    for logical_id, resource in template["Resources"].items():
        if not isinstance(resource, dict) or resource.get("Type") != "AWS::IAM::Policy":
            continue
        if "Condition" in resource and not resolver.condition(resource["Condition"]):
            continue
        properties = resource.get("Properties", {})
        roles = [
            role.get("Ref") if isinstance(role, dict) else role
            for role in properties.get("Roles", [])
        ]
        statements = resolver.value(properties.get("PolicyDocument", {}).get("Statement", []))
        parsed = [
            Statement.parse(raw, f"{template_path.name} {logical_id}")
            for raw in (statements if isinstance(statements, list) else [statements])
        ]
        for role in roles:
            attached.setdefault(str(role), []).extend(parsed)
    chalice_statements = _chalice_statements(chalice_dir)
    found = {}
    for function in functions:
        role = role_of(function)
        merged = template["Resources"].get(role, {}).get("Properties", {})
        if {"Policies", "ManagedPolicyArns"} & set(merged):
            # Merged onto Chalice's role they would replace its policies: not modelled.
            raise IamConfigError(f"{role} in {template_path.name}: only AWS::IAM::Policy is read")
        # A PermissionsBoundary only narrows a role; it lives in another stack (ci-role.yaml),
        # and tests/infra/test_workflow.py checks statically that it covers every action granted
        # here.
        if role not in attached:
            raise IamConfigError(
                f"no policy in {template_path.name} is attached to {role}, the role of "
                f"{function}: add its *AccessPolicy (the local stack runs it under that role)"
            )
        found[function] = Role(role, function, tuple(attached[role] + chalice_statements))
    return found


def _chalice_statements(chalice_dir: Path) -> list[Statement]:
    config = json.loads((chalice_dir / "config.json").read_text())
    if config.get("autogen_policy", True):
        raise IamConfigError("autogen_policy is not false: the roles are not the template's")
    path = chalice_dir / config.get("iam_policy_file", "policy.json")
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IamConfigError(f"cannot read Chalice's policy file {path}: {exc}") from None
    raw = document.get("Statement", [])
    return [Statement.parse(item, path.name) for item in (raw if isinstance(raw, list) else [raw])]


# ---------------------------------------------------------------- calls -> authorisations

_DYNAMODB_TRANSACT_PARTS = {
    "Put": "dynamodb:PutItem",
    "Update": "dynamodb:UpdateItem",
    "Delete": "dynamodb:DeleteItem",
    "ConditionCheck": "dynamodb:ConditionCheckItem",
    "Get": "dynamodb:GetItem",
}
_SQS_BATCHES = {
    "SendMessageBatch": "sqs:SendMessage",
    "DeleteMessageBatch": "sqs:DeleteMessage",
    "ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
}


@dataclass(frozen=True)
class CallScope:
    """Where a call goes: what a name in its parameters stands for."""

    region: str
    account: str
    secret_arns: Mapping[str, str] = field(default_factory=dict)

    def table(self, name: str, index: str | None = None) -> str:
        arn = (
            name
            if name.startswith("arn:")
            else (f"arn:{PARTITION}:dynamodb:{self.region}:{self.account}:table/{name}")
        )
        return f"{arn}/index/{index}" if index else arn

    def secret(self, secret_id: str) -> str:
        if secret_id.startswith("arn:"):
            return secret_id
        return self.secret_arns.get(
            secret_id,
            f"arn:{PARTITION}:secretsmanager:{self.region}:{self.account}:secret:{secret_id}",
        )


def requests_for(
    service: str, operation: str, params: Mapping[str, Any], scope: CallScope
) -> list[Request]:
    """The authorisations AWS makes for one API call, in order (each must be allowed)."""
    if service == "dynamodb":
        return _dynamodb(operation, params, scope)
    if service == "sqs":
        action = _SQS_BATCHES.get(operation, f"sqs:{operation}")
        if "QueueUrl" in params:
            return [Request(action, queue_arn(params["QueueUrl"], scope.region))]
        if "QueueName" in params:
            owner = params.get("QueueOwnerAWSAccountId") or scope.account
            name = params["QueueName"]
            return [Request(action, f"arn:{PARTITION}:sqs:{scope.region}:{owner}:{name}")]
        return [Request(action, "*")]
    if service == "secretsmanager" and "SecretId" in params:
        return [Request(f"secretsmanager:{operation}", scope.secret(params["SecretId"]))]
    if service == "ses" and operation in ("SendEmail", "SendRawEmail"):
        return [_ses_send(operation, params, scope)]
    if service == "kms" and "KeyId" in params:
        key = params["KeyId"]
        arn = (
            key
            if key.startswith("arn:")
            else (f"arn:{PARTITION}:kms:{scope.region}:{scope.account}:key/{key}")
        )
        return [Request(f"kms:{operation}", arn)]
    return [Request(f"{service}:{operation}", "*")]


def _dynamodb(operation: str, params: Mapping[str, Any], scope: CallScope) -> list[Request]:
    if operation in ("TransactWriteItems", "TransactGetItems"):
        found = []
        for item in params.get("TransactItems", []):
            [(part, body)] = item.items()
            found.append(Request(_DYNAMODB_TRANSACT_PARTS[part], scope.table(body["TableName"])))
        return found
    if operation in ("BatchGetItem", "BatchWriteItem"):
        return [
            Request(f"dynamodb:{operation}", scope.table(name))
            for name in params.get("RequestItems", {})
        ]
    if "TableName" in params:
        index = params.get("IndexName") if operation in ("Query", "Scan") else None
        return [Request(f"dynamodb:{operation}", scope.table(params["TableName"], index))]
    return [Request(f"dynamodb:{operation}", "*")]


def _ses_send(operation: str, params: Mapping[str, Any], scope: CallScope) -> Request:
    """SES authorises a send on the From address's identity, with the addresses as keys."""
    source = params.get("Source") or ""
    if not source and operation == "SendRawEmail":
        source = _raw_header(params, "From")
    address = parseaddr(source)[1]
    if operation == "SendEmail":
        destination = params.get("Destination", {})
        recipients = [
            a
            for kind in ("ToAddresses", "CcAddresses", "BccAddresses")
            for a in destination.get(kind, [])
        ]
    else:
        recipients = list(params.get("Destinations") or []) or [
            a
            for _, a in getaddresses(
                [_raw_header(params, h) for h in ("To", "Cc", "Bcc") if _raw_header(params, h)]
            )
        ]
    context = {
        "ses:fromaddress": (address,),
        "ses:recipients": tuple(parseaddr(r)[1] for r in recipients),
    }
    identity = f"arn:{PARTITION}:ses:{scope.region}:{scope.account}:identity/{address}"
    return Request(f"ses:{operation}", identity, context)


def _raw_header(params: Mapping[str, Any], name: str) -> str:
    from email import message_from_bytes

    data = params.get("RawMessage", {}).get("Data", b"")
    message = message_from_bytes(data if isinstance(data, bytes) else str(data).encode())
    return str(message.get(name) or "")


# ---------------------------------------------------------------- enforcement

_ACCESS_DENIED_CODES = {"sqs": "AccessDenied", "ses": "AccessDenied"}


@dataclass(frozen=True)
class Enforcer:
    """Checks each tagged call against its function's role."""

    roles: Mapping[str, Role]
    account: str
    secret_arns: Mapping[str, str] = field(default_factory=dict)

    def check(self, function: str, service: str, operation: str, params: Any, region: str) -> None:
        """Raise the ClientError AWS would answer if `function`'s role may not make this call."""
        role = self.roles.get(function)
        scope = CallScope(region, self.account, self.secret_arns)
        for request in requests_for(service, operation, params, scope):
            verdict = role.decide(request) if role is not None else "ImplicitDeny"
            if verdict != "Allow":
                self._deny(function, role, request, verdict, service, operation)

    def _deny(
        self,
        function: str,
        role: Role | None,
        request: Request,
        verdict: str,
        service: str,
        operation: str,
    ) -> None:
        role_name = role.name if role is not None else f"<no role known for {function}>"
        why = (
            "with an explicit deny in an identity-based policy"
            if verdict == "Deny"
            else f"because no identity-based policy allows the {request.action} action"
        )
        message = (
            f"User: arn:{PARTITION}:sts::{self.account}:assumed-role/{role_name}/{function} "
            f"is not authorized to perform: {request.action} on resource: {request.resource} "
            f"{why}"
        )
        logger.error(
            "IAM denied %s: %s",
            function,
            message,
            extra={
                "iam_function": function,
                "iam_role": role_name,
                "iam_action": request.action,
                "iam_resource": request.resource,
            },
        )
        code = _ACCESS_DENIED_CODES.get(service, "AccessDeniedException")
        status = 403 if code == "AccessDenied" else 400
        raise ClientError(
            {
                "Error": {"Code": code, "Message": message},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            operation,
        )


_enforcer: Enforcer | None = None
_original_call: Callable[..., Any] | None = None
_install_lock = threading.Lock()


def _checked_call(client: Any, operation_name: str, api_params: Any) -> Any:
    enforcer, running = _enforcer, invocation.current()
    if enforcer is not None and running is not None:
        enforcer.check(
            running.function,
            client.meta.service_model.service_name,
            operation_name,
            api_params,
            client.meta.region_name,
        )
    assert _original_call is not None
    return _original_call(client, operation_name, api_params)


def enforce(enforcer: Enforcer | None) -> None:
    """Check every botocore call made in an invocation against `enforcer` (None: stop checking).

    botocore's BaseClient._make_api_call is wrapped once per process (boto3 and PynamoDB 6 both
    go through it); calling this again only swaps the enforcer.
    """
    global _enforcer, _original_call
    with _install_lock:
        if _original_call is None:
            _original_call = botocore.client.BaseClient._make_api_call
            botocore.client.BaseClient._make_api_call = _checked_call  # type: ignore[method-assign]
        _enforcer = enforcer


def active() -> Enforcer | None:
    """The enforcer in force, if any."""
    return _enforcer


# ---------------------------------------------------------------- the local stack's roles


def for_local_stack(
    app: Any,
    settings: Any,
    *,
    account: str,
    queue_urls: Mapping[str, str],
    template_path: Path = DEFAULT_TEMPLATE,
    secrets_client: Any = None,
) -> Enforcer:
    """The roles of every function of `app`, resolved against this stack's resources.

    The parameters are those a deployment with these settings would pass; the secrets the
    settings name are looked up (outside any invocation) for their full ARNs, as the template's
    parameters take them. IamConfigError if anything cannot be resolved.
    """
    secret_arns = {}
    for secret_id in (settings.api_tokens_secret_id, settings.sender_api_token_secret_id):
        if secret_id and not secret_id.startswith("arn:"):
            if secrets_client is None:
                raise IamConfigError(f"cannot look up the ARN of the secret {secret_id}")
            try:
                secret_arns[secret_id] = secrets_client.describe_secret(SecretId=secret_id)["ARN"]
            except ClientError as exc:
                raise IamConfigError(f"cannot look up the secret {secret_id}: {exc}") from None
    scope = CallScope(settings.aws_region, account, secret_arns)

    def secret(secret_id: str | None) -> str:
        return scope.secret(secret_id) if secret_id else ""

    parameters = {
        "AuthMode": settings.auth_mode.value,
        "ApiTokensSecretArn": secret(settings.api_tokens_secret_id),
        "ApiTokensKmsKeyArn": "",
        "OidcIssuer": settings.oidc_issuer or "",
        "OidcAudience": settings.oidc_audience or "",
        "OidcJwksUrl": settings.oidc_jwks_url or "",
        "OidcClientId": settings.oidc_client_id or "",
        "OidcAuthorizationUrl": settings.oidc_authorization_url or "",
        "OidcTokenUrl": settings.oidc_token_url or "",
        "OidcScope": settings.oidc_scope or "",
        "OidcRolesClaim": settings.oidc_roles_claim or "",
        "OidcRoleMap": ",".join(f"{value}={role.value}" for value, role in settings.oidc_role_map),
        "SenderApiUrl": settings.sender_api_url or "",
        # Empty when the token comes from SENDER_API_TOKEN: the grant then names no secret.
        "GatewayTokenSecretArn": secret(settings.sender_api_token_secret_id),
        "GatewayTokenKmsKeyArn": "",
        "ReportSender": settings.report_sender or "",
        "ReportRecipients": ",".join(settings.report_recipients),
    }
    local = LocalResources(
        region=settings.aws_region,
        account=account,
        stack_name=settings.table_prefix,
        parameters=parameters,
        queue_urls=queue_urls,
        secret_arns=secret_arns,
    )
    roles = load_roles(app_functions(app), local, template_path)
    return Enforcer(roles, account, secret_arns)
