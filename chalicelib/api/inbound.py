"""The gateway's webhooks: clients' replies (`POST /inbound-sms`) and delivery receipts
(`POST /delivery-receipts`); and a client's replies (`GET /clients/{client_id}/replies`)."""

from __future__ import annotations

from chalicelib.api.http import ApiBlueprint
from chalicelib.api.mapping import delivery_out, page_limit
from chalicelib.api.security import bearer_auth
from chalicelib.container import services
from chalicelib.schemas import (
    DeliveryReceiptIn,
    DeliveryReceiptOut,
    InboundReplyOut,
    InboundReplyPage,
    InboundSmsIn,
    InboundSmsOut,
    PageQuery,
)

api = ApiBlueprint(__name__, "inbound", authorizer=bearer_auth)


@api.route(
    "/inbound-sms",
    "POST",
    summary="Receive a client's SMS reply (the gateway's webhook)",
    body=InboundSmsIn,
    response=InboundSmsOut,
    status=202,
    errors=(400, 409, 413, 415, 422),
    # A gateway that retries its webhook with the same Idempotency-Key gets the first answer,
    # and the reply is kept and counted once.
    idempotent=True,
)
def receive_inbound_sms(body: InboundSmsIn) -> InboundSmsOut:
    """A reply made only of an opt-out keyword (INBOUND_OPT_OUT_KEYWORDS; any case and
    whitespace) opts the client out, as `POST /opt-outs` does. Any other reply is kept on the
    client's page (`GET /clients/{id}/replies`) and counted. A number no client has is counted
    and accepted (202) too, so the gateway does not send it again and again."""
    outcome = services().inbound.receive(body.phone, body.text)
    return InboundSmsOut(result=outcome.result, client_id=outcome.client_id)


@api.route(
    "/clients/{client_id}/replies",
    "GET",
    summary="A client's SMS replies",
    query=PageQuery,
    response=InboundReplyPage,
    errors=(400, 404),
)
def client_replies(client_id: str, query: PageQuery) -> InboundReplyPage:
    """The replies the client sent that were not opt-out keywords, newest first, a page at a
    time."""
    page = services().inbound.replies(
        client_id, limit=page_limit(query.limit, services().settings), cursor=query.cursor
    )
    return InboundReplyPage(
        items=[
            InboundReplyOut(id=r.id, phone=r.phone, text=r.text, received_at=r.received_at)
            for r in page.items
        ],
        next_cursor=page.next_cursor,
    )


@api.route(
    "/delivery-receipts",
    "POST",
    summary="Record a delivery receipt (the gateway's webhook)",
    body=DeliveryReceiptIn,
    response=DeliveryReceiptOut,
    errors=(400, 404, 413, 415, 422),
    # One per message sent: the message keeps the receipt, and an audit entry each would double
    # the writes of a mailing.
    audited=False,
)
def record_delivery_receipt(body: DeliveryReceiptIn) -> DeliveryReceiptOut:
    """The message keeps its status (`sent`) and gains `delivery`; its mailing counts it as
    `delivered` or `undelivered` (an `expired` receipt is undelivered). The first receipt of a
    message counts: a second one changes nothing and answers `duplicate: true`. A receipt that
    comes before the sender wrote `sent` is kept all the same. 404 for an id no message has,
    or whose mailing fanned out while DELIVERY_RECEIPTS was off."""
    outcome = services().receipts.record(body.id, body.status, error=body.error, at=body.at)
    return DeliveryReceiptOut(
        id=outcome.message_id,
        mailing_id=outcome.mailing_id,
        delivery=delivery_out(outcome.delivery),
        duplicate=outcome.duplicate,
    )
