"""CloudWatch metrics as Embedded Metric Format (EMF) lines, written by Powertools.

Every blob has the dimensions `service` (POWERTOOLS_SERVICE_NAME) and `stack` (the stack name,
TABLE_PREFIX), so prod and dev stacks never mix. The mailing id is a property of the blob (it
is searchable in Logs Insights), never a dimension: a dimension per mailing would create a
metric per mailing and cost accordingly. docs/operations.md lists every metric.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit

from chalicelib.domain.gateway_answer import GatewayResult
from chalicelib.domain.rate_limit import GatewayState, GatewayStatus
from chalicelib.logs import SERVICE
from chalicelib.settings import Settings

logger = logging.getLogger(__name__)

# Name -> (unit, what it counts); docs/operations.md's table and the tests read this.
METRICS: dict[str, tuple[MetricUnit, str]] = {
    "MessagesSent": (MetricUnit.Count, "messages the gateway accepted"),
    "MessagesFailed": (MetricUnit.Count, "messages that failed for good (rejected, gave up)"),
    "MessagesExpired": (MetricUnit.Count, "messages not sent before their mailing's end"),
    "MessagesRetried": (MetricUnit.Count, "failed gateway attempts that will be tried again"),
    "MessagesQueued": (MetricUnit.Count, "messages created and queued by the fan-out"),
    "FanoutRate": (MetricUnit.CountPerSecond, "fan-out speed of one fan-out run"),
    "GatewayCalls": (MetricUnit.Count, "calls made to the SMS gateway"),
    "GatewayErrors": (MetricUnit.Count, "gateway calls that were not a success"),
    "GatewayLatency": (MetricUnit.Milliseconds, "time of one gateway call, per call"),
    "DlqArrivals": (MetricUnit.Count, "send jobs moved to the dead-letter queue"),
    # The gateway's back-pressure state as a sender saw it after a batch (gauges: zeros kept).
    "GatewayRate": (MetricUnit.CountPerSecond, "gateway calls a second allowed now"),
    "GatewaySpeed": (MetricUnit.Percent, "share of the configured rate allowed once not paused"),
    "GatewayPaused": (MetricUnit.Count, "1 while senders wait for the gateway's Retry-After"),
    "GatewayProbing": (MetricUnit.Count, "1 while a gateway that seems down is probed"),
    "GatewayAcceptRatio": (MetricUnit.Percent, "share of the window's gateway calls accepted"),
    "MessagesRequeued": (
        MetricUnit.Count,
        "pending messages whose job was lost, queued again by the reconciler",
    ),
    "AuditWriteFailures": (MetricUnit.Count, "writes whose audit entry could not be stored"),
}
# GatewayErrors is also written once per error class with an `error_class` dimension.
ERROR_CLASSES = (
    "timeout",
    "network",
    "http_429",
    "http_5xx",
    "http_4xx",
    "unauthorized",
    "bad_answer",
)


def error_class(result: GatewayResult) -> str | None:
    """The class of a gateway answer that was not a success (None for a success)."""
    return result.kind.error_class


def _stdout(line: str) -> None:
    # Lambda sends stdout to CloudWatch Logs, which extracts EMF blobs into metrics.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class MetricsWriter:
    """Writes EMF blobs through `write` (stdout in Lambda)."""

    def __init__(self, settings: Settings, write: Callable[[str], None] | None = None) -> None:
        self._namespace = settings.metrics_namespace
        self._stack = settings.table_prefix
        self._write = write or _stdout
        self._enabled = os.environ.get("POWERTOOLS_METRICS_DISABLED", "").lower() != "true"

    def emit(
        self,
        values: dict[str, float | Iterable[float]],
        *,
        properties: dict[str, Any] | None = None,
        dimensions: dict[str, str] | None = None,
        gauges: bool = False,
    ) -> None:
        """One blob: every metric in `values` (an iterable gives one value each), zeros left
        out unless they are `gauges` (a state, where 0 says something); nothing is written when
        nothing is left. Never raises."""
        if not self._enabled:
            return
        try:
            blob = self._blob(values, properties or {}, dimensions or {}, gauges)
            if blob is not None:
                self._write(json.dumps(blob, separators=(",", ":"), default=str))
        except Exception:  # metrics must never cost a message
            logger.warning("could not write metrics", exc_info=True)

    def _blob(
        self,
        values: dict[str, float | Iterable[float]],
        properties: dict,
        dimensions: dict,
        gauges: bool = False,
    ) -> dict | None:
        metrics = EphemeralMetrics(namespace=self._namespace, service=SERVICE)
        metrics.add_dimension(name="stack", value=self._stack)
        for name, value in dimensions.items():
            metrics.add_dimension(name=name, value=value)
        added = False
        for name, value in values.items():
            unit = METRICS[name][0]
            for one in [value] if isinstance(value, int | float) else list(value):
                if one or gauges:
                    metrics.add_metric(name=name, unit=unit, value=one)
                    added = True
        if not added:
            return None
        for key, prop in properties.items():
            metrics.add_metadata(key=key, value=prop)
        return metrics.serialize_metric_set()

    # ---------------------------------------------------------------- what the services emit

    def delivery(
        self, mailing_id: str, results: Iterable[str], answers: list[GatewayResult]
    ) -> None:
        """The outcomes and gateway calls of one send batch (one mailing)."""
        counts = Counter(str(result) for result in results)
        errors = Counter(cls for cls in map(error_class, answers) if cls is not None)
        self.emit(
            {
                "MessagesSent": counts["sent"],
                "MessagesFailed": counts["failed"] + counts["dead_lettered"],
                "MessagesExpired": counts["expired"],
                "MessagesRetried": counts["retry"],
                "DlqArrivals": counts["dead_lettered"],
                "GatewayCalls": len(answers),
                "GatewayErrors": sum(errors.values()),
                "GatewayLatency": [round(a.latency_seconds * 1000, 1) for a in answers],
            },
            properties={"mailing_id": mailing_id},
        )
        for cls, count in sorted(errors.items()):
            self.emit(
                {"GatewayErrors": count},
                properties={"mailing_id": mailing_id},
                dimensions={"error_class": cls},
            )

    def gateway(self, mailing_id: str, status: GatewayStatus) -> None:
        """The gateway's back-pressure state as a send batch (of this mailing) left it."""
        values: dict[str, float | Iterable[float]] = {
            "GatewayRate": round(status.current_rate, 3),
            "GatewaySpeed": round(status.speed * 100, 1),
            "GatewayPaused": int(status.pause_left > 0),
            "GatewayProbing": int(status.state is GatewayState.PROBING),
        }
        if status.accept_ratio is not None:
            values["GatewayAcceptRatio"] = round(status.accept_ratio * 100, 1)
        self.emit(values, properties={"mailing_id": mailing_id}, gauges=True)

    def fanout(self, mailing_id: str, created: int, seconds: float) -> None:
        """One fan-out run of a mailing: messages created and queued, and how fast."""
        rate = round(created / seconds, 1) if created and seconds > 0 else 0
        self.emit(
            {"MessagesQueued": created, "FanoutRate": rate},
            properties={"mailing_id": mailing_id},
        )

    def requeued(self, mailing_id: str, count: int) -> None:
        """Pending messages of a mailing whose job was lost, queued again."""
        self.emit({"MessagesRequeued": count}, properties={"mailing_id": mailing_id})

    def dead_letters(self, count: int) -> None:
        """SQS messages that failed their last receive: SQS moves them to the DLQ."""
        self.emit({"DlqArrivals": count})
