"""The sender: turns send jobs into gateway calls, at most one successful call per message.

Right before each call it re-checks everything that may have changed since the job was queued:
the message is still pending, the mailing exists and is not cancelled, the end has not passed,
the client exists, and it is inside the client's local send window. Then it *claims* the message
(a conditional write only one sender can win) and calls the gateway. Each outcome is written
once the batch's other calls are back (or after at most OUTCOME_LINGER_SECONDS), with the
mailing's counters, in one transaction with whatever other outcomes of the batch are waiting.

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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib import logs
from chalicelib.domain import (
    Client,
    Clock,
    MailingStatus,
    Message,
    MessageStatus,
)
from chalicelib.domain.delivery_policy import (
    Decision,
    DeliveryAttempt,
    DeliveryRules,
    Step,
    after_answer,
    before_call,
    paused,
    timing,
    too_late,
)
from chalicelib.domain.gateway_answer import GatewayResult
from chalicelib.domain.mailing import Mailing, MailingNotFound, MailingUnusable, SkipReason
from chalicelib.domain.rate_limit import Kind, classify, unreachable
from chalicelib.domain.text import personalise
from chalicelib.domain.timeline import grid_of
from chalicelib.domain.variants import in_holdout, variant_of
from chalicelib.gateway import GatewayClient
from chalicelib.metrics import MetricsWriter
from chalicelib.services.clients import ClientDirectory
from chalicelib.services.frequency_cap import CapContended, FrequencyCapGuard
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
from chalicelib.storage.mailings import MailingRepository

logger = logging.getLogger(__name__)

# How long a batch of one rate-limited operator's jobs may wait for that operator's slots; the
# rest of its jobs go back to the queue (a longer wait holds the invocation's other messages).
OPERATOR_PATIENCE_SECONDS = 1.0
# A job may arrive a moment before its fan-out page commits; wait for that this long at most.
UNCOMMITTED_GRACE = timedelta(minutes=2)
UNCOMMITTED_RETRY_SECONDS = 2
THROTTLED_SPREAD_SECONDS = 5.0
# How old the mailing's status may be when a gateway call starts: a cancel or a pause stops the
# calls within this, with one read of the mailing per interval for all of a batch's threads.
STATUS_MAX_AGE_SECONDS = 1.0
# A read that keeps failing transiently is tried this often before the job is put back.
READ_ATTEMPTS = 4
# Writes are retried until this close to the invocation's deadline (then the record fails and
# comes back from SQS; see the module's docstring for the one double-send window).
DEADLINE_RESERVE_SECONDS = 0.5
# How long an outcome may wait for the batch's other calls, to share their transaction.
OUTCOME_LINGER_SECONDS = 0.25
# Without an invocation's clock (scripts, tests): Lambda's longest timeout.
DEFAULT_BUDGET_SECONDS = 900.0
# Calls of one batch in a row with no answer at all after which its other calls wait.
UNREACHABLE_RUN = 2

Remaining = Callable[[], float]
LogIds = dict[str, str | int | float]  # a log line's ids (mailing, client, message) and more
Step_ = TypeVar("Step_")


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
    FREQUENCY_CAPPED = "frequency_capped"  # over FREQUENCY_CAP: `skipped`, never sent
    HELD_OUT = "held_out"  # in the mailing's holdout group: `skipped`, never sent


_TERMINAL = frozenset(
    {
        JobResult.SENT,
        JobResult.FAILED,
        JobResult.EXPIRED,
        JobResult.CANCELLED,
        JobResult.DEAD_LETTERED,
        JobResult.OPTED_OUT,
        JobResult.FREQUENCY_CAPPED,
        JobResult.HELD_OUT,
    }
)


def _result_of(status: MessageStatus, skip_reason: SkipReason | None = None) -> JobResult:
    """What finishing a message with `status` means for its job."""
    if skip_reason is SkipReason.FREQUENCY_CAP:
        return JobResult.FREQUENCY_CAPPED
    if skip_reason is SkipReason.HOLDOUT:
        return JobResult.HELD_OUT
    return JobResult.OPTED_OUT if status is MessageStatus.SKIPPED else JobResult(status.value)


@dataclass
class BatchReport:
    results: list[JobResult] = field(default_factory=list)
    requeued: list[Delayed] = field(default_factory=list)
    gateway_calls: int = 0


class _Outcomes:
    """Writes a batch's outcomes in as few transactions as it can: the thread that brings one
    waits (at most OUTCOME_LINGER_SECONDS) until none of the batch's other gateway calls is
    still out, then writes every outcome waiting by then in one transaction, with one counter
    update for all, while the others wait. Each transaction item costs two write units, the
    counter's included: one counter update per batch rather than per two or three outcomes."""

    def __init__(self, write: Callable[[list[Outcome]], set[str]], remaining: Remaining) -> None:
        self._write = write
        self._remaining = remaining
        self._waiting: list[Outcome] = []
        self._written: dict[Outcome, bool | BaseException] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._writing = threading.Lock()
        self._out = 0  # gateway calls under way whose outcome has not come yet
        self._local = threading.local()

    @contextmanager
    def calling(self) -> Iterator[None]:
        """Around one gateway call and what follows it: outcomes wait for it a little."""
        with self._lock:
            self._out += 1
        self._local.out = True
        try:
            yield
        finally:
            self._came_back()

    def _came_back(self) -> None:
        if getattr(self._local, "out", False):
            self._local.out = False
            with self._lock:
                self._out -= 1
                self._changed.notify_all()

    def write(self, outcome: Outcome) -> bool:
        """Whether `outcome` was recorded (False: the message was no longer ours to finish)."""
        self._came_back()
        # Never linger into the time kept for the write itself and the jobs sent back.
        linger = min(OUTCOME_LINGER_SECONDS, self._remaining() - OUTCOME_WRITE_SECONDS)
        with self._lock:
            self._waiting.append(outcome)
            if linger > 0:
                self._changed.wait_for(lambda: self._out == 0, timeout=linger)
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

    def __init__(
        self,
        read: Callable[[], Mailing | None],
        remaining: Remaining,
        mailing: Mailing | None,
    ) -> None:
        self._read, self._remaining = read, remaining
        self._mailing, self._read_at = mailing, remaining()
        self._lock = threading.Lock()

    def current(self) -> Mailing | None:
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


