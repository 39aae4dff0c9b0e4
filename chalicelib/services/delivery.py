"""The sender: turns send jobs into gateway calls, at most one successful call per message.

Right before each call it re-checks everything that may have changed since the job was queued:
the message is still pending, the mailing exists and is not cancelled, the end has not passed,
the client exists, and it is inside the client's local send window. Then it *claims* the message
(a conditional write only one sender can win) and calls the gateway. Each outcome is written as
soon as its call returns, with the mailing's counters, in one transaction with whatever other
outcomes of the batch are waiting by then.

Right before each call it looks again: enough of the invocation and of the claim is left for the
call and its outcome's write, and the mailing (as read at most a second ago) is still running. A
conflict or a throttle from DynamoDB is retried with backoff, never read as "already done".

The one window for a double send: a sender dies (or its write fails) after the gateway accepted a
message and before the outcome is written. The claim then expires, SQS delivers the job again, and
the gateway receives the same message id a second time, so it can deduplicate. There is no other:
a job delivered twice, or two senders racing, meet at the claim.
"""

from __future__ import annotations

import contextvars
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from botocore.exceptions import BotoCoreError, ClientError
from pynamodb.exceptions import DoesNotExist

from chalicelib import logs
from chalicelib.domain import Clock, MailingStatus, MessageStatus, SendWindow, render
from chalicelib.domain.gateway_answer import GatewayResult
from chalicelib.domain.rate_limit import Kind, classify, unreachable
from chalicelib.gateway import GatewayClient
from chalicelib.metrics import MetricsWriter
from chalicelib.services.clients import ClientDirectory
from chalicelib.services.messages import MessageStore, Outcome
from chalicelib.services.queues import (
    SQS_MAX_DELAY_SECONDS,
    Delayed,
    JobBatch,
    Queues,
    SendJob,
    coalesce,
)
from chalicelib.services.throttle import (
    LATE_SECONDS,
    PROBING_REQUEUE_SECONDS,
    Admission,
    GatewayThrottle,
    RetryBudget,
    Slots,
)
from chalicelib.settings import OUTCOME_WRITE_SECONDS, Settings, SettingsError
from chalicelib.storage.errors import Retry, is_transient
from chalicelib.storage.models import Models

logger = logging.getLogger(__name__)

# How long a batch of one rate-limited operator's jobs may wait for that operator's slots; the
# rest of its jobs go back to the queue (a longer wait holds the invocation's other messages).
OPERATOR_PATIENCE_SECONDS = 1.0
# A job may arrive a moment before its fan-out page commits; wait for that this long at most.
UNCOMMITTED_GRACE = timedelta(minutes=2)
UNCOMMITTED_RETRY_SECONDS = 2
THROTTLED_SPREAD_SECONDS = 5.0
# How soon a job of a paused mailing looks again (a resume takes effect within this).
PAUSED_RECHECK_SECONDS = 10
PAUSED_MAX_RECHECK_SECONDS = 300
# How old the mailing's status may be when a gateway call starts: a cancel or a pause stops the
# calls within this, with one read of the mailing per interval for all of a batch's threads.
STATUS_MAX_AGE_SECONDS = 1.0
# A read that keeps failing transiently is tried this often before the job is put back.
READ_ATTEMPTS = 4
# Writes are retried until this close to the invocation's deadline (then the record fails and
# comes back from SQS; see the module's docstring for the one double-send window).
DEADLINE_RESERVE_SECONDS = 0.5
# Without an invocation's clock (scripts, tests): Lambda's longest timeout.
DEFAULT_BUDGET_SECONDS = 900.0
# Calls of one batch in a row with no answer at all after which its other calls wait.
UNREACHABLE_RUN = 2
# A bad-luck retry the shared budget grants, while most calls succeed, backs off from this and
# not from RETRY_BASE_SECONDS: the gateway works and the shared rate bounds the load, so a long
# wait only leaves the rate unused while the end comes closer (1, 1-2, 2-4 s, ...).
BAD_LUCK_RETRY_BASE_SECONDS = 1.0

Remaining = Callable[[], float]


def countdown(seconds: float) -> Remaining:
    """The seconds left of a budget of `seconds` starting now, like Lambda's context gives."""
    deadline = time.monotonic() + seconds
    return lambda: deadline - time.monotonic()


class JobResult(StrEnum):
    SENT = "sent"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    RETRY = "retry"
    DEFERRED = "deferred"
    THROTTLED = "throttled"  # over the gateway's shared limits: back later, no attempt spent
    DEAD_LETTERED = "dead_lettered"
    CONFIG_ERROR = "config_error"
    SKIPPED = "skipped"  # nothing to do: already done, claimed elsewhere, or stale
    OPTED_OUT = "opted_out"  # the client opted out: the message is `skipped`, never sent


_TERMINAL = frozenset(
    {
        JobResult.SENT,
        JobResult.FAILED,
        JobResult.EXPIRED,
        JobResult.CANCELLED,
        JobResult.DEAD_LETTERED,
        JobResult.OPTED_OUT,
    }
)


