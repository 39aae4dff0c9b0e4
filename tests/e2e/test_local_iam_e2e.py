"""IAM in the local stack, end to end: one action missing from one role fails where AWS would.

The stack (`make run`) reads each function's role from LOCAL_IAM_TEMPLATE, here a copy of
infra/resources.yaml with one action taken out of the sender's grant on the messages table.
"""

from __future__ import annotations

import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.local_stack import (
    READY_TIMEOUT_SECONDS,
    REPO_ROOT,
    Stack,
    free_port,
    iam_denials,
    running_stack,
    stack_command,
    stack_environment,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PHONES = ("79001110001", "79001110002")
TIMEOUT_SECONDS = 30
POLL_SECONDS = 0.2
# The sender's grant on the messages table, as infra/resources.yaml writes it.
SENDER_MESSAGES_GRANT = """\
          - Sid: Messages
            Effect: Allow
            Action:
              - dynamodb:BatchGetItem
              - dynamodb:UpdateItem
            Resource:
              - !GetAtt MessagesTable.Arn
"""


def template_without(tmp_path: Path, action: str) -> Path:
    """A copy of infra/resources.yaml whose sender may not do `action` on the messages table."""
    text = (ROOT / "infra" / "resources.yaml").read_text()
    assert text.count(SENDER_MESSAGES_GRANT) == 1, "the sender's messages grant has changed"
    changed = text.replace(
        SENDER_MESSAGES_GRANT, SENDER_MESSAGES_GRANT.replace(f"              - {action}\n", "")
    )
    assert changed != text
    copy = tmp_path / "resources.yaml"
    copy.write_text(changed)
    return copy


def start_mailing(stack: Stack) -> tuple[requests.Session, str]:
    """Given two clients and a mailing to them that starts now."""
    http = requests.Session()
    http.headers.update(stack.auth)
    for phone in PHONES:
        response = http.post(f"{stack.url}/clients", json={"phone": phone}, timeout=5)
        assert response.status_code == 201, response.text
    start = datetime.now(UTC)
    body = {
        "text": "Spring sale",
        "start_at": start.isoformat(),
        "end_at": (start + timedelta(hours=1)).isoformat(),
    }
    response = http.post(f"{stack.url}/mailings", json=body, timeout=5)
    assert response.status_code == 201, response.text
    return http, response.json()["id"]


def counts(http: requests.Session, stack: Stack, mailing_id: str) -> dict[str, Any]:
    response = http.get(f"{stack.url}/mailings/{mailing_id}/stats", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()["stats"]


def accepted(stack: Stack) -> list[dict[str, Any]]:
    ledger = requests.get(f"{stack.sandbox_url}/_sandbox/ledger", timeout=5).json()
    # The ledger holds phones as numbers.
    return [send for send in ledger["accepted"] if str(send["phone"]) in PHONES]


def test_a_sender_role_without_update_item_leaves_the_messages_pending(tmp_path: Path) -> None:
    # Given the stack running with the sender's role lacking dynamodb:UpdateItem on the
    # messages table (the claim, before any gateway call, is an UpdateItem)
    template = template_without(tmp_path, "dynamodb:UpdateItem")
    with running_stack(
        iam_denials_expected=True,
        LOCAL_IAM_TEMPLATE=str(template),
        SCHEDULER_INTERVAL_SECONDS="1",
    ) as stack:
        # When a mailing to two clients starts
        http, mailing_id = start_mailing(stack)
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while not iam_denials(stack.running.output) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        # Then the stack logs the denial AWS would answer, naming the role, action and table
        [first, *_] = iam_denials(stack.running.output) or [f"none:\n{stack.running.output}"]
        assert "assumed-role/SendMessagesRole/send_messages" in first
        assert "dynamodb:UpdateItem on resource: arn:aws:dynamodb:" in first
        assert "table/sms-local-messages" in first
        # And no SMS went out: both messages are still pending
        assert accepted(stack) == []
        stats = counts(http, stack, mailing_id)
        assert (stats["total"], stats["pending"], stats["sent"]) == (2, 2, 0), stats


def test_the_unchanged_roles_deliver_the_same_mailing() -> None:
    # Given the stack with the template's roles as they are
    with running_stack(SCHEDULER_INTERVAL_SECONDS="1") as stack:
        # When the same mailing starts
        http, mailing_id = start_mailing(stack)
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while counts(http, stack, mailing_id)["sent"] < len(PHONES):
            assert time.monotonic() < deadline, counts(http, stack, mailing_id)
            time.sleep(POLL_SECONDS)
        # Then both SMS went out once, and (running_stack checks) nothing was denied
        assert sorted(str(send["phone"]) for send in accepted(stack)) == sorted(PHONES)
        # And the banner says IAM was enforced, and with which template
        assert "IAM      enforced: each function under its role in" in stack.running.output


def test_a_policy_the_stack_cannot_evaluate_stops_it_at_start_up(tmp_path: Path) -> None:
    # Given a template whose sender grant names a value the checker cannot resolve
    text = (ROOT / "infra" / "resources.yaml").read_text()
    broken = tmp_path / "resources.yaml"
    broken.write_text(
        text.replace(
            "              - !GetAtt SendDeadLetterQueue.Arn\n",
            "              - !ImportValue shared-dead-letters\n",
            1,
        )
    )
    # When the stack starts with it
    result = subprocess.run(
        stack_command(),
        cwd=REPO_ROOT,
        env=stack_environment(PORT=str(free_port()), LOCAL_IAM_TEMPLATE=str(broken)),
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_SECONDS,
        start_new_session=True,
    )
    # Then it refuses to run unchecked: exit code 2, naming the template and the intrinsic
    assert result.returncode == 2, result.stderr
    assert f"error: LOCAL_IAM: {broken}: cannot evaluate Fn::ImportValue" in result.stderr
    assert "READY" not in result.stdout


def test_with_local_iam_off_every_call_is_allowed_as_by_the_bare_emulator(tmp_path: Path) -> None:
    # Given the stack with IAM off, and a template whose sender could not claim a message
    template = template_without(tmp_path, "dynamodb:UpdateItem")
    with running_stack(
        LOCAL_IAM="off", LOCAL_IAM_TEMPLATE=str(template), SCHEDULER_INTERVAL_SECONDS="1"
    ) as stack:
        # When a mailing starts
        http, mailing_id = start_mailing(stack)
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while counts(http, stack, mailing_id)["sent"] < len(PHONES):
            assert time.monotonic() < deadline, counts(http, stack, mailing_id)
            time.sleep(POLL_SECONDS)
        # Then it is delivered (nothing is checked), and the banner says so
        assert "IAM      off (LOCAL_IAM=off)" in stack.running.output