@dataclass(frozen=True)
class _Delivery:
    """What the jobs of one delivery share: the invocation's clock, the storage retries bounded
    by it, the mailing's watch and the outcome writer."""

    remaining: Remaining
    retry: Retry
    read_retry: Retry
    outcomes: _Outcomes
    watch: _MailingWatch


@dataclass(frozen=True)
class _Calls:
    """What the gateway calls of one batch share (the threads' only shared state, each part
    guarding itself): permits, slots, the retry budget and the unreachable run."""

    permits: threading.BoundedSemaphore
    slots: Slots
    # Retries of bad-luck answers this delivery may still grant (the shared retry budget).
    budget: RetryBudget
    # Whether the gateway stopped answering at all during this delivery's calls.
    gone: _Unreachable


@dataclass(frozen=True)
class _Job:
    """One job as it goes through the sender's steps; a step returns a new `_Job` (claimed,
    given a slot) or a `_Done`, and only the batch's own thread puts them together."""

    index: int  # its place in the batch
    batch: JobBatch
    job: SendJob
    run: _Delivery
    mailing: Mailing | None
    client: Client | None
    # The attempt the policy decides on (None: the mailing cannot be used).
    attempt: DeliveryAttempt | None
    # Why the mailing or the client record cannot be used (missing, corrupt, older schema).
    problem: str | None = None
    mailing_exists: bool = True
    # Its claim (and until when it holds).
    claim: str | None = None
    claim_until: datetime | None = None
    # A rate-limited operator's job: its call leaves in [earliest, latest] (epoch seconds).
    operator_slot: tuple[float, float] | None = None
    # The global slot set aside for its call when the batch was admitted.
    planned: datetime | None = None
    # The client's frequency-cap slot its message holds (services/frequency_cap.py).
    cap_slot: int | None = None

    @property
    def recipient(self) -> Client:
        assert self.client is not None  # only jobs with a usable client get this far
        return self.client

    @property
    def policy_attempt(self) -> DeliveryAttempt:
        assert self.attempt is not None  # only jobs of a usable mailing get this far
        return self.attempt


@dataclass(frozen=True)
class _Done:
    """What became of a job: its result, when it comes back, whether it called the gateway and
    what the gateway answered, or the error that stopped it (its SQS message comes back)."""

    result: JobResult | None = None
    requeue: Delayed | None = None
    called: bool = False
    answer: GatewayResult | None = None
    error: Exception | None = None


