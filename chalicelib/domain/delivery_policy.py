"""The delivery policy (pure: no I/O, the clock and the randomness passed in): what becomes of one
attempt to deliver a message, before its gateway call and after the gateway's answer.

Before a call: a cancelled mailing cancels the message, an unusable client fails it, an opted-out
client skips it, a paused mailing defers it (looking again less often the longer the pause
lasts), a call too close to the end expires it, and outside the client's send window it waits
for the window's next opening (or expires when that comes too late).

After an answer (see domain/rate_limit.py for overload against bad luck): a success is sent, a
refusal fails, refused credentials wait for an operator, overload waits for the gateway's pause
with no attempt spent, and bad luck is retried with exponential backoff while the shared retry
budget allows, then dead-lettered after the last attempt. No retry is scheduled past the end.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from chalicelib.domain.mailing import MailingStatus, SkipReason
from chalicelib.domain.rate_limit import Kind, Verdict
from chalicelib.domain.send_window import SendWindow

# How soon a job of a paused mailing looks again (a resume takes effect within this), and at
# most how long it waits however long the pause lasts.
PAUSED_RECHECK_SECONDS = 10
PAUSED_MAX_RECHECK_SECONDS = 300
# A bad-luck retry the shared budget grants, while most calls succeed, backs off from this and
# not from RETRY_BASE_SECONDS: the gateway works and the shared rate bounds the load, so a long
# wait only leaves the rate unused while the end comes closer (1, 1-2, 2-4 s, ...).
BAD_LUCK_RETRY_BASE_SECONDS = 1.0


@dataclass(frozen=True)
class DeliveryRules:
    """The settings the policy follows."""

    # A call starting this close to the end (or to the window's close) could reach the gateway
    # after it: the gateway's connect timeout.
    margin: timedelta
    max_attempts: int
    retry_base_seconds: float
    retry_max_seconds: float
    auth_retry_seconds: float
    gateway_pause_seconds: float


@dataclass(frozen=True)
class DeliveryAttempt:
    """One attempt to deliver a message: the message, its mailing's limits and its client."""

    mailing_id: str
    client_id: str
    message_id: int
    retries: int  # attempts spent before this one
    last_error: str | None  # why the previous attempt failed
    mailing_status: MailingStatus
    end_at: datetime
    window: SendWindow | None  # the mailing's local send window, if any
    paused_since: datetime | None = None  # when the mailing last changed (its pause)
    client_found: bool = True  # False: the client record is missing or unusable
    timezone: str = "UTC"  # the client's
    opted_out: bool = False
    problem: str | None = None  # why the client cannot be used

    @property
    def number(self) -> int:
        """Which attempt this is (1 for the first)."""
        return self.retries + 1


class Step(StrEnum):
    SEND = "send"  # call the gateway now
    CANCEL = "cancel"  # the mailing was cancelled
    SKIP = "skip"  # never sent, for the decision's `skip_reason` (the client opted out)
    FAIL = "fail"  # refused for good, or the client cannot be used
    EXPIRE = "expire"  # the end (or the window's last opening before it) has passed
    DEFER = "defer"  # back after `wait`, no attempt spent
    SENT = "sent"
    CONFIG_ERROR = "config_error"  # our credentials: back after `wait`, the message pending
    THROTTLE = "throttle"  # the gateway asked to slow down: back after `wait`, no attempt spent
    RETRY = "retry"  # this attempt failed: back after `wait` as attempt `retries` + 1
    DEAD_LETTER = "dead_letter"  # the last attempt failed: the message fails


@dataclass(frozen=True)
class Decision:
    step: Step
    reason: str | None = None  # the message's error (or why it expired, failed, was cancelled)
    wait: float = 0.0  # seconds until the job comes back
    retries: int | None = None  # attempts spent, this one included (RETRY, DEAD_LETTER)
    skip_reason: SkipReason | None = None  # why a SKIP is never sent


SEND = Decision(Step.SEND)


# ---------------------------------------------------------------- before a call


def ended(end_at: datetime, at: datetime, rules: DeliveryRules) -> bool:
    """Whether a call starting `at` could reach the gateway after the end."""
    return at + rules.margin >= end_at


def in_window(attempt: DeliveryAttempt, at: datetime, rules: DeliveryRules) -> bool:
    """Both ends of a call starting `at` are inside the client's window (if any): it must not
    slip past the close."""
    if attempt.window is None:
        return True
    zone = ZoneInfo(attempt.timezone)
    return all(
        attempt.window.contains(t.astimezone(zone).timetz()) for t in (at, at + rules.margin)
    )


def too_late(attempt: DeliveryAttempt, at: datetime, rules: DeliveryRules) -> bool:
    """Whether a call leaving `at` could pass the end or the client's window."""
    return ended(attempt.end_at, at, rules) or not in_window(attempt, at, rules)


def expiry(attempt: DeliveryAttempt) -> Decision:
    """The message expires, with its last attempt's error when it had one."""
    return Decision(Step.EXPIRE, attempt.last_error or "end passed")


