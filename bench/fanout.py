"""Fan-out benchmark: recipients enqueued per second, next to what the emulator can take at best.

One run, one emulator process (the local stack's, with its patches):
1. N clients are written straight into DynamoDB with BatchWriteItem (setup, not measured);
2. the service's fan-out of one mailing whose filter selects all N clients: the real
   Scheduler, called as the fan-out Lambda would be (invocations of its configured timeout,
   each continuing from the checkpoint of the last) until the audience is enqueued;
3. the floor, timed apart but run in slices between the fan-out's pages so that both meet the
   same machine: N message records written with bare BatchWriteItem calls of 25, and N send
   jobs sent with bare SendMessageBatch calls (jobs per SQS message and entries per call as
   the service sends them), every request body prepared before the clock starts: the fastest
   the emulator takes that data from one sequential caller, as the fan-out is one.

It prints both rates and their ratio (target: at least 0.7 of the floor), the fan-out's AWS
calls by operation, and the peak resident memory of the emulator and of this process. Nobody
consumes the send queue: sending is measured by bench.delivery.

Usage: python -m bench.fanout [--clients 100000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.delivery import Meter, install_meter, load_clients

TARGET_RATIO = 0.7
BATCH_WRITE_ITEMS = 25  # DynamoDB's BatchWriteItem limit
SQS_BATCH_ENTRIES = 10  # SQS's SendMessageBatch limit


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size of a process (VmHWM), in MiB."""
    return _status_kb(pid, "VmHWM") / 1024


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process now (VmRSS), in MiB."""
    return _status_kb(pid, "VmRSS") / 1024


def _status_kb(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


class Run:
    """The emulator, the queues and the real services wired to them, as the local stack does."""

    def __init__(self) -> None:
        from devstack.stack import (
            CHALICE_STAGE,
            FANOUT_FUNCTION,
            PROJECT_DIR,
            LocalConfig,
            MotoEmulator,
            _function_timeout,
            ensure_queues,
            prepare_environment,
        )

        prefix = "bench-" + uuid.uuid4().hex[:6]
        environ = os.environ
        for name in ("AWS_ENDPOINT_URL", "SEND_QUEUE_URL", "SEND_DLQ_URL", "FANOUT_QUEUE_URL"):
            environ.pop(name, None)
        environ["TABLE_PREFIX"] = prefix
        environ["API_TOKENS"] = "bench-" + secrets.token_hex(16)
        config = LocalConfig()
        prepare_environment(config, environ)

        from chalice.cli.factory import CLIFactory

        chalice_config = CLIFactory(str(PROJECT_DIR)).create_config_obj(
            chalice_stage_name=CHALICE_STAGE
        )
        # As in AWS: each fan-out invocation gets the advance_mailing Lambda's timeout.
        self.invocation_seconds = _function_timeout(chalice_config, FANOUT_FUNCTION)

        self.emulator = MotoEmulator()
        self.emulator.start()
        environ["AWS_ENDPOINT_URL"] = self.emulator.endpoint_url
        try:
            self._wire(prefix, ensure_queues)
        except BaseException:
            self.emulator.stop()
            raise

    def _wire(self, prefix: str, ensure_queues: Callable[..., Any]) -> None:
        from chalicelib import aws
        from chalicelib.container import Services, use_services
        from chalicelib.settings import Settings
        from chalicelib.storage.models import create_tables

        settings = Settings.from_env(os.environ)
        self.sqs = aws.client("sqs", settings)
        self.dynamodb = aws.client("dynamodb", settings)
        queues = ensure_queues(
            self.sqs, prefix, send_visibility_timeout=60, fanout_visibility_timeout=120
        )
        # The floor's jobs go to a queue of their own, so both start from an empty queue.
        self.floor_queue = self.sqs.create_queue(
            QueueName=f"{prefix}-floor", Attributes={"VisibilityTimeout": "60"}
        )["QueueUrl"]
        self.settings = settings.model_copy(
            update={
                "send_queue_url": queues.send,
                "send_dlq_url": queues.send_dlq,
                "fanout_queue_url": queues.fanout,
            }
        )
        self.services = Services.build(self.settings)
        create_tables(self.services.models)
        use_services(self.services)

    @property
    def emulator_pid(self) -> int:
        pid = self.emulator.pid
        if pid is None:
            raise RuntimeError("the emulator is not running")
        return pid

    def stop(self) -> None:
        from chalicelib.container import use_services

        use_services(None)
        self.emulator.stop()


def client_ids(run: Run, count: int) -> list[str]:
    """Ids of seeded clients for the floor's records, read before the clock starts."""
    Client = run.services.models.Client
    ids: list[str] = []
    for shard in range(16):
        for item in Client.by_shard.query(shard, attributes_to_get=["client_id"]):
            ids.append(item.client_id)
            if len(ids) == count:
                return ids
    return ids


