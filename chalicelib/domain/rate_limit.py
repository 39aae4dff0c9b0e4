"""Overload or bad luck: what a gateway answer means for the shared sending rate (pure: no I/O,
time passed in as epoch seconds).

- `classify` reads a gateway answer's kind (chalicelib/domain/gateway_answer.py) for load: sent,
  rejected (permanent 4xx), unauthorized, overload (429, or 503 with `Retry-After`) or bad luck
  (other 5xx, malformed bodies, timeouts, network errors).
- `Window` counts the calls of the last two minutes (all senders) in buckets; from it come the
  accept ratio (client-side adaptive throttling, SRE book: overloaded when
  requests > K * accepts, K = 2) and the retry budget (Finagle: retries at most ~20% of
  requests, plus a small reserve). An outage is a run of calls with none accepted.
- `decide` turns a batch's answers and the window into the next `Control` state: overload cuts
  the speed by half and pauses for `Retry-After`; bad luck changes nothing; an outage probes at
  one call a second; good answers raise the speed by half per second back to the configured rate.
- `GatewayStatus` says the same to an operator: the rate now against the configured one, normal /
  slowed / paused / probing, the accept ratio and answer mix over the window, and whether the
  gateway is degraded (/gateway, /metrics, EMF, the admin UI's gateway panel).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from enum import StrEnum

from chalicelib.domain.gateway_answer import AnswerKind, GatewayResult

WINDOW_SECONDS = 120
BUCKET_SECONDS = 10
# SRE "Handling Overload": the backend is overloaded when requests exceed K times accepts.
K = 2.0
# The accept ratio is judged over at least this many calls (a handful is noise, not overload).
RATIO_MIN_CALLS = 20
# Calls in a row (all senders) with none accepted that mean an outage: at 25% random failures
# such a run comes once in 10**12 calls, at 50% once in a million.
OUTAGE_RUN = 20
PROBE_INTERVAL_SECONDS = 1.0
# Speed (share of the configured rate): its floor, the cut and the climb per second of good
# answers (1/16 * 1.5**7 > 1: back at the configured rate within 7 s), and where it climbs
# from after an outage: a quarter, not the full rate at once (no thundering herd), and at 90%
# four seconds after the first probe that got through (from 1/8 it took five, and the
# backlog's return through SQS comes on top).
MIN_SPEED = 1 / 16
CUT = 0.5
GROWTH_PER_SECOND = 1.5
RESTART_SPEED = 1 / 4
# One cut per this long, whichever sender sees the overload (a batch's answers arrive together).
CUT_SPACING_SECONDS = 1.0
RAISE_SPACING_SECONDS = 1.0
# Retries allowed: this share of the window's requests, plus a reserve for a quiet window.
RETRY_RATIO = 0.2
RETRY_RESERVE = 10
# A latency this many times the window's mean (and at least LATENCY_FLOOR_SECONDS) is overload.
LATENCY_FACTOR = 4.0
LATENCY_FLOOR_SECONDS = 1.0
LATENCY_MIN_SAMPLES = 20
LATENCY_BATCH_MIN = 3


class Kind(StrEnum):
    SENT = "sent"
    REJECTED = "rejected"  # this message is refused for good: failed at once
    UNAUTHORIZED = "unauthorized"  # our credentials: a configuration problem
    OVERLOAD = "overload"  # slow down: cut the rate, wait for Retry-After
    BAD_LUCK = "bad_luck"  # this call failed; the gateway works: retry within the budget


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    retry_after: float | None = None  # seconds, from the answer's Retry-After

    @property
    def accepted(self) -> bool:
        """The gateway did its job (SRE "accepts"): a rejection of a bad message counts too."""
        return self.kind in (Kind.SENT, Kind.REJECTED, Kind.UNAUTHORIZED)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """RFC 9110 Retry-After: delta-seconds or an HTTP-date; None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # HTTP-dates are GMT
        return None
    return max(0.0, moment.timestamp() - now)


def classify(result: GatewayResult, now: float) -> Verdict:
    """What one gateway answer means: for the message, and for the shared rate."""
    if result.kind is AnswerKind.SENT:
        return Verdict(Kind.SENT)
    if result.kind is AnswerKind.REJECTED:
        return Verdict(Kind.REJECTED)
    if result.kind is AnswerKind.UNAUTHORIZED:
        return Verdict(Kind.UNAUTHORIZED)
    retry_after = parse_retry_after(result.retry_after, now)
    if result.kind is AnswerKind.TOO_MANY_REQUESTS:
        return Verdict(Kind.OVERLOAD, retry_after)
    if result.kind is AnswerKind.UNAVAILABLE and retry_after is not None:
        return Verdict(Kind.OVERLOAD, retry_after)
    # Other 5xx, a 200 without the success code, timeouts, network errors.
    return Verdict(Kind.BAD_LUCK)