def _result_of(status: MessageStatus) -> JobResult:
    """What finishing a message with `status` means for its job."""
    return JobResult.OPTED_OUT if status is MessageStatus.SKIPPED else JobResult(status.value)


@dataclass
class BatchReport:
    results: list[JobResult] = field(default_factory=list)
    requeued: list[Delayed] = field(default_factory=list)
    gateway_calls: int = 0


class _Outcomes:
    """Writes a batch's outcomes as they come: the thread that brings one writes every outcome
    waiting by then in one transaction (one counter update for all), while the others wait."""

    def __init__(self, write: Callable[[list[Outcome]], set[str]]) -> None:
        self._write = write
        self._waiting: list[Outcome] = []
        self._written: dict[Outcome, bool | BaseException] = {}
        self._lock = threading.Lock()
        self._writing = threading.Lock()

    def write(self, outcome: Outcome) -> bool:
        """Whether `outcome` was recorded (False: the message was no longer ours to finish)."""
        with self._lock:
            self._waiting.append(outcome)
        with self._writing:
            with self._lock:
                group, self._waiting = self._waiting, []
            if group:
                try:
                    done = self._write(group)
                except BaseException as exc:  # every outcome of the group failed with it
                    self._written.update(dict.fromkeys(group, exc))
                    raise
                else:
                    self._written.update({o: o.client_id in done for o in group})
        written = self._written[outcome]
        if isinstance(written, BaseException):
            raise written
        return written


class _MailingWatch:
    """The batch's mailing as read at most STATUS_MAX_AGE_SECONDS ago by the invocation's clock
    (None: deleted or unusable); one read at a time for all of the batch's threads."""

    def __init__(self, read: Callable[[], Any | None], remaining: Remaining, mailing: Any) -> None:
        self._read, self._remaining = read, remaining
        self._mailing, self._read_at = mailing, remaining()
        self._lock = threading.Lock()

    def current(self) -> Any | None:
        with self._lock:
            now = self._remaining()
            if self._read_at - now >= STATUS_MAX_AGE_SECONDS:
                self._mailing, self._read_at = self._read(), now
            return self._mailing


class _Unreachable:
    """A batch's calls in a row that got no answer at all (refused or dropped connections).
    After UNREACHABLE_RUN of them the batch's other calls wait instead of following them into
    a gateway that is down (senders learn of the outage only when their batches end)."""

    def __init__(self, wait: float) -> None:
        self.wait = wait  # one delay for all of the batch's calls that wait
        self._run = 0
        self._lock = threading.Lock()

    def note(self, result: GatewayResult) -> None:
        with self._lock:
            self._run = self._run + 1 if unreachable(result) else 0

    @property
    def seems_down(self) -> bool:
        with self._lock:
            return self._run >= UNREACHABLE_RUN


@dataclass
class _Delivery:
    """What the jobs of one delivery share: the invocation's clock, the storage retries bounded
    by it, the mailing's watch and the outcome writer."""

    remaining: Remaining
    retry: Retry
    read_retry: Retry
    outcomes: _Outcomes
    watch: _MailingWatch | None = None
    # Retries of bad-luck answers this delivery may still grant (the shared retry budget).
    budget: RetryBudget | None = None
    # Whether the gateway stopped answering at all during this delivery's calls.
    gone: _Unreachable | None = None


@dataclass
class _Job:
    batch: JobBatch
    job: SendJob
    run: _Delivery
    mailing: Any
    client: Any
    # Why the mailing or the client record cannot be used (missing, corrupt, older schema).
    problem: str | None = None
    mailing_exists: bool = True
    requeue: Delayed | None = None
    called_gateway: bool = False
    result: JobResult | None = None
    # Passed every check and waits for a gateway call; its claim (and until when it holds);
    # the gateway's answer.
    ready: bool = False
    claim: str | None = None
    claim_until: datetime | None = None
    answer: GatewayResult | None = None
    # A rate-limited operator's job: its call leaves in [earliest, latest] (epoch seconds).
    operator_slot: tuple[float, float] | None = None
    # The global slot set aside for its call when the batch was admitted.
    planned: datetime | None = None