def timing(attempt: DeliveryAttempt, at: datetime, rules: DeliveryRules) -> Decision:
    """A call starting `at`: expired too close to the end, deferred outside the client's send
    window (expired when the window does not open again in time), else sent."""
    if ended(attempt.end_at, at, rules):
        return expiry(attempt)
    if in_window(attempt, at, rules):
        return SEND
    assert attempt.window is not None  # outside a window there is one
    opens = attempt.window.next_opening(at + rules.margin, ZoneInfo(attempt.timezone))
    if opens + rules.margin >= attempt.end_at:
        return Decision(Step.EXPIRE, "send window does not open again before the end")
    return Decision(Step.DEFER, wait=max(1, math.ceil((opens - at).total_seconds())))


def paused_wait(paused_since: datetime | None, now: datetime) -> float:
    """How long a job of a paused mailing waits before it looks again: soon at first (a short
    pause ends within PAUSED_RECHECK_SECONDS of the resume), then a sixth of the pause so far
    (at most PAUSED_MAX_RECHECK_SECONDS), so a mailing paused for a day does not bounce every
    job through SQS every few seconds."""
    paused_for = (now - paused_since).total_seconds() if paused_since is not None else 0
    return min(PAUSED_MAX_RECHECK_SECONDS, max(PAUSED_RECHECK_SECONDS, paused_for / 6))


def paused(attempt: DeliveryAttempt, now: datetime) -> Decision:
    """The mailing is paused: no call, no attempt spent; the job looks again later."""
    return Decision(Step.DEFER, wait=paused_wait(attempt.paused_since, now))


def before_call(attempt: DeliveryAttempt, now: datetime, rules: DeliveryRules) -> Decision:
    """What to do with an attempt that needs no gateway call to settle, or SEND."""
    if attempt.mailing_status is MailingStatus.CANCELLED:
        return Decision(Step.CANCEL, "mailing cancelled")
    if not attempt.client_found:
        if ended(attempt.end_at, now, rules):
            return expiry(attempt)
        return Decision(Step.FAIL, attempt.problem)
    if attempt.opted_out:
        return Decision(Step.SKIP, "client opted out", skip_reason=SkipReason.OPTED_OUT)
    if attempt.mailing_status is MailingStatus.PAUSED:
        if ended(attempt.end_at, now, rules):
            return expiry(attempt)
        return paused(attempt, now)
    return timing(attempt, now, rules)


# ---------------------------------------------------------------- after an answer


def backoff(
    retries: int, rules: DeliveryRules, rng: random.Random, base: float | None = None
) -> float:
    """Exponential backoff with jitter: spreads retries so a recovering gateway is not hit;
    from `base` when that is below the configured base."""
    first = rules.retry_base_seconds
    if base is not None:
        first = min(first, base)
    ceiling = min(rules.retry_max_seconds, first * 2 ** (retries - 1))
    return max(1.0, rng.uniform(ceiling / 2, ceiling))


def after_answer(
    attempt: DeliveryAttempt,
    verdict: Verdict,
    detail: str,
    now: datetime,
    rules: DeliveryRules,
    rng: random.Random,
    *,
    retry_granted: bool = True,
    gateway_works: bool = False,
) -> Decision:
    """What becomes of the message after the gateway's answer (`verdict`, with `detail` as its
    error). For bad luck, `retry_granted` says whether the shared retry budget allows a retry,
    and `gateway_works` whether most calls succeed (then retries back off briefly)."""
    if verdict.kind is Kind.SENT:
        return Decision(Step.SENT)
    if verdict.kind is Kind.REJECTED:
        return Decision(Step.FAIL, detail)
    if verdict.kind is Kind.UNAUTHORIZED:
        return Decision(Step.CONFIG_ERROR, detail, rules.auth_retry_seconds)
    if verdict.kind is Kind.OVERLOAD:
        # The throttle slows down; this is no failed attempt.
        wait = rules.gateway_pause_seconds if verdict.retry_after is None else verdict.retry_after
        return Decision(Step.THROTTLE, detail, wait + rng.uniform(0, 1))
    # Bad luck: retried with backoff while the shared retry budget allows (retries cannot
    # multiply the load); beyond it, deferred as long without spending an attempt.
    if not retry_granted:
        delay = backoff(attempt.number, rules, rng)
        if now + timedelta(seconds=delay) >= attempt.end_at:
            return Decision(Step.EXPIRE, detail)
        return Decision(Step.DEFER, detail, delay)
    retries = attempt.number
    if retries >= rules.max_attempts:
        error = f"gave up after {retries} attempts: {detail}"
        return Decision(Step.DEAD_LETTER, error, retries=retries)
    # Unless the gateway is known to work, back off as configured: during an outage (or before
    # the window knows) a short backoff would spend the attempts within minutes.
    delay = backoff(retries, rules, rng, BAD_LUCK_RETRY_BASE_SECONDS if gateway_works else None)
    if now + timedelta(seconds=delay) >= attempt.end_at:
        return Decision(Step.EXPIRE, detail)
    return Decision(Step.RETRY, detail, delay, retries)
