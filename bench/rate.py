"""Gateway rate benchmark: every sender together stays within the configured rate, and backs off.

It starts the local stack as `bench.delivery` does, with `GATEWAY_RATE_PER_SECOND` set and
several sender "Lambdas" (SQS pollers) sharing that limit through the emulator's DynamoDB; it
loads the clients, sends one mailing to all of them through the sandbox gateway (20 ± 10 ms a
call) and reads when each request reached the gateway. Three phases:

1. steady: sending at the configured rate;
2. pressure: the gateway answers 429 to every call for a while;
3. recovery: the faults stop; how long until sending is back at 90% of the limit.

It prints the densest one-second window the gateway saw over the whole run next to the limit
(the promise: never above it, within 10%), the mean rate while steady, the calls per second the
gateway got while it said 429, the recovery time, and that no message was lost or failed.

Usage: python -m bench.rate [--rate 40] [--clients 2400] [--pollers 8]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import requests

from bench.delivery import load_clients, start_stack

PHASE_STEADY_SECONDS = 20.0
PHASE_PRESSURE_SECONDS = 10.0
TOLERANCE = 1.10


def densest_window(times: list[float], width: float = 1.0) -> int:
    """The most requests that arrived within any `width` seconds."""
    ordered = sorted(times)
    return max(
        (bisect.bisect_left(ordered, t + width) - i for i, t in enumerate(ordered)), default=0
    )


def _densest_start(times: list[float], width: float = 1.0) -> float:
    ordered = sorted(times)
    counts = [bisect.bisect_left(ordered, t + width) - i for i, t in enumerate(ordered)]
    return ordered[counts.index(max(counts))] if ordered else 0.0


def first_recovered(times: list[float], after: float, rate: float) -> float | None:
    """When the first one-second window after `after` held 90% of `rate` requests."""
    ordered = sorted(t for t in times if t >= after)
    for i, t in enumerate(ordered):
        if bisect.bisect_left(ordered, t + 1.0) - i >= 0.9 * rate:
            return t + 1.0 - after
    return None


def run(rate: float, clients: int, pollers: int) -> dict[str, Any]:
    from devstack.gateway import FaultProfile

    os.environ.update(
        {
            "GATEWAY_RATE_PER_SECOND": str(rate),
            "SENDER_POLLERS": str(pollers),
            "GATEWAY_PAUSE_SECONDS": "2",
            "GATEWAY_MAX_PAUSE_SECONDS": "8",
        }
    )
    healthy = FaultProfile(latency_seconds=0.02, latency_jitter_seconds=0.01, seed=5)
    stack = start_stack()
    try:
        stack.sandbox.set_profile(healthy)
        load_clients(stack, clients, phones=False)
        headers = api_headers()
        mailing_id = create_mailing(stack.api_url, headers, "Rate benchmark", 3600)
        first = wait_for_first_request(stack.sandbox)
        time.sleep(max(0.0, first + PHASE_STEADY_SECONDS - time.time()))
        pressure_from = time.time()
        stack.sandbox.set_profile(FaultProfile(rate_limit_rate=1.0, seed=5))
        time.sleep(PHASE_PRESSURE_SECONDS)
        recovered_from = time.time()
        stack.sandbox.set_profile(healthy)
        stack.sandbox.wait_for_accepted(clients, timeout=clients / rate * 4 + 120)
        finished = time.time()
        stats = final_stats(stack.api_url, mailing_id, headers)
        received = stack.sandbox.requests()
        duplicates = stack.sandbox.duplicates()
    finally:
        stack.stop()

    times = [r.received_at for r in received]
    steady = [t for t in times if first + 2.0 <= t < pressure_from]
    pressured = [t for t in times if pressure_from + 0.5 <= t < recovered_from]
    densest = densest_window(times)
    return {
        "configured_rate": rate,
        "sender_pollers": pollers,
        "clients": clients,
        "densest_one_second_window": densest,
        "densest_over_limit": round(densest / rate, 3),
        "densest_window_starts_at_second": round(_densest_start(times) - first, 1),
        "phases_seconds": {
            "pressure_from": round(pressure_from - first, 1),
            "recovered_from": round(recovered_from - first, 1),
        },
        "within_tolerance": densest <= rate * TOLERANCE,
        "steady_mean_rate": round(len(steady) / (pressure_from - first - 2.0), 1),
        "calls_per_second_during_429s": round(
            len(pressured) / (recovered_from - pressure_from - 0.5), 2
        ),
        "recovery_seconds": _round(first_recovered(times, recovered_from, rate)),
        "total_seconds": round(finished - first, 1),
        "gateway_requests": len(times),
        "gateway_duplicates": len(duplicates),
        "final_stats": stats,
    }


def api_headers() -> dict[str, str]:
    """The bearer header of the stack `start_stack` started."""
    return {"Authorization": f"Bearer {os.environ['API_TOKENS']}"}


def create_mailing(api_url: str, headers: dict[str, str], text: str, seconds: float) -> str:
    """Create a mailing to every client, starting now and ending `seconds` from now; its id."""
    now = datetime.now(UTC)
    response = requests.post(
        f"{api_url}/mailings",
        json={
            "text": text,
            "start_at": now.isoformat(),
            "end_at": (now + timedelta(seconds=seconds)).isoformat(),
        },
        headers=headers,
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["id"]


def wait_for_first_request(sandbox: Any, timeout: float = 120) -> float:
    """When the gateway got its first request (wall clock); RuntimeError after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        received = sandbox.requests()
        if received:
            return received[0].received_at
        time.sleep(0.05)
    raise RuntimeError("the gateway got no request within two minutes")


def final_stats(
    api_url: str, mailing_id: str, headers: dict[str, str], timeout: float = 120
) -> dict[str, Any]:
    """The mailing's counters once it is finished, or as they are after `timeout` s."""
    deadline = time.time() + timeout
    while True:
        stats = requests.get(
            f"{api_url}/mailings/{mailing_id}/stats?limit=1", headers=headers, timeout=30
        ).json()
        if stats["status"] == "finished" or time.time() > deadline:
            return stats["stats"]
        time.sleep(0.5)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def report(result: dict[str, Any]) -> str:
    verdict = "ok" if result["within_tolerance"] else "EXCEEDED"
    return "\n".join(
        [
            f"== gateway rate limit {result['configured_rate']:g}/s, "
            f"{result['sender_pollers']} concurrent senders, {result['clients']} clients",
            f"densest 1 s window at the gateway  {result['densest_one_second_window']} calls "
            f"= {result['densest_over_limit']:.2f} x the limit (at most {TOLERANCE:.2f}: "
            f"{verdict}; at {result['densest_window_starts_at_second']} s, "
            f"phases {result['phases_seconds']})",
            f"mean rate while steady             {result['steady_mean_rate']} calls/s",
            f"calls/s while the gateway said 429 {result['calls_per_second_during_429s']}",
            f"back to 90% of the limit after     {result['recovery_seconds']} s",
            f"all accepted after                 {result['total_seconds']} s "
            f"({result['gateway_requests']} requests)",
            f"final stats                        {result['final_stats']}",
            f"gateway duplicates                 {result['gateway_duplicates']}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--clients", type=int, default=2400)
    parser.add_argument("--pollers", type=int, default=8)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    result = run(args.rate, args.clients, args.pollers)
    print(report(result), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    ok = result["within_tolerance"] and result["final_stats"].get("sent") == args.clients
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