class Sender:
    """Processes the send jobs of one SQS message."""

    def __init__(
        self,
        models: Models,
        messages: MessageStore,
        clients: ClientDirectory,
        queues: Queues,
        gateway: Callable[[], GatewayClient | None],
        settings: Settings,
        clock: Clock,
        rng: random.Random | None = None,
        *,
        throttle: GatewayThrottle,
        wait_until: Callable[[datetime], None],
        metrics: MetricsWriter,
    ) -> None:
        self._models = models
        self._messages = messages
        self._clients = clients
        self._queues = queues
        self._gateway = gateway
        self._settings = settings
        self._clock = clock
        self._rng = rng or random.Random()
        self._pool: ThreadPoolExecutor | None = None
        self._throttle = throttle
        self._wait_until = wait_until
        self._metrics = metrics
        self._margin = timedelta(seconds=settings.gateway_connect_timeout)

    def deliver(self, batch: JobBatch, remaining: Remaining | None = None) -> BatchReport:
        """Process every job of `batch` within the invocation's `remaining()` seconds; raises (so
        SQS retries it) on unexpected errors and on reads that keep failing transiently."""
        run = self._delivery(batch.mailing_id, remaining or countdown(DEFAULT_BUDGET_SECONDS))
        # One read each for the mailing and the clients of the whole batch, right before its
        # calls start (milliseconds later): a deleted or cancelled mailing or a deleted client is
        # seen here. The message itself is checked by the claim's condition.
        client_ids = [job.client_id for job in batch.jobs]
        mailing, mailing_problem, mailing_exists = self._mailing_checked(
            batch.mailing_id, run.read_retry
        )
        clients, problems = (
            self._clients.find_many(client_ids, retry=run.read_retry) if mailing else ({}, {})
        )
        run.watch = _MailingWatch(
            lambda: self._mailing_checked(batch.mailing_id, run.read_retry)[0],
            run.remaining,
            mailing,
        )
        work = [
            _Job(
                batch,
                job,
                run,
                mailing,
                clients.get(job.client_id),
                mailing_problem or problems.get(job.client_id),
                mailing_exists,
            )
            for job in batch.jobs
        ]
        pool = self._pool or ThreadPoolExecutor(self._settings.sender_concurrency, "sender")
        self._pool = pool
        # First everything that needs no gateway call; then the calls, within the shared limits.
        errors = self._each(pool, self._prepare, work)
        ready = [item for item in work if item.ready]
        if ready:
            errors += self._send_all(pool, ready)
        report = BatchReport()
        for item in work:
            if item.result is not None:
                report.results.append(item.result)
            if item.requeue is not None:
                report.requeued.append(item.requeue)
            report.gateway_calls += item.called_gateway
        self._metrics.delivery(
            batch.mailing_id,
            report.results,
            [item.answer for item in work if item.answer is not None],
        )
        gateway = self._throttle.known_status()  # as this batch left it: no extra request
        if gateway is not None:
            self._metrics.gateway(batch.mailing_id, gateway)
        if errors:
            # Re-deliver the whole SQS message; finished jobs are skipped on the next pass.
            raise errors[0]
        if report.requeued:
            self._queues.enqueue(coalesce(report.requeued, self._settings.jobs_per_message))
        if (
            mailing is not None
            and mailing.fanout_done
            and any(r in _TERMINAL for r in report.results)
        ):
            self._kick_if_drained(batch.mailing_id, run.read_retry)
        return report

    def _delivery(self, mailing_id: str, remaining: Remaining) -> _Delivery:
        retry = Retry(remaining, reserve=DEADLINE_RESERVE_SECONDS, rng=self._rng)
        outcomes = _Outcomes(
            lambda group: self._messages.finish_many(mailing_id, group, self._clock(), retry=retry)
        )
        read_retry = Retry(remaining, attempts=READ_ATTEMPTS, rng=self._rng)
        return _Delivery(remaining, retry, read_retry, outcomes)

    def _call_fits(self, item: _Job) -> bool:
        """Whether a gateway call started now, and its outcome's write, end before the
        invocation's deadline and while the message's claim (if taken) holds."""
        needed = self._settings.gateway_call_seconds + OUTCOME_WRITE_SECONDS
        if item.claim_until is not None and item.claim_until - self._clock() < timedelta(
            seconds=needed
        ):
            return False
        return item.run.remaining() >= needed

    @staticmethod
    def _each(
        pool: ThreadPoolExecutor, step: Callable[..., JobResult | None], items: list, *args: Any
    ) -> list[Exception]:
        """Run `step` for every item in parallel; siblings of a failing one still finish."""
        # Each thread runs in a copy of the caller's context: its log ids, and whatever the
        # runtime tagged the invocation with.
        futures = [
            pool.submit(contextvars.copy_context().run, _with_ids, step, item, *args)
            for item in items
        ]
        errors = []
        for item, future in zip(items, futures, strict=True):
            try:
                item.result = future.result()
            except Exception as exc:  # collected: siblings still finish first
                errors.append(exc)
        return errors

    def _send_all(self, pool: ThreadPoolExecutor, ready: list[_Job]) -> list[Exception]:
        """The gateway calls of one batch: claims first, then slots and permits from the shared
        throttle, reserved when the calls are ready to leave (claims take time)."""
        paused = self._throttle.paused_for()
        if paused > 0 or not self._call_fits(ready[0]):
            # Known to be paused, or too little time left for a call: no claim, no call; back
            # later, no attempt spent.
            later = self._spread(paused)
            for item in ready:
                item.result = self._throttled(item, later, spread=False)
            return []
        # While the gateway seems down a batch makes one probe call: the others are not claimed
        # (two writes each saved, every time the backlog comes round).
        allowed, wait = self._throttle.expected_room(len(ready))
        later = self._spread(wait)
        for item in ready[allowed:]:
            item.result = self._throttled(item, later, spread=False)
        errors = self._each(pool, self._claim, ready[:allowed])
        claimed = [item for item in ready[:allowed] if item.claim is not None]
        if not claimed:
            return errors
        claimed, later, refused = self._operator_slots(pool, claimed)
        errors += refused
        if not claimed and not later:
            return errors
        admission = self._throttle.admit(len(claimed)) if claimed else Admission.none(0)
        admitted, waiting = claimed[: admission.count], claimed[admission.count :]
        # One delay for the batch's jobs that got no slot, so they go back in one SQS message: a
        # backlog split into single jobs costs a sender invocation per job once sending resumes.
        delay = self._spread(admission.retry_after)
        errors += self._each(pool, self._give_back, waiting, delay, False)
        # Calls whose operator slot comes after the batch's global slots take their own then.
        admitted += later
        permits = threading.BoundedSemaphore(max(1, admission.permits))
        slots = Slots(admission)
        if any(item.operator_slot for item in admitted):
            admitted = self._plan(admitted, slots)
        budget = ready[0].run.budget = self._throttle.retry_budget()
        ready[0].run.gone = _Unreachable(self._spread(PROBING_REQUEUE_SECONDS))
        try:
            errors += self._each(pool, self._call, admitted, permits, slots)
        finally:
            # The permits back and the answers counted in the shared window, in one write; the
            # shared speed follows them (see services/throttle.py).
            answers = [item.answer for item in admitted if item.answer is not None]
            self._throttle.release(admission, answers, budget.taken)
        return errors

    def _operator_slots(
        self, pool: ThreadPoolExecutor, claimed: list[_Job]
    ) -> tuple[list[_Job], list[_Job], list[Exception]]:
        """Slots of the rate-limited operators (GATEWAY_RATE_PER_OPERATOR) for the batch's calls,
        one write per such operator; their jobs that get none go back to the queue before they
        take a global slot or permit, no attempt spent. Returns the jobs that take the batch's
        global slots (operators' first), those that take a global slot of their own when their
        operator slot comes, and the errors.

        Operator slots fall where the batch's global slots are expected, so the sender does not
        sit waiting on a slow operator while other operators' calls are ready; a batch of one
        operator only waits for its slots up to OPERATOR_PATIENCE_SECONDS (the invocation's
        other SQS messages wait for it)."""
        by_operator: dict[str, list[_Job]] = {}
        for item in claimed:
            code = item.client.operator_code
            if self._throttle.limited(code):
                by_operator.setdefault(code, []).append(item)
        if not by_operator:
            return claimed, [], []
        start, interval = self._throttle.expected_slots()
        going: list[_Job] = []
        errors: list[Exception] = []
        for code, jobs in by_operator.items():
            alone = len(jobs) == len(claimed)
            until = start + (OPERATOR_PATIENCE_SECONDS if alone else len(claimed) * interval)
            try:
                admission = self._throttle.admit_operator(code, len(jobs), start, until, interval)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                # The operator's item is busy or throttled: its jobs come back, no attempt spent.
                logger.warning("operator %s: no slots for now", code, exc_info=True)
                admission = Admission.none(1.0)
            for index, item in enumerate(jobs[: admission.count]):
                earliest = admission.start + index * admission.interval
                item.operator_slot = (earliest, earliest + admission.late)
            going += jobs[: admission.count]
            deferred = jobs[admission.count :]
            errors += self._each(pool, self._give_back, deferred, admission.retry_after)
        going += [item for item in claimed if item.operator_slot is None and item.claim is not None]
        # The batch's global slots, as expected now that some jobs went back.
        end = start + len(going) * interval
        own = [item for item in going if item.operator_slot and item.operator_slot[0] >= end]
        return [item for item in going if item not in own], own, errors

    def _plan(self, admitted: list[_Job], slots: Slots) -> list[_Job]:
        """Set aside each call's global slot (an operator's call: one within its operator slot),
        and order the calls by it, so a sender with few threads makes them in time."""
        now = self._clock()
        for item in admitted:
            if item.operator_slot is not None:
                item.planned = slots.take_between(*item.operator_slot, now)
        for item in admitted:
            if item.operator_slot is None:
                item.planned = slots.take(now)

        def when(item: _Job) -> float:
            if item.planned is not None:
                return item.planned.timestamp()
            return item.operator_slot[0] if item.operator_slot else math.inf

        return sorted(admitted, key=when)

    def _claim(self, item: _Job) -> JobResult | None:
        """Claim the message for a call; the job's result if it cannot be claimed."""
        job, now, seconds = item.job, self._clock(), self._settings.claim_seconds
        claim = item.run.retry(
            lambda: self._messages.claim(
                item.batch.mailing_id, job.client_id, job.message_id, now, seconds
            )
        )
        item.claim = claim.claim_id
        if item.claim is None:
            return self._unclaimable(item, claim.message, now, self._log(item))
        item.claim_until = now + timedelta(seconds=seconds)
        return None

    def _give_back(self, item: _Job, wait: float = 0.0, spread: bool = True) -> JobResult:
        """A claimed message that will not be sent now: unclaimed, its attempt undone, later."""
        self._unclaim(item)
        return self._throttled(item, wait, spread=spread)

    def _unclaim(self, item: _Job) -> None:
        assert item.claim is not None
        self._release(item, item.claim, item.job.last_error, called=False)
        item.claim = None

    def _release(self, item: _Job, claim: str, error: str | None, *, called: bool = True) -> None:
        """Give the message back, still pending (see MessageStore.release)."""
        item.run.retry(
            lambda: self._messages.release(
                item.batch.mailing_id,
                item.job.client_id,
                claim,
                self._clock(),
                error,
                called=called,
            )
        )

    def _too_late_now(self, item: _Job, at: datetime) -> JobResult:
        """A claimed call that would leave too late: unclaimed, then expired or deferred."""
        self._unclaim(item)
        return self._timing(item, at) or self._throttled(item)

    def _paused(self, item: _Job) -> JobResult:
        """The mailing is paused: no claim, no call, no attempt; the job looks again later.

        Soon at first (a short pause ends within PAUSED_RECHECK_SECONDS of the resume), then
        less often the longer the pause lasts (a sixth of it, at most PAUSED_MAX_RECHECK_SECONDS),
        so a mailing paused for a day does not bounce every job through SQS every few seconds.
        """
        since = getattr(item.mailing, "updated_at", None)  # set by the pause
        paused_for = (self._clock() - since).total_seconds() if isinstance(since, datetime) else 0
        wait = min(PAUSED_MAX_RECHECK_SECONDS, max(PAUSED_RECHECK_SECONDS, paused_for / 6))
        # No random spread: the batch's jobs keep one delay, so they travel in one SQS message.
        item.requeue = self._later(item, item.job, wait)
        return JobResult.DEFERRED

    def _throttled(self, item: _Job, wait: float = 0.0, *, spread: bool = True) -> JobResult:
        """Over the shared rate or paused by back-pressure: back later, no attempt spent
        (after `wait` plus a spread, or after exactly `wait` when it is spread already)."""
        item.requeue = self._later(item, item.job, self._spread(wait) if spread else wait)
        return JobResult.THROTTLED

    def _spread(self, wait: float) -> float:
        """`wait` plus up to 5 s, so deferred batches do not all come back in the same second."""
        return wait + self._rng.uniform(0, min(max(1.0, wait), THROTTLED_SPREAD_SECONDS))

    def _kick_if_drained(self, mailing_id: str, retry: Retry) -> None:
        # The last message out: let the scheduler finish the mailing now, not at its next tick.
        try:
            fresh = self._mailing_checked(mailing_id, retry)[0]
        except Exception as exc:
            if not is_transient(exc):
                raise
            logger.info("mailing unreadable for now; its next tick finishes it", exc_info=True)
            return
        if fresh is not None and fresh.due_key is not None and int(fresh.count_pending or 0) == 0:
            self._queues.kick([mailing_id])

    def _cleared(self, item: _Job) -> JobResult | None:
        """The last look before a gateway call; None when it may go. Too little time left, or a
        mailing that cannot be read now: the claim is given back and the job comes back, no
        attempt spent. A cancelled mailing ends the message; a paused one defers it."""
        if not self._call_fits(item):
            logger.info(
                "too little time left for a gateway call; job requeued", extra=self._log(item)
            )
            return self._give_back(item)
        assert item.run.watch is not None
        try:
            mailing = item.run.watch.current()
        except Exception as exc:
            if not is_transient(exc):
                raise
            mailing = None
        if mailing is None:  # deleted, unusable or unreadable: the next delivery says which
            return self._give_back(item)
        if mailing.status == MailingStatus.CANCELLED.value:
            return self._finish(item, MessageStatus.CANCELLED, item.claim, "mailing cancelled")
        if mailing.status == MailingStatus.PAUSED.value:
            self._unclaim(item)
            item.mailing = mailing
            return self._paused(item)
        return None

    # ---------------------------------------------------------------- one job

    def _prepare(self, item: _Job) -> JobResult | None:
        """Settle a job that needs no gateway call; None if it is ready for one."""
        mailing, client = item.mailing, item.client
        if mailing is None:
            return self._fail_without_mailing(item, self._clock(), self._log(item))
        if mailing.status == MailingStatus.CANCELLED.value:
            return self._finish(item, MessageStatus.CANCELLED, None, "mailing cancelled")
        if client is None:
            ended = self._expire_if_ended(item, self._clock())
            if ended is not None:
                return ended
            logger.warning("message failed: %s", item.problem, extra=self._log(item))
            return self._finish(item, MessageStatus.FAILED, None, item.problem)
        if client.opted_out:
            return self._finish(item, MessageStatus.SKIPPED, None, "client opted out")
        if mailing.status == MailingStatus.PAUSED.value:
            return self._expire_if_ended(item, self._clock()) or self._paused(item)
        timing = self._timing(item, self._clock())
        if timing is not None:
            return timing
        problem = self._gateway_problem()
        if problem is not None:
            logger.error("%s: nothing can be sent; retried later", problem, extra=self._log(item))
            item.requeue = self._later(item, item.job, self._settings.auth_retry_seconds)
            return JobResult.CONFIG_ERROR
        item.ready = True
        return None

    def _gateway_problem(self) -> str | None:
        """Why no gateway call can be made (not configured, token unreadable), if so."""
        try:
            gateway = self._gateway()
        except (SettingsError, ClientError, BotoCoreError) as exc:
            # A missing secret, a denied read, a malformed value: fixed by an operator, after
            # which the next retry reads it again (failures are not cached).
            return f"the gateway token cannot be read ({exc})"
        if gateway is None:
            return "SENDER_API_URL / SENDER_API_TOKEN (or SENDER_API_TOKEN_SECRET_ID) are not set"
        return None

    def _timing(self, item: _Job, now: datetime) -> JobResult | None:
        """Expire a job too close to the end, defer one outside the client's send window."""
        mailing, job, margin = item.mailing, item.job, self._margin
        ended = self._expire_if_ended(item, now)
        if ended is not None:
            return ended
        if self._in_window(item, now):
            return None
        window, zone = _window_of(mailing), ZoneInfo(item.client.timezone)
        assert window is not None  # outside a window there is one
        opens = window.next_opening(now + margin, zone)
        if opens + margin >= mailing.end_at:
            reason = "send window does not open again before the end"
            return self._finish(item, MessageStatus.EXPIRED, None, reason)
        wait = max(1, math.ceil((opens - now).total_seconds()))
        item.requeue = self._later(item, job, wait)
        return JobResult.DEFERRED

    def _expire_if_ended(self, item: _Job, now: datetime) -> JobResult | None:
        # Starting a call this close to the end could reach the gateway after it.
        if now + self._margin < item.mailing.end_at:
            return None
        error = item.job.last_error or "end passed"
        return self._finish(item, MessageStatus.EXPIRED, None, error)

    def _too_late(self, item: _Job, at: datetime) -> bool:
        """Whether a call leaving `at` could pass the end or the client's window."""
        return at + self._margin >= item.mailing.end_at or not self._in_window(item, at)

    def _in_window(self, item: _Job, at: datetime) -> bool:
        """Both ends of a call starting `at` are inside the client's window (if any): it must
        not slip past the close."""
        window = _window_of(item.mailing)
        if window is None:
            return True
        zone = ZoneInfo(item.client.timezone)
        return all(window.contains(t.astimezone(zone).timetz()) for t in (at, at + self._margin))

    def _call(self, item: _Job, permits: threading.BoundedSemaphore, slots: Slots) -> JobResult:
        """Take a permit and the next free slot, call the gateway on the slot.

        The time checks are made for the admission's last slot, so they hold whichever slot the
        call gets. A call whose batch's slots all passed while it waited for a permit takes one
        fresh slot; without one it goes back to SQS instead of leaving late.
        """
        job, log, claim = item.job, self._log(item), item.claim
        assert claim is not None
        last = max(self._clock(), slots.last)
        if item.operator_slot is not None:
            last = max(last, _moment(item.operator_slot[1]))
        if self._too_late(item, last):
            return self._too_late_now(item, last)
        if item.operator_slot is not None and item.planned is None:
            # Its slot comes after the batch's: wait for it without holding a permit.
            self._wait_until(_moment(item.operator_slot[0]))
        with permits:
            slot = self._slot(item, slots)
            extra = None
            if slot is None:
                extra = self._fresh_slot(item)
                fresh = extra.slot(0) if extra.count else None
                if fresh is None or self._too_late(item, fresh):
                    self._throttle.release(extra)
                    if fresh is None:
                        return self._give_back(item, extra.retry_after)
                    return self._too_late_now(item, fresh)
                slot = fresh
            try:
                self._wait_until(slot)
                stop = self._cleared(item)
                if stop is not None:
                    return stop
                gone = item.run.gone
                if gone is not None and gone.seems_down:
                    return self._give_back(item, gone.wait, False)
                gateway = self._gateway()
                assert gateway is not None  # checked by _prepare
                item.called_gateway = True
                result = gateway.send(job.message_id, item.client.phone, _text_for(item))
                if gone is not None:
                    gone.note(result)
            finally:
                if extra is not None:
                    self._throttle.release(extra)
        item.answer = result
        return self._record(item, claim, result, item.mailing, log)

    def _slot(self, item: _Job, slots: Slots) -> datetime | None:
        """The call's global slot: the one set aside for it, unless already past (then, for a
        call of an operator without a limit, the next free one)."""
        now = self._clock()
        if item.planned is not None and item.planned.timestamp() >= now.timestamp() - LATE_SECONDS:
            return item.planned
        if item.operator_slot is not None:
            earliest, latest = item.operator_slot
            return slots.take_between(earliest, latest, now)
        return slots.take(now)

    def _fresh_slot(self, item: _Job) -> Admission:
        """One global slot of its own for a call whose batch's slots did not serve; an operator's
        call asks for it at its operator slot and takes it only within that slot's bound."""
        if item.operator_slot is None:
            return self._throttle.admit(1)
        earliest, latest = item.operator_slot
        self._wait_until(_moment(earliest))
        extra = self._throttle.admit(1)
        if extra.count and extra.start > latest:
            # Leaving later could bring it closer than the operator's rate to its next call.
            self._throttle.release(extra)
            return Admission.none(max(extra.retry_after, extra.start - earliest))
        return extra

    def _record(
        self, item: _Job, claim: str, result: GatewayResult, mailing: Any, log: dict
    ) -> JobResult:
        job, now = item.job, self._clock()
        verdict = classify(result, now.timestamp())
        if verdict.kind is Kind.SENT:
            return self._finish(item, MessageStatus.SENT, claim, None)
        if verdict.kind is Kind.REJECTED:
            return self._finish(item, MessageStatus.FAILED, claim, result.detail)
        if verdict.kind is Kind.UNAUTHORIZED:
            logger.error(
                "the SMS gateway refused our credentials; check SENDER_API_TOKEN (or the "
                "secret SENDER_API_TOKEN_SECRET_ID names). Messages stay pending and are retried.",
                extra=log,
            )
            # A rotated secret is read again for the retry, with no redeploy.
            forget = getattr(self._gateway, "cache_clear", None)
            if forget is not None:
                forget()
            self._release(item, claim, result.detail)
            item.requeue = self._later(item, job, self._settings.auth_retry_seconds)
            return JobResult.CONFIG_ERROR
        if verdict.kind is Kind.OVERLOAD:
            # The gateway asks us to slow down: the throttle does; this is no failed attempt.
            self._release(item, claim, result.detail, called=False)
            wait = verdict.retry_after
            delay = (self._settings.gateway_pause_seconds if wait is None else wait) + (
                self._rng.uniform(0, 1)
            )
            item.requeue = self._later(item, job, delay)
            return JobResult.THROTTLED
        # Bad luck: retried with backoff while the shared retry budget allows (retries cannot
        # multiply the load); beyond it, deferred as long without spending an attempt.
        budget = item.run.budget
        if budget is not None and not budget.take():
            delay = self._backoff(job.retries + 1)
            if now + timedelta(seconds=delay) >= mailing.end_at:
                return self._finish(item, MessageStatus.EXPIRED, claim, result.detail)
            self._release(item, claim, result.detail, called=False)
            item.requeue = self._later(item, job, delay)
            return JobResult.DEFERRED
        retries = job.retries + 1
        if retries >= self._settings.max_attempts:
            error = f"gave up after {retries} attempts: {result.detail}"
            self._queues.dead_letter(
                JobBatch(
                    mailing_id=item.batch.mailing_id,
                    jobs=[job.model_copy(update={"retries": retries, "last_error": error})],
                    enqueued_at=item.batch.enqueued_at,
                ),
                error,
            )
            self._finish(item, MessageStatus.FAILED, claim, error)
            return JobResult.DEAD_LETTERED
        # Unless the gateway is known to work, back off as configured: during an outage (or
        # before the window knows) a short backoff would spend the attempts within minutes.
        delay = self._backoff(
            retries, BAD_LUCK_RETRY_BASE_SECONDS if self._throttle.gateway_works() else None
        )
        if now + timedelta(seconds=delay) >= mailing.end_at:
            return self._finish(item, MessageStatus.EXPIRED, claim, result.detail)
        logger.warning(
            "attempt %d of %d failed; retry in %d s: %s",
            retries,
            self._settings.max_attempts,
            delay,
            result.detail,
            extra={**log, "attempt": retries, "retry_in_seconds": delay},
        )
        self._release(item, claim, result.detail)
        retry = job.model_copy(update={"retries": retries, "last_error": result.detail})
        item.requeue = self._later(item, retry, delay)
        return JobResult.RETRY

    # ---------------------------------------------------------------- helpers

    def _finish(
        self, item: _Job, status: MessageStatus, claim: str | None, error: str | None
    ) -> JobResult:
        # Written at once, with whatever other outcomes of the batch are waiting (see _Outcomes).
        done = item.run.outcomes.write(
            Outcome(item.job.client_id, status, claim, error, item.job.message_id)
        )
        return _result_of(status) if done else JobResult.SKIPPED

    @staticmethod
    def _log(item: _Job) -> dict[str, Any]:
        job = item.job
        return {
            "mailing_id": item.batch.mailing_id,
            "client_id": job.client_id,
            "message_id": job.message_id,
        }

    def _later(self, item: _Job, job: SendJob, delay_seconds: float) -> Delayed:
        batch = JobBatch(
            mailing_id=item.batch.mailing_id, jobs=[job], enqueued_at=item.batch.enqueued_at
        )
        return Delayed(batch, min(SQS_MAX_DELAY_SECONDS, max(0, math.ceil(delay_seconds))))

    def _backoff(self, retries: int, base: float | None = None) -> float:
        """Exponential backoff with jitter: spreads retries so a recovering gateway is not hit;
        from `base` when that is below RETRY_BASE_SECONDS."""
        first = self._settings.retry_base_seconds
        if base is not None:
            first = min(first, base)
        ceiling = min(self._settings.retry_max_seconds, first * 2 ** (retries - 1))
        return max(1.0, self._rng.uniform(ceiling / 2, ceiling))

    def _unclaimable(self, item: _Job, message: Any | None, now: Any, log: dict) -> JobResult:
        """Why the claim failed, from the `message` its condition saw: done or claimed
        elsewhere (skip), or not committed yet (wait)."""
        job = item.job
        if message is None and now - item.batch.enqueued_at < UNCOMMITTED_GRACE:
            # Fan-out enqueues a page's jobs a moment before it commits the page.
            logger.debug("message not committed yet; job comes back shortly", extra=log)
            item.requeue = self._later(item, job, UNCOMMITTED_RETRY_SECONDS)
            return JobResult.DEFERRED
        if message is None or int(message.message_id) != job.message_id:
            logger.info("job for a message that does not exist; dropped", extra=log)
        return JobResult.SKIPPED

    def _mailing_checked(
        self, mailing_id: str, retry: Retry
    ) -> tuple[Any | None, str | None, bool]:
        """The mailing if it can be sent from, else None and what is wrong with its record;
        and whether the record exists at all. A read that keeps failing transiently raises."""
        try:
            item = retry(lambda: self._models.Mailing.get(mailing_id, consistent_read=True))
        except DoesNotExist:
            return None, "mailing record is missing (the mailing was deleted)", False
        except Exception as exc:
            if is_transient(exc):
                raise
            # Corrupt beyond deserialising.
            return None, f"mailing record is unreadable: {type(exc).__name__}", True
        problem = mailing_record_problem(item)
        return (None, problem, True) if problem else (item, None, True)

    def _fail_without_mailing(self, item: _Job, now: Any, log: dict) -> JobResult:
        """The mailing record is missing or unusable: the message fails with the reason."""
        logger.warning("message failed: %s", item.problem, extra=log)
        if item.mailing_exists:
            try:
                # Its counters may still be intact: keep them in step if they are.
                return self._finish(item, MessageStatus.FAILED, None, item.problem)
            except Exception as exc:
                if is_transient(exc):
                    raise
                logger.warning("mailing counters unusable too", exc_info=True, extra=log)
        # No usable mailing, so no counters: the message alone records why it was not sent.
        failed = item.run.retry(
            lambda: self._messages.fail_orphan(
                item.batch.mailing_id, item.job.client_id, item.problem or "", now
            )
        )
        return JobResult.FAILED if failed else JobResult.SKIPPED