# ---------------------------------------------------------------- slots (GCRA)

# A call of a rate-limited operator may leave on a global slot at most this share of the
# operator's interval after its operator slot.
OPERATOR_LATE_SHARE = 0.1


def slots_before(base: float, until: float, interval: float) -> int:
    """How many slots `interval` apart, the first at `base`, begin before `until` (the room a
    generic cell rate algorithm has left up to its horizon)."""
    return max(0, math.floor((until - base) / interval + 1e-9))


def slots_starting_before(base: float, until: float, interval: float) -> int:
    """How many slots `interval` apart, the first at `base`, start before `until`."""
    return max(0, math.ceil((until - base) / interval - 1e-9))


def on_grid(moment: float, origin: float, step: float) -> float:
    """The first moment at or after `moment` on the grid `origin + k * step` (k >= 0)."""
    if moment <= origin:
        return origin
    return origin + math.ceil((moment - origin) / step - 1e-9) * step


@dataclass(frozen=True)
class OperatorSpacing:
    """How one operator's slots are laid out so that its calls, which must also leave on global
    slots, are never closer than 1 / `rate`: a call leaves at most `late` after its slot, and
    slots are `interval` = 1 / rate + late apart (or a little more: see `interval_on`). The
    price: the operator gets at most 1 / interval calls a second, 91% of its rate or less."""

    rate: float

    @property
    def late(self) -> float:
        return OPERATOR_LATE_SHARE / self.rate

    @property
    def interval(self) -> float:
        return 1 / self.rate + self.late

    def interval_on(self, grid: float) -> float:
        """`interval` rounded up to a whole number of global slots `grid` apart: slots laid out
        from a global slot then fall on global slots, where the calls can leave on time."""
        return max(1, math.ceil(self.interval / grid - 1e-9)) * grid


def unreachable(result: GatewayResult) -> bool:
    """No answer at all: the connection was refused or dropped (a timeout is not this)."""
    return result.kind is AnswerKind.NETWORK


# ---------------------------------------------------------------- the window


@dataclass(frozen=True)
class Tally:
    """Counts of one bucket (or of a batch): calls, accepted, overload answers, retries granted,
    and the total latency of the accepted calls."""

    requests: int = 0
    accepts: int = 0
    overloads: int = 0
    retries: int = 0
    latency: float = 0.0

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            self.requests + other.requests,
            self.accepts + other.accepts,
            self.overloads + other.overloads,
            self.retries + other.retries,
            self.latency + other.latency,
        )

    @classmethod
    def of(cls, verdicts: Sequence[Verdict], latencies: Iterable[float] = ()) -> Tally:
        """The counts of a batch; `latencies` in the same order as `verdicts`."""
        return cls(
            requests=len(verdicts),
            accepts=sum(v.accepted for v in verdicts),
            overloads=sum(v.kind is Kind.OVERLOAD for v in verdicts),
            latency=sum(t for v, t in zip(verdicts, latencies, strict=False) if v.accepted),
        )


def bucket_of(now: float) -> int:
    return math.floor(now / BUCKET_SECONDS)


@dataclass(frozen=True)
class Window:
    """The last WINDOW_SECONDS of calls by every sender, by bucket number."""

    buckets: Mapping[int, Tally]

    def total(self, now: float) -> Tally:
        """The counts of the window that ends now."""
        first = bucket_of(now - WINDOW_SECONDS) + 1
        total = Tally()
        for number, tally in self.buckets.items():
            if first <= number <= bucket_of(now):
                total += tally
        return total

    def plus(self, now: float, tally: Tally) -> Window:
        """This window with `tally` counted now, expired buckets left out (what the shared item's
        counters become after a batch)."""
        bucket = bucket_of(now)
        first = bucket_of(now - WINDOW_SECONDS) + 1
        buckets = {n: t for n, t in self.buckets.items() if n >= first}
        buckets[bucket] = buckets.get(bucket, Tally()) + tally
        return Window(buckets)

    def expired(self, now: float) -> list[int]:
        """Buckets that have left the window (their counters can be removed)."""
        first = bucket_of(now - WINDOW_SECONDS) + 1
        return [number for number in self.buckets if number < first]

    def reject_probability(self, now: float) -> float:
        """SRE client-side throttling: max(0, (requests - K * accepts) / (requests + 1))."""
        tally = self.total(now)
        return max(0.0, (tally.requests - K * tally.accepts) / (tally.requests + 1))

    def retry_budget(self, now: float) -> int:
        """Retries still allowed now (Finagle-style: ~20% of requests plus a reserve)."""
        tally = self.total(now)
        return max(0, math.floor(RETRY_RATIO * tally.requests) + RETRY_RESERVE - tally.retries)

    def works(self, now: float) -> bool:
        """Whether the gateway is known to work: enough calls in the window and at least half
        of them accepted (so a failure is bad luck, not an outage)."""
        tally = self.total(now)
        return tally.requests >= RATIO_MIN_CALLS and tally.accepts * K >= tally.requests

    def mean_latency(self, now: float) -> float | None:
        """Mean latency of the window's accepted calls (None: too few to tell)."""
        tally = self.total(now)
        if tally.accepts < LATENCY_MIN_SAMPLES:
            return None
        return tally.latency / tally.accepts


