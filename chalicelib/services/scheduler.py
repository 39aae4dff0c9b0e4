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

import contextvars
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pynamodb.connection import Connection
from pynamodb.exceptions import DoesNotExist, TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib.domain import Action, AudienceFilter, Clock, MailingStatus, MessageStatus
from chalicelib.domain.mailing import allows, may_finish, moves, pending_become, transition
from chalicelib.metrics import MetricsWriter
from chalicelib.pagination import Position, decode_cursor, encode_cursor, fingerprint, read_page
from chalicelib.services.clients import ClientDirectory
from chalicelib.services.messages import MessageStore, Outcome
from chalicelib.services.queues import Queues, job_batches
from chalicelib.services.reconciler import Reconciler
from chalicelib.settings import Settings
from chalicelib.storage.errors import PATIENT, Retry, is_conditional_failure
from chalicelib.storage.models import DUE_KEY, MESSAGE_ID_SEQUENCE, Models, status_key

logger = logging.getLogger(__name__)

# Stop starting new work when less than this is left of the invocation.
SAFETY_SECONDS = 10.0
# Messages a sweep moves per transaction (DynamoDB's limit is 100 items, one is the mailing).
SWEEP_PAGE = 99
# A write being retried may use the invocation's time down to this (the lease must still go back).
RETRY_RESERVE_SECONDS = SAFETY_SECONDS / 2

