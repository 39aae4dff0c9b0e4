"""The delivery policy: what becomes of an attempt before its gateway call and after the answer
(pure: the clock and the randomness are passed in)."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta

import pytest

from chalicelib.domain import MailingStatus, SendWindow
from chalicelib.domain.delivery_policy import (
    BAD_LUCK_RETRY_BASE_SECONDS,
    PAUSED_MAX_RECHECK_SECONDS,
    PAUSED_RECHECK_SECONDS,
    Decision,
    DeliveryAttempt,
    DeliveryRules,
    Step,
    after_answer,
    backoff,
    before_call,
    timing,
    too_late,
)
from chalicelib.domain.mailing import SkipReason
from chalicelib.domain.rate_limit import Kind, Verdict

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
RULES = DeliveryRules(
    margin=timedelta(seconds=3),
    max_attempts=3,
    retry_base_seconds=5.0,
    retry_max_seconds=900,
    auth_retry_seconds=300,
    gateway_pause_seconds=2.0,
)
ATTEMPT = DeliveryAttempt(
    mailing_id="m-1",
    client_id="c-1",
    message_id=7,
    retries=0,
    last_error=None,
    mailing_status=MailingStatus.RUNNING,
    end_at=NOW + timedelta(hours=1),
    window=None,
    timezone="Europe/Moscow",  # UTC+3: noon UTC is 15:00 there
)
BAD_LUCK = Verdict(Kind.BAD_LUCK)


def decide_after(
    verdict: Verdict,
    attempt: DeliveryAttempt = ATTEMPT,
    *,
    granted: bool = True,
    works: bool = False,
    seed: int = 1,
) -> Decision:
    return after_answer(
        attempt,
        verdict,
        "HTTP 500: oops",
        NOW,
        RULES,
        random.Random(seed),
        retry_granted=granted,
        gateway_works=works,
    )


# ---------------------------------------------------------------- before a call


def test_an_attempt_of_a_running_mailing_inside_its_time_is_sent_now():
    # Given a running mailing an hour from its end, without a send window
    # When the policy looks before the call
    decision = before_call(ATTEMPT, NOW, RULES)
    # Then the call goes now
    assert decision.step is Step.SEND


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (
            replace(ATTEMPT, mailing_status=MailingStatus.CANCELLED, opted_out=True),
            Decision(Step.CANCEL, "mailing cancelled"),
        ),
        (
            replace(ATTEMPT, client_found=False, problem="client record is missing"),
            Decision(Step.FAIL, "client record is missing"),
        ),
        (
            replace(ATTEMPT, opted_out=True),
            Decision(Step.SKIP, "client opted out", skip_reason=SkipReason.OPTED_OUT),
        ),
    ],
)
def test_a_cancelled_mailing_a_missing_client_and_an_opt_out_settle_without_a_call(
    attempt, expected
):
    # Given a cancelled mailing, a client that cannot be used, or a client who opted out
    # When the policy looks before the call
    # Then the message ends without a call, saying why (a cancel first of all)
    assert before_call(attempt, NOW, RULES) == expected


def test_a_call_that_could_reach_the_gateway_after_the_end_expires_with_the_last_error():
    # Given an attempt whose previous try failed, two seconds before the end (the margin is 3)
    attempt = replace(ATTEMPT, end_at=NOW + timedelta(seconds=2), last_error="HTTP 500")
    # When the policy looks before the call
    decision = before_call(attempt, NOW, RULES)
    # Then the message expires with that error
    assert decision == Decision(Step.EXPIRE, "HTTP 500")


def test_a_first_attempt_past_the_end_expires_as_end_passed():
    # Given a first attempt after the end
    attempt = replace(ATTEMPT, end_at=NOW - timedelta(minutes=1))
    # When the policy looks before the call, then it expires as "end passed"
    assert before_call(attempt, NOW, RULES) == Decision(Step.EXPIRE, "end passed")


def test_a_missing_client_after_the_end_expires_rather_than_fails():
    # Given a client that cannot be used, after the mailing's end
    attempt = replace(
        ATTEMPT, client_found=False, problem="missing", end_at=NOW - timedelta(seconds=1)
    )
    # When the policy looks before the call, then the message expires
    assert before_call(attempt, NOW, RULES).step is Step.EXPIRE


@pytest.mark.parametrize(
    ("paused_for", "wait"),
    [
        (None, PAUSED_RECHECK_SECONDS),
        (timedelta(seconds=30), PAUSED_RECHECK_SECONDS),
        (timedelta(minutes=6), 60),
        (timedelta(days=1), PAUSED_MAX_RECHECK_SECONDS),
    ],
)
def test_a_paused_mailing_looks_again_less_often_the_longer_the_pause_lasts(paused_for, wait):
    # Given a mailing paused for a while (or since an unknown moment)
    since = None if paused_for is None else NOW - paused_for
    attempt = replace(ATTEMPT, mailing_status=MailingStatus.PAUSED, paused_since=since)
    # When the policy looks before the call
    decision = before_call(attempt, NOW, RULES)
    # Then the job comes back after a sixth of the pause, between the bounds
    assert decision == Decision(Step.DEFER, wait=wait)


def test_a_paused_mailing_past_its_end_expires():
    attempt = replace(
        ATTEMPT, mailing_status=MailingStatus.PAUSED, end_at=NOW + timedelta(seconds=1)
    )
    assert before_call(attempt, NOW, RULES).step is Step.EXPIRE


def test_outside_the_clients_window_the_job_waits_for_its_opening():
    # Given a window of 16:00-18:00 client time, at 15:00 client time, three hours to the end
    attempt = replace(
        ATTEMPT, window=SendWindow(time(16, 0), time(18, 0)), end_at=NOW + timedelta(hours=3)
    )
    # When the policy looks before the call
    decision = before_call(attempt, NOW, RULES)
    # Then the job comes back when the window opens, an hour later
    assert decision == Decision(Step.DEFER, wait=3600)


def test_a_window_that_opens_only_after_the_end_expires_the_message():
    # Given a window opening at 16:00 client time and a mailing ending at 15:30 client time
    attempt = replace(
        ATTEMPT,
        window=SendWindow(time(16, 0), time(18, 0)),
        end_at=NOW + timedelta(minutes=30),
    )
    # When the policy looks before the call, then the message expires, saying why
    assert before_call(attempt, NOW, RULES) == Decision(
        Step.EXPIRE, "send window does not open again before the end"
    )


def test_a_call_whose_end_would_slip_past_the_windows_close_is_too_late():
    # Given a window closing at 15:00:02 client time (the call's margin is 3 s)
    attempt = replace(ATTEMPT, window=SendWindow(time(14, 0), time(15, 0, 2)))
    # Then a call leaving now is too late, while one leaving a minute earlier is not
    assert too_late(attempt, NOW, RULES)
    assert not too_late(attempt, NOW - timedelta(minutes=1), RULES)
    # And, the window opening again only the next day, after the end, the message expires
    assert timing(attempt, NOW, RULES) == Decision(
        Step.EXPIRE, "send window does not open again before the end"
    )


# ---------------------------------------------------------------- after an answer


def test_a_success_is_sent_and_a_refusal_fails_with_the_gateways_detail():
    assert decide_after(Verdict(Kind.SENT)) == Decision(Step.SENT)
    assert decide_after(Verdict(Kind.REJECTED)) == Decision(Step.FAIL, "HTTP 500: oops")


def test_refused_credentials_keep_the_message_pending_for_an_operator():
    # When the gateway refuses our credentials
    decision = decide_after(Verdict(Kind.UNAUTHORIZED))
    # Then the job comes back after the configured wait
    assert (decision.step, decision.wait) == (Step.CONFIG_ERROR, 300)


@pytest.mark.parametrize(("retry_after", "base"), [(7.0, 7.0), (None, 2.0)])
def test_overload_waits_for_the_gateways_pause_without_spending_an_attempt(retry_after, base):
    # When the gateway asks to slow down (with or without a Retry-After)
    decision = decide_after(Verdict(Kind.OVERLOAD, retry_after))
    # Then the job comes back after that pause (or the configured one) plus up to a second
    assert decision.step is Step.THROTTLE
    assert base <= decision.wait <= base + 1
    assert decision.retries is None


def test_bad_luck_is_retried_with_backoff_as_the_next_attempt():
    # When a first attempt meets bad luck and the retry budget grants a retry
    decision = decide_after(BAD_LUCK)
    # Then it is retried as the second attempt, after 2.5-5 s (the configured base is 5 s)
    assert (decision.step, decision.retries, decision.reason) == (
        Step.RETRY,
        1,
        "HTTP 500: oops",
    )
    assert 2.5 <= decision.wait <= 5


def test_bad_luck_while_the_gateway_works_backs_off_briefly():
    # Given a gateway that accepts most calls
    decision = decide_after(BAD_LUCK, works=True)
    # Then the retry backs off from one second, not from the configured base
    assert decision.step is Step.RETRY
    assert decision.wait == 1.0 == BAD_LUCK_RETRY_BASE_SECONDS


def test_bad_luck_beyond_the_retry_budget_is_deferred_without_spending_an_attempt():
    # When the shared retry budget is spent
    decision = decide_after(BAD_LUCK, granted=False)
    # Then the job waits as long as a retry would, no attempt spent
    assert decision.step is Step.DEFER
    assert decision.retries is None
    assert 2.5 <= decision.wait <= 5


def test_the_last_attempt_dead_letters_the_message():
    # Given the third of three attempts
    attempt = replace(ATTEMPT, retries=2)
    # When it meets bad luck
    decision = decide_after(BAD_LUCK, attempt)
    # Then the message is dead-lettered, saying how many attempts were made
    assert decision == Decision(
        Step.DEAD_LETTER, "gave up after 3 attempts: HTTP 500: oops", retries=3
    )


@pytest.mark.parametrize("granted", [True, False])
def test_no_retry_is_scheduled_past_the_end(granted):
    # Given an attempt two seconds before the end
    attempt = replace(ATTEMPT, end_at=NOW + timedelta(seconds=2))
    # When it meets bad luck (retry granted or not)
    decision = decide_after(BAD_LUCK, attempt, granted=granted)
    # Then the message expires with the answer's detail
    assert decision == Decision(Step.EXPIRE, "HTTP 500: oops")


def test_backoff_doubles_up_to_the_ceiling_with_jitter():
    # Given the configured base of 5 s and a ceiling of 900 s
    rng = random.Random(3)
    # When attempts back off one after another
    waits = [backoff(n, RULES, rng) for n in (1, 2, 3, 20)]
    # Then each waits between half and all of base * 2**(n-1), capped at the ceiling
    for wait, ceiling in zip(waits, (5, 10, 20, 900), strict=True):
        assert ceiling / 2 <= wait <= ceiling