class _Settled:
    """The batch's finished jobs, put together by the batch's own thread."""

    def __init__(self) -> None:
        self.done: dict[int, _Done] = {}
        self.errors: list[Exception] = []

    def add(self, item: _Job, done: _Done) -> None:
        self.done[item.index] = done
        if done.error is not None:
            self.errors.append(done.error)

    def add_all(self, items: list[_Job], outs: Sequence[_Job | _Done | None]) -> list[_Job]:
        """Record the `_Done` among a step's `outs`; the jobs it passed on (a `_Job` or None,
        for the same job unchanged) go on."""
        going = []
        for item, out in zip(items, outs, strict=True):
            if isinstance(out, _Done):
                self.add(item, out)
            else:
                going.append(item if out is None else out)
        return going


class Sender:
    """Processes the send jobs of one SQS message."""

    def __init__(
        self,
        mailings: MailingRepository,
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
        caps: FrequencyCapGuard | None = None,
    ) -> None:
        self._caps = caps
        self._mailings = mailings
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
        self._rules = DeliveryRules(
            margin=timedelta(seconds=settings.gateway_connect_timeout),
            max_attempts=settings.max_attempts,
            retry_base_seconds=settings.retry_base_seconds,
            retry_max_seconds=settings.retry_max_seconds,
            auth_retry_seconds=settings.auth_retry_seconds,
            gateway_pause_seconds=settings.gateway_pause_seconds,
        )

    def deliver(self, batch: JobBatch, remaining: Remaining | None = None) -> BatchReport:
        """Process every job of `batch` within the invocation's `remaining()` seconds; raises (so
        SQS retries it) on unexpected errors and on reads that keep failing transiently."""
        remaining = remaining or countdown(DEFAULT_BUDGET_SECONDS)
        retry = Retry(remaining, reserve=DEADLINE_RESERVE_SECONDS, rng=self._rng)
        read_retry = Retry(remaining, attempts=READ_ATTEMPTS, rng=self._rng)
        # One read each for the mailing and the clients of the whole batch, right before its
        # calls start (milliseconds later): a deleted or cancelled mailing or a deleted client is
        # seen here. The message itself is checked by the claim's condition.
        client_ids = [job.client_id for job in batch.jobs]
        mailing, mailing_problem, mailing_exists = self._mailing_checked(
            batch.mailing_id, read_retry
        )
        # The outcomes move the counters and the timeline's bucket of their time together.
        timeline = None if mailing is None else grid_of(mailing)
        outcomes = _Outcomes(
            lambda group: self._messages.finish_many(
                batch.mailing_id, group, self._clock(), retry=retry, timeline=timeline
            ),
            remaining,
        )
        clients, problems = (
            self._clients.find_many(client_ids, retry=read_retry) if mailing else ({}, {})
        )
        watch = _MailingWatch(
            lambda: self._mailing_checked(batch.mailing_id, read_retry)[0], remaining, mailing
        )
        run = _Delivery(remaining, retry, read_retry, outcomes, watch)
        work = []
        for index, job in enumerate(batch.jobs):
            client = clients.get(job.client_id)
            problem = mailing_problem or problems.get(job.client_id)
            attempt = _attempt_of(batch.mailing_id, job, mailing, client, problem)
            work.append(
                _Job(index, batch, job, run, mailing, client, attempt, problem, mailing_exists)
            )
        pool = self._pool or ThreadPoolExecutor(self._settings.sender_concurrency, "sender")
        self._pool = pool
        # First everything that needs no gateway call; then the calls, within the shared limits.
        settled = _Settled()
        ready = settled.add_all(work, self._each(pool, self._prepare, work))
        if ready:
            self._send_all(pool, ready, settled)
        report = BatchReport()
        answers = []
        for item in work:
            done = settled.done.get(item.index, _Done())
            if done.result is not None:
                report.results.append(done.result)
            if done.requeue is not None:
                report.requeued.append(done.requeue)
            report.gateway_calls += done.called
            if done.answer is not None:
                answers.append(done.answer)
        self._metrics.delivery(batch.mailing_id, report.results, answers)
        gateway = self._throttle.known_status()  # as this batch left it: no extra request
        if gateway is not None:
            self._metrics.gateway(batch.mailing_id, gateway)
        if settled.errors:
            # Re-deliver the whole SQS message; finished jobs are skipped on the next pass.
            raise settled.errors[0]
        if report.requeued:
            self._queues.enqueue(coalesce(report.requeued, self._settings.jobs_per_message))
        if (
            mailing is not None
            and mailing.schedule.fanout_done
            and any(r in _TERMINAL for r in report.results)
        ):
            self._kick_if_drained(batch.mailing_id, read_retry)
        return report

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
        pool: ThreadPoolExecutor,
        step: Callable[..., Step_],
        items: list[_Job],
        *args: object,
    ) -> list[Step_ | _Done]:
        """Run `step` for every item in parallel and return what each returned (an error as a
        `_Done` carrying it): siblings of a failing one still finish."""
        # Each thread runs in a copy of the caller's context: its log ids, and whatever the
        # runtime tagged the invocation with.
        futures = [
            pool.submit(contextvars.copy_context().run, _with_ids, step, item, *args)
            for item in items
        ]
        outs: list[Step_ | _Done] = []
        for future in futures:
            try:
                outs.append(future.result())
            except Exception as exc:  # collected: siblings still finish first
                outs.append(_Done(error=exc))
        return outs

    def _send_all(self, pool: ThreadPoolExecutor, ready: list[_Job], settled: _Settled) -> None:
        """The gateway calls of one batch: claims first, then slots and permits from the shared
        throttle, reserved when the calls are ready to leave (claims take time)."""
        paused = self._throttle.paused_for()
        if paused > 0 or not self._call_fits(ready[0]):
            # Known to be paused, or too little time left for a call: no claim, no call; back
            # later, no attempt spent.
            later = self._spread(paused)
            for item in ready:
                settled.add(item, self._throttled(item, later, spread=False))
            return
        # While the gateway seems down a batch makes one probe call: the others are not claimed
        # (two writes each saved, every time the backlog comes round).
        allowed, wait = self._throttle.expected_room(len(ready))
        later = self._spread(wait)
        for item in ready[allowed:]:
            settled.add(item, self._throttled(item, later, spread=False))
        trying = ready[:allowed]
        claimed = settled.add_all(trying, self._each(pool, self._claim, trying))
        if not claimed:
            return
        claimed, later_ones = self._operator_slots(pool, claimed, settled)
        if not claimed and not later_ones:
            return
        admission = self._throttle.admit(len(claimed)) if claimed else Admission.none(0)
        admitted, waiting = claimed[: admission.count], claimed[admission.count :]
        # One delay for the batch's jobs that got no slot, so they go back in one SQS message: a
        # backlog split into single jobs costs a sender invocation per job once sending resumes.
        delay = self._spread(admission.retry_after)
        settled.add_all(waiting, self._each(pool, self._give_back, waiting, delay, False))
        # Calls whose operator slot comes after the batch's global slots take their own then.
        admitted += later_ones
        slots = Slots(admission)
        if any(item.operator_slot for item in admitted):
            admitted = self._plan(admitted, slots)
        calls = _Calls(
            threading.BoundedSemaphore(max(1, admission.permits)),
            slots,
            self._throttle.retry_budget(),
            _Unreachable(self._spread(PROBING_REQUEUE_SECONDS)),
        )
        outs: list[_Done] = []
        try:
            outs = self._each(pool, self._call, admitted, calls)
            settled.add_all(admitted, outs)
        finally:
            # The permits back and the answers counted in the shared window, in one write; the
            # shared speed follows them (see services/throttle.py).
            answers = [out.answer for out in outs if out.answer is not None]
            self._throttle.release(admission, answers, calls.budget.taken)

    def _operator_slots(
        self, pool: ThreadPoolExecutor, claimed: list[_Job], settled: _Settled
    ) -> tuple[list[_Job], list[_Job]]:
        """Slots of the rate-limited operators (GATEWAY_RATE_PER_OPERATOR) for the batch's calls,
        one write per such operator; their jobs that get none go back to the queue before they
        take a global slot or permit, no attempt spent. Returns the jobs that take the batch's
        global slots (operators' first) and those that take a global slot of their own when
        their operator slot comes.

        Operator slots fall where the batch's global slots are expected, so the sender does not
        sit waiting on a slow operator while other operators' calls are ready; a batch of one
        operator only waits for its slots up to OPERATOR_PATIENCE_SECONDS (the invocation's
        other SQS messages wait for it)."""
        by_operator: dict[str, list[_Job]] = {}
        for item in claimed:
            code = item.recipient.operator_code
            if self._throttle.limited(code):
                by_operator.setdefault(code, []).append(item)
        if not by_operator:
            return claimed, []
        start, interval = self._throttle.expected_slots()
        going: list[_Job] = []
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
                going.append(replace(item, operator_slot=(earliest, earliest + admission.late)))
            deferred = jobs[admission.count :]
            settled.add_all(
                deferred, self._each(pool, self._give_back, deferred, admission.retry_after)
            )
        limited = {item.index for jobs in by_operator.values() for item in jobs}
        going += [item for item in claimed if item.index not in limited]
        # The batch's global slots, as expected now that some jobs went back.
        end = start + len(going) * interval
        own = [item for item in going if item.operator_slot and item.operator_slot[0] >= end]
        own_indexes = {item.index for item in own}
        return [item for item in going if item.index not in own_indexes], own

    def _plan(self, admitted: list[_Job], slots: Slots) -> list[_Job]:
        """Set aside each call's global slot (an operator's call: one within its operator slot),
        and order the calls by it, so a sender with few threads makes them in time."""
        now = self._clock()
        planned: dict[int, datetime | None] = {}
        for item in admitted:
            if item.operator_slot is not None:
                planned[item.index] = slots.take_between(*item.operator_slot, now)
        for item in admitted:
            if item.operator_slot is None:
                planned[item.index] = slots.take(now)
        admitted = [replace(item, planned=planned[item.index]) for item in admitted]

        def when(item: _Job) -> float:
            if item.planned is not None:
                return item.planned.timestamp()
            return item.operator_slot[0] if item.operator_slot else math.inf

        return sorted(admitted, key=when)

    def _claim(self, item: _Job) -> _Job | _Done:
        """Claim the message for a call: the claimed job, or what became of it if it cannot be
        claimed."""
        job, now, seconds = item.job, self._clock(), self._settings.claim_seconds
        claim = item.run.retry(
            lambda: self._messages.claim(
                item.batch.mailing_id, job.client_id, job.message_id, now, seconds
            )
        )
        if claim.claim_id is None:
            return self._unclaimable(item, claim.message, now, self._log(item))
        claimed = replace(item, claim=claim.claim_id, claim_until=now + timedelta(seconds=seconds))
        return self._cap_take(claimed, now)

    # ---------------------------------------------------------------- the frequency cap

    def _cap_take(self, item: _Job, now: datetime) -> _Job | _Done:
        """Take the client's frequency-cap slot for the claimed message (see
        services/frequency_cap.py): the job holding it, or the message skipped when the client
        had its cap already. Taken after the claim, so only the claim's holder takes it."""
        caps, mailing = self._caps, item.mailing
        if caps is None or mailing is None or mailing.frequency_cap_exempt:
            return item
        client_id = item.job.client_id
        try:
            slot = item.run.retry(lambda: caps.take(client_id, mailing.id, now))
        except CapContended:
            logger.warning("frequency-cap slots busy; job comes back", extra=self._log(item))
            return self._give_back(item)
        if slot is None:
            logger.info("client reached the frequency cap; message skipped", extra=self._log(item))
            return self._finish(
                item,
                MessageStatus.SKIPPED,
                item.claim,
                "frequency cap reached",
                SkipReason.FREQUENCY_CAP,
            )
        return replace(item, cap_slot=slot)

    def _cap_give_back(self, item: _Job, *, look_up: bool = False) -> None:
        """Free the cap slot of a message that ended, or went back, without being sent; with
        `look_up`, also one this job does not know of (taken by an earlier attempt that kept it).
        A give-back that fails leaves the slot busy until its window ends: logged, not raised."""
        caps, slot, mailing = self._caps, item.cap_slot, item.mailing
        if caps is None or mailing is None or mailing.frequency_cap_exempt:
            return
        if slot is None and not look_up:
            return
        client_id, mailing_id = item.job.client_id, item.batch.mailing_id
        try:
            item.run.retry(lambda: caps.give_back(client_id, mailing_id, slot, self._clock()))
        except Exception:
            logger.warning(
                "frequency-cap slot not given back; busy until its window ends",
                exc_info=True,
                extra=self._log(item),
            )

    def _give_back(self, item: _Job, wait: float = 0.0, spread: bool = True) -> _Done:
        """A claimed message that will not be sent now: unclaimed, its attempt undone, later."""
        self._unclaim(item)
        return self._throttled(item, wait, spread=spread)

    def _unclaim(self, item: _Job) -> None:
        assert item.claim is not None
        self._release(item, item.claim, item.job.last_error, called=False)

    def _release(self, item: _Job, claim: str, error: str | None, *, called: bool = True) -> None:
        """Give the message back, still pending (see MessageStore.release); with no call made
        (or one the gateway refused to take), its frequency-cap slot goes back too."""
        if not called:
            self._cap_give_back(item)
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

    def _too_late_now(self, item: _Job, at: datetime) -> _Done:
        """A claimed call that would leave too late: unclaimed, then expired or deferred."""
        self._unclaim(item)
        decision = timing(item.policy_attempt, at, self._rules)
        if decision.step is Step.SEND:  # in time after all: only the slot was missed
            return self._throttled(item)
        return self._settle(item, decision)

    def _throttled(self, item: _Job, wait: float = 0.0, *, spread: bool = True) -> _Done:
        """Over the shared rate or paused by back-pressure: back later, no attempt spent
        (after `wait` plus a spread, or after exactly `wait` when it is spread already)."""
        later = self._later(item, item.job, self._spread(wait) if spread else wait)
        return _Done(JobResult.THROTTLED, later)

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
        if fresh is not None and fresh.schedule.due and fresh.counts.pending == 0:
            self._queues.kick([mailing_id])

    def _cleared(self, item: _Job) -> _Done | None:
        """The last look before a gateway call; None when it may go. Too little time left, or a
        mailing that cannot be read now: the claim is given back and the job comes back, no
        attempt spent. A cancelled mailing ends the message; a paused one defers it."""
        if not self._call_fits(item):
            logger.info(
                "too little time left for a gateway call; job requeued", extra=self._log(item)
            )
            return self._give_back(item)
        try:
            mailing = item.run.watch.current()
        except Exception as exc:
            if not is_transient(exc):
                raise
            mailing = None
        if mailing is None:  # deleted, unusable or unreadable: the next delivery says which
            return self._give_back(item)
        if mailing.status is MailingStatus.CANCELLED:
            return self._finish(item, MessageStatus.CANCELLED, item.claim, "mailing cancelled")
        if mailing.status is MailingStatus.PAUSED:
            self._unclaim(item)
            attempt = replace(item.policy_attempt, paused_since=mailing.updated_at)
            return self._settle(item, paused(attempt, self._clock()))
        return None

    # ---------------------------------------------------------------- one job

    def _prepare(self, item: _Job) -> _Done | None:
        """Settle a job that needs no gateway call; None if it is ready for one."""
        if item.attempt is None:
            return self._fail_without_mailing(item, self._clock(), self._log(item))
        decision = before_call(item.attempt, self._clock(), self._rules)
        if decision.step is Step.FAIL:
            logger.warning("message failed: %s", item.problem, extra=self._log(item))
        if decision.step is not Step.SEND:
            return self._settle(item, decision)
        if _held_out(item):
            return self._finish(
                item, MessageStatus.SKIPPED, None, "holdout group", SkipReason.HOLDOUT
            )
        problem = self._gateway_problem()
        if problem is not None:
            logger.error("%s: nothing can be sent; retried later", problem, extra=self._log(item))
            later = self._later(item, item.job, self._settings.auth_retry_seconds)
            return _Done(JobResult.CONFIG_ERROR, later)
        return None

    def _settle(self, item: _Job, decision: Decision, claim: str | None = None) -> _Done:
        """Carry out a decision that needs no gateway call (the claim, if any, is ended)."""
        finished = {
            Step.CANCEL: MessageStatus.CANCELLED,
            Step.FAIL: MessageStatus.FAILED,
            Step.SKIP: MessageStatus.SKIPPED,
            Step.EXPIRE: MessageStatus.EXPIRED,
        }
        if decision.step in finished:
            return self._finish(
                item, finished[decision.step], claim, decision.reason, decision.skip_reason
            )
        assert decision.step is Step.DEFER, decision
        # No random spread: the batch's jobs keep one delay, so they travel in one SQS message.
        return _Done(JobResult.DEFERRED, self._later(item, item.job, decision.wait))

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

    def _call(self, item: _Job, calls: _Calls) -> _Done:
        """Take a permit and the next free slot, call the gateway on the slot.

        The time checks are made for the admission's last slot, so they hold whichever slot the
        call gets. A call whose batch's slots all passed while it waited for a permit takes one
        fresh slot; without one it goes back to SQS instead of leaving late.
        """
        with item.run.outcomes.calling():
            return self._call_under_way(item, calls)

    def _call_under_way(self, item: _Job, calls: _Calls) -> _Done:
        job, log, claim, slots = item.job, self._log(item), item.claim, calls.slots
        assert claim is not None
        last = max(self._clock(), slots.last)
        if item.operator_slot is not None:
            last = max(last, _moment(item.operator_slot[1]))
        if too_late(item.policy_attempt, last, self._rules):
            return self._too_late_now(item, last)
        if item.operator_slot is not None and item.planned is None:
            # Its slot comes after the batch's: wait for it without holding a permit.
            self._wait_until(_moment(item.operator_slot[0]))
        with calls.permits:
            slot = self._slot(item, slots)
            extra = None
            if slot is None:
                extra = self._fresh_slot(item)
                fresh = extra.slot(0) if extra.count else None
                if fresh is None or too_late(item.policy_attempt, fresh, self._rules):
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
                if calls.gone.seems_down:
                    return self._give_back(item, calls.gone.wait, False)
                gateway = self._gateway()
                assert gateway is not None  # checked by _prepare
                try:
                    result = gateway.send(job.message_id, item.recipient.phone, _text_for(item))
                except Exception as exc:
                    return _Done(called=True, error=exc)
                calls.gone.note(result)
            finally:
                if extra is not None:
                    self._throttle.release(extra)
        try:
            done = self._record(item, claim, result, calls.budget, log)
        except Exception as exc:  # the answer still counts in the shared window
            return _Done(called=True, answer=result, error=exc)
        return replace(done, called=True, answer=result)

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
        self, item: _Job, claim: str, result: GatewayResult, budget: RetryBudget, log: LogIds
    ) -> _Done:
        """Carry out the delivery policy's decision after the gateway's answer."""
        job, now = item.job, self._clock()
        verdict = classify(result, now.timestamp())
        granted = works = False
        if verdict.kind is Kind.BAD_LUCK:
            granted = budget.take()
            works = granted and self._throttle.gateway_works()
        decision = after_answer(
            item.policy_attempt,
            verdict,
            result.detail,
            now,
            self._rules,
            self._rng,
            retry_granted=granted,
            gateway_works=works,
        )
        step, reason = decision.step, decision.reason
        if step is Step.SENT:
            return self._finish(item, MessageStatus.SENT, claim, None)
        if step in (Step.FAIL, Step.EXPIRE):
            return self._settle(item, decision, claim)
        if step is Step.CONFIG_ERROR:
            logger.error(
                "the SMS gateway refused our credentials; check SENDER_API_TOKEN (or the "
                "secret SENDER_API_TOKEN_SECRET_ID names). Messages stay pending and are retried.",
                extra=log,
            )
            # A rotated secret is read again for the retry, with no redeploy.
            forget = getattr(self._gateway, "cache_clear", None)
            if forget is not None:
                forget()
            self._release(item, claim, reason)
            return _Done(JobResult.CONFIG_ERROR, self._later(item, job, decision.wait))
        if step in (Step.THROTTLE, Step.DEFER):
            # No failed attempt: overload (the throttle slows down), or over the retry budget.
            self._release(item, claim, reason, called=False)
            result_of = JobResult.THROTTLED if step is Step.THROTTLE else JobResult.DEFERRED
            return _Done(result_of, self._later(item, job, decision.wait))
        assert decision.retries is not None
        retried = job.model_copy(update={"retries": decision.retries, "last_error": reason})
        if step is Step.DEAD_LETTER:
            assert reason is not None
            self._queues.dead_letter(
                JobBatch(
                    mailing_id=item.batch.mailing_id,
                    jobs=[retried],
                    enqueued_at=item.batch.enqueued_at,
                ),
                reason,
            )
            self._finish(item, MessageStatus.FAILED, claim, reason)
            return _Done(JobResult.DEAD_LETTERED)
        logger.warning(
            "attempt %d of %d failed; retry in %d s: %s",
            decision.retries,
            self._settings.max_attempts,
            decision.wait,
            result.detail,
            extra={**log, "attempt": decision.retries, "retry_in_seconds": decision.wait},
        )
        self._release(item, claim, result.detail)
        return _Done(JobResult.RETRY, self._later(item, retried, decision.wait))

    # ---------------------------------------------------------------- helpers

    def _finish(
        self,
        item: _Job,
        status: MessageStatus,
        claim: str | None,
        error: str | None,
        skip_reason: SkipReason | None = None,
    ) -> _Done:
        # Written at once, with whatever other outcomes of the batch are waiting (see _Outcomes).
        variant = _variant_index(item) if status is MessageStatus.SENT else None
        done = item.run.outcomes.write(
            Outcome(
                item.job.client_id,
                status,
                claim,
                error,
                item.job.message_id,
                skip_reason,
                variant,
            )
        )
        if done and status is not MessageStatus.SENT and skip_reason is None:
            # Ended unsent (failed, expired, cancelled): its place, if an earlier attempt kept
            # one (a retry after a 5xx), goes back too.
            self._cap_give_back(item, look_up=True)
        return _Done(_result_of(status, skip_reason) if done else JobResult.SKIPPED)

    @staticmethod
    def _log(item: _Job) -> LogIds:
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

    def _unclaimable(
        self, item: _Job, message: Message | None, now: datetime, log: LogIds
    ) -> _Done:
        """Why the claim failed, from the `message` its condition saw: done or claimed
        elsewhere (skip), or not committed yet (wait)."""
        job = item.job
        if message is None and now - item.batch.enqueued_at < UNCOMMITTED_GRACE:
            # Fan-out enqueues a page's jobs a moment before it commits the page.
            logger.debug("message not committed yet; job comes back shortly", extra=log)
            return _Done(JobResult.DEFERRED, self._later(item, job, UNCOMMITTED_RETRY_SECONDS))
        if message is None or message.id != job.message_id:
            logger.info("job for a message that does not exist; dropped", extra=log)
        return _Done(JobResult.SKIPPED)

    def _mailing_checked(
        self, mailing_id: str, retry: Retry
    ) -> tuple[Mailing | None, str | None, bool]:
        """The mailing if it can be sent from, else None and what is wrong with its record;
        and whether the record exists at all. A read that keeps failing transiently raises."""
        try:
            return retry(lambda: self._mailings.get_for_sending(mailing_id)), None, True
        except MailingNotFound:
            return None, "mailing record is missing (the mailing was deleted)", False
        except MailingUnusable as unusable:
            return None, unusable.problem, True

    def _fail_without_mailing(self, item: _Job, now: datetime, log: LogIds) -> _Done:
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
        return _Done(JobResult.FAILED if failed else JobResult.SKIPPED)


