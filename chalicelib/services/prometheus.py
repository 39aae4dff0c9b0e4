"""The Prometheus text exposition (format 0.0.4) of the business counters and the gateway's
back-pressure state.

Every value is read from storage at scrape time (the mailings' counters, SQS's approximate
depths, the senders' shared gateway item), so all series are gauges: deleting a mailing lowers
the totals.
"""

from __future__ import annotations

from collections.abc import Iterable

from chalicelib.domain import Mailing, MailingStatus, MessageStatus
from chalicelib.domain.inbound import InboundCounts
from chalicelib.domain.mailing import Statistics, Totals, statistics
from chalicelib.domain.rate_limit import GatewayState, GatewayStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Mailings listed one by one: those that can still change. Finished and cancelled ones only
# count in the totals, so the number of series stays bounded by the active mailings.
_LIVE = (MailingStatus.SCHEDULED, MailingStatus.RUNNING)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(
    name: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    for labels, value in samples:
        rendered = ",".join(f'{key}="{_label(val)}"' for key, val in labels.items())
        lines.append(f"{name}{{{rendered}}} {value}" if rendered else f"{name} {value}")
    return lines


def _gateway(status: GatewayStatus) -> list[str]:
    answers = status.answers
    window = f"over the last {status.window_seconds} s"
    lines = [
        *_family(
            "sms_gateway_configured_rate",
            "Gateway calls a second allowed to all senders (GATEWAY_RATE_PER_SECOND).",
            [({}, status.configured_rate)],
        ),
        *_family(
            "sms_gateway_current_rate",
            "Gateway calls a second allowed now: lower while slowed, 0 paused, 1 probing.",
            [({}, round(status.current_rate, 3))],
        ),
        *_family(
            "sms_gateway_paused",
            "1 while every sender waits for the gateway's Retry-After.",
            [({}, int(status.pause_left > 0))],
        ),
        *_family(
            "sms_gateway_probing",
            "1 while the gateway seems down and is probed one call a second.",
            [({}, int(status.state is GatewayState.PROBING))],
        ),
        *_family(
            "sms_gateway_degraded",
            "1 while sending is slowed, paused or probing, or the gateway accepts under 80%.",
            [({}, int(status.degraded))],
        ),
    ]
    if status.accept_ratio is not None:  # no calls in the window: no ratio to tell
        lines += _family(
            "sms_gateway_accept_ratio",
            f"Share of the gateway calls accepted {window}.",
            [({}, round(status.accept_ratio, 4))],
        )
    lines += _family(
        "sms_gateway_answers",
        f"Gateway answers to all senders {window}, by kind.",
        [
            ({"kind": "accepted"}, answers.accepted),
            ({"kind": "overload"}, answers.overload),
            ({"kind": "bad_luck"}, answers.bad_luck),
        ],
    )
    lines += _family(
        "sms_gateway_retries",
        f"Retries granted from the shared retry budget {window}.",
        [({}, answers.retries)],
    )
    if status.operators:
        lines += _family(
            "sms_gateway_operator_configured_rate",
            "Gateway calls a second allowed to one mobile operator (GATEWAY_RATE_PER_OPERATOR).",
            (({"operator": o.code}, o.configured_rate) for o in status.operators),
        )
        lines += _family(
            "sms_gateway_operator_backlog_seconds",
            "How far ahead one mobile operator's send slots are taken.",
            (({"operator": o.code}, o.reserved_ahead_seconds) for o in status.operators),
        )
        lines += _family(
            "sms_gateway_operator_deferring",
            "1 while a mobile operator's messages wait in the queue for its rate.",
            (({"operator": o.code}, float(o.deferring)) for o in status.operators),
        )
    return lines


def exposition(
    mailings: Statistics | list[Mailing],
    depths: dict[str, dict[str, int]],
    gateway: GatewayStatus | None = None,
) -> str:
    """The exposition of `mailings`: their statistics (the service's bounded read), or every
    mailing as a list (summed here)."""
    if not isinstance(mailings, Statistics):
        mailings = statistics(Totals(), [(mailing, None) for mailing in mailings])
    counts = mailings.counts
    live = [m for m in mailings.unsettled if m.status in _LIVE]
    lines = [
        *_family(
            "sms_messages",
            "Messages by status over all stored mailings.",
            (({"status": s.value}, getattr(counts, s.value)) for s in MessageStatus),
        ),
        *_family(
            "sms_mailings",
            "Mailings by status.",
            (({"status": s.value}, mailings.mailings.get(s, 0)) for s in MailingStatus),
        ),
        *_family(
            "sms_mailing_messages",
            "Messages of each scheduled or running mailing, by status.",
            (
                ({"mailing_id": m.id, "status": s.value}, getattr(m.counts, s.value))
                for m in live
                for s in MessageStatus
            ),
        ),
        *_family(
            "sms_queue_messages",
            "Approximate messages in each SQS queue, by state.",
            (
                ({"queue": queue, "state": state}, count)
                for queue, states in sorted(depths.items())
                for state, count in states.items()
            ),
        ),
        *(_gateway(gateway) if gateway is not None else []),
    ]
    return "\n".join(lines) + "\n"


def receipts_exposition(unsettled: Iterable[Mailing], inbound: InboundCounts) -> str:
    """Delivery receipts of the scheduled and running mailings and the inbound SMS counts, in
    the same format (appended to `exposition`)."""
    live = [m for m in unsettled if m.status in _LIVE]
    rates = [(m, m.delivery.rate(m.counts.sent)) for m in live]
    lines = [
        *_family(
            "sms_mailing_delivery_receipts",
            "Delivery receipts of each scheduled or running mailing, by outcome.",
            (
                ({"mailing_id": m.id, "outcome": outcome}, value)
                for m in live
                for outcome, value in (
                    ("delivered", m.delivery.delivered),
                    ("undelivered", m.delivery.undelivered),
                )
            ),
        ),
        *_family(
            "sms_mailing_delivered_rate",
            "Delivered / sent of each scheduled or running mailing that sent anything.",
            (({"mailing_id": m.id}, round(rate, 4)) for m, rate in rates if rate is not None),
        ),
        *_family(
            "sms_inbound_messages",
            "Inbound SMS (POST /inbound-sms) so far, by what they did.",
            [
                ({"result": "reply"}, inbound.replies),
                ({"result": "opt_out"}, inbound.opt_outs),
                ({"result": "unknown_phone"}, inbound.unknown),
            ],
        ),
    ]
    return "\n".join(lines) + "\n"
