"""Delivery benchmark: cost per message and delivery rate through the local stack.

For each audience size it starts the whole local stack in this process (embedded moto server,
sandbox gateway without faults, scheduler tick, Lambda-style SQS pollers), loads the clients
straight into DynamoDB, then creates one mailing over HTTP and measures:

- how long `POST /mailings` takes, and the time until the gateway has accepted every message;
- every AWS API call made by the service (botocore, so boto3 and PynamoDB alike) by operation,
  per delivered message, and the write/read capacity units they consume;
- Lambda invocations and their duration, per delivered message;
- the AWS cost per million messages at on-demand prices (table below).

Usage: python -m bench.delivery [--sizes 2000,10000]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import botocore.client
import requests

# us-east-1 on-demand list prices (per unit), as published by AWS.
PRICES_CHECKED = "2026-11-22"
PRICES = {
    "dynamodb_wru": 0.625 / 1e6,  # per write request unit
    "dynamodb_rru": 0.125 / 1e6,  # per read request unit
    "sqs_request": 0.40 / 1e6,  # standard queue, per request (64 KB chunk)
    "lambda_request": 0.20 / 1e6,
    "lambda_gb_second": 0.0000166667,  # x86
}
# Issue 16's acceptance list, per delivered message (the $ figure per million messages).
TARGETS = {
    "dynamodb_wru": 3.0,
    "dynamodb_requests": 1.5,
    "sqs_requests": 0.3,
    "lambda_invocations": 0.15,
    "usd_per_million": 2.0,
}
TARGET_SECONDS_2000 = 20.0
# The Django + Celery peer (maskalev/sms-sender), measured beside this stack on the same 2-core
# machine with the same fake gateway (issue 16): 2,000 clients, POST until all were accepted.
PEER = {"name": "Django + Celery peer", "deliver_2000_s": (47.3, 54.4), "post_s": (21.6, 22.2)}
LAMBDA_MEMORY_GB = 0.5  # .chalice/config.json: 512 MB
DYNAMODB_WRITES = {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"}
DYNAMODB_READS = {"GetItem", "BatchGetItem", "Query", "Scan", "TransactGetItems"}
ITEM_KB = 1.0  # every item of this service is well under 1 KB: one unit per item


@dataclass
class Meter:
    """Counts AWS calls, and the capacity units of each DynamoDB operation, as they are made."""

    calls: Counter = field(default_factory=Counter)  # (service, operation) -> requests
    wru: Counter = field(default_factory=Counter)  # DynamoDB operation -> write units
    rru: Counter = field(default_factory=Counter)  # DynamoDB operation -> read units
    lambda_invocations: Counter = field(default_factory=Counter)
    lambda_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    on: bool = False

    def record(self, service: str, operation: str, params: dict, result: dict) -> None:
        if not self.on:
            return
        wru, rru = _capacity(service, operation, params, result)
        with self.lock:
            self.calls[(service, operation)] += 1
            if service == "dynamodb":
                self.wru[operation] += wru
                self.rru[operation] += rru

    def invocation(self, name: str, seconds: float) -> None:
        if not self.on:
            return
        with self.lock:
            self.lambda_invocations[name] += 1
            self.lambda_seconds += seconds


def _capacity(service: str, operation: str, params: dict, result: dict) -> tuple[float, float]:
    """Write and read request units of one DynamoDB call (items here are all under 1 KB)."""
    if service != "dynamodb":
        return 0.0, 0.0
    consistent = 1.0 if params.get("ConsistentRead") else 0.5
    if operation == "TransactWriteItems":
        # Transactional writes cost two units per item, plus index writes (below).
        items = params["TransactItems"]
        return 2.0 * len(items) + sum(_index_writes(i) for i in items), 0.0
    if operation in ("PutItem", "UpdateItem", "DeleteItem"):
        return 1.0 + _index_writes({operation.removesuffix("Item"): params}), 0.0
    if operation == "BatchWriteItem":
        return float(sum(len(v) for v in params["RequestItems"].values())), 0.0
    if operation == "GetItem":
        return 0.0, consistent
    if operation == "BatchGetItem":
        found = sum(len(v) for v in result.get("Responses", {}).values())
        consistent = (
            1.0 if any(v.get("ConsistentRead") for v in params["RequestItems"].values()) else 0.5
        )
        return 0.0, max(1, found) * consistent
    if operation in ("Query", "Scan"):
        # Billed by data read: ~0.3 KB per item here, rounded up to 4 KB per call.
        kb = result.get("ScannedCount", result.get("Count", 0)) * 0.3
        return 0.0, max(1.0, -(-kb // 4)) * consistent
    return 0.0, 0.0


def _index_writes(item: dict) -> float:
    """Index entries a write adds or removes. by_status is sparse: only messages in a final
    status are in it, so a message enters it (one put) when it leaves `pending` and leaves it
    (one delete) when retry-failed makes it pending again; a new pending message is not in it.
    The mailing leaves the due index when it finishes."""
    put = item.get("Put")
    if put and put["TableName"].endswith("-messages"):
        return 1.0 if "status_key" in put.get("Item", {}) else 0.0
    update = item.get("Update")
    if update:
        expression = update.get("UpdateExpression", "")
        names = update.get("ExpressionAttributeNames", {})
        if "status_key" in names.values():
            return 1.0
        if "due_key" in names.values() and "REMOVE" in expression:
            return 1.0
    return 0.0


def install_meter(meter: Meter) -> None:
    original = botocore.client.BaseClient._make_api_call

    def metered(self: Any, operation_name: str, api_params: dict) -> Any:
        result = original(self, operation_name, api_params)
        meter.record(self.meta.service_model.service_name, operation_name, api_params, result)
        return result

    botocore.client.BaseClient._make_api_call = metered


def wrap_lambdas(meter: Meter) -> None:
    from devstack import stack

    original = stack._lambda_handler

    def metered_handler(app: Any, name: str) -> Any:
        handler = original(app, name)

        def run(event: Any, context: Any) -> Any:
            started = time.perf_counter()
            try:
                return handler(event, context)
            finally:
                meter.invocation(name, time.perf_counter() - started)

        return run

    stack._lambda_handler = metered_handler


def start_stack() -> Any:
    from devstack.stack import LocalConfig, LocalStack, configure_logging

    os.environ.update(
        {
            "PORT": "0",
            "API_TOKENS": "bench-" + secrets.token_hex(16),
            "SCHEDULER_INTERVAL_SECONDS": "60",  # as in AWS: the kick starts the mailing
            "TABLE_PREFIX": "bench-" + uuid.uuid4().hex[:6],
            # Five INFO lines a message would bury the figures; their cost (about 42 us a line)
            # is measured on its own (docs/operations.md, "Logs").
            "LOG_LEVEL": os.environ.get("LOG_LEVEL") or "WARNING",
        }
    )
    for name in list(os.environ):
        if name.startswith("SANDBOX_") or name in ("AWS_ENDPOINT_URL", "SENDER_API_URL"):
            del os.environ[name]
    configure_logging()
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    stack = LocalStack(LocalConfig.from_env(os.environ), environ=os.environ)
    stack.start()
    return stack


def client_phone(n: int) -> str:
    """The phone number `load_clients` gives its `n`th client."""
    return f"79{n:09d}"


def load_clients(stack: Any, count: int, *, phones: bool = True) -> None:
    """Put `count` clients straight into DynamoDB (setup, not measured).

    Without `phones` the phone-number claims are left out: nothing but the API reads them.
    """
    from chalicelib.container import services
    from chalicelib.domain.client import Client, ClientFields
    from chalicelib.storage.clients import client_record

    models = services().models
    now = datetime.now(UTC)
    with models.Client.batch_write() as clients, models.Phone.batch_write() as claims:
        for n in range(count):
            phone = client_phone(n)
            fields = ClientFields(phone, None, "", "UTC")
            item = client_record(models.Client, Client.new(str(uuid.uuid4()), fields, now))
            clients.save(item)
            if phones:
                claims.save(models.Phone(phone, client_id=item.client_id))


def run_size(count: int) -> dict[str, Any]:
    meter = Meter()
    install_meter(meter)
    wrap_lambdas(meter)
    stack = start_stack()
    try:
        load_clients(stack, count)
        token = os.environ["API_TOKENS"]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        now = datetime.now(UTC)
        payload = {
            "text": "Benchmark",
            "start_at": now.isoformat(),
            "end_at": (now + timedelta(hours=2)).isoformat(),
        }
        emulator = next((c for c in stack.components if c.name == "aws-emulator"), None)
        emulator_pid = emulator.pid if emulator is not None else None
        cpu_started = (time.process_time(), cpu_seconds(emulator_pid))
        meter.on = True
        started = time.perf_counter()
        response = requests.post(
            f"{stack.api_url}/mailings", json=payload, headers=headers, timeout=30
        )
        post_seconds = time.perf_counter() - started
        response.raise_for_status()
        meter.invocation("api_handler", post_seconds)
        mailing_id = response.json()["id"]
        stack.sandbox.wait_for_accepted(count, timeout=1800)
        delivered_seconds = time.perf_counter() - started
        # Let the run finish its bookkeeping (the mailing turns finished) before counting.
        deadline = time.time() + 120
        while time.time() < deadline:
            stats = requests.get(
                f"{stack.api_url}/mailings/{mailing_id}/stats?limit=1", headers=headers, timeout=30
            ).json()
            if stats["status"] == "finished":
                break
            time.sleep(0.5)
        meter.on = False
        cpu = {
            "stack": time.process_time() - cpu_started[0],
            "emulator": cpu_seconds(emulator_pid) - cpu_started[1],
        }
        duplicates = stack.sandbox.duplicates()
    finally:
        stack.stop()
    return summarize(count, meter, post_seconds, delivered_seconds, stats, duplicates) | {
        "cpu_ms_per_message": {k: round(v / count * 1000, 3) for k, v in cpu.items()}
    }


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) a process has used so far; 0 when it is not known."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(
    count: int, meter: Meter, post_s: float, delivered_s: float, stats: dict, duplicates: list
) -> dict[str, Any]:
    """Everything per delivered message, and the $ per million messages it costs, itemised."""
    dynamodb = {op: n for (service, op), n in meter.calls.items() if service == "dynamodb"}
    sqs = {op: n for (service, op), n in meter.calls.items() if service == "sqs"}
    # Locally the scheduler ticked for nothing; in AWS one tick a minute runs regardless of load.
    lambdas = sum(n for name, n in meter.lambda_invocations.items() if name != "scheduler_tick")
    wru, rru = sum(meter.wru.values()), sum(meter.rru.values())
    cost = {
        "dynamodb_writes": wru * PRICES["dynamodb_wru"],
        "dynamodb_reads": rru * PRICES["dynamodb_rru"],
        "sqs": sum(sqs.values()) * PRICES["sqs_request"],
        "lambda_requests": lambdas * PRICES["lambda_request"],
        "lambda_duration": meter.lambda_seconds * LAMBDA_MEMORY_GB * PRICES["lambda_gb_second"],
    }
    per_million = {k: v / count * 1e6 for k, v in cost.items()}
    by_operation = {
        op: {
            "requests": round(n / count, 4),
            "wru": round(meter.wru[op] / count, 4),
            "rru": round(meter.rru[op] / count, 4),
        }
        for op, n in sorted(dynamodb.items())
    }
    return {
        "clients": count,
        "post_seconds": round(post_s, 3),
        "all_accepted_seconds": round(delivered_s, 2),
        "messages_per_second": round(count / delivered_s, 1),
        "final_stats": stats["stats"],
        "gateway_duplicates": len(duplicates),
        "per_message": {
            "dynamodb_requests": round(sum(dynamodb.values()) / count, 4),
            "dynamodb_write_requests": round(
                sum(n for op, n in dynamodb.items() if op in DYNAMODB_WRITES) / count, 4
            ),
            "dynamodb_read_requests": round(
                sum(n for op, n in dynamodb.items() if op in DYNAMODB_READS) / count, 4
            ),
            "dynamodb_wru": round(wru / count, 4),
            "dynamodb_rru": round(rru / count, 4),
            "sqs_requests": round(sum(sqs.values()) / count, 4),
            "lambda_invocations": round(lambdas / count, 4),
            "lambda_seconds_local": round(meter.lambda_seconds / count, 4),
        },
        "dynamodb_by_operation": by_operation,
        "sqs_by_operation": {op: round(n / count, 4) for op, n in sorted(sqs.items())},
        "usd_per_million": {k: round(v, 4) for k, v in per_million.items()}
        | {"total": round(sum(per_million.values()), 4)},
        "prices": {"checked": PRICES_CHECKED} | PRICES,
        "calls": {f"{s}:{op}": n for (s, op), n in sorted(meter.calls.items())},
    }


def _mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def report(result: dict[str, Any]) -> str:
    """The benchmark's printout for one audience size: every figure with its target."""
    p, usd, count = result["per_message"], result["usd_per_million"], result["clients"]
    cpu = result.get("cpu_ms_per_message", {})
    seconds = result["all_accepted_seconds"]
    lines = [
        f"== {count:,} clients",
        f"POST /mailings answered in          {result['post_seconds'] * 1000:.0f} ms",
        f"all messages accepted after         {seconds:.1f} s "
        f"({result['messages_per_second']} msg/s)",
    ]
    if count == PEER_CLIENTS:
        low, high = PEER["deliver_2000_s"]
        post_low, post_high = PEER["post_s"]
        lines += [
            f"  {PEER['name']}: {low:.1f}-{high:.1f} s (POST {post_low}-{post_high} s), "
            f"here {low / seconds:.2f}-{high / seconds:.2f}x as fast",
            f"  target <= {TARGET_SECONDS_2000:.0f} s (2.5x the peer)   "
            + _mark(seconds <= TARGET_SECONDS_2000),
        ]
    lines += [
        f"final stats                         {result['final_stats']}",
        f"CPU per message, ms (stack / emulator) {cpu.get('stack', 0):.2f} / "
        f"{cpu.get('emulator', 0):.2f}  (the emulator's one core bounds the rate)",
        f"gateway duplicates                  {result['gateway_duplicates']}",
        "per delivered message:",
        f"  DynamoDB write units              {p['dynamodb_wru']:.3f}  (target <= "
        f"{TARGETS['dynamodb_wru']:g}) {_mark(p['dynamodb_wru'] <= TARGETS['dynamodb_wru'])}",
        f"  DynamoDB read units               {p['dynamodb_rru']:.3f}",
        f"  DynamoDB requests                 {p['dynamodb_requests']:.3f}  (target <= "
        f"{TARGETS['dynamodb_requests']:g}) "
        + _mark(p["dynamodb_requests"] <= TARGETS["dynamodb_requests"]),
        f"    {'operation':<28}{'requests':>9}{'WRU':>9}{'RRU':>9}",
    ]
    for op, figures in result["dynamodb_by_operation"].items():
        lines.append(
            f"    {op:<28}{figures['requests']:>9.3f}{figures['wru']:>9.3f}{figures['rru']:>9.3f}"
        )
    sqs_ops = ", ".join(f"{op} {n:.3f}" for op, n in result["sqs_by_operation"].items())
    lines += [
        f"  SQS requests                      {p['sqs_requests']:.3f}  ({sqs_ops}; target <= "
        f"{TARGETS['sqs_requests']:g}) " + _mark(p["sqs_requests"] <= TARGETS["sqs_requests"]),
        f"  Lambda invocations                {p['lambda_invocations']:.4f}  (target <= "
        f"{TARGETS['lambda_invocations']:g}) "
        + _mark(p["lambda_invocations"] <= TARGETS["lambda_invocations"]),
        f"  Lambda seconds (local, an upper bound) {p['lambda_seconds_local']:.4f}",
        f"$ per million messages (on demand, us-east-1, prices checked {PRICES_CHECKED}):",
    ]
    for item, price in _PRICE_LINES:
        lines.append(f"  {item:<34}{usd[_KEY_OF[item]]:>8.3f}   {price}")
    lines.append(
        f"  {'total':<34}{usd['total']:>8.3f}   (target < {TARGETS['usd_per_million']:g}) "
        + _mark(usd["total"] < TARGETS["usd_per_million"])
    )
    return "\n".join(lines)


