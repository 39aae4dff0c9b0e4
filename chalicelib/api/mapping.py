"""Mapping between API models (pydantic) and domain objects, in both directions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from chalicelib import domain
from chalicelib.domain import MessageStatus
from chalicelib.domain import variants as domain_variants
from chalicelib.domain.rate_limit import GatewayStatus
from chalicelib.domain.receipt import Delivery
from chalicelib.domain.sms_parts import PartsEstimate
from chalicelib.schemas import (
    AudienceFilter,
    ClientCreate,
    ClientOut,
    CostEstimate,
    DeliveryOut,
    DeliveryStats,
    GatewayAnswers,
    GatewayOperator,
    GatewaySlowdown,
    GatewayStatusOut,
    MailingCreate,
    MailingOut,
    MailingPatch,
    MailingSummary,
    MessageOut,
    MessageStats,
    PartsOut,
    SendWindow,
    SkippedByReason,
    VariantIn,
    VariantOut,
)
from chalicelib.services.clients import ClientFields
from chalicelib.services.mailings import MailingFields
from chalicelib.settings import Settings


def page_limit(requested: int | None, settings: Settings) -> int:
    """The page size: the default when absent, capped at the configured maximum."""
    return min(requested or settings.default_page_size, settings.max_page_size)


def client_fields(body: ClientCreate) -> ClientFields:
    return ClientFields(
        phone=body.phone,
        operator_code=body.operator_code,
        tag=body.tag,
        timezone=body.timezone,
        opted_out=body.opted_out,
    )


def client_out(client: domain.Client) -> ClientOut:
    return ClientOut(
        id=client.id,
        phone=client.phone,
        operator_code=client.operator_code,
        tag=client.tag,
        timezone=client.timezone,
        opted_out=client.opted_out,
        created_at=client.created_at,
        updated_at=client.updated_at,
    )


def audience(value: AudienceFilter) -> domain.AudienceFilter:
    return domain.AudienceFilter(tuple(value.operator_codes), tuple(value.tags))


def send_window(value: SendWindow | None) -> domain.SendWindow | None:
    if value is None:
        return None
    return domain.SendWindow(
        domain.SendWindow.parse(value.start), domain.SendWindow.parse(value.end)
    )


def mailing_fields(body: MailingCreate) -> MailingFields:
    return MailingFields(
        text=body.text,
        start_at=body.start_at,
        end_at=body.end_at,
        audience=audience(body.filter),
        send_window=send_window(body.send_window),
        max_parts=body.max_parts,
        frequency_cap_exempt=body.frequency_cap_exempt,
        variants=variants_in(body.variants),
        holdout_percent=body.holdout_percent,
    )


def variants_in(values: list[VariantIn] | None) -> tuple[domain_variants.Variant, ...]:
    return tuple(domain_variants.Variant(v.text, v.weight) for v in values or ())


def variants_out(mailing: domain.Mailing) -> list[VariantOut] | None:
    if not mailing.variants:
        return None
    return [
        VariantOut(text=v.text, weight=v.weight, sent=sent)
        for v, sent in zip(mailing.variants, mailing.variant_sent, strict=False)
    ]


def mailing_changes(patch: MailingPatch) -> dict[str, Any]:
    """A PATCH body as keyword changes of MailingFields (only the fields that were sent)."""
    sent = patch.model_fields_set
    changes: dict[str, Any] = {}
    for name in ("text", "start_at", "end_at"):
        if name in sent:
            changes[name] = getattr(patch, name)
    if "filter" in sent:
        changes["audience"] = audience(patch.filter)
    if "send_window" in sent:
        changes["send_window"] = send_window(patch.send_window)
    if "max_parts" in sent:
        changes["max_parts"] = patch.max_parts
    if "frequency_cap_exempt" in sent and patch.frequency_cap_exempt is not None:
        changes["frequency_cap_exempt"] = patch.frequency_cap_exempt
    if "variants" in sent and patch.variants is not None:
        changes["variants"] = variants_in(patch.variants)
    if "holdout_percent" in sent and patch.holdout_percent is not None:
        changes["holdout_percent"] = patch.holdout_percent
    return changes


def skipped_by_reason(mailing: domain.Mailing) -> SkippedByReason:
    return SkippedByReason(**mailing.skip_counts.as_dict())


def stats_out(counts: domain.MessageCounts) -> MessageStats:
    return MessageStats(
        total=counts.total,
        **{status.value: getattr(counts, status.value) for status in MessageStatus},
    )


def mailing_out(mailing: domain.Mailing) -> MailingOut:
    window = None
    if mailing.send_window is not None:
        window = SendWindow(
            start=domain.SendWindow.format(mailing.send_window.start),
            end=domain.SendWindow.format(mailing.send_window.end),
        )
    return MailingOut(
        id=mailing.id,
        text=mailing.text,
        start_at=mailing.start_at,
        end_at=mailing.end_at,
        filter=AudienceFilter(
            operator_codes=list(mailing.audience.operator_codes), tags=list(mailing.audience.tags)
        ),
        send_window=window,
        frequency_cap_exempt=mailing.frequency_cap_exempt,
        variants=variants_out(mailing),
        holdout_percent=mailing.holdout_percent,
        status=mailing.status,
        stats=stats_out(mailing.counts),
        delivery=delivery_stats_out(mailing),
        skipped_by_reason=skipped_by_reason(mailing),
        created_at=mailing.created_at,
        updated_at=mailing.updated_at,
        max_parts=mailing.max_parts,
        parts=parts_out(mailing.parts),
        cost_estimate=cost_out(mailing.parts),
    )


def parts_out(parts: PartsEstimate | None) -> PartsOut | None:
    if parts is None:
        return None
    return PartsOut(
        encoding=parts.encoding,
        per_message_min=parts.per_message_min,
        per_message_max=parts.per_message_max,
        total=parts.total,
        approximate=parts.approximate,
    )


def cost_out(parts: PartsEstimate | None) -> CostEstimate | None:
    if parts is None or parts.cost is None or parts.currency is None:
        return None
    return CostEstimate(amount=parts.cost, currency=parts.currency)


def mailing_summary(mailing: domain.Mailing) -> MailingSummary:
    return MailingSummary(
        mailing_id=mailing.id,
        status=mailing.status,
        stats=stats_out(mailing.counts),
        delivery=delivery_stats_out(mailing),
    )


def message_out(message: domain.Message) -> MessageOut:
    return MessageOut(
        id=message.id,
        client_id=message.client_id,
        phone=message.phone,
        status=message.status,
        created_at=message.created_at,
        sent_at=message.sent_at,
        attempts=message.attempts,
        last_error=message.last_error,
        skip_reason=message.skip_reason,
        variant=message.variant,
        delivery=None if message.delivery is None else delivery_out(message.delivery),
    )


def delivery_stats_out(mailing: domain.Mailing) -> DeliveryStats:
    """A mailing's delivery receipts so far, with the delivered share of its sent messages."""
    counts = mailing.delivery
    return DeliveryStats(
        delivered=counts.delivered,
        undelivered=counts.undelivered,
        delivered_rate=counts.rate(mailing.counts.sent),
    )