def floor_requests(
    run: Run, mailing_id: str, ids: list[str], first: int
) -> tuple[list[dict], list[list[dict]]]:
    """BatchWriteItem requests of message records and SendMessageBatch entry lists for the
    recipients `ids` (numbered from `first`), as the service builds them: same attributes,
    same job bodies."""
    from chalicelib.domain import MessageStatus
    from chalicelib.services.queues import JobBatch, SendJob
    from chalicelib.storage.models import status_key

    models, settings = run.services.models, run.settings
    now = datetime.now(UTC)
    table = models.Message.Meta.table_name
    numbered = list(enumerate(ids, start=first))
    records = [
        models.Message(
            mailing_id,
            client_id,
            message_id=10**12 + n,
            phone=f"79{n:09d}",
            status=MessageStatus.PENDING.value,
            status_key=status_key(mailing_id, MessageStatus.PENDING.value),
            created_at=now,
            updated_at=now,
            attempts=0,
            expires_at=now + timedelta(days=settings.message_retention_days),
        ).serialize()
        for n, client_id in numbered
    ]
    writes = [
        {table: [{"PutRequest": {"Item": item}} for item in records[i : i + BATCH_WRITE_ITEMS]]}
        for i in range(0, len(records), BATCH_WRITE_ITEMS)
    ]
    size = settings.jobs_per_message
    bodies = [
        JobBatch(
            mailing_id=mailing_id,
            jobs=[SendJob(client_id=c, message_id=10**12 + n) for n, c in numbered[i : i + size]],
            enqueued_at=now,
        ).model_dump_json()
        for i in range(0, len(numbered), size)
    ]
    sends = [
        [
            {"Id": str(k), "MessageBody": body, "DelaySeconds": 0}
            for k, body in enumerate(bodies[i : i + SQS_BATCH_ENTRIES])
        ]
        for i in range(0, len(bodies), SQS_BATCH_ENTRIES)
    ]
    return writes, sends


class ReadAhead:
    """Knows when the fan-out's read-ahead (its next audience page) is in flight, so that a
    floor slice never runs beside it: the emulator would serve both, and charge the floor."""

    def __init__(self) -> None:
        self._pending = 0
        self._changed = threading.Condition()

    def install(self) -> None:
        """Track the scheduler's reader threads from submission to completion."""
        from chalicelib.services import scheduler

        tracker = self

        class TrackedExecutor(ThreadPoolExecutor):
            def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
                tracker._change(+1)
                future = super().submit(fn, *args, **kwargs)
                future.add_done_callback(lambda _: tracker._change(-1))
                return future

        scheduler.ThreadPoolExecutor = TrackedExecutor  # type: ignore[misc]

    def _change(self, by: int) -> None:
        with self._changed:
            self._pending += by
            self._changed.notify_all()

    def wait(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._pending == 0)