# ---------------------------------------------------------------- the controller


@dataclass(frozen=True)
class Control:
    """The shared controller state: speed (share of the configured rate), a pause, probing."""

    speed: float = 1.0
    paused_until: float = 0.0
    probing: bool = False
    cut_at: float = 0.0
    raised_at: float = 0.0

    def interval(self, rate: float) -> float:
        """Seconds between two calls of all senders together."""
        interval = 1.0 / (rate * self.speed)
        return max(interval, PROBE_INTERVAL_SECONDS) if self.probing else interval

    def batch_limit(self, wanted: int) -> int:
        """Calls one sender may make in a batch: one probe while the gateway seems down."""
        return min(wanted, 1) if self.probing else wanted


@dataclass(frozen=True)
class Decision:
    control: Control
    why: str | None = None  # set when sending slowed down or paused


def decide(
    control: Control,
    window: Window,
    verdicts: Sequence[Verdict],
    now: float,
    *,
    run: int = 0,
    default_pause: float,
    max_pause: float = math.inf,
    latencies: Sequence[float] = (),
) -> Decision:
    """The controller's next state after a batch's answers (`window` already counts them; `run`
    is the calls in a row, of all senders, with none accepted, this batch's included)."""
    if not verdicts:
        return Decision(control)
    overload = [v for v in verdicts if v.kind is Kind.OVERLOAD]
    accepted = sum(v.accepted for v in verdicts)
    waits = [v.retry_after for v in overload if v.retry_after is not None]
    # Retry-After is honoured up to max_pause: a gateway asking for a day does not get it.
    pause = min(max_pause, max(waits) if waits else default_pause) if overload else 0.0
    if run >= OUTAGE_RUN and not accepted:
        # Everything fails (refused, 5xx, or overload answers only): one probe a second, and
        # still no call before the gateway's Retry-After.
        probing = replace(control, probing=True, paused_until=_until(control, now, pause))
        return Decision(probing, None if control.probing else "the gateway seems down: probing")
    why = None
    if overload:
        why = "the gateway asked to slow down"
    elif _slow(window, verdicts, latencies, now):
        why = "the gateway answers far slower than usual"
    elif (
        window.total(now).requests >= RATIO_MIN_CALLS
        and window.reject_probability(now) > 0
        and accepted * K < len(verdicts)
    ):
        why = "fewer than half of the calls succeed"
    if why is not None:
        paused_until = _until(control, now, pause)
        if now - control.cut_at < CUT_SPACING_SECONDS:  # this episode's cut is made already
            return Decision(replace(control, paused_until=paused_until))
        speed = max(MIN_SPEED, control.speed * CUT)
        return Decision(
            replace(control, speed=speed, paused_until=paused_until, cut_at=now, raised_at=now),
            why,
        )
    if not accepted:  # bad luck alone: the rate is left alone
        return Decision(control)
    if control.probing:  # the gateway is back: climb from a low speed
        speed = min(control.speed, RESTART_SPEED)
        return Decision(replace(control, probing=False, speed=speed, raised_at=now))
    if control.speed < 1.0 and now - control.raised_at >= RAISE_SPACING_SECONDS:
        grown = control.speed * GROWTH_PER_SECOND ** min(now - control.raised_at, 2.0)
        return Decision(replace(control, speed=min(1.0, grown), raised_at=now))
    return Decision(control)


def _until(control: Control, now: float, pause: float) -> float:
    """The pause's end after a pause of `pause` seconds from now (none: unchanged, so an
    unchanged state costs no write)."""
    return max(control.paused_until, now + pause) if pause > 0 else control.paused_until


def _slow(
    window: Window, verdicts: Sequence[Verdict], latencies: Sequence[float], now: float
) -> bool:
    """Most of a batch's accepted calls (a few at least) answered far slower than the window's
    mean; timeouts are bad luck, not counted here."""
    mean = window.mean_latency(now)
    answered = [t for v, t in zip(verdicts, latencies, strict=False) if v.accepted]
    if mean is None or len(answered) < LATENCY_BATCH_MIN:
        return False
    threshold = max(LATENCY_FLOOR_SECONDS, LATENCY_FACTOR * mean)
    return sum(t > threshold for t in answered) * 2 > len(answered)


# ---------------------------------------------------------------- the shared limits


