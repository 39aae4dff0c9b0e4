"""The reconciler: queues a job again for each pending message whose send job was lost.

A job can vanish after its message was committed: the send queue purged, an SQS message deleted
by hand, an enqueue that failed after a retry-failed commit. Nothing else would send such a
message; it would wait, pending, until the end sweep expires it.

The scheduler runs it under the mailing's lease, for a running mailing whose fan-out is done, and
only once the mailing has been quiet for LOST_JOB_AFTER: its counters have not moved and it was
not paused, resumed, edited or retried (its `updated_at`) in that time, and the send queue has no
backlog its jobs could be waiting in. A pass then walks the mailing's pending messages by message
id, a page at a time within the invocation's time, its position checkpointed on the mailing, and
queues a job again (same message id) for each message that
- holds no live claim (no sender is calling the gateway for it),
- was not touched (created, claimed, released, queued again) for LOST_JOB_AFTER, and
- was inside its client's send window all that time (a job deferred for the window waits in
  SQS, not touching its message, until the window opens).

A duplicate job is harmless (the claim admits one gateway call per message) but costs traffic:
queueing touches the message, so one message is queued again at most once per LOST_JOB_AFTER,
and a pass starts at most once per LOST_JOB_AFTER of quiet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from chalicelib.domain import Clock, Mailing, MessageCounts, MessageStatus
from chalicelib.metrics import MetricsWriter
from chalicelib.services.clients import ClientDirectory
from chalicelib.services.messages import MessageStore
from chalicelib.services.queues import SQS_MAX_DELAY_SECONDS, Queues, job_batches
from chalicelib.settings import Settings
from chalicelib.storage.errors import Retry
from chalicelib.storage.mailings import MailingRepository

logger = logging.getLogger(__name__)

# The send queue's VisibilityTimeout in infra/resources.yaml (a test keeps them equal): a
# receive whose sender died comes back after this.
SEND_VISIBILITY_TIMEOUT_SECONDS = 361
# The longest a live job can go without touching its message: SQS's longest delay (a retry's
# backoff, a deferral) plus a visibility timeout (a receive that died). A pending message
# untouched for longer, with no live claim, has no job left.
LOST_JOB_AFTER = timedelta(seconds=SQS_MAX_DELAY_SECONDS + SEND_VISIBILITY_TIMEOUT_SECONDS)
# Pending messages looked at per query, and per mailing per invocation (a kick continues).
RECONCILE_PAGE = 99
RECONCILE_MAX_PER_RUN = 990
# Above this many visible send-queue messages the senders are behind: a quiet mailing's jobs may
# just be waiting in the queue, so no pass starts.
MAX_BACKLOG = 10
# Stop starting new work when less than this is left of the invocation (as the scheduler).
SAFETY_SECONDS = 10.0

Remaining = Callable[[], float]


@dataclass(frozen=True)
class ReconcileRun:
    requeued: int = 0
    # False: the pass stopped for time (or its per-run bound) and continues from its checkpoint.
    complete: bool = True


def counters_mark(counts: MessageCounts) -> str:
    """The mailing's counters as one value: it changes whenever a message moves."""
    return ":".join(str(getattr(counts, s.value)) for s in MessageStatus)