def delivery_out(delivery: Delivery) -> DeliveryOut:
    return DeliveryOut(
        status=delivery.status,
        at=delivery.at,
        received_at=delivery.received_at,
        error=delivery.error,
    )


def gateway_status_out(status: GatewayStatus) -> GatewayStatusOut:
    answers = status.answers
    slowdown = None
    if status.why is not None and status.why_at is not None:
        slowdown = GatewaySlowdown(reason=status.why, at=datetime.fromtimestamp(status.why_at, UTC))
    return GatewayStatusOut(
        state=status.state.value,
        degraded=status.degraded,
        configured_rate=status.configured_rate,
        current_rate=round(status.current_rate, 3),
        speed=round(status.speed, 4),
        pause_seconds=round(status.pause_left, 1),
        accept_ratio=None if status.accept_ratio is None else round(status.accept_ratio, 4),
        window_seconds=status.window_seconds,
        answers=GatewayAnswers(
            calls=answers.calls,
            accepted=answers.accepted,
            overload=answers.overload,
            bad_luck=answers.bad_luck,
            retries=answers.retries,
        ),
        last_slowdown=slowdown,
        operators=[
            GatewayOperator(
                code=o.code,
                configured_rate=o.configured_rate,
                max_rate=o.max_rate,
                reserved_ahead_seconds=o.reserved_ahead_seconds,
                deferring=o.deferring,
            )
            for o in status.operators
        ],
    )