PEER_CLIENTS = 2000
_PRICE_LINES = [
    ("DynamoDB writes", f"${PRICES['dynamodb_wru'] * 1e6:g} per million write units"),
    ("DynamoDB reads", f"${PRICES['dynamodb_rru'] * 1e6:g} per million read units"),
    ("SQS", f"${PRICES['sqs_request'] * 1e6:g} per million requests"),
    ("Lambda requests", f"${PRICES['lambda_request'] * 1e6:g} per million invocations"),
    (
        "Lambda duration",
        f"${PRICES['lambda_gb_second']:.10f}".rstrip("0")
        + f" per GB-second, {LAMBDA_MEMORY_GB * 1024:.0f} MB",
    ),
]
_KEY_OF = {
    "DynamoDB writes": "dynamodb_writes",
    "DynamoDB reads": "dynamodb_reads",
    "SQS": "sqs",
    "Lambda requests": "lambda_requests",
    "Lambda duration": "lambda_duration",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,10000")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single:
        print("RESULT " + json.dumps(run_size(args.single)), flush=True)
        return 0
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        # One process per size: a fresh emulator, and Chalice's local server can start only
        # once per process.
        run = subprocess.run(
            [sys.executable, "-m", "bench.delivery", "--single", str(size)],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            print(run.stdout[-2000:], run.stderr[-4000:], file=sys.stderr)
            return 1
        result = json.loads(lines[-1].removeprefix("RESULT "))
        results.append(result)
        print(report(result), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