class Floor:
    """The floor's calls, a slice between two fan-out pages, timed apart from the fan-out.

    Interleaved, both see the same machine: on a shared 2-core box a burst of someone else's
    work then slows both alike instead of whichever ran at the time. Each slice's requests are
    built just before it runs (not timed), so the bench holds one slice, not all of them.
    """

    def __init__(self, run: Run, count: int, meter: Meter) -> None:
        self._run, self._meter, self.count = run, meter, count
        self._ids = client_ids(run, count)
        self._mailing_id = str(uuid.uuid4())
        # One SendMessageBatch worth of recipients per slice: a page's worth, give or take.
        self._slice = run.settings.jobs_per_message * SQS_BATCH_ENTRIES
        self._next = 0
        self.write_calls = self.send_calls = 0
        self.write_seconds = self.send_seconds = 0.0

    @property
    def seconds(self) -> float:
        return self.write_seconds + self.send_seconds

    def step(self) -> None:
        """Run the next slice, if any is left."""
        if self._next >= len(self._ids):
            return
        first, self._next = self._next, self._next + self._slice
        writes, sends = floor_requests(
            self._run, self._mailing_id, self._ids[first : self._next], first
        )
        metering, self._meter.on = self._meter.on, False
        try:
            started = time.perf_counter()
            for request in writes:
                answer = self._run.dynamodb.batch_write_item(RequestItems=request)
                if answer.get("UnprocessedItems"):
                    raise RuntimeError("the emulator left items unprocessed")
            written = time.perf_counter()
            for entries in sends:
                answer = self._run.sqs.send_message_batch(
                    QueueUrl=self._run.floor_queue, Entries=entries
                )
                if answer.get("Failed"):
                    raise RuntimeError("the emulator refused send jobs")
            self.write_seconds += written - started
            self.send_seconds += time.perf_counter() - written
        finally:
            self._meter.on = metering
        self.write_calls += len(writes)
        self.send_calls += len(sends)

    def finish(self) -> dict[str, Any]:
        while self._next < len(self._ids):
            self.step()
        return {
            "recipients": self.count,
            "seconds": round(self.seconds, 2),
            "recipients_per_second": round(self.count / self.seconds, 1),
            "batch_write_item_calls": self.write_calls,
            "batch_write_item_seconds": round(self.write_seconds, 2),
            "send_message_batch_calls": self.send_calls,
            "send_message_batch_seconds": round(self.send_seconds, 2),
        }


def measure(run: Run, count: int, meter: Meter) -> tuple[dict[str, Any], dict[str, Any]]:
    """The service's fan-out of one mailing to every client, and the floor between its pages."""
    from chalicelib.domain import AudienceFilter
    from chalicelib.services.mailings import MailingFields

    services = run.services
    floor = Floor(run, count, meter)
    read_ahead = ReadAhead()
    read_ahead.install()
    now = datetime.now(UTC)
    mailing = services.mailings.create(
        MailingFields("Benchmark", now, now + timedelta(hours=2), AudienceFilter(), None)
    )
    invocations = created = 0
    meter.on = True
    started, floor_before = time.perf_counter(), floor.seconds
    while True:
        # One fan-out Lambda invocation: it stops short of its deadline and kicks itself.
        # The scheduler asks for the time left before each page: the floor's slice runs then,
        # and does not count against the invocation.
        invoked, floor_at_invocation = time.perf_counter(), floor.seconds

        def remaining(invoked: float = invoked, floor_at: float = floor_at_invocation) -> float:
            read_ahead.wait()  # counts as fan-out time: the scheduler waits for it next anyway
            floor.step()
            spent = time.perf_counter() - invoked - (floor.seconds - floor_at)
            return run.invocation_seconds - spent

        progress = services.scheduler.advance(mailing.id, remaining)
        invocations += 1
        created += progress.messages_created
        if not progress.continued:
            break
    seconds = time.perf_counter() - started - (floor.seconds - floor_before)
    meter.on = False
    floor_result = floor.finish()
    item = services.models.Mailing.get(mailing.id, consistent_read=True)
    if not item.fanout_done or int(item.count_pending) != count or created != count:
        raise RuntimeError(
            f"fan-out incomplete: done={item.fanout_done} pending={item.count_pending} "
            f"created={created} of {count}"
        )
    depth = run.sqs.get_queue_attributes(
        QueueUrl=run.settings.send_queue_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]["ApproximateNumberOfMessages"]
    expected_depth = _service_sqs_messages(count, run.settings)
    if int(depth) != expected_depth:
        raise RuntimeError(f"send queue holds {depth} SQS messages, expected {expected_depth}")
    fanout = {
        "recipients": count,
        "seconds": round(seconds, 2),
        "recipients_per_second": round(count / seconds, 1),
        "lambda_invocations": invocations,
        "sqs_messages_enqueued": expected_depth,
        "calls": {f"{s}:{op}": n for (s, op), n in sorted(meter.calls.items())},
    }
    return fanout, floor_result


