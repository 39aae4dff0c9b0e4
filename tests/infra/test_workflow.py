"""The CI workflow in .github/workflows: actionlint accepts it, and it lints, tests and packages
every pull request and deploys the prod stage from main with a role assumed through OIDC.

The deploy job's shell steps run here too, against stand-ins for `aws` and `curl` that record
how they were called, so what they would send to AWS is asserted, not only what they look like.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
CI = WORKFLOWS / "ci.yml"
BIN = Path(sys.executable).parent
STACK_NAME = "sms-campaigns-prod"
BOUNDARY_ARN = f"arn:aws:iam::123456789012:policy/{STACK_NAME}-function-boundary"
SECRET_ARN = (
    "arn:aws:secretsmanager:eu-west-1:123456789012:secret:sms-campaigns/prod/gateway-token-AbCdEf"
)
TOKENS_SECRET_ARN = (
    "arn:aws:secretsmanager:eu-west-1:123456789012:secret:sms-campaigns/prod/api-tokens-XyZ789"
)
ENDPOINT_URL = "https://abc123.execute-api.eu-west-1.amazonaws.com/api/"


def tool(name: str) -> Path:
    """The console script `name` of the dev requirements: next to this Python, else on PATH."""
    beside = BIN / name
    if beside.exists():
        return beside
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -r requirements-dev.txt")
    return Path(found)


def actionlint(*files: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """actionlint on `files`, with shellcheck on their `run:` scripts."""
    return subprocess.run(
        [
            str(tool("actionlint")),
            "-no-color",
            f"-shellcheck={tool('shellcheck')}",
            *(str(file) for file in files),
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def workflow() -> dict[str, Any]:
    return yaml.safe_load(CI.read_text())


def triggers(document: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 reads the bare key `on` as the boolean true.
    return document.get("on", document.get(True))


def job(name: str) -> dict[str, Any]:
    return workflow()["jobs"][name]


def step_named(job_name: str, name: str) -> dict[str, Any]:
    return next(step for step in job(job_name)["steps"] if step.get("name") == name)


def commands(job_body: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in job_body["steps"])


def run_step(
    step: dict[str, Any], tmp_path: Path, env: dict[str, str], fakes: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """Runs a `run:` step as GitHub does (bash -eo pipefail) with fake commands first on PATH.

    Each fake records its arguments as a JSON line, then runs its shell body. Returns the
    process and every recorded call, in order.
    """
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    calls = tmp_path / "calls.jsonl"
    for name, body in fakes.items():
        script = fake_bin / name
        script.write_text(
            "#!/usr/bin/env bash\n"
            f'"{sys.executable}" -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@"'
            f' >> "{calls}"\n'
            f"{body}\n"
        )
        script.chmod(0o755)
    script_file = tmp_path / "step.sh"
    script_file.write_text(step["run"])
    github_files = {
        "GITHUB_OUTPUT": tmp_path / "output",
        "GITHUB_STEP_SUMMARY": tmp_path / "summary",
    }
    for file in github_files.values():
        file.touch()
    process = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script_file)],
        cwd=tmp_path,
        env={
            "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
            "STACK_NAME": workflow()["env"]["STACK_NAME"],
            "GITHUB_SHA": "0123abc",
            **{key: str(path) for key, path in github_files.items()},
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    recorded = calls.read_text().splitlines() if calls.exists() else []
    return process, [json.loads(line) for line in recorded]


def deploy_variables(**overrides: str) -> dict[str, str]:
    """The deploy step's environment as GitHub fills it from the prod environment's variables;
    an unset variable reaches the step as an empty string."""
    values = {
        "ARTIFACT_BUCKET": "ci-artifacts",
        "GATEWAY_TOKEN_SECRET_ARN": SECRET_ARN,
        "PERMISSIONS_BOUNDARY_ARN": BOUNDARY_ARN,
        "GATEWAY_TOKEN_KMS_KEY_ARN": "",
        "AUTH_MODE": "",
        "API_TOKENS_SECRET_ARN": TOKENS_SECRET_ARN,
        "API_TOKENS_KMS_KEY_ARN": "",
        "OIDC_ISSUER": "",
        "OIDC_AUDIENCE": "",
        "OIDC_JWKS_URL": "",
        "OIDC_CLIENT_ID": "",
        "OIDC_AUTHORIZATION_URL": "",
        "OIDC_TOKEN_URL": "",
        "OIDC_SCOPE": "",
        "OIDC_ROLES_CLAIM": "",
        "OIDC_ROLE_MAP": "",
        "SENDER_API_URL": "",
        "GATEWAY_RATE_PER_SECOND": "",
        "GATEWAY_RATE_PER_OPERATOR": "",
        "GATEWAY_CONCURRENCY": "",
        "FREQUENCY_CAP": "",
        "ALARM_EMAIL": "",
        "REPORT_RECIPIENTS": "",
        "REPORT_SENDER": "",
        "DAILY_REPORT_SCHEDULE": "",
        "LOG_LEVEL": "",
    }
    return {**values, **overrides}


def parameter_overrides(call: list[str]) -> dict[str, str]:
    start = call.index("--parameter-overrides") + 1
    pairs = []
    for argument in call[start:]:
        if argument.startswith("--"):
            break
        pairs.append(argument.split("=", 1))
    return dict(pairs)


def option(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


# ------------------------------------------------------------------ actionlint


@pytest.mark.parametrize(
    "workflow_file",
    sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")]),
    ids=lambda path: path.name,
)
def test_workflow_passes_actionlint(workflow_file: Path) -> None:
    """Given a workflow of this repository, when actionlint checks it (shellcheck included),
    then it reports nothing."""
    result = actionlint(workflow_file)

    assert result.returncode == 0, f"actionlint found problems:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize(
    ("broken_job", "finding"),
    [
        pytest.param(
            {"runs-on": "ubuntu-24.04", "needs": "build", "steps": [{"run": "make test"}]},
            'needs job "build" which does not exist',
            id="unknown-needs",
        ),
        pytest.param(
            {"runs-on": "ubuntu-24.04", "steps": [{"run": "rm -rf $TARGET/build"}]},
            "SC2086",
            id="unquoted-variable",
        ),
        pytest.param(
            {"runs-on": "ubuntu-24.04", "steps": [{"run": "echo ${{ github.nope.sha }}"}]},
            'property "nope" is not defined',
            id="unknown-context",
        ),
    ],
)
def test_actionlint_rejects_a_broken_workflow(
    tmp_path: Path, broken_job: dict[str, Any], finding: str
) -> None:
    """Given a workflow with a mistake, when actionlint checks it, then it fails and names the
    mistake: the check in this suite can fail, it does not pass everything."""
    workflows = tmp_path / ".github" / "workflows"
    workflows.mkdir(parents=True)
    broken = workflows / "broken.yml"
    broken.write_text(yaml.safe_dump({"on": "push", "jobs": {"check": broken_job}}))

    result = actionlint(broken, cwd=tmp_path)

    assert result.returncode != 0
    assert finding in result.stdout, result.stdout


# ------------------------------------------------------------------ pull requests


def test_pull_requests_are_linted_tested_and_packaged() -> None:
    """Given a pull request, when the workflow runs, then jobs that do not wait on a condition
    run ruff, the test suite and the prod package."""
    document = workflow()
    pull_request_jobs = [body for body in document["jobs"].values() if "if" not in body]

    ran = "\n".join(commands(body) for body in pull_request_jobs)

    assert "pull_request" in triggers(document)
    assert "make lint" in ran
    assert "make test" in ran
    assert "make package STAGE=prod" in ran


def test_the_browser_test_runs_on_the_runners_chrome_without_apt(tmp_path: Path) -> None:
    """Given the test job on an ubuntu-24.04 runner, where apt's chromium is a stub for the snap,
    when `make test` makes sure a browser is there, then it takes the preinstalled Google Chrome
    from the job's CHROMIUM_PATH and never calls apt-get."""
    test_job = job("test")
    chrome = test_job["env"]["CHROMIUM_PATH"]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "apt-get-calls"
    for name in ("apt-get", "sudo"):
        (fake_bin / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 1\n')
        (fake_bin / name).chmod(0o755)
    stand_in = tmp_path / "google-chrome"  # the runner's binary, as far as `make browser` asks
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)

    result = subprocess.run(
        ["make", "--no-print-directory", "browser"],
        cwd=ROOT,
        env={
            **os.environ,
            "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
            "CHROMIUM_PATH": str(stand_in),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert chrome == "/usr/bin/google-chrome"
    assert test_job["runs-on"] == "ubuntu-24.04"
    assert "make test" in commands(test_job)
    assert result.returncode == 0, result.stderr
    assert not calls.exists()


def test_make_package_runs_cfn_lint_on_the_template() -> None:
    """Given the package job's `make package`, when it runs, then cfn-lint checks the template
    it wrote, so a template CloudFormation would refuse fails the pull request."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\npackage:", 1)[1].split("\n\n", 1)[0]

    assert "chalice package --stage $(STAGE)" in recipe
    assert "cfn-lint $(PACKAGE_DIR)/sam.yaml" in recipe


def test_a_new_push_to_a_pull_request_cancels_its_older_run() -> None:
    """Given two pushes to one pull request, when the second starts, then the first is cancelled;
    runs on main are grouped by commit, so none cancels another."""
    concurrency = workflow()["concurrency"]

    assert "github.event_name == 'pull_request' && github.ref || github.sha" in concurrency["group"]
    assert concurrency["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}"


# ------------------------------------------------------------------ deploy


def test_deploy_runs_only_for_pushes_to_main() -> None:
    """Given a pull request or a push to another branch, when the workflow runs, then the deploy
    job is skipped; a push to main deploys."""
    document = workflow()

    assert triggers(document)["push"] == {"branches": ["main"]}
    assert job("deploy")["if"] == "github.event_name == 'push' && github.ref == 'refs/heads/main'"


def test_deploy_waits_for_lint_tests_and_the_package() -> None:
    """Given a push to main, when a test fails, then nothing is deployed: the deploy job needs
    the lint, test and package jobs."""
    assert set(job("deploy")["needs"]) == {"lint", "test", "package"}


def test_deploy_ships_the_package_the_package_job_linted() -> None:
    """Given the package job's prod template and zip, when the deploy job runs, then it deploys
    that artifact rather than building its own."""
    document = workflow()
    artifact = document["env"]["PACKAGE_ARTIFACT"]
    upload = next(s for s in job("package")["steps"] if "upload-artifact" in s.get("uses", ""))
    download = next(s for s in job("deploy")["steps"] if "download-artifact" in s.get("uses", ""))

    assert upload["with"]["name"] == download["with"]["name"] == "${{ env.PACKAGE_ARTIFACT }}"
    assert artifact == "package-prod"
    assert "build/package/sam.yaml" in upload["with"]["path"]
    assert download["with"]["path"] == "build/package"


def test_deploy_assumes_a_role_through_oidc_and_holds_no_aws_keys() -> None:
    """Given the deploy job, when it gets AWS credentials, then it exchanges GitHub's OIDC token
    for a session of the deploy role; no job gets an OIDC token, and the file names no keys."""
    document = workflow()
    deploy = job("deploy")
    credentials = next(
        s for s in deploy["steps"] if "aws-actions/configure-aws-credentials" in s.get("uses", "")
    )
    others = [body for name, body in document["jobs"].items() if name != "deploy"]
    text = CI.read_text().lower()

    assert deploy["permissions"]["id-token"] == "write"
    assert credentials["with"]["role-to-assume"] == "${{ vars.AWS_DEPLOY_ROLE_ARN }}"
    assert "id-token" not in document["permissions"]
    assert all("id-token" not in body.get("permissions", {}) for body in others)
    for key in ("aws-access-key-id", "aws-secret-access-key", "aws_access_key_id", "secrets."):
        assert key not in text


def test_deploy_targets_the_prod_environment_and_never_overlaps() -> None:
    """Given two pushes to main in quick succession, when both reach the deploy job, then the
    second waits for the first: one group, nothing cancelled mid-update."""
    deploy = job("deploy")

    assert deploy["environment"]["name"] == "prod"
    assert deploy["concurrency"] == {"group": "deploy-prod", "cancel-in-progress": False}
    assert deploy["timeout-minutes"] <= 60


def test_deploy_steps_take_github_values_only_through_the_environment() -> None:
    """Given the deploy job's scripts, when a variable holds shell syntax, then it cannot run as
    code: no script interpolates a ${{ }} expression, each reads environment variables."""
    scripts = [step["run"] for step in job("deploy")["steps"] if "run" in step]

    assert scripts
    assert all("${{" not in script for script in scripts)


def test_deploy_uploads_the_code_then_deploys_the_prod_stack(tmp_path: Path) -> None:
    """Given the prod environment's variables, when the deploy steps run, then the code goes to
    the artifact bucket and `aws cloudformation deploy` updates the prod stack from it."""
    fakes = {"aws": "exit 0"}
    package_step = step_named("deploy", "Upload the code to the artifact bucket")
    deploy_step = step_named("deploy", "aws cloudformation deploy")

    packaged, package_calls = run_step(package_step, tmp_path, deploy_variables(), fakes)
    deployed, deploy_calls = run_step(deploy_step, tmp_path, deploy_variables(), fakes)

    assert packaged.returncode == 0, packaged.stderr
    assert deployed.returncode == 0, deployed.stderr
    [package_call] = package_calls
    deploy_call = deploy_calls[-1]
    assert package_call[:2] == ["cloudformation", "package"]
    assert option(package_call, "--s3-bucket") == "ci-artifacts"
    assert option(package_call, "--output-template-file") == "build/package/packaged.yaml"
    assert deploy_call[:2] == ["cloudformation", "deploy"]
    assert option(deploy_call, "--template-file") == "build/package/packaged.yaml"
    assert option(deploy_call, "--stack-name") == STACK_NAME
    assert {"CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"} <= set(deploy_call)
    assert "--no-fail-on-empty-changeset" in deploy_call


def test_deploy_passes_the_token_secret_arn_and_only_the_variables_that_are_set(
    tmp_path: Path,
) -> None:
    """Given some stack settings set as variables and others not, when the deploy step runs, then
    the set ones become parameter overrides, exactly as written (spaces and commas included),
    and the others are left out so the stack keeps its current values."""
    settings = deploy_variables(
        GATEWAY_RATE_PER_SECOND="250",
        REPORT_RECIPIENTS="ops@example.com,lead@example.com",
        DAILY_REPORT_SCHEDULE="cron(0 6 * * ? *)",
        LOG_LEVEL="WARNING",
    )

    deployed, calls = run_step(
        step_named("deploy", "aws cloudformation deploy"), tmp_path, settings, {"aws": "exit 0"}
    )

    assert deployed.returncode == 0, deployed.stderr
    assert parameter_overrides(calls[-1]) == {
        "GatewayTokenSecretArn": SECRET_ARN,
        "PermissionsBoundaryArn": BOUNDARY_ARN,
        "ApiTokensSecretArn": TOKENS_SECRET_ARN,
        "GatewayRatePerSecond": "250",
        "ReportRecipients": "ops@example.com,lead@example.com",
        "DailyReportSchedule": "cron(0 6 * * ? *)",
        "LogLevel": "WARNING",
    }


def test_every_stack_setting_can_be_set_from_a_variable(tmp_path: Path) -> None:
    """Given every stack setting set as a variable, when the deploy step runs, then each reaches
    its stack parameter, a parameter infra/resources.yaml declares."""
    settings = deploy_variables(
        GATEWAY_TOKEN_KMS_KEY_ARN="arn:aws:kms:eu-west-1:123456789012:key/mrk-0123",
        AUTH_MODE="oidc",
        API_TOKENS_KMS_KEY_ARN="arn:aws:kms:eu-west-1:123456789012:key/mrk-4567",
        OIDC_ISSUER="https://id.example.com/realms/sms",
        OIDC_AUDIENCE="sms-admin",
        OIDC_JWKS_URL="https://id.example.com/realms/sms/protocol/openid-connect/certs",
        OIDC_CLIENT_ID="sms-admin",
        OIDC_AUTHORIZATION_URL="https://id.example.com/realms/sms/protocol/openid-connect/auth",
        OIDC_TOKEN_URL="https://id.example.com/realms/sms/protocol/openid-connect/token",
        OIDC_SCOPE="openid profile",
        OIDC_ROLES_CLAIM="groups",
        OIDC_ROLE_MAP="sms-admins=admin,sms-ops=operator",
        SENDER_API_URL="https://gateway.example.com",
        GATEWAY_RATE_PER_SECOND="100",
        GATEWAY_RATE_PER_OPERATOR="916=20,903=10",
        GATEWAY_CONCURRENCY="40",
        FREQUENCY_CAP="1/24h",
        ALARM_EMAIL="oncall@example.com",
        REPORT_RECIPIENTS="ops@example.com",
        REPORT_SENDER="reports@example.com",
        DAILY_REPORT_SCHEDULE="cron(0 6 * * ? *)",
        LOG_LEVEL="DEBUG",
    )

    _, calls = run_step(
        step_named("deploy", "aws cloudformation deploy"), tmp_path, settings, {"aws": "exit 0"}
    )

    assert set(parameter_overrides(calls[-1])) == {
        "GatewayTokenSecretArn",
        "PermissionsBoundaryArn",
        "GatewayTokenKmsKeyArn",
        "AuthMode",
        "ApiTokensSecretArn",
        "ApiTokensKmsKeyArn",
        "OidcIssuer",
        "OidcAudience",
        "OidcJwksUrl",
        "OidcClientId",
        "OidcAuthorizationUrl",
        "OidcTokenUrl",
        "OidcScope",
        "OidcRolesClaim",
        "OidcRoleMap",
        "SenderApiUrl",
        "GatewayRatePerSecond",
        "GatewayRatePerOperator",
        "GatewayConcurrency",
        "FrequencyCap",
        "AlarmEmail",
        "ReportRecipients",
        "ReportSender",
        "DailyReportSchedule",
        "LogLevel",
    }
    merged = yaml.load((ROOT / "infra" / "resources.yaml").read_text(), Loader=TemplateLoader)
    assert set(parameter_overrides(calls[-1])) <= set(merged["Parameters"])


@pytest.mark.parametrize(
    "variable",
    [
        "GATEWAY_TOKEN_SECRET_ARN",
        # The deploy role could not create the function roles without the boundary anyway.
        "PERMISSIONS_BOUNDARY_ARN",
    ],
)
def test_deploy_stops_before_aws_when_a_required_variable_is_not_set(
    tmp_path: Path, variable: str
) -> None:
    """Given the variable not set, when the deploy step runs, then it fails naming the variable,
    and CloudFormation is never called."""
    deployed, calls = run_step(
        step_named("deploy", "aws cloudformation deploy"),
        tmp_path,
        deploy_variables(**{variable: ""}),
        {"aws": "exit 0"},
    )

    assert deployed.returncode != 0
    assert variable in deployed.stderr
    assert calls == []


@pytest.mark.parametrize("mode", ["", "static"], ids=["mode-unset", "static"])
def test_deploy_stops_before_aws_when_static_tokens_have_no_secret_arn(
    tmp_path: Path, mode: str
) -> None:
    """Given static tokens (AUTH_MODE unset keeps the default, static) and no
    API_TOKENS_SECRET_ARN, when the deploy step runs, then it fails naming the variable before
    calling CloudFormation, whose rules would refuse the stack anyway."""
    deployed, calls = run_step(
        step_named("deploy", "aws cloudformation deploy"),
        tmp_path,
        deploy_variables(AUTH_MODE=mode, API_TOKENS_SECRET_ARN=""),
        {"aws": "exit 0"},
    )

    assert deployed.returncode != 0
    assert "API_TOKENS_SECRET_ARN" in deployed.stderr
    assert calls == []


def test_an_oidc_deploy_needs_no_tokens_secret_and_passes_the_oidc_variables(
    tmp_path: Path,
) -> None:
    """Given AUTH_MODE=oidc with the issuer's variables and no API_TOKENS_SECRET_ARN, when the
    deploy step runs, then the stack gets the mode and the issuer, and no tokens secret."""
    issuer = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC"
    settings = deploy_variables(
        AUTH_MODE="oidc",
        API_TOKENS_SECRET_ARN="",
        OIDC_ISSUER=issuer,
        OIDC_AUDIENCE="4f1c2e7d9a",
        OIDC_JWKS_URL=f"{issuer}/.well-known/jwks.json",
    )

    deployed, calls = run_step(
        step_named("deploy", "aws cloudformation deploy"), tmp_path, settings, {"aws": "exit 0"}
    )

    assert deployed.returncode == 0, deployed.stderr
    assert parameter_overrides(calls[-1]) == {
        "GatewayTokenSecretArn": SECRET_ARN,
        "PermissionsBoundaryArn": BOUNDARY_ARN,
        "AuthMode": "oidc",
        "OidcIssuer": issuer,
        "OidcAudience": "4f1c2e7d9a",
        "OidcJwksUrl": f"{issuer}/.well-known/jwks.json",
    }


def smoke_fakes(health: str) -> dict[str, str]:
    return {
        "aws": f"echo '{ENDPOINT_URL}'",
        "curl": f"echo '{health}'",
    }


@pytest.mark.skipif(shutil.which("jq") is None, reason="the smoke step parses JSON with jq")
def test_smoke_test_calls_health_on_the_deployed_api(tmp_path: Path) -> None:
    """Given a deployed prod stack that answers its health check, when the smoke step runs, then
    it calls GET <EndpointURL>/health, passes, and records the URL for the environment."""
    smoke = step_named("deploy", "Smoke test GET /health")

    result, calls = run_step(smoke, tmp_path, {}, smoke_fakes('{"status": "ok", "stage": "prod"}'))

    assert result.returncode == 0, result.stderr
    describe, curl = calls
    assert describe[:2] == ["cloudformation", "describe-stacks"]
    assert option(describe, "--stack-name") == STACK_NAME
    assert "EndpointURL" in option(describe, "--query")
    assert curl[-1] == ENDPOINT_URL.rstrip("/") + "/health"
    assert "--fail" in curl
    assert (tmp_path / "output").read_text() == f"url={ENDPOINT_URL.rstrip('/')}\n"


@pytest.mark.skipif(shutil.which("jq") is None, reason="the smoke step parses JSON with jq")
@pytest.mark.parametrize(
    "health",
    [
        pytest.param('{"status": "ok", "stage": "dev"}', id="another-stage"),
        pytest.param('{"status": "degraded", "stage": "prod"}', id="not-ok"),
    ],
)
def test_smoke_test_fails_when_the_api_is_not_the_healthy_prod_stage(
    tmp_path: Path, health: str
) -> None:
    """Given an API whose health answer is not ok, or comes from another stage, when the smoke
    step runs, then the deploy job fails."""
    smoke = step_named("deploy", "Smoke test GET /health")

    result, _ = run_step(smoke, tmp_path, {}, smoke_fakes(health))

    assert result.returncode != 0


# ------------------------------------------------------------------ the deploy role

CI_ROLE = ROOT / "infra" / "ci-role.yaml"
ORG, REPO = "acme", "sms-campaigns"
ACCOUNT, REGION = "123456789012", "eu-west-1"
PSEUDO = {"AWS::Partition": "aws", "AWS::AccountId": ACCOUNT, "AWS::Region": REGION}
EXISTING_PROVIDER = f"arn:aws:iam::{ACCOUNT}:oidc-provider/token.actions.githubusercontent.com"
# IAM's limit on the inline policies of one role, counted without whitespace.
INLINE_POLICY_LIMIT = 10_240
READ_ONLY_PREFIXES = ("Get", "List", "Describe")


class TemplateLoader(yaml.SafeLoader):
    """Reads CloudFormation's short tags (!Sub, !If, ...) as their long form."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}


TemplateLoader.add_multi_constructor("!", _intrinsic)


def ci_role_template() -> dict[str, Any]:
    return yaml.load(CI_ROLE.read_text(), Loader=TemplateLoader)


class Deployed:
    """infra/ci-role.yaml with its parameters, intrinsics resolved as CloudFormation would.

    A resource's Ref or attribute resolves to a placeholder such as `<ArtifactBucket.Arn>`."""

    def __init__(self, **parameters: str) -> None:
        self.template = ci_role_template()
        defaults = {
            name: spec["Default"]
            for name, spec in self.template["Parameters"].items()
            if "Default" in spec
        }
        required = {"GitHubOrg": ORG, "GitHubRepo": REPO, "GatewayTokenSecretArn": SECRET_ARN}
        self.values = {**PSEUDO, **defaults, **required, **parameters}
        # In order: a condition may name those before it.
        self.conditions: dict[str, bool] = {}
        for name, body in self.template["Conditions"].items():
            self.conditions[name] = self.resolve(body)

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            items = [self.resolve(item) for item in value]
            return [item for item in items if item is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if value == {"Ref": "AWS::NoValue"}:
            return NO_VALUE
        if set(value) == {"Ref"}:
            return self.values.get(value["Ref"], f"<{value['Ref']}>")
        if set(value) in ({"Condition"}, {"Fn::Condition"}):  # !Condition reads as Fn::Condition
            return self.conditions[next(iter(value.values()))]
        if set(value) == {"Fn::Not"}:
            [condition] = self.resolve(value["Fn::Not"])
            return not condition
        if set(value) == {"Fn::And"}:
            return all(self.resolve(value["Fn::And"]))
        if set(value) == {"Fn::Or"}:
            return any(self.resolve(value["Fn::Or"]))
        if set(value) == {"Fn::Sub"}:
            text = value["Fn::Sub"]
            for name, replacement in self.values.items():
                text = text.replace("${" + name + "}", replacement)
            return text.replace("${", "<").replace("}", ">")
        if set(value) == {"Fn::GetAtt"}:
            return f"<{value['Fn::GetAtt']}>"
        if set(value) == {"Fn::Equals"}:
            left, right = self.resolve(value["Fn::Equals"])
            return left == right
        if set(value) == {"Fn::If"}:
            condition, if_true, if_false = value["Fn::If"]
            return self.resolve(if_true if self.conditions[condition] else if_false)
        resolved = {key: self.resolve(item) for key, item in value.items()}
        return {key: item for key, item in resolved.items() if item is not NO_VALUE}

    def resource(self, name: str) -> dict[str, Any]:
        return self.resolve(self.template["Resources"][name])

    def creates(self, name: str) -> bool:
        condition = self.template["Resources"][name].get("Condition")
        return condition is None or self.conditions[condition]

    def role(self) -> dict[str, Any]:
        return self.resource("DeployRole")["Properties"]

    def statements(self) -> list[dict[str, Any]]:
        return [
            statement
            for policy in self.role()["Policies"]
            for statement in policy["PolicyDocument"]["Statement"]
        ]

    def may_assume(self, subject: str, audience: str = "sts.amazonaws.com") -> bool:
        """Whether a GitHub OIDC token with this sub and aud may assume the role."""
        for statement in self.role()["AssumeRolePolicyDocument"]["Statement"]:
            if statement["Effect"] != "Allow":
                continue
            assert set(statement["Condition"]) == {"StringEquals"}, "only exact matches"
            claims = statement["Condition"]["StringEquals"]
            token = {
                "token.actions.githubusercontent.com:sub": subject,
                "token.actions.githubusercontent.com:aud": audience,
            }
            if all(token[key] in as_list(expected) for key, expected in claims.items()):
                return True
        return False

    def allows(
        self, action: str, resource: str, boundary: str | None = "<FunctionBoundary>"
    ) -> bool:
        """Whether the role's policies allow `action` on `resource`: an explicit Deny wins.

        `boundary` is the permissions boundary the request carries (iam:PermissionsBoundary):
        by default the function boundary, as the stack's deploys set it. Other conditions are not
        evaluated: an Allow under one counts as allowed, which only makes the checks stricter."""
        verdicts = [
            statement["Effect"]
            for statement in self.statements()
            if any(fnmatch.fnmatchcase(action, pattern) for pattern in as_list(statement["Action"]))
            and any(fnmatch.fnmatchcase(resource, arn) for arn in as_list(statement["Resource"]))
            and _boundary_condition_holds(statement.get("Condition", {}), boundary)
        ]
        return "Allow" in verdicts and "Deny" not in verdicts


def _boundary_condition_holds(condition: dict[str, Any], boundary: str | None) -> bool:
    key = "iam:PermissionsBoundary"
    if key in condition.get("StringEquals", {}):
        return boundary == condition["StringEquals"][key]
    if key in condition.get("StringNotEquals", {}):
        # A negated operator matches a request without the key.
        return boundary != condition["StringNotEquals"][key]
    return True


def as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


NO_VALUE = object()  # AWS::NoValue: the key or list item is left out


def arn(service: str, resource: str, region: str = REGION) -> str:
    return f"arn:aws:{service}:{region}:{ACCOUNT}:{resource}"


@pytest.mark.infra
def test_ci_role_template_passes_cfn_lint() -> None:
    """Given the deploy role's template, when cfn-lint checks it, then it reports nothing."""
    result = subprocess.run(
        [str(tool("cfn-lint")), str(CI_ROLE)], capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 0, f"cfn-lint found problems:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize(
    ("subject", "admitted"),
    [
        pytest.param(f"repo:{ORG}/{REPO}:environment:prod", True, id="prod-environment"),
        pytest.param(f"repo:{ORG}/{REPO}:ref:refs/heads/main", False, id="main-branch"),
        pytest.param(f"repo:{ORG}/{REPO}:pull_request", False, id="pull-request"),
        pytest.param(f"repo:{ORG}/{REPO}:ref:refs/heads/feature", False, id="other-branch"),
        pytest.param(f"repo:{ORG}/{REPO}:ref:refs/tags/v1", False, id="tag"),
        pytest.param(f"repo:{ORG}/{REPO}:environment:dev", False, id="other-environment"),
        pytest.param(f"repo:{ORG}/other:environment:prod", False, id="other-repository"),
        pytest.param(f"repo:fork/{REPO}:ref:refs/heads/main", False, id="fork"),
        pytest.param(f"repo:{ORG}/{REPO}:ref:refs/heads/main-x", False, id="prefix-of-main"),
    ],
)
def test_only_the_prod_environment_of_the_repository_may_assume_the_role(
    subject: str, admitted: bool
) -> None:
    """Given the role deployed for one repository, when a GitHub job presents its OIDC token,
    then only a job of the repository's protected prod environment gets a session: a job on
    main without it does not."""
    deployed = Deployed()

    assert deployed.may_assume(subject) is admitted


def test_a_token_meant_for_another_audience_is_refused() -> None:
    """Given a token of the prod environment issued for another audience, when it is presented,
    then the role refuses it."""
    deployed = Deployed()

    assert not deployed.may_assume(f"repo:{ORG}/{REPO}:environment:prod", audience="other")


def test_only_githubs_oidc_provider_is_trusted_for_web_identity() -> None:
    """Given the role, when anything but GitHub's provider asks for a session, then no statement
    of the trust policy names it."""
    [statement] = Deployed().role()["AssumeRolePolicyDocument"]["Statement"]

    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert set(statement["Principal"]) == {"Federated"}


@pytest.mark.parametrize(
    ("create", "provider"),
    [
        pytest.param("true", "<GitHubOidcProvider>", id="created-here"),
        pytest.param("false", EXISTING_PROVIDER, id="already-in-the-account"),
    ],
)
def test_the_oidc_provider_is_created_only_when_asked(create: str, provider: str) -> None:
    """Given an account with or without GitHub's OIDC provider, when the template is deployed,
    then it creates the provider only if asked and trusts the one the account then has."""
    deployed = Deployed(CreateOidcProvider=create)
    [statement] = deployed.role()["AssumeRolePolicyDocument"]["Statement"]

    assert deployed.creates("GitHubOidcProvider") is (create == "true")
    assert statement["Principal"]["Federated"] == provider


def test_the_created_provider_is_githubs_for_sts() -> None:
    """Given the provider the template creates, then it is GitHub Actions' token issuer with
    STS as the only audience."""
    provider = Deployed().resource("GitHubOidcProvider")["Properties"]

    assert provider["Url"] == "https://token.actions.githubusercontent.com"
    assert provider["ClientIdList"] == ["sts.amazonaws.com"]


def test_the_role_deploys_the_stack_the_workflow_deploys() -> None:
    """Given the workflow's stack name, when the role is deployed with its defaults, then its
    grants are for that stack."""
    deployed = Deployed()

    assert deployed.values["AppStackName"] == workflow()["env"]["STACK_NAME"] == STACK_NAME


# What each kind of resource the prod stack holds needs from the deploy role, on a name the
# stack gives it. A resource type added to infra/resources.yaml fails here until the role (and
# this map) can deploy it.
DEPLOY_NEEDS: dict[str, list[tuple[str, str]]] = {
    "AWS::Serverless::Function": [
        ("lambda:CreateFunction", arn("lambda", f"function:{STACK_NAME}-APIHandler-AbC123")),
        ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/{STACK_NAME}-ApiHandlerRole-AbC123"),
    ],
    "AWS::IAM::Role": [
        ("iam:CreateRole", f"arn:aws:iam::{ACCOUNT}:role/{STACK_NAME}-ApiHandlerRole-AbC123"),
    ],
    "AWS::IAM::Policy": [
        ("iam:PutRolePolicy", f"arn:aws:iam::{ACCOUNT}:role/{STACK_NAME}-SendMessagesRole-X"),
    ],
    "AWS::Lambda::Permission": [
        ("lambda:AddPermission", arn("lambda", f"function:{STACK_NAME}-BearerAuth-AbC123")),
    ],
    "AWS::Lambda::EventSourceMapping": [("lambda:CreateEventSourceMapping", "*")],
    "AWS::Serverless::Api": [
        ("apigateway:POST", f"arn:aws:apigateway:{REGION}::/restapis"),
        ("apigateway:PATCH", f"arn:aws:apigateway:{REGION}::/restapis/abc123/stages/api"),
    ],
    "AWS::Events::Rule": [("events:PutRule", arn("events", f"rule/{STACK_NAME}-Tick-AbC123"))],
    "AWS::DynamoDB::Table": [
        ("dynamodb:CreateTable", arn("dynamodb", f"table/{STACK_NAME}-clients")),
        ("dynamodb:UpdateTable", arn("dynamodb", f"table/{STACK_NAME}-clients")),
    ],
    "AWS::SQS::Queue": [("sqs:CreateQueue", arn("sqs", f"{STACK_NAME}-send"))],
    "AWS::CloudWatch::Alarm": [
        ("cloudwatch:PutMetricAlarm", arn("cloudwatch", f"alarm:{STACK_NAME}-SendDlq-AbC123")),
    ],
    "AWS::SNS::Topic": [("sns:CreateTopic", arn("sns", f"{STACK_NAME}-AlarmTopic-AbC123"))],
    "AWS::SNS::Subscription": [("sns:Subscribe", arn("sns", f"{STACK_NAME}-AlarmTopic-AbC123"))],
    "AWS::Logs::LogGroup": [
        ("logs:CreateLogGroup", arn("logs", f"log-group:/sms-campaigns/{STACK_NAME}/APIHandler")),
        ("logs:PutRetentionPolicy", arn("logs", f"log-group:/sms-campaigns/{STACK_NAME}/X:*")),
    ],
}
# Chalice's part of the package: functions, their roles and permissions, the API, and what SAM
# makes of their SQS and schedule events.
CHALICE_TYPES = {
    "AWS::Serverless::Function",
    "AWS::IAM::Role",
    "AWS::Lambda::Permission",
    "AWS::Lambda::EventSourceMapping",
    "AWS::Serverless::Api",
    "AWS::Events::Rule",
}


def test_the_role_can_deploy_every_kind_of_resource_of_the_stack() -> None:
    """Given the resource types of the prod stack (Chalice's and infra/resources.yaml's), when
    the workflow deploys it with the role, then the role may create each of them."""
    merged = yaml.load((ROOT / "infra" / "resources.yaml").read_text(), Loader=TemplateLoader)
    # Entries without a Type add properties to a resource of Chalice's.
    types = CHALICE_TYPES | {
        body["Type"] for body in merged["Resources"].values() if "Type" in body
    }
    deployed = Deployed()

    unknown = types - set(DEPLOY_NEEDS)
    refused = [
        (kind, action, resource)
        for kind in sorted(types & set(DEPLOY_NEEDS))
        for action, resource in DEPLOY_NEEDS[kind]
        if not deployed.allows(action, resource)
    ]

    assert not unknown, f"give infra/ci-role.yaml and DEPLOY_NEEDS the rights for: {unknown}"
    assert not refused


def test_the_role_manages_the_log_groups_the_stack_names() -> None:
    """Given the log groups of infra/resources.yaml under the workflow's stack name, when the
    role deploys the stack, then it may create each, set its retention, tag it, and delete it
    when the deploy that created it rolls back."""
    merged = yaml.load((ROOT / "infra" / "resources.yaml").read_text(), Loader=TemplateLoader)
    names = [
        body["Properties"]["LogGroupName"]["Fn::Sub"].replace("${AWS::StackName}", STACK_NAME)
        for body in merged["Resources"].values()
        if body.get("Type") == "AWS::Logs::LogGroup"
    ]
    deployed = Deployed()

    assert names
    for name in names:
        for action in (
            "logs:CreateLogGroup",
            "logs:PutRetentionPolicy",
            "logs:TagResource",
            "logs:DeleteLogGroup",
        ):
            assert deployed.allows(action, arn("logs", f"log-group:{name}")), (action, name)
            assert deployed.allows(action, arn("logs", f"log-group:{name}:*")), (action, name)


@pytest.mark.parametrize(
    ("action", "resource"),
    [
        ("iam:PutRolePolicy", f"arn:aws:iam::{ACCOUNT}:role/Admin"),
        ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/Admin"),
        ("iam:CreateUser", f"arn:aws:iam::{ACCOUNT}:user/{STACK_NAME}-x"),
        ("iam:AttachRolePolicy", f"arn:aws:iam::{ACCOUNT}:role/{STACK_NAME}-ApiHandlerRole-X"),
        ("cloudformation:ExecuteChangeSet", arn("cloudformation", "stack/other-app/1")),
        ("lambda:UpdateFunctionCode", arn("lambda", "function:other-app-Handler")),
        ("dynamodb:CreateTable", arn("dynamodb", "table/other-app-orders")),
        ("dynamodb:GetItem", arn("dynamodb", f"table/{STACK_NAME}-clients")),
        ("sqs:DeleteQueue", arn("sqs", "other-app-jobs")),
        ("s3:PutObject", "arn:aws:s3:::some-other-bucket/key"),
        ("sns:Publish", arn("sns", f"{STACK_NAME}-AlarmTopic-AbC123")),
        ("logs:DeleteLogGroup", arn("logs", "log-group:/sms-campaigns/other-app-prod/APIHandler")),
        ("logs:CreateLogGroup", arn("logs", "log-group:/aws/lambda/other-app-Handler")),
        # Lambda's own groups of the stack's functions: not the stack's, so not the deploy's.
        ("logs:DeleteLogGroup", arn("logs", f"log-group:/aws/lambda/{STACK_NAME}-APIHandler-X")),
        ("logs:PutLogEvents", arn("logs", f"log-group:/sms-campaigns/{STACK_NAME}/X:log-stream:s")),
    ],
)
def test_the_role_cannot_touch_what_the_stack_does_not_own(action: str, resource: str) -> None:
    """Given the deploy role, when it asks for another application's resources, for IAM users or
    attached policies, or for the stack's data, then IAM refuses."""
    assert not Deployed().allows(action, resource)


def test_the_role_cannot_rewrite_its_own_policies() -> None:
    """Given the IAM rights the role holds over the stack's roles, when it targets itself, then
    they do not apply: its own name lies outside the stack's prefix."""
    deployed = Deployed()
    own_arn = f"arn:aws:iam::{ACCOUNT}:role/{deployed.role()['RoleName']}"

    assert not deployed.allows("iam:PutRolePolicy", own_arn)
    assert not deployed.allows("iam:UpdateAssumeRolePolicy", own_arn)


def test_the_trust_is_exactly_the_prod_environment() -> None:
    """Given the role's trust policy, then it names one subject, exactly (StringEquals, no
    wildcard, no branch): the prod environment of the repository, which the deploy job uses."""
    [statement] = Deployed().role()["AssumeRolePolicyDocument"]["Statement"]

    assert set(statement["Condition"]) == {"StringEquals"}
    assert statement["Condition"]["StringEquals"]["token.actions.githubusercontent.com:sub"] == (
        f"repo:{ORG}/{REPO}:environment:prod"
    )
    assert job("deploy")["environment"]["name"] == "prod"


BOUNDARY = "<FunctionBoundary>"  # the boundary policy's ARN, as the deployed role names it
STACK_ROLE = f"arn:aws:iam::{ACCOUNT}:role/{STACK_NAME}-SendMessagesRole-AbC123"
# What can give a role more permissions than it has: IAM checks iam:PermissionsBoundary on each.
PERMISSION_WRITES = {
    "iam:CreateRole",
    "iam:PutRolePolicy",
    "iam:DeleteRolePolicy",
    "iam:AttachRolePolicy",
    "iam:DetachRolePolicy",
    "iam:PutRolePermissionsBoundary",
}
# Writes on a role that IAM cannot condition on its boundary, and that cannot widen a role.
NON_WIDENING_WRITES = {
    "iam:DeleteRole",
    "iam:UpdateRoleDescription",
    "iam:TagRole",
    "iam:UntagRole",
}


def _grants(deployed: Deployed, action: str, resource: str) -> list[dict[str, Any]]:
    return [
        statement
        for statement in deployed.statements()
        if statement["Effect"] == "Allow"
        and any(fnmatch.fnmatchcase(action, pattern) for pattern in as_list(statement["Action"]))
        and any(fnmatch.fnmatchcase(resource, arn) for arn in as_list(statement["Resource"]))
    ]


def _requires_the_boundary(statement: dict[str, Any]) -> bool:
    condition = statement.get("Condition", {})
    return condition.get("StringEquals", {}).get("iam:PermissionsBoundary") == BOUNDARY


def test_every_iam_write_on_the_stacks_roles_requires_the_boundary() -> None:
    """Given the IAM actions the deploy role holds on the stack's roles, when it creates a role
    or changes what a role may do, then every grant requires the function boundary on the
    role; the only other writes cannot widen a role."""
    deployed = Deployed()
    iam_writes = {
        action
        for statement in deployed.statements()
        if statement["Effect"] == "Allow"
        for action in as_list(statement["Action"])
        if action.startswith("iam:")
        and not action.split(":", 1)[1].startswith(READ_ONLY_PREFIXES)
        and any(fnmatch.fnmatchcase(STACK_ROLE, arn) for arn in as_list(statement["Resource"]))
    }

    assert {"iam:CreateRole", "iam:PutRolePolicy"} <= iam_writes
    assert iam_writes - {"iam:PassRole"} <= PERMISSION_WRITES | NON_WIDENING_WRITES
    for action in iam_writes & PERMISSION_WRITES:
        grants = _grants(deployed, action, STACK_ROLE)
        assert grants, action
        assert all(_requires_the_boundary(grant) for grant in grants), action


@pytest.mark.parametrize("boundary", [None, f"arn:aws:iam::{ACCOUNT}:policy/AdministratorAccess"])
@pytest.mark.parametrize("action", ["iam:CreateRole", "iam:PutRolePolicy", "iam:DeleteRolePolicy"])
def test_the_role_cannot_create_or_change_a_role_without_the_boundary(
    action: str, boundary: str | None
) -> None:
    """Given a role of the stack's name, when the deploy role creates it or writes its policy
    without the function boundary, or with another one, then IAM refuses; with it, it may."""
    deployed = Deployed()

    assert not deployed.allows(action, STACK_ROLE, boundary=boundary)
    assert deployed.allows(action, STACK_ROLE)


@pytest.mark.parametrize("action", sorted(PERMISSION_WRITES))
def test_a_role_without_the_boundary_is_denied_whatever_is_granted(action: str) -> None:
    """Given any grant added later, when the deploy role creates or changes a role without the
    boundary (or with another), then an explicit Deny stops it."""
    denials = [
        statement
        for statement in Deployed().statements()
        if statement["Effect"] == "Deny"
        and action in as_list(statement["Action"])
        and "*" in as_list(statement["Resource"])
    ]

    assert [d["Condition"] for d in denials] == [
        {"StringNotEquals": {"iam:PermissionsBoundary": BOUNDARY}}
    ]


@pytest.mark.parametrize(
    ("action", "resource"),
    [
        ("iam:DeleteRolePermissionsBoundary", STACK_ROLE),
        ("iam:UpdateAssumeRolePolicy", STACK_ROLE),
        ("iam:CreatePolicyVersion", BOUNDARY),
        ("iam:SetDefaultPolicyVersion", BOUNDARY),
        ("iam:DeletePolicyVersion", BOUNDARY),
        ("iam:DeletePolicy", BOUNDARY),
    ],
)
def test_the_role_can_neither_remove_nor_edit_the_boundary(action: str, resource: str) -> None:
    """Given the deploy role, when it would take a role's boundary away, change a role's trust,
    or rewrite the boundary policy, then IAM refuses, by an explicit Deny where it matters."""
    deployed = Deployed()

    assert not deployed.allows(action, resource)
    if action != "iam:UpdateAssumeRolePolicy":
        assert any(
            statement["Effect"] == "Deny"
            and action in as_list(statement["Action"])
            and any(fnmatch.fnmatchcase(resource, arn) for arn in as_list(statement["Resource"]))
            for statement in deployed.statements()
        )


@pytest.mark.parametrize(
    "action",
    [
        "iam:PutRolePolicy",
        "iam:AttachRolePolicy",
        "iam:UpdateAssumeRolePolicy",
        "iam:DeleteRolePermissionsBoundary",
        "iam:CreatePolicyVersion",
    ],
)
def test_no_statement_lets_the_role_touch_itself(action: str) -> None:
    """Given the deploy role's own ARN, when it targets itself with any IAM action, then an
    explicit Deny on iam:* stops it."""
    deployed = Deployed()
    own_arn = f"arn:aws:iam::{ACCOUNT}:role/{deployed.role()['RoleName']}"

    assert not deployed.allows(action, own_arn)
    assert any(
        statement["Effect"] == "Deny"
        and statement["Action"] == "iam:*"
        and statement["Resource"] == own_arn
        for statement in deployed.statements()
    )


def _boundary(**parameters: str) -> list[dict[str, Any]]:
    return Deployed(**parameters).resource("FunctionBoundary")["Properties"]["PolicyDocument"][
        "Statement"
    ]


def test_the_boundary_covers_every_action_the_function_policies_grant() -> None:
    """Given the function roles' policies (infra/resources.yaml and .chalice/policy.json), when
    the boundary caps them, then it still allows every action they grant: a function never
    loses a permission to the boundary."""
    merged = yaml.load((ROOT / "infra" / "resources.yaml").read_text(), Loader=TemplateLoader)
    chalice = json.loads((ROOT / ".chalice" / "policy.json").read_text())
    statements = list(chalice["Statement"])
    for body in merged["Resources"].values():
        if body.get("Type") == "AWS::IAM::Policy":
            for statement in body["Properties"]["PolicyDocument"]["Statement"]:
                if "Fn::If" in statement:
                    statements.append(statement["Fn::If"][1])
                else:
                    statements.append(statement)
    granted = {a for statement in statements for a in as_list(statement["Action"])}
    boundary = {
        action
        for statement in _boundary(
            ApiTokensSecretArn=TOKENS_SECRET_ARN,
            GatewayTokenKmsKeyArn=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/mrk-{'0' * 32}",
            ApiTokensKmsKeyArn=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/mrk-{'1' * 32}",
        )
        for action in as_list(statement["Action"])
    }

    assert granted <= boundary


def test_the_boundary_names_only_the_stacks_resources_and_its_secrets() -> None:
    """Given the boundary with both secrets and their keys, then it allows nothing on "*", no
    wildcard action, and each resource is the stack's, one of its secrets or their keys (SES
    identities aside: the stack's own grant pins sender and recipients)."""
    gateway_key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/mrk-{'0' * 32}"
    tokens_key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/mrk-{'1' * 32}"
    statements = _boundary(
        ApiTokensSecretArn=TOKENS_SECRET_ARN,
        GatewayTokenKmsKeyArn=gateway_key,
        ApiTokensKmsKeyArn=tokens_key,
    )
    own = (
        f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{STACK_NAME}-*",
        f"arn:aws:sqs:{REGION}:{ACCOUNT}:{STACK_NAME}-*",
        f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/sms-campaigns/{STACK_NAME}/*",
        f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/lambda/{STACK_NAME}-*",
        f"arn:aws:ses:{REGION}:{ACCOUNT}:identity/*",
        SECRET_ARN,
        TOKENS_SECRET_ARN,
        gateway_key,
        tokens_key,
    )

    assert all(statement["Effect"] == "Allow" for statement in statements)
    for statement in statements:
        assert all("*" not in action for action in as_list(statement["Action"])), statement
        assert set(as_list(statement["Resource"])) <= set(own), statement
    [keys] = [s for s in statements if s["Action"] == "kms:Decrypt"]
    assert keys["Resource"] == [gateway_key, tokens_key]
    assert keys["Condition"]["StringEquals"]["kms:ViaService"] == (
        f"secretsmanager.{REGION}.amazonaws.com"
    )


def test_without_customer_keys_the_boundary_allows_no_decryption() -> None:
    """Given secrets under the AWS managed key (no key parameters), then the boundary allows no
    kms:Decrypt at all, and only the gateway token's secret without API tokens."""
    statements = _boundary()

    assert not [s for s in statements if "kms:Decrypt" in as_list(s["Action"])]
    [secrets] = [s for s in statements if s["Action"] == "secretsmanager:GetSecretValue"]
    assert secrets["Resource"] == [SECRET_ARN]


def test_the_boundary_is_an_output_the_workflow_passes_to_the_stack() -> None:
    """Given the one-time setup's outputs, then the boundary's ARN is one, and the deploy step
    passes the variable holding it as the app stack's PermissionsBoundaryArn."""
    outputs = Deployed().resolve(ci_role_template()["Outputs"])
    deploy = step_named("deploy", "aws cloudformation deploy")

    assert outputs["PermissionsBoundaryArn"]["Value"] == BOUNDARY
    assert deploy["env"]["PERMISSIONS_BOUNDARY_ARN"] == "${{ vars.PERMISSIONS_BOUNDARY_ARN }}"
    assert "PermissionsBoundaryArn=${PERMISSIONS_BOUNDARY_ARN" in deploy["run"]


@pytest.mark.parametrize(
    ("action", "resource"),
    [
        ("secretsmanager:GetSecretValue", arn("secretsmanager", "secret:sms/prod/token-AbCdEf")),
        ("dynamodb:DeleteTable", arn("dynamodb", f"table/{STACK_NAME}-clients")),
        ("dynamodb:DeleteTable", arn("dynamodb", f"table/{STACK_NAME}-messages")),
    ],
)
def test_the_role_never_reads_the_token_or_deletes_the_data(action: str, resource: str) -> None:
    """Given the deploy role, when a deploy would read the gateway token or delete a table, then
    an explicit Deny stops it whatever else is granted later."""
    deployed = Deployed()
    denials = [s for s in deployed.statements() if s["Effect"] == "Deny"]

    assert not deployed.allows(action, resource)
    assert any(
        any(fnmatch.fnmatchcase(action, pattern) for pattern in as_list(s["Action"]))
        and any(fnmatch.fnmatchcase(resource, arn) for arn in as_list(s["Resource"]))
        for s in denials
    )


def test_grants_on_every_resource_are_read_only_or_conditioned() -> None:
    """Given the role's Allow statements on "*", when they are read, then each either only reads
    or is bounded by a condition."""
    broad = [
        statement
        for statement in Deployed().statements()
        if statement["Effect"] == "Allow" and "*" in as_list(statement["Resource"])
    ]

    for statement in broad:
        actions = [action.split(":", 1)[1] for action in as_list(statement["Action"])]
        read_only = all(action.startswith(READ_ONLY_PREFIXES) for action in actions)
        assert read_only or "Condition" in statement, statement["Sid"]


def test_the_roles_policies_fit_iams_size_limit() -> None:
    """Given the role's inline policies with long names filled in, when IAM stores them, then
    they fit its limit for one role."""
    deployed = Deployed(AppStackName="sms-campaigns-production-eu-west-1")
    size = sum(
        len(json.dumps(policy["PolicyDocument"], separators=(",", ":")))
        for policy in deployed.role()["Policies"]
    )

    assert size < INLINE_POLICY_LIMIT


def test_the_artifact_bucket_is_private_encrypted_versioned_and_tls_only() -> None:
    """Given the artifact bucket, then nothing in it can be made public, objects are encrypted
    at rest, overwritten artifacts stay recoverable, and plain HTTP is refused."""
    deployed = Deployed()
    bucket = deployed.resource("ArtifactBucket")
    properties = bucket["Properties"]
    [encryption] = properties["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    [tls_only] = deployed.resource("ArtifactBucketPolicy")["Properties"]["PolicyDocument"][
        "Statement"
    ]

    assert set(properties["PublicAccessBlockConfiguration"].values()) == {True}
    assert encryption["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in {"AES256", "aws:kms"}
    assert properties["VersioningConfiguration"]["Status"] == "Enabled"
    assert bucket["DeletionPolicy"] == "Retain"
    assert tls_only["Effect"] == "Deny"
    assert tls_only["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_outputs_name_the_role_and_the_bucket_the_workflow_needs() -> None:
    """Given the deployed template, when the operator reads its outputs, then they are the two
    values the prod environment's AWS_DEPLOY_ROLE_ARN and ARTIFACT_BUCKET variables take."""
    outputs = Deployed().resolve(ci_role_template()["Outputs"])

    assert outputs["RoleArn"]["Value"] == "<DeployRole.Arn>"
    assert outputs["ArtifactBucket"]["Value"] == "<ArtifactBucket>"
    text = CI.read_text()
    assert "vars.AWS_DEPLOY_ROLE_ARN" in text
    assert "vars.ARTIFACT_BUCKET" in text
