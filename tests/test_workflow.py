"""The CI workflow in .github/workflows: actionlint accepts it, and it lints, tests and packages
every pull request and deploys the prod stage from main with a role assumed through OIDC.

The deploy job's shell steps run here too, against stand-ins for `aws` and `curl` that record
how they were called, so what they would send to AWS is asserted, not only what they look like.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
CI = WORKFLOWS / "ci.yml"
BIN = Path(sys.executable).parent
STACK_NAME = "sms-campaigns-prod"
SECRET_ARN = (
    "arn:aws:secretsmanager:eu-west-1:123456789012:secret:sms-campaigns/prod/gateway-token-AbCdEf"
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
        "GATEWAY_TOKEN_KMS_KEY_ARN": "",
        "SENDER_API_URL": "",
        "GATEWAY_RATE_PER_SECOND": "",
        "GATEWAY_CONCURRENCY": "",
        "ALARM_EMAIL": "",
        "REPORT_RECIPIENTS": "",
        "REPORT_SENDER": "",
        "DAILY_REPORT_SCHEDULE": "",
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
    )

    deployed, calls = run_step(
        step_named("deploy", "aws cloudformation deploy"), tmp_path, settings, {"aws": "exit 0"}
    )

    assert deployed.returncode == 0, deployed.stderr
    assert parameter_overrides(calls[-1]) == {
        "GatewayTokenSecretArn": SECRET_ARN,
        "GatewayRatePerSecond": "250",
        "ReportRecipients": "ops@example.com,lead@example.com",
        "DailyReportSchedule": "cron(0 6 * * ? *)",
    }


def test_every_stack_setting_can_be_set_from_a_variable(tmp_path: Path) -> None:
    """Given every stack setting set as a variable, when the deploy step runs, then each reaches
    its stack parameter."""
    settings = deploy_variables(
        GATEWAY_TOKEN_KMS_KEY_ARN="arn:aws:kms:eu-west-1:123456789012:key/mrk-0123",
        SENDER_API_URL="https://gateway.example.com",
        GATEWAY_RATE_PER_SECOND="100",
        GATEWAY_CONCURRENCY="40",
        ALARM_EMAIL="oncall@example.com",
        REPORT_RECIPIENTS="ops@example.com",
        REPORT_SENDER="reports@example.com",
        DAILY_REPORT_SCHEDULE="cron(0 6 * * ? *)",
    )

    _, calls = run_step(
        step_named("deploy", "aws cloudformation deploy"), tmp_path, settings, {"aws": "exit 0"}
    )

    assert set(parameter_overrides(calls[-1])) == {
        "GatewayTokenSecretArn",
        "GatewayTokenKmsKeyArn",
        "SenderApiUrl",
        "GatewayRatePerSecond",
        "GatewayConcurrency",
        "AlarmEmail",
        "ReportRecipients",
        "ReportSender",
        "DailyReportSchedule",
    }


def test_deploy_stops_before_aws_when_the_token_secret_arn_is_not_set(tmp_path: Path) -> None:
    """Given no GATEWAY_TOKEN_SECRET_ARN variable, when the deploy step runs, then it fails
    naming the variable, and CloudFormation is never called."""
    deployed, calls = run_step(
        step_named("deploy", "aws cloudformation deploy"),
        tmp_path,
        deploy_variables(GATEWAY_TOKEN_SECRET_ARN=""),
        {"aws": "exit 0"},
    )

    assert deployed.returncode != 0
    assert "GATEWAY_TOKEN_SECRET_ARN" in deployed.stderr
    assert calls == []


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
