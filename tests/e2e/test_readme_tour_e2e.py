"""The README's five-minute tour, run as a reader runs it: its shell blocks, in order, against
`make run`, with the API URL and token the reader copies from the banner. So the tour cannot
drift from what the service does."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.support.local_stack import REPO_ROOT, TOKEN, running_stack

pytestmark = pytest.mark.e2e

README = REPO_ROOT / "README.md"
TOUR_HEADING = re.compile(r"^## .*\btour\b", flags=re.IGNORECASE | re.MULTILINE)
SHELL_BLOCK = re.compile(r"^```(?:sh|bash)[ \t]*\n(.*?)^```[ \t]*$", flags=re.MULTILINE | re.DOTALL)
# The two lines the reader fills in from `make run`'s banner ("API ..." and "Token ...").
BANNER_VALUES = ("API", "TOKEN")
# The stack fans out and sends within seconds; a loaded machine may take longer.
STATS_ATTEMPTS = 90


def tour_commands() -> list[str]:
    """The tour's shell commands in order: one entry per command, continuation lines joined."""
    text = README.read_text()
    start = TOUR_HEADING.search(text)
    assert start, "README.md has no tour section (a '## ... tour' heading)"
    section = text[start.end() :].split("\n## ", 1)[0]
    commands: list[str] = []
    pending = ""
    for block in SHELL_BLOCK.findall(section):
        for line in block.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line + "\n"
                continue
            commands.append(pending + line)
            pending = ""
    assert not pending, f"a command ends in a line continuation: {pending!r}"
    return commands


def with_banner_values(commands: list[str], values: dict[str, str]) -> list[str]:
    """The commands with the reader's copies of the banner's values in place."""
    filled = []
    for command in commands:
        name = command.split("=", 1)[0]
        filled.append(f"{name}={values[name]}" if name in values else command)
    for name in values:
        assigned = [command for command in commands if command.startswith(f"{name}=")]
        assert len(assigned) == 1, f"the tour should set {name} once, from the banner"
    return filled


def tour_script(commands: list[str]) -> str:
    """One bash script: each command must succeed; the last one (the mailing's statistics) is
    run again, as the README says, until no message is pending."""
    lines = ["set -euo pipefail", 'trap \'printf "\\n@@failed: %s\\n" "$BASH_COMMAND" >&2\' ERR']
    for number, command in enumerate(commands[:-1]):
        lines += [command, f"printf '\\n@@done {number}\\n'"]
    done_sending = (
        f'{sys.executable} -c \'import json, sys; s = json.load(sys.stdin)["stats"]; '
        f'sys.exit(0 if s["total"] and not s["pending"] else 1)\''
    )
    lines += [
        f"for attempt in $(seq {STATS_ATTEMPTS}); do",
        f"  out=$({commands[-1]})",
        f'  if printf "%s" "$out" | {done_sending}; then break; fi',
        "  sleep 1",
        "done",
        "printf '\\n@@stats %s\\n' \"$out\"",
    ]
    return "\n".join(lines) + "\n"


def test_the_readmes_tour_runs_against_the_local_stack(tmp_path: Path):
    # Given curl, and the tour as the README gives it
    assert shutil.which("curl"), "the tour uses curl: install it"
    commands = tour_commands()
    assert any("/stats" in command for command in commands[-1:]), "the tour should end on stats"

    # And the local stack, started as `make run` starts it
    with running_stack() as stack:
        script = tour_script(with_banner_values(commands, {"API": stack.url, "TOKEN": TOKEN}))

        # When the reader runs the tour's commands in a shell
        result = subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=os.environ.copy(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        ledger = requests.get(f"{stack.sandbox_url}/_sandbox/ledger", timeout=10).json()

    # Then every command succeeded
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the tour failed:\n{output}"
    done = re.findall(r"^@@done (\d+)$", result.stdout, flags=re.MULTILINE)
    assert done == [str(number) for number in range(len(commands) - 1)], output

    # And the mailing's statistics show every client of the tour sent, none failed
    clients = sum('"$API/clients"' in command and "POST" in command for command in commands)
    stats_line = re.search(r"^@@stats (.*)$", result.stdout, flags=re.MULTILINE | re.DOTALL)
    assert stats_line, output
    stats = json.loads(stats_line.group(1))["stats"]
    assert stats["total"] == clients == 2
    assert stats["sent"] == clients, stats
    assert stats["failed"] == stats["pending"] == 0, stats

    # And the gateway accepted one text per client, each once, its placeholders filled in
    accepted = ledger["accepted"]
    assert len({send["phone"] for send in accepted}) == len(accepted) == clients, accepted
    assert not [send["text"] for send in accepted if "{" in send["text"]], accepted
    assert ledger["duplicates"] == []
