"""The scheduler: starts due mailings, fans their audience out to send jobs, ends them.

Each tick advances every mailing on the sparse `due` index (started, not yet finished). One worker
at a time holds a mailing's lease. Fan-out walks the audience a page at a time; each page is one
DynamoDB transaction that creates the page's messages (each conditional on not existing) and
moves the mailing's checkpoint and pending counter, so a crash anywhere loses and duplicates
nothing: a page is either fully committed with its checkpoint or not at all. The page's send jobs
are enqueued *before* that commit, so a crash after the commit cannot lose them; jobs of a page
that never committed name message ids that do not exist and are dropped by the sender.

A transaction conflict, a throttle or a 500 on any of these writes is tried again (with backoff,
within the invocation's time); only a failed condition means another worker holds the lease or
moved the checkpoint. Every loop stops starting new work SAFETY_SECONDS before the deadline and
leaves a checkpoint (the fan-out cursor, the messages already swept, the reconciler's position)
for the next invocation, which a kick starts at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

from chalicelib.domain import Action, Clock, Mailing, Message, MessageStatus
from chalicelib.domain.mailing import (
    MailingChanged,
    MailingNotFound,
    MessagesExist,
    allows,
    may_finish,
    moves,
    pending_become,
    transition,
)
from chalicelib.domain.timeline import grid_of
from chalicelib.metrics import MetricsWriter
from chalicelib.services.clients import ClientDirectory
from chalicelib.services.messages import MessageStore, Outcome
from chalicelib.services.queues import Queues, job_batches
from chalicelib.services.receipts import DeliveryReceipts
from chalicelib.services.reconciler import Reconciler
from chalicelib.settings import Settings
from chalicelib.storage.errors import PATIENT, Retry
from chalicelib.storage.mailings import MailingRepository
from chalicelib.storage.pagination import (
    Position,
    decode_cursor,
    encode_cursor,
    fingerprint,
    read_page,
)

logger = logging.getLogger(__name__)

# Stop starting new work when less than this is left of the invocation.
SAFETY_SECONDS = 10.0
# Messages a sweep moves per transaction (DynamoDB's limit is 100 items; the mailing and its
# timeline's part are two).
SWEEP_PAGE = 98
# A write being retried may use the invocation's time down to this (the lease must still go back).
RETRY_RESERVE_SECONDS = SAFETY_SECONDS / 2

Remaining = Callable[[], float]
T = TypeVar("T")


class Recipient(Protocol):
    """What fan-out reads of a client: who gets the message, at which number."""

    client_id: str
    phone: str


def message_expiry(end_at: datetime, retention_days: int) -> datetime:
    """When DynamoDB deletes a message record: `retention_days` after its mailing's end, or the
    last moment a date can name when the end is so far ahead that the sum has none."""
    try:
        return end_at + timedelta(days=retention_days)
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC)


@dataclass
class Progress:
    """What one call did, for logs, tests and benchmarks."""

    mailings: int = 0
    messages_created: int = 0
    jobs_enqueued: int = 0
    expired: int = 0
    cancelled: int = 0
    requeued: int = 0
    finished: list[str] = field(default_factory=list)
    continued: list[str] = field(default_factory=list)

    def add(self, other: Progress) -> None:
        self.mailings += other.mailings
        self.messages_created += other.messages_created
        self.jobs_enqueued += other.jobs_enqueued
        self.expired += other.expired
        self.cancelled += other.cancelled
        self.requeued += other.requeued
        self.finished.extend(other.finished)
        self.continued.extend(other.continued)


class IdBlock:
    """Message ids reserved ahead and handed out in order, so that a long fan-out reserves
    them once per several pages rather than once per page.

    The first reservation is one page; each next one doubles, up to `MAX_PAGES` pages, so a
    small mailing reserves about what it uses. Ids left over when the worker stops (its
    deadline, a lost lease, a crash) are never handed out: the sequence only grows.
    """

    MAX_PAGES = 16

    def __init__(self, reserve: Callable[[int], int], page_size: int) -> None:
        self._reserve = reserve
        self._page_size = page_size
        self._pages = 0
        self._next = self._left = 0

    def take(self, count: int) -> int:
        """The first of `count` consecutive ids nobody else has or will have."""
        if count > self._left:
            self._pages = min(2 * self._pages or 1, self.MAX_PAGES)
            size = max(count, self._pages * self._page_size)
            self._next, self._left = self._reserve(size), size
        first = self._next
        self._next, self._left = self._next + count, self._left - count
        return first


class Scheduler:
    """Advances mailings from scheduled to finished."""

    def __init__(
        self,
        clients: ClientDirectory,
        messages: MessageStore,
        queues: Queues,
        settings: Settings,
        clock: Clock,
        metrics: MetricsWriter,
        *,
        mailings: MailingRepository,
        retry: Retry = PATIENT,
        receipts: DeliveryReceipts | None = None,
    ) -> None:
        self._mailings = mailings
        # With delivery receipts on, each page's ids are registered for their lookup.
        self._receipts = receipts
        self._clients = clients
        self._messages = messages
        self._queues = queues
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._retry_writes = retry
        self._reconciler = Reconciler(
            mailings, clients, messages, queues, settings, clock, metrics, retry
        )

    # ---------------------------------------------------------------- entry points

    def tick(self, remaining: Remaining) -> Progress:
        """Advance every due mailing while time remains (the scheduled Lambda)."""
        progress = Progress()
        for mailing_id in self._mailings.due_ids(self._clock()):
            if remaining() < SAFETY_SECONDS:
                # Whatever is left is picked up by the next tick.
                break
            # The index holds keys only; read the mailing as it is now.
            try:
                mailing = self._mailings.get(mailing_id)
                progress.add(self._advance(mailing, remaining))
            except MailingNotFound:
                continue  # deleted meanwhile
            except Exception:
                # One broken mailing must not stop the others; it is retried next tick.
                logger.exception("could not advance mailing", extra={"mailing_id": mailing_id})
        if progress.continued and self._queues.can_kick:
            self._queues.kick(progress.continued)
        return progress

    def advance(self, mailing_id: str, remaining: Remaining) -> Progress:
        """Advance one mailing now (a fan-out kick: immediate start or continuation)."""
        try:
            mailing = self._mailings.get(mailing_id)
        except MailingNotFound:
            return Progress()
        if not mailing.schedule.due or not mailing.started(self._clock()):
            return Progress()
        progress = self._advance(mailing, remaining)
        if progress.continued and self._queues.can_kick:
            self._queues.kick(progress.continued)
        return progress

    # ---------------------------------------------------------------- one mailing

    def _advance(self, found: Mailing, remaining: Remaining) -> Progress:
        progress = Progress(mailings=1)
        owner = uuid.uuid4().hex
        mailing = self._take_lease(found, owner, remaining)
        if mailing is None:
            return progress
        log = {"mailing_id": mailing.id}
        try:
            cancelled_as = pending_become(mailing.status, ended=False)
            if cancelled_as is not None:
                cancelled, left = self._sweep(mailing, cancelled_as, remaining)
                progress.cancelled += cancelled
                if left:
                    progress.continued.append(mailing.id)
                    return progress
            else:
                # As read when the lease was taken: a fan-out that completes below just queued
                # every job, so there is nothing to reconcile yet.
                walked = mailing.schedule.fanout_done
                if not walked:
                    if mailing.ended(self._clock()):
                        # The end came before the audience was walked: nobody else is added.
                        self._close_fan_out(mailing, owner, remaining)
                    elif not allows(mailing.status, Action.FAN_OUT):
                        return progress  # resume kicks it; the end is still watched by ticks
                    elif not self._timed_fan_out(mailing, owner, remaining, progress):
                        progress.continued.append(mailing.id)
                        return progress
                expired_as = pending_become(mailing.status, ended=mailing.ended(self._clock()))
                if expired_as is not None:
                    expired, left = self._sweep(mailing, expired_as, remaining)
                    progress.expired += expired
                    if left:
                        progress.continued.append(mailing.id)
                        return progress
                elif (
                    walked
                    and allows(mailing.status, Action.RECONCILE)
                    and mailing.counts.pending > 0
                ):
                    run = self._reconciler.run(mailing, owner, remaining)
                    progress.requeued += run.requeued
                    if not run.complete:
                        progress.continued.append(mailing.id)
            if self._finish_if_done(mailing.id, owner, remaining):
                progress.finished.append(mailing.id)
                logger.info("mailing finished", extra=log)
        finally:
            self._release_lease(mailing.id, owner, remaining)
        return progress

    def _retry(self, call: Callable[[], T], what: str, mailing_id: str, remaining: Remaining) -> T:
        """`call()`, tried again after a transaction conflict, a throttle or a 500."""
        return replace(
            self._retry_writes,
            remaining=remaining,
            reserve=RETRY_RESERVE_SECONDS,
            what=what,
            log={"mailing_id": mailing_id},
        )(call)

    def _take_lease(self, mailing: Mailing, owner: str, remaining: Remaining) -> Mailing | None:
        """The mailing as it is once `owner` holds its lease; None if another worker does."""
        now = self._clock()
        until = now + timedelta(seconds=self._settings.lease_seconds)
        # A pause or cancel that lands meanwhile wins the start; the next tick sees it.
        start = moves(mailing.status, Action.START)
        try:
            leased = self._retry(
                lambda: self._mailings.take_lease(
                    mailing.id, owner, now, until, current=mailing.status, start=start
                ),
                "taking the mailing's lease",
                mailing.id,
                remaining,
            )
        except MailingChanged:
            return None
        if start is not None:
            logger.info("mailing started", extra={"mailing_id": mailing.id})
        return leased

    def _release_lease(self, mailing_id: str, owner: str, remaining: Remaining) -> None:
        with contextlib.suppress(MailingChanged):  # not ours any more: nothing to give back
            self._retry(
                lambda: self._mailings.release_lease(mailing_id, owner),
                "giving the mailing's lease back",
                mailing_id,
                remaining,
            )

    # ---------------------------------------------------------------- fan-out

    def _timed_fan_out(
        self, mailing: Mailing, owner: str, remaining: Remaining, progress: Progress
    ) -> bool:
        started, before = time.monotonic(), progress.messages_created
        try:
            return self._fan_out(mailing, owner, remaining, progress)
        finally:
            created = progress.messages_created - before
            self._metrics.fanout(mailing.id, created, time.monotonic() - started)

    def _fan_out(
        self, mailing: Mailing, owner: str, remaining: Remaining, progress: Progress
    ) -> bool:
        """Walk the audience from the checkpoint; True when it is complete.

        The next page of the audience is read while the current one is committed. Reading
        changes nothing, so this only hides the Query's round trip; pages are still committed
        one at a time, in order, each with its checkpoint.
        """
        audience = mailing.audience
        # A message needs the client's id and phone only; the rest is read by the sender.
        segments = self._clients.audience_segments(audience, attributes=("client_id", "phone"))
        scope = fingerprint("audience", mailing.id, audience.operator_codes, audience.tags)
        cursor = mailing.schedule.fanout_cursor
        position = decode_cursor(cursor, scope, segments) if cursor else Position()
        size = self._settings.fanout_page_size
        ids = IdBlock(lambda count: self._allocate_ids(mailing.id, count, remaining), size)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="audience") as reader:
            upcoming = reader.submit(
                contextvars.copy_context().run, read_page, segments, position, size
            )
            while True:
                if remaining() < SAFETY_SECONDS:
                    upcoming.cancel()
                    return False
                page = upcoming.result()
                if page.next is not None:
                    upcoming = reader.submit(
                        contextvars.copy_context().run, read_page, segments, page.next, size
                    )
                next_cursor = encode_cursor(page.next, scope)
                created = self._commit_page(
                    mailing, owner, cursor, next_cursor, page.items, ids, remaining
                )
                if created is None:
                    # Someone else moved the checkpoint (our lease was lost): stop here.
                    upcoming.cancel()
                    return True
                progress.messages_created += created
                progress.jobs_enqueued += created
                if page.next is None:
                    return True
                cursor = next_cursor

    def _commit_page(
        self,
        mailing: Mailing,
        owner: str,
        cursor: str | None,
        next_cursor: str | None,
        clients: Sequence[Recipient],
        ids: IdBlock,
        remaining: Remaining,
    ) -> int | None:
        now = self._clock()
        first_id = ids.take(len(clients)) if clients else 0
        messages = [
            Message(
                id=first_id + n,
                mailing_id=mailing.id,
                client_id=client.client_id,
                phone=client.phone,
                status=MessageStatus.PENDING,
                created_at=now,
                sent_at=None,
                attempts=0,
                last_error=None,
            )
            for n, client in enumerate(clients)
        ]
        # Jobs first: a crash after the commit below must not leave messages nobody will send.
        self._enqueue_jobs(mailing.id, messages, now)
        lease_until = now + timedelta(seconds=self._settings.lease_seconds)
        expires_at = message_expiry(mailing.end_at, self._settings.message_retention_days)
        # The receipts' id lookup too: a receipt can come as soon as the gateway has a message.
        self._register_ids(mailing.id, first_id, messages, expires_at, remaining)
        try:
            while True:
                # One token for every try of this page: if a try that ended in a 500 was
                # applied after all, DynamoDB answers the next one as a success instead of
                # failing its conditions.
                token = uuid.uuid4().hex
                try:
                    # The jobs above stay queued once: only the commit is tried again.
                    self._retry(
                        lambda token=token, messages=messages: self._mailings.commit_fan_out_page(
                            mailing.id,
                            owner,
                            cursor=cursor,
                            next_cursor=next_cursor,
                            messages=messages,
                            expires_at=expires_at,
                            lease_until=lease_until,
                            token=token,
                            timeline=grid_of(mailing),
                        ),
                        "committing a fan-out page",
                        mailing.id,
                        remaining,
                    )
                    break
                except MessagesExist as exists:
                    # A client met again in a later segment (its tag or operator changed
                    # during the walk) keeps the message it has; the page goes without it.
                    # Its job here names a message id that never exists: the sender drops it.
                    logger.info(
                        "fan-out page: %d clients already have a message",
                        len(exists.client_ids),
                        extra={"mailing_id": mailing.id},
                    )
                    messages = [m for m in messages if m.client_id not in exists.client_ids]
        except MailingChanged:
            logger.warning(
                "fan-out page not committed: the checkpoint moved (the lease was lost)",
                extra={"mailing_id": mailing.id},
            )
            return None
        for message in messages:
            logger.info(
                "message created, pending",
                extra={
                    "mailing_id": mailing.id,
                    "client_id": message.client_id,
                    "message_id": message.id,
                    "status": MessageStatus.PENDING.value,
                },
            )
        return len(messages)

    def _register_ids(
        self,
        mailing_id: str,
        first_id: int,
        messages: Sequence[Message],
        expires_at: datetime | None,
        remaining: Remaining,
    ) -> None:
        """Write the page's message-id lookup for delivery receipts (when they are on)."""
        receipts = self._receipts
        if receipts is None or not receipts.enabled or not messages:
            return
        client_ids = [message.client_id for message in messages]
        self._retry(
            lambda: receipts.register_ids(mailing_id, first_id, client_ids, expires_at),
            "registering message ids for receipts",
            mailing_id,
            remaining,
        )

    def _allocate_ids(self, mailing_id: str, count: int, remaining: Remaining) -> int:
        """Reserve `count` consecutive message ids; returns the first. Ids are never reused
        (a retried reservation whose first try was applied only leaves a gap)."""
        return self._retry(
            lambda: self._mailings.reserve_message_ids(count),
            "reserving message ids",
            mailing_id,
            remaining,
        )

    def _enqueue_jobs(self, mailing_id: str, messages: list[Message], now: datetime) -> None:
        pairs = [(m.client_id, m.id) for m in messages]
        batches = job_batches(mailing_id, pairs, now, self._settings.jobs_per_message)
        if batches:
            self._queues.enqueue(batches)

    def _close_fan_out(self, mailing: Mailing, owner: str, remaining: Remaining) -> None:
        self._retry(
            lambda: self._mailings.close_fan_out(mailing.id, owner),
            "closing the fan-out at the end",
            mailing.id,
            remaining,
        )

    # ---------------------------------------------------------------- ending

    def _sweep(
        self, mailing: Mailing, status: MessageStatus, remaining: Remaining
    ) -> tuple[int, bool]:
        """Move the mailing's unclaimed pending messages to `status` (end passed, cancelled),
        a page of them per transaction with one counter update; how many, and whether it
        stopped for lack of time with messages left (each page moved is committed)."""
        changed, after = 0, None
        while True:
            if remaining() < SAFETY_SECONDS:
                left = self._messages.pending(mailing.id, limit=1)
                return changed, bool(left)
            # On from the last page: pending messages are not indexed, and reading the mailing's
            # partition from its start for every page would read it once per page.
            pending = self._messages.pending(mailing.id, limit=SWEEP_PAGE, after=after)
            if not pending:
                return changed, False
            after = pending[-1][0]
            outcomes = [Outcome(client_id, status, None, None, id_) for client_id, id_ in pending]
            # One transaction for the page; one each if a sender holds any of them right now.
            moved = len(
                self._retry(
                    lambda outcomes=outcomes: self._messages.finish_many(
                        mailing.id, outcomes, self._clock(), timeline=grid_of(mailing)
                    ),
                    f"moving pending messages to {status.value}",
                    mailing.id,
                    remaining,
                )
            )
            changed += moved
            if moved == 0:
                # The rest are claimed by senders right now; they finish them (or a later tick).
                return changed, False

    def _finish_if_done(self, mailing_id: str, owner: str, remaining: Remaining) -> bool:
        try:
            mailing = self._mailings.get(mailing_id)
        except MailingNotFound:
            return False  # deleted while we worked on it
        if not may_finish(
            mailing.status,
            fanout_done=mailing.schedule.fanout_done,
            pending=mailing.counts.pending,
        ):
            return False
        final = transition(mailing_id, mailing.status, Action.FINISH)
        try:
            self._retry(
                lambda: self._mailings.finish(mailing_id, owner, final),
                "finishing the mailing",
                mailing_id,
                remaining,
            )
        except MailingChanged:
            return False
        return True