class Reconciler:
    """Finds the pending messages of one mailing that no job will ever send, and queues them."""

    def __init__(
        self,
        mailings: MailingRepository,
        clients: ClientDirectory,
        messages: MessageStore,
        queues: Queues,
        settings: Settings,
        clock: Clock,
        metrics: MetricsWriter,
        retry: Retry,
    ) -> None:
        self._mailings = mailings
        self._clients = clients
        self._messages = messages
        self._queues = queues
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._retry = retry

    def run(self, mailing: Mailing, owner: str, remaining: Remaining) -> ReconcileRun:
        """One step for a running mailing whose fan-out is done (the caller holds its lease)."""
        now, mark = self._clock(), counters_mark(mailing.counts)
        after, since = mailing.schedule.reconcile_after, mailing.schedule.quiet_since
        # Paused, resumed, edited or retried since: jobs parked meanwhile come back on their own.
        touched = since is not None and mailing.updated_at > since
        if touched or (after is None and (mailing.schedule.quiet_mark != mark or since is None)):
            self._quiet_from(mailing, owner, remaining, mark, now)
            return ReconcileRun()
        if after is None and since is not None:  # no pass under way: is one due?
            if now - since < LOST_JOB_AFTER or self._senders_behind(mailing.id):
                return ReconcileRun()
            logger.info(
                "mailing quiet since %s: looking for pending messages whose job was lost",
                since.isoformat(),
                extra={"mailing_id": mailing.id},
            )
        requeued = looked = 0
        while True:
            if remaining() < SAFETY_SECONDS or looked >= RECONCILE_MAX_PER_RUN:
                self._save(
                    mailing,
                    lambda at=after or 0: self._mailings.save_reconcile_position(
                        mailing.id, owner, at
                    ),
                    remaining,
                )
                return ReconcileRun(requeued, complete=False)
            page = self._messages.with_status(
                mailing.id, MessageStatus.PENDING, RECONCILE_PAGE, after=after
            )
            if not page:
                # The next pass only if nothing moves for LOST_JOB_AFTER again.
                self._quiet_from(mailing, owner, remaining, mark, now)
                return ReconcileRun(requeued)
            requeued += self._requeue_lost(mailing, page, now, remaining)
            looked, after = looked + len(page), page[-1][1]

    # ---------------------------------------------------------------- steps

    def _requeue_lost(
        self, mailing: Mailing, page: list[tuple[str, int]], now: datetime, remaining: Remaining
    ) -> int:
        since = now - LOST_JOB_AFTER
        candidates = self._outside_window_skipped(mailing, page, since, now)
        # Touch first, then queue: a job that fails to go leaves a touched message, found again
        # by a later pass; a touch that fails (claimed or changed meanwhile) queues nothing.
        lost = [
            (client_id, message_id)
            for client_id, message_id in candidates
            if self._touch(mailing.id, client_id, message_id, now, since, remaining)
        ]
        if not lost:
            return 0
        self._queues.enqueue(job_batches(mailing.id, lost, now, self._settings.jobs_per_message))
        for client_id, message_id in lost:
            logger.warning(
                "pending message had no job left; queued again",
                extra={
                    "mailing_id": mailing.id,
                    "client_id": client_id,
                    "message_id": message_id,
                    "status": MessageStatus.PENDING.value,
                },
            )
        self._metrics.requeued(mailing.id, len(lost))
        return len(lost)

    def _outside_window_skipped(
        self, mailing: Mailing, page: list[tuple[str, int]], since: datetime, now: datetime
    ) -> list[tuple[str, int]]:
        """The page without messages whose client's send window was closed since `since`."""
        window = mailing.send_window
        if window is None:
            return page
        found, _ = self._clients.find_many([client_id for client_id, _ in page])
        zones = {client_id: client.timezone for client_id, client in found.items()}
        kept = []
        for client_id, message_id in page:
            try:
                zone = ZoneInfo(zones[client_id])
            except (KeyError, ValueError, ZoneInfoNotFoundError):
                kept.append((client_id, message_id))  # the sender settles a missing client
                continue
            if window.open_throughout(zone, since, now):
                kept.append((client_id, message_id))
        return kept

    def _touch(
        self,
        mailing_id: str,
        client_id: str,
        message_id: int,
        now: datetime,
        since: datetime,
        remaining: Remaining,
    ) -> bool:
        """Mark the message as queued again now, if it is still pending, unclaimed and untouched
        after `since`; False otherwise (a live job or a sender has it)."""
        return replace(
            self._retry,
            remaining=remaining,
            reserve=SAFETY_SECONDS / 2,
            what="marking a message queued again",
            log={"mailing_id": mailing_id, "client_id": client_id, "message_id": message_id},
        )(lambda: self._messages.touch_if_lost(mailing_id, client_id, message_id, now, since))

    def _senders_behind(self, mailing_id: str) -> bool:
        """Whether the send queue holds a backlog (unknown counts as none: a duplicate job is
        harmless, a message left unsent is not)."""
        visible = self._queues.send_backlog()
        if visible is not None and visible > MAX_BACKLOG:
            logger.info(
                "send queue backlog of %d: lost jobs are looked for later",
                visible,
                extra={"mailing_id": mailing_id},
            )
            return True
        return False

    def _quiet_from(
        self, mailing: Mailing, owner: str, remaining: Remaining, mark: str, now: datetime
    ) -> None:
        """Count the mailing quiet from `now` at counters `mark`, with no pass under way."""
        self._save(
            mailing, lambda: self._mailings.save_quiet(mailing.id, owner, mark, now), remaining
        )

    def _save(self, mailing: Mailing, write: Callable[[], Mailing], remaining: Remaining) -> None:
        replace(
            self._retry,
            remaining=remaining,
            reserve=SAFETY_SECONDS / 2,
            what="saving the reconciler's position",
            log={"mailing_id": mailing.id},
        )(write)