@dataclass(frozen=True)
class Lease:
    """Permits one sender holds until a moment (epoch seconds); a dead sender's come back."""

    permits: int
    until: float


@dataclass(frozen=True)
class SharedLimits:
    """What every sender shares (one stored item): the next free slot (`tat`, the generic cell
    rate algorithm's theoretical arrival time), the permits held and by whom, the controller's
    state and its version, the calls in a row with none accepted, and the window's counts."""

    tat: float = 0.0
    held: int = 0
    holders: Mapping[str, Lease] = field(default_factory=dict)
    control: Control = field(default_factory=Control)
    version: int = 0
    run: int = 0
    window: Window = field(default_factory=lambda: Window({}))
    # The last reason sending slowed down or paused, and when (written with that decision).
    why: str | None = None
    why_at: float | None = None


@dataclass(frozen=True)
class OperatorSlots:
    """One rate-limited operator's slots: where its next free one begins, and when its jobs
    last went back to the queue for want of one (epoch seconds)."""

    tat: float = 0.0
    deferred_at: float | None = None


# ---------------------------------------------------------------- what operators see

# Below this accept ratio (over at least RATIO_MIN_CALLS calls) the gateway counts as degraded
# even while sending runs at full speed: more than one call in five fails, which a healthy
# gateway never does (the controller itself only acts below 1/K = 50%).
DEGRADED_ACCEPT_RATIO = 0.8


class GatewayState(StrEnum):
    NORMAL = "normal"  # sending at the configured rate
    SLOWED = "slowed"  # sending below it after an overload, climbing back
    PAUSED = "paused"  # no call until the pause ends (the gateway's Retry-After)
    PROBING = "probing"  # the gateway seems down: one call a second until one succeeds


@dataclass(frozen=True)
class AnswerMix:
    """The gateway's answers to every sender over the window."""

    calls: int = 0
    accepted: int = 0
    overload: int = 0
    retries: int = 0  # retries granted from the budget

    @property
    def bad_luck(self) -> int:
        """Calls that failed without being about load (5xx, malformed, timeouts, network)."""
        return self.calls - self.accepted - self.overload


@dataclass(frozen=True)
class OperatorStatus:
    """A mobile operator with a sending rate of its own (GATEWAY_RATE_PER_OPERATOR)."""

    code: str
    configured_rate: float
    max_rate: float | None = None  # what its slots allow (see OperatorSpacing)
    reserved_ahead_seconds: float = 0.0  # how far ahead its slots are taken: its backlog
    deferring: bool = False  # its jobs went back to the queue for want of a slot just now


@dataclass(frozen=True)
class GatewayStatus:
    """Why sending is as fast as it is: the controller's state in an operator's terms."""

    configured_rate: float  # calls a second, all senders together (GATEWAY_RATE_PER_SECOND)
    current_rate: float  # calls a second allowed now: 0 while paused, 1 while probing
    speed: float  # share of the configured rate the controller allows once not paused
    state: GatewayState
    pause_left: float  # seconds until the pause ends (0: not paused)
    accept_ratio: float | None  # accepted / calls over the window; None without calls
    answers: AnswerMix
    degraded: bool
    why: str | None = None  # the last reason sending slowed down or paused
    why_at: float | None = None  # when (epoch seconds)
    operators: tuple[OperatorStatus, ...] = ()
    window_seconds: int = WINDOW_SECONDS

    @classmethod
    def of(
        cls,
        control: Control,
        window: Window,
        rate: float,
        now: float,
        *,
        why: str | None = None,
        why_at: float | None = None,
        operators: tuple[OperatorStatus, ...] = (),
    ) -> GatewayStatus:
        """The status of the shared controller state and window at `now`."""
        tally = window.total(now)
        pause_left = max(0.0, control.paused_until - now)
        if control.probing:
            state = GatewayState.PROBING
        elif pause_left > 0:
            state = GatewayState.PAUSED
        elif control.speed < 1.0:
            state = GatewayState.SLOWED
        else:
            state = GatewayState.NORMAL
        # A pause stops every call, a probe's included (a Retry-After while probing).
        current = 0.0 if pause_left > 0 else 1.0 / control.interval(rate)
        ratio = tally.accepts / tally.requests if tally.requests else None
        poor = (
            ratio is not None
            and tally.requests >= RATIO_MIN_CALLS
            and ratio < DEGRADED_ACCEPT_RATIO
        )
        return cls(
            configured_rate=rate,
            current_rate=current,
            speed=control.speed,
            state=state,
            pause_left=pause_left,
            accept_ratio=ratio,
            answers=AnswerMix(tally.requests, tally.accepts, tally.overloads, tally.retries),
            degraded=state is not GatewayState.NORMAL or poor,
            why=why,
            why_at=why_at,
            operators=operators,
        )