Remaining = Callable[[], float]


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
        models: Models,
        connection: Connection,
        clients: ClientDirectory,
        messages: MessageStore,
        queues: Queues,
        settings: Settings,
        clock: Clock,
        metrics: MetricsWriter,
        *,
        retry: Retry = PATIENT,
    ) -> None:
        self._models = models
        self._connection = connection
        self._clients = clients
        self._messages = messages
        self._queues = queues
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._retry_writes = retry
        self._reconciler = Reconciler(
            models, clients, messages, queues, settings, clock, metrics, retry
        )

    # ---------------------------------------------------------------- entry points

    def tick(self, remaining: Remaining) -> Progress:
        """Advance every due mailing while time remains (the scheduled Lambda)."""
        Mailing = self._models.Mailing
        progress = Progress()
        now = self._clock()
        due = [
            k.mailing_id
            for k in Mailing.due.query(DUE_KEY, Mailing.start_at <= now.astimezone(UTC))
        ]
        for mailing_id in due:
            if remaining() < SAFETY_SECONDS:
                # Whatever is left is picked up by the next tick.
                break
            # The index holds keys only; read the mailing as it is now.
            try:
                item = Mailing.get(mailing_id, consistent_read=True)
                progress.add(self._advance(item, remaining))
            except DoesNotExist:
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
            item = self._models.Mailing.get(mailing_id, consistent_read=True)
        except DoesNotExist:
            return Progress()
        if item.due_key is None or item.start_at > self._clock():
            return Progress()
        progress = self._advance(item, remaining)
        if progress.continued and self._queues.can_kick:
            self._queues.kick(progress.continued)
        return progress

    # ---------------------------------------------------------------- one mailing

    def _advance(self, item: Any, remaining: Remaining) -> Progress:
        progress = Progress(mailings=1)
        owner = uuid.uuid4().hex
        if not self._take_lease(item, owner, remaining):
            return progress
        log = {"mailing_id": item.mailing_id}
        status = MailingStatus(item.status)
        try:
            cancelled_as = pending_become(status, ended=False)
            if cancelled_as is not None:
                cancelled, left = self._sweep(item, cancelled_as, remaining)
                progress.cancelled += cancelled
                if left:
                    progress.continued.append(item.mailing_id)
                    return progress
            else:
                # As read when the lease was taken: a fan-out that completes below just queued
                # every job, so there is nothing to reconcile yet.
                walked = bool(item.fanout_done)
                if not item.fanout_done:
                    if self._clock() >= item.end_at:
                        # The end came before the audience was walked: nobody else is added.
                        self._mark_fanout_done(item, owner, remaining)
                    elif not allows(status, Action.FAN_OUT):
                        return progress  # resume kicks it; the end is still watched by ticks
                    elif not self._timed_fan_out(item, owner, remaining, progress):
                        progress.continued.append(item.mailing_id)
                        return progress
                expired_as = pending_become(status, ended=self._clock() >= item.end_at)
                if expired_as is not None:
                    expired, left = self._sweep(item, expired_as, remaining)
                    progress.expired += expired
                    if left:
                        progress.continued.append(item.mailing_id)
                        return progress
                elif (
                    walked and allows(status, Action.RECONCILE) and int(item.count_pending or 0) > 0
                ):
                    run = self._reconciler.run(item, owner, remaining)
                    progress.requeued += run.requeued
                    if not run.complete:
                        progress.continued.append(item.mailing_id)
            if self._finish_if_done(item.mailing_id, owner, remaining):
                progress.finished.append(item.mailing_id)
                logger.info("mailing finished", extra=log)
        finally:
            self._release_lease(item.mailing_id, owner, remaining)
        return progress

    def _retry(
        self, call: Callable[[], Any], what: str, mailing_id: str, remaining: Remaining
    ) -> Any:
        """`call()`, tried again after a transaction conflict, a throttle or a 500."""
        return replace(
            self._retry_writes,
            remaining=remaining,
            reserve=RETRY_RESERVE_SECONDS,
            what=what,
            log={"mailing_id": mailing_id},
        )(call)

    def _take_lease(self, item: Any, owner: str, remaining: Remaining) -> bool:
        Mailing = self._models.Mailing
        now = self._clock()
        actions = [
            Mailing.lease_owner.set(owner),
            Mailing.lease_until.set(now + timedelta(seconds=self._settings.lease_seconds)),
        ]
        current = MailingStatus(item.status)
        starting = moves(current, Action.START)
        # Ours already: a retried write whose first try was applied after all (a 500).
        condition = Mailing.due_key.exists() & (
            Mailing.lease_until.does_not_exist()
            | (Mailing.lease_until < now)
            | (Mailing.lease_owner == owner)
        )
        if starting is not None:
            actions.append(Mailing.status.set(starting.value))
            # A pause or cancel that lands meanwhile wins; the next tick sees it.
            condition &= Mailing.status == current.value
        try:
            self._retry(
                lambda: item.update(actions=actions, condition=condition),
                "taking the mailing's lease",
                item.mailing_id,
                remaining,
            )
        except UpdateError as exc:
            if is_conditional_failure(exc):
                return False
            raise
        if starting is not None:
            logger.info("mailing started", extra={"mailing_id": item.mailing_id})
        return True

    def _release_lease(self, mailing_id: str, owner: str, remaining: Remaining) -> None:
        Mailing = self._models.Mailing
        try:
            self._retry(
                lambda: Mailing(mailing_id).update(
                    actions=[Mailing.lease_owner.remove(), Mailing.lease_until.remove()],
                    condition=Mailing.lease_owner == owner,
                ),
                "giving the mailing's lease back",
                mailing_id,
                remaining,
            )
        except UpdateError as exc:
            if not is_conditional_failure(exc):
                raise

    # ---------------------------------------------------------------- fan-out

    def _timed_fan_out(
        self, item: Any, owner: str, remaining: Remaining, progress: Progress
    ) -> bool:
        started, before = time.monotonic(), progress.messages_created
        try:
            return self._fan_out(item, owner, remaining, progress)
        finally:
            created = progress.messages_created - before
            self._metrics.fanout(item.mailing_id, created, time.monotonic() - started)

    def _fan_out(self, item: Any, owner: str, remaining: Remaining, progress: Progress) -> bool:
        """Walk the audience from the checkpoint; True when it is complete.

        The next page of the audience is read while the current one is committed. Reading
        changes nothing, so this only hides the Query's round trip; pages are still committed
        one at a time, in order, each with its checkpoint.
        """
        audience = AudienceFilter(tuple(item.operator_codes or ()), tuple(item.tags or ()))
        # A message needs the client's id and phone only; the rest is read by the sender.
        segments = self._clients.audience_segments(audience, attributes=("client_id", "phone"))
        scope = fingerprint("audience", item.mailing_id, audience.operator_codes, audience.tags)
        cursor = item.fanout_cursor
        position = decode_cursor(cursor, scope, segments) if cursor else Position()
        size = self._settings.fanout_page_size
        ids = IdBlock(lambda count: self._allocate_ids(item.mailing_id, count, remaining), size)
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
                    item, owner, cursor, next_cursor, page.items, ids, remaining
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
        item: Any,
        owner: str,
        cursor: str | None,
        next_cursor: str | None,
        clients: list[Any],
        ids: IdBlock,
        remaining: Remaining,
    ) -> int | None:
        Mailing, Message = self._models.Mailing, self._models.Message
        now = self._clock()
        first_id = ids.take(len(clients)) if clients else 0
        messages = [
            Message(
                item.mailing_id,
                client.client_id,
                message_id=first_id + n,
                phone=client.phone,
                status=MessageStatus.PENDING.value,
                status_key=status_key(item.mailing_id, MessageStatus.PENDING.value),
                created_at=now,
                updated_at=now,
                attempts=0,
                expires_at=message_expiry(item.end_at, self._settings.message_retention_days),
            )
            for n, client in enumerate(clients)
        ]
        # Jobs first: a crash after the commit below must not leave messages nobody will send.
        self._enqueue_jobs(item.mailing_id, messages, now)
        checkpoint = (
            Mailing.fanout_cursor.does_not_exist()
            if cursor is None
            else Mailing.fanout_cursor == cursor
        )
        actions = [
            Mailing.count_pending.add(len(messages)),
            Mailing.lease_until.set(now + timedelta(seconds=self._settings.lease_seconds)),
        ]
        if next_cursor is None:
            actions.append(Mailing.fanout_done.set(True))
        else:
            actions.append(Mailing.fanout_cursor.set(next_cursor))
        # One token for every try of this page: if a try that ended in a 500 was applied after
        # all, DynamoDB answers the next one as a success instead of failing its conditions.
        token = uuid.uuid4().hex

        def commit() -> None:
            with TransactWrite(connection=self._connection, client_request_token=token) as tx:
                for message in messages:
                    tx.save(message, condition=Message.client_id.does_not_exist())
                tx.update(
                    Mailing(item.mailing_id),
                    actions=actions,
                    condition=(Mailing.lease_owner == owner) & checkpoint,
                )

        try:
            # The jobs above stay queued once: only the commit is tried again.
            self._retry(commit, "committing a fan-out page", item.mailing_id, remaining)
        except TransactWriteError as exc:
            if is_conditional_failure(exc):
                logger.warning(
                    "fan-out page not committed: checkpoint moved or message exists",
                    extra={"mailing_id": item.mailing_id},
                )
                return None
            raise
        for message in messages:
            logger.info(
                "message created, pending",
                extra={
                    "mailing_id": item.mailing_id,
                    "client_id": message.client_id,
                    "message_id": message.message_id,
                    "status": MessageStatus.PENDING.value,
                },
            )
        return len(messages)

    def _allocate_ids(self, mailing_id: str, count: int, remaining: Remaining) -> int:
        """Reserve `count` consecutive message ids; returns the first. Ids are never reused
        (a retried reservation whose first try was applied only leaves a gap)."""
        Sequence = self._models.Sequence
        sequence = Sequence(MESSAGE_ID_SEQUENCE)
        self._retry(
            lambda: sequence.update(actions=[Sequence.value.add(count)]),
            "reserving message ids",
            mailing_id,
            remaining,
        )
        return int(sequence.value) - count + 1

    def _enqueue_jobs(self, mailing_id: str, messages: list[Any], now: datetime) -> None:
        pairs = [(m.client_id, m.message_id) for m in messages]
        batches = job_batches(mailing_id, pairs, now, self._settings.jobs_per_message)
        if batches:
            self._queues.enqueue(batches)

    def _mark_fanout_done(self, item: Any, owner: str, remaining: Remaining) -> None:
        Mailing = self._models.Mailing
        self._retry(
            lambda: item.update(
                actions=[Mailing.fanout_done.set(True)],
                condition=Mailing.lease_owner == owner,
            ),
            "closing the fan-out at the end",
            item.mailing_id,
            remaining,
        )

    # ---------------------------------------------------------------- ending

    def _sweep(self, item: Any, status: MessageStatus, remaining: Remaining) -> tuple[int, bool]:
        """Move the mailing's unclaimed pending messages to `status` (end passed, cancelled),
        a page of them per transaction with one counter update; how many, and whether it
        stopped for lack of time with messages left (each page moved is committed)."""
        changed = 0
        while True:
            if remaining() < SAFETY_SECONDS:
                left = self._messages.pending(item.mailing_id, limit=1)
                return changed, bool(left)
            pending = self._messages.pending(item.mailing_id, limit=SWEEP_PAGE)
            if not pending:
                return changed, False
            outcomes = [Outcome(client_id, status, None, None, id_) for client_id, id_ in pending]
            # One transaction for the page; one each if a sender holds any of them right now.
            moved = len(
                self._retry(
                    lambda outcomes=outcomes: self._messages.finish_many(
                        item.mailing_id, outcomes, self._clock()
                    ),
                    f"moving pending messages to {status.value}",
                    item.mailing_id,
                    remaining,
                )
            )
            changed += moved
            if moved == 0:
                # The rest are claimed by senders right now; they finish them (or a later tick).
                return changed, False

    def _finish_if_done(self, mailing_id: str, owner: str, remaining: Remaining) -> bool:
        Mailing = self._models.Mailing
        try:
            item = Mailing.get(mailing_id, consistent_read=True)
        except DoesNotExist:
            return False  # deleted while we worked on it
        status = MailingStatus(item.status)
        pending = int(item.count_pending or 0)
        if not may_finish(status, fanout_done=bool(item.fanout_done), pending=pending):
            return False
        final = transition(mailing_id, status, Action.FINISH)
        try:
            self._retry(
                lambda: item.update(
                    actions=[
                        Mailing.status.set(final.value),
                        Mailing.due_key.remove(),
                        Mailing.fanout_done.set(True),
                    ],
                    condition=(Mailing.lease_owner == owner) & (Mailing.count_pending == 0),
                ),
                "finishing the mailing",
                mailing_id,
                remaining,
            )
        except UpdateError as exc:
            if is_conditional_failure(exc):
                return False
            raise
        return True