def _moment(epoch_seconds: float) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, UTC)


def _text_for(item: _Job) -> str:
    """The mailing's text with the client's fields in its placeholders."""
    client = item.client
    values = {
        "phone": client.phone,
        "operator_code": client.operator_code,
        "tag": client.tag,
        "timezone": client.timezone,
    }
    return render(item.mailing.text, values)


def _with_ids(step: Callable[..., JobResult | None], item: _Job, *args: Any) -> JobResult | None:
    """Run one job's step with its ids on every log line, the gateway client's included."""
    with logs.bind(**Sender._log(item), attempt=item.job.retries + 1):
        return step(item, *args)


def mailing_record_problem(item: Any) -> str | None:
    """What makes a stored mailing unusable for sending (corrupt or older schema), if anything."""
    problems = []
    if not isinstance(item.text, str) or not item.text.strip():
        problems.append("text is missing")
    if not isinstance(item.start_at, datetime) or not isinstance(item.end_at, datetime):
        problems.append("start or end is missing")
    if item.status not in {status.value for status in MailingStatus}:
        problems.append("status is unknown")
    window = (item.window_start, item.window_end)
    if window != (None, None) and not all(
        isinstance(m, (int, float)) and 0 <= m < 24 * 60 for m in window
    ):
        problems.append("send window is invalid")
    if not problems:
        return None
    return "mailing record is corrupt: " + ", ".join(problems)


def _window_of(mailing: Any) -> SendWindow | None:
    if mailing.window_start is None or mailing.window_end is None:
        return None
    return SendWindow.from_minutes(int(mailing.window_start), int(mailing.window_end))