def _moment(epoch_seconds: float) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, UTC)


def _attempt_of(
    mailing_id: str,
    job: SendJob,
    mailing: Mailing | None,
    client: Client | None,
    problem: str | None,
) -> DeliveryAttempt | None:
    """The attempt the delivery policy decides on (None: the mailing cannot be used)."""
    if mailing is None:
        return None
    return DeliveryAttempt(
        mailing_id=mailing_id,
        client_id=job.client_id,
        message_id=job.message_id,
        retries=job.retries,
        last_error=job.last_error,
        mailing_status=mailing.status,
        end_at=mailing.end_at,
        window=mailing.send_window,
        paused_since=mailing.updated_at,
        client_found=client is not None,
        timezone="UTC" if client is None else client.timezone,
        opted_out=client is not None and bool(client.opted_out),
        problem=problem,
    )


def _text_for(item: _Job) -> str:
    """The mailing's text (the client's A/B variant's) with the client's fields in its
    placeholders."""
    assert item.mailing is not None  # only jobs of a usable mailing get a call
    index = _variant_index(item)
    text = item.mailing.text if index is None else item.mailing.variants[index].text
    return personalise(text, item.recipient)


def _variant_index(item: _Job) -> int | None:
    """The A/B variant the job's client gets (None: the mailing has a single text)."""
    mailing = item.mailing
    if mailing is None or not mailing.variants:
        return None
    return variant_of(mailing.id, item.job.client_id, mailing.variants)


def _held_out(item: _Job) -> bool:
    """Whether the job's client is in its mailing's holdout group (skipped, never sent)."""
    mailing = item.mailing
    return mailing is not None and in_holdout(
        mailing.id, item.job.client_id, mailing.holdout_percent
    )


def _with_ids(step: Callable[..., Step_], item: _Job, *args: object) -> Step_:
    """Run one job's step with its ids on every log line, the gateway client's included."""
    with logs.bind(**Sender._log(item), attempt=item.job.retries + 1):
        return step(item, *args)
