"""CSV import benchmark: 100,000 rows through the local stack, then the same file again.

It starts the whole local stack in this process (embedded moto server in its own process, the
API over HTTP, the import queue and its two pollers running the import_clients Lambda as SQS
would), generates a file of N new clients (every column, a few tags and time zones, an
operator code given on a third of the rows) and:

1. posts it to `POST /clients/import` and measures the answer's time (API Gateway gives up
   after 29 s) and the time until the import is `done` (rows/s);
2. posts the same file again (every row `unchanged`, no client written) with tracemalloc on
   while the POST runs, for the Python heap the API handler needs for a file that large (the
   workers in this process start on the first chunks meanwhile; their share is small here).

It counts the service's AWS calls by operation (botocore, so boto3 and PynamoDB alike) and the
DynamoDB writes per row, and prints the peak resident memory of this process (the API and the
workers) and of the emulator.

Usage: python -m bench.import_clients [--rows 100000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from typing import Any

import requests

from bench.delivery import Meter, install_meter, start_stack, wrap_lambdas
from bench.fanout import peak_rss_mb

API_GATEWAY_TIMEOUT_SECONDS = 29
TAGS = ("", "vip", "new", "loyal", "b2b")
ZONES = ("UTC", "Europe/Moscow", "Asia/Vladivostok", "Asia/Yekaterinburg")


def generate(rows: int) -> bytes:
    lines = ["phone,operator_code,tag,timezone"]
    for n in range(rows):
        code = f"{900 + n % 50}" if n % 3 == 0 else ""
        lines.append(f"79{n:09d},{code},{TAGS[n % len(TAGS)]},{ZONES[n % len(ZONES)]}")
    return ("\n".join(lines) + "\n").encode()


def run_import(
    stack: Any, headers: dict[str, str], data: bytes, *, trace: bool = False
) -> dict[str, Any]:
    """POST the file, wait until the import ends; the timings and the final import. With
    `trace`, the Python heap's peak while the POST ran (tracemalloc slows it down)."""
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    response = requests.post(
        f"{stack.api_url}/clients/import",
        data=data,
        headers={**headers, "Content-Type": "text/csv"},
        timeout=120,
    )
    answered = time.perf_counter() - started
    heap_peak = 0
    if trace:
        heap_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if response.status_code != 202:
        raise SystemExit(f"POST /clients/import answered {response.status_code}: {response.text}")
    location = f"{stack.api_url}{response.headers['Location']}"
    while True:
        job = requests.get(location, headers=headers, timeout=30).json()
        if job["status"] in ("done", "failed"):
            break
        time.sleep(0.25)
    finished = time.perf_counter() - started
    return {"post_seconds": answered, "total_seconds": finished, "job": job, "heap": heap_peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    data = generate(args.rows)
    meter = Meter()
    install_meter(meter)
    wrap_lambdas(meter)
    os.environ["IMPORT_MAX_ROWS"] = str(max(args.rows, 100_000))
    stack = start_stack()
    try:
        headers = {"Authorization": f"Bearer {os.environ['API_TOKENS']}"}
        emulator = next(c for c in stack.components if c.name == "aws-emulator")
        meter.on = True
        first = run_import(stack, headers, data)
        meter.on = False
        calls_first = dict(meter.calls)
        invocations = dict(meter.lambda_invocations)
        lambda_seconds = meter.lambda_seconds

        meter.calls.clear()
        meter.on = True
        again = run_import(stack, headers, data, trace=True)
        meter.on = False
        calls_again = dict(meter.calls)
        memory = {
            "bench_peak_rss_mb": round(peak_rss_mb(), 1),
            "emulator_peak_rss_mb": round(peak_rss_mb(emulator.pid), 1),
            "post_python_heap_peak_mb": round(again["heap"] / 2**20, 1),
        }
    finally:
        stack.stop()

    result = {
        "rows": args.rows,
        "file_bytes": len(data),
        "post_seconds": round(first["post_seconds"], 2),
        "import_seconds": round(first["total_seconds"], 1),
        "rows_per_second": round(args.rows / first["total_seconds"]),
        "job": {k: first["job"][k] for k in ("status", "created", "updated", "failed")},
        "reimport_post_seconds": round(again["post_seconds"], 2),
        "reimport_seconds": round(again["total_seconds"], 1),
        "reimport_job": {k: again["job"][k] for k in ("status", "unchanged", "created")},
        "lambda_invocations": invocations,
        "lambda_seconds": round(lambda_seconds, 1),
        "calls": {f"{s}:{o}": n for (s, o), n in sorted(calls_first.items())},
        "reimport_calls": {f"{s}:{o}": n for (s, o), n in sorted(calls_again.items())},
        "memory": memory,
    }
    print(report(result), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    ok = (
        result["job"]["status"] == "done"
        and result["job"]["created"] == args.rows
        and result["post_seconds"] < API_GATEWAY_TIMEOUT_SECONDS
    )
    return 0 if ok else 1


def report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    writes = {
        k: v
        for k, v in result["reimport_calls"].items()
        if k.split(":")[1] in ("PutItem", "UpdateItem", "BatchWriteItem", "TransactWriteItems")
    }
    within = "✅" if result["post_seconds"] < API_GATEWAY_TIMEOUT_SECONDS else "❌"
    return "\n".join(
        [
            f"CSV import of {rows:,} rows ({result['file_bytes'] / 2**20:.1f} MiB)",
            f"POST /clients/import answered in   {result['post_seconds']} s "
            f"(API Gateway's limit {API_GATEWAY_TIMEOUT_SECONDS} s {within})",
            f"import done after                  {result['import_seconds']} s "
            f"({result['rows_per_second']:,} rows/s): {result['job']}",
            f"same file again: answered in       {result['reimport_post_seconds']} s, done after "
            f"{result['reimport_seconds']} s: {result['reimport_job']}",
            f"  its writes (imports table only)  {writes}",
            f"Lambda invocations                 {result['lambda_invocations']} "
            f"({result['lambda_seconds']} s)",
            f"AWS calls, first import            {result['calls']}",
            f"peak RSS bench / emulator          {result['memory']['bench_peak_rss_mb']} MiB / "
            f"{result['memory']['emulator_peak_rss_mb']} MiB",
            f"Python heap peak while a POST ran  "
            f"{result['memory']['post_python_heap_peak_mb']} MiB "
            "(the API handler, and the workers' first chunks)",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
