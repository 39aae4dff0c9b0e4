"""The Prometheus text exposition (format 0.0.4) of the business counters.

Every value is read from storage at scrape time (the mailings' counters, SQS's approximate
depths), so all series are gauges: deleting a mailing lowers the totals.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from chalicelib.domain import Mailing, MailingStatus, MessageStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Mailings listed one by one: those that can still change. Finished and cancelled ones only
# count in the totals, so the number of series stays bounded by the active mailings.
_LIVE = (MailingStatus.SCHEDULED, MailingStatus.RUNNING)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(name: str, help_text: str, samples: Iterable[tuple[dict[str, str], int]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    for labels, value in samples:
        rendered = ",".join(f'{key}="{_label(val)}"' for key, val in labels.items())
        lines.append(f"{name}{{{rendered}}} {value}" if rendered else f"{name} {value}")
    return lines


def exposition(mailings: list[Mailing], depths: dict[str, dict[str, int]]) -> str:
    totals: Counter = Counter()
    for mailing in mailings:
        for status in MessageStatus:
            totals[status.value] += getattr(mailing.counts, status.value)
    by_status = Counter(mailing.status.value for mailing in mailings)
    live = [m for m in mailings if m.status in _LIVE]
    lines = [
        *_family(
            "sms_messages",
            "Messages by status over all stored mailings.",
            (({"status": s.value}, totals[s.value]) for s in MessageStatus),
        ),
        *_family(
            "sms_mailings",
            "Mailings by status.",
            (({"status": s.value}, by_status[s.value]) for s in MailingStatus),
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
    ]
    return "\n".join(lines) + "\n"
