"""Message state changes, as the sender, the scheduler and the mailings service ask for them:
each one is a conditional write in the message repository (chalicelib/storage/messages.py),
logged with the message's ids here.

A message leaves `pending` exactly once. The write that takes it out is conditional on it still
being pending (and on the caller's claim, or on nobody holding one), and it carries the matching
`ADD` on the mailing's counters, so the counters always equal the message records.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from chalicelib.domain import Message, MessageStatus
from chalicelib.domain.mailing import MessageChange
from chalicelib.domain.paging import PageOf
from chalicelib.domain.timeline import TimelineGrid
from chalicelib.storage.errors import ONCE, Retry
from chalicelib.storage.messages import Claim, MessageRepository, Outcome

logger = logging.getLogger(__name__)

__all__ = ["Claim", "MessageStore", "Outcome"]

LogExtra = dict[str, str | int]


def _ids(
    mailing_id: str, client_id: str, message_id: int | None = None, **more: str | int | None
) -> LogExtra:
    """A log line's `extra`: the message's ids (a None id comes from the bound context)."""
    ids = {"mailing_id": mailing_id, "client_id": client_id, "message_id": message_id}
    return {key: value for key, value in {**ids, **more}.items() if value is not None}


def _log_final(mailing_id: str, outcome: Outcome) -> None:
    level = logging.INFO if outcome.status is MessageStatus.SENT else logging.WARNING
    logger.log(
        level,
        "message %s",
        outcome.status.value,
        extra=_ids(
            mailing_id,
            outcome.client_id,
            outcome.message_id,
            status=outcome.status.value,
            error=outcome.error,
        ),
    )


class MessageStore:
    """Reads messages and performs their one-way status changes."""

    def __init__(self, repository: MessageRepository) -> None:
        self._repository = repository

    def page(
        self, mailing_id: str, *, status: MessageStatus | None, limit: int, cursor: str | None
    ) -> PageOf[Message]:
        """One page of a mailing's messages, optionally only those with `status`."""
        return self._repository.page(mailing_id, status=status, limit=limit, cursor=cursor)

    def history(self, mailing_id: str, *, limit: int) -> tuple[list[MessageChange], bool]:
        """The changes of up to `limit` of a mailing's messages; True when it has more."""
        return self._repository.history(mailing_id, limit=limit)

    def claim(
        self, mailing_id: str, client_id: str, message_id: int, now: datetime, seconds: int
    ) -> Claim:
        """Take the message for one gateway call.

        No claim when it is not there with this id, not pending, or claimed by a live claim;
        then the message as the failed condition saw it, with no second read.
        """
        until = now + timedelta(seconds=seconds)
        claim = self._repository.claim(
            mailing_id, client_id, message_id, uuid.uuid4().hex, now, until
        )
        if claim.claim_id is not None:
            logger.info(
                "message claimed for a gateway call",
                extra=_ids(mailing_id, client_id, message_id, claim_seconds=seconds),
            )
        return claim

    def release(
        self,
        mailing_id: str,
        client_id: str,
        claim_id: str,
        now: datetime,
        error: str | None,
        *,
        called: bool = True,
    ) -> bool:
        """Give a claimed message back (still pending), noting why the call did not finish it.

        Without `called` (the gateway was not called after all) the claim's attempt is undone.
        """
        released = self._repository.release(
            mailing_id, client_id, claim_id, now, error, called=called
        )
        if released:
            logger.info(
                "message released, still pending" if called else "claim given back, attempt undone",
                extra=_ids(mailing_id, client_id, status="pending", error=error),
            )
        return released

    def finish(
        self,
        mailing_id: str,
        client_id: str,
        status: MessageStatus,
        now: datetime,
        *,
        claim_id: str | None = None,
        error: str | None = None,
        message_id: int | None = None,
        retry: Retry = ONCE,
        timeline: TimelineGrid | None = None,
    ) -> bool:
        """Move a pending message to a final status with the mailing's counters (and its
        `timeline`), atomically.

        With `claim_id`, only the holder of that claim may do it; without, only while nobody
        holds a live claim. False when the message was not in a state to change (already done).
        """
        outcome = Outcome(client_id, status, claim_id, error, message_id)
        return bool(retry(lambda: self._commit(mailing_id, [outcome], now, timeline)))

    def finish_many(
        self,
        mailing_id: str,
        outcomes: list[Outcome],
        now: datetime,
        *,
        retry: Retry = ONCE,
        timeline: TimelineGrid | None = None,
    ) -> set[str]:
        """Finish several messages of one mailing in one transaction (one counter update for
        all, and one for the bucket of `now` in its `timeline`); the clients whose message was
        finished. Falls back to one transaction each when any of them cannot be (its claim
        lapsed and another sender took it). Each transaction goes through `retry`: a conflict
        or a throttle is never read as "already done"."""
        if not outcomes:
            return set()
        done = retry(lambda: self._commit(mailing_id, outcomes, now, timeline))
        if done or len(outcomes) == 1:
            return done

        def alone(outcome: Outcome) -> set[str]:
            return retry(lambda: self._commit(mailing_id, [outcome], now, timeline))

        return {o.client_id for o in outcomes if alone(o)}

    def _commit(
        self,
        mailing_id: str,
        outcomes: list[Outcome],
        now: datetime,
        timeline: TimelineGrid | None,
    ) -> set[str]:
        if not self._repository.finish(mailing_id, outcomes, now, timeline):
            return set()
        for outcome in outcomes:
            _log_final(mailing_id, outcome)
        return {outcome.client_id for outcome in outcomes}

    def fail_orphan(self, mailing_id: str, client_id: str, reason: str, now: datetime) -> bool:
        """Fail a pending message whose mailing cannot keep counters (missing or unusable)."""
        outcome = Outcome(client_id, MessageStatus.FAILED, None, reason)
        if not self._repository.fail_orphan(mailing_id, outcome, now):
            return False
        _log_final(mailing_id, outcome)
        return True

    def touch_if_lost(
        self, mailing_id: str, client_id: str, message_id: int, now: datetime, since: datetime
    ) -> bool:
        """Mark the message as queued again now, if it is still pending, unclaimed and untouched
        after `since`; False otherwise (a live job or a sender has it)."""
        return self._repository.touch_if_lost(mailing_id, client_id, message_id, now, since)

    def pending(
        self, mailing_id: str, limit: int, after: str | None = None
    ) -> list[tuple[str, int]]:
        """Up to `limit` (client id, message id) pairs whose message is still pending, by client
        id (after client `after`, when given; a pass over them reads each message once)."""
        return self._repository.pending(mailing_id, limit, after)

    def with_status(
        self, mailing_id: str, status: MessageStatus, limit: int, after: int | None = None
    ) -> list[tuple[str, int]]:
        """Up to `limit` (client id, message id) pairs with `status`, by message id (after
        `after`, when given)."""
        return self._repository.with_status(mailing_id, status, limit, after)

    def requeue_failed(
        self,
        mailing_id: str,
        messages: list[tuple[str, int]],
        now: datetime,
        *,
        reopen: bool,
        token: str | None = None,
        timeline: TimelineGrid | None = None,
    ) -> bool:
        """Make these failed messages pending again (same ids), with the mailing's counters
        (and its `timeline`), in one transaction; with `reopen`, a finished mailing runs
        again. False when any of them is no longer failed or the mailing was cancelled or
        deleted meanwhile.

        Give every try of one change the same `token`: a try after a 500 whose first try was
        applied after all then succeeds instead of failing its conditions."""
        if not self._repository.requeue_failed(
            mailing_id, messages, now, reopen=reopen, token=token, timeline=timeline
        ):
            return False
        pending = MessageStatus.PENDING.value
        for client_id, message_id in messages:
            logger.info(
                "failed message queued again, pending",
                extra=_ids(mailing_id, client_id, message_id, status=pending),
            )
        return True