def _service_sqs_messages(count: int, settings: Any) -> int:
    """SQS messages the fan-out sends: each page's jobs, `jobs_per_message` to a message."""
    page, size = settings.fanout_page_size, settings.jobs_per_message
    full, rest = divmod(count, page)
    return full * math.ceil(page / size) + math.ceil(rest / size)


def run_bench(count: int) -> dict[str, Any]:
    begun = time.perf_counter()
    meter = Meter()
    install_meter(meter)
    run = Run()
    try:
        emulator_start = rss_mb(run.emulator_pid)
        started = time.perf_counter()
        load_clients(None, count, phones=False)
        seeded = time.perf_counter() - started
        emulator_seeded = rss_mb(run.emulator_pid)
        fanout, floor = measure(run, count, meter)
        emulator_peak = peak_rss_mb(run.emulator_pid)
        # What the emulator holds at the end: the clients, two sets of message records (the
        # service's and the floor's) and both queues' SQS messages.
        records = 3 * count + fanout["sqs_messages_enqueued"]
        records += math.ceil(count / run.settings.jobs_per_message)
        memory = {
            "emulator_rss_at_start_mb": round(emulator_start, 1),
            "emulator_rss_after_seed_mb": round(emulator_seeded, 1),
            "emulator_peak_rss_mb": round(emulator_peak, 1),
            "emulator_records_held": records,
            "emulator_kib_per_record": round((emulator_peak - emulator_start) * 1024 / records, 2),
            "bench_peak_rss_mb": round(peak_rss_mb(), 1),
        }
    finally:
        run.stop()
    return {
        "date": datetime.now(UTC).date().isoformat(),
        "clients": count,
        "seed_seconds": round(seeded, 1),
        "fanout": fanout,
        "floor": floor,
        "ratio": round(fanout["recipients_per_second"] / floor["recipients_per_second"], 3),
        "target_ratio": TARGET_RATIO,
        "memory": memory,
        "total_seconds": round(time.perf_counter() - begun, 1),
    }


def report(result: dict[str, Any]) -> str:
    fanout, floor, memory = result["fanout"], result["floor"], result["memory"]
    ratio = result["ratio"]
    verdict = "ok" if ratio >= TARGET_RATIO else "MISSED"
    lines = [
        f"== fan-out of one mailing to {result['clients']} clients",
        f"clients seeded in                 {result['seed_seconds']:.1f} s (not measured)",
        f"service fan-out                   {fanout['recipients_per_second']:.0f} recipients/s "
        f"({fanout['seconds']:.1f} s, {fanout['lambda_invocations']} invocation(s))",
        f"floor (bare batch calls)          {floor['recipients_per_second']:.0f} recipients/s "
        f"({floor['seconds']:.1f} s: {floor['batch_write_item_calls']} BatchWriteItem in "
        f"{floor['batch_write_item_seconds']:.1f} s, {floor['send_message_batch_calls']} "
        f"SendMessageBatch in {floor['send_message_batch_seconds']:.1f} s)",
        f"ratio to the floor                {ratio:.2f}  (target {TARGET_RATIO}: {verdict})",
        f"peak RSS emulator / bench         {memory['emulator_peak_rss_mb']:.0f} MiB / "
        f"{memory['bench_peak_rss_mb']:.0f} MiB",
        f"  emulator                        {memory['emulator_rss_at_start_mb']:.0f} MiB at "
        f"start, {memory['emulator_rss_after_seed_mb']:.0f} MiB with the clients; "
        f"{memory['emulator_kib_per_record']:.1f} KiB per record held "
        f"({memory['emulator_records_held']} clients, messages and SQS messages)",
        f"fan-out calls                     {json.dumps(fanout['calls'])}",
        f"run time                          {result['total_seconds']:.0f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    result = run_bench(args.clients)
    print(report(result), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
