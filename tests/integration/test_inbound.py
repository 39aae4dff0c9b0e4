"""Inbound SMS (`POST /inbound-sms`): opt-out keywords, other replies kept on the client's page,
unknown numbers; through the real app on moto and, for the opt-out, the delivery pipeline."""

from __future__ import annotations

import pytest

from tests.conftest import API_TOKEN, GATEWAY_TOKEN, body
from tests.integration import test_delivery as delivery
from tests.support.pipeline import pipeline_settings

# The delivery suite's fixtures (moto, virtual SQS, the sandbox gateway, the pipeline driver).
gateway, gateway_client, sqs, services, pipeline = (
    delivery.gateway,
    delivery.gateway_client,
    delivery.sqs,
    delivery.services,
    delivery.pipeline,
)
add_client, create_mailing, sent_phones = (
    delivery.add_client,
    delivery.create_mailing,
    delivery.sent_phones,
)


@pytest.fixture
def settings(gateway, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    monkeypatch.setenv("API_TOKENS", API_TOKEN)
    overrides = getattr(request, "param", {})
    return pipeline_settings(gateway.url, sender_api_token=GATEWAY_TOKEN, **overrides)


def inbound(api, phone: str, text: str):
    return api.post("/inbound-sms", {"phone": phone, "text": text})


def inbound_counts(api) -> dict[str, float]:
    lines = api.get("/metrics").body.decode().splitlines()
    prefix = "sms_inbound_messages{result="
    return {
        line[len(prefix) + 1 : line.index('"', len(prefix) + 1)]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(prefix)
    }


@pytest.mark.parametrize(
    "text",
    ["STOP", " stop ", "Стоп", "ОТПИСКА\n", "unsubscribe", "отписаться", "\tСТОП  "],  # noqa: RUF001
)
def test_a_keyword_reply_opts_the_client_out_and_it_is_sent_nothing_more(
    api, pipeline, clock, gateway, text
):
    # Given two clients
    leaving = add_client(api, "79000000001")
    add_client(api, "79000000002")

    # When the first replies with an opt-out keyword, in any case and spacing
    answer = inbound(api, "+79000000001", text)

    # Then it is opted out, and the next mailing reaches only the other client
    assert answer.status_code == 202
    assert body(answer) == {"result": "opted_out", "client_id": leaving["id"]}
    assert body(api.get(f"/clients/{leaving['id']}"))["opted_out"] is True
    mailing = create_mailing(api, clock)
    pipeline.settle()
    assert sent_phones(gateway) == ["79000000002"]
    assert body(api.get(f"/mailings/{mailing['id']}"))["stats"]["skipped"] == 1
    # ...and a keyword is not kept as a reply, only counted
    assert body(api.get(f"/clients/{leaving['id']}/replies"))["items"] == []
    assert inbound_counts(api)["opt_out"] == 1


def test_a_keyword_again_is_answered_and_changes_nothing(api):
    # Given a client that opted out by reply
    client = add_client(api, "79000000001")
    inbound(api, "79000000001", "STOP")

    # When it sends STOP again, Then it is told so and stays opted out
    answer = inbound(api, "79000000001", "stop")
    assert body(answer) == {"result": "already_opted_out", "client_id": client["id"]}
    assert body(api.get(f"/clients/{client['id']}"))["opted_out"] is True


def test_other_replies_are_kept_newest_first_and_counted(api, clock):
    # Given a client
    client = add_client(api, "79000000001")

    # When it sends three replies that are not just a keyword, a minute apart
    texts = ["STOP IT", "stop?", "Спасибо, а когда скидка?"]  # noqa: RUF001
    for text in texts:
        answer = inbound(api, "79000000001", text)
        assert body(answer) == {"result": "stored", "client_id": client["id"]}
        clock.advance(minutes=1)

    # Then the client is still subscribed, and its page lists them newest first, paged
    assert body(api.get(f"/clients/{client['id']}"))["opted_out"] is False
    first = body(api.get(f"/clients/{client['id']}/replies?limit=2"))
    assert [r["text"] for r in first["items"]] == texts[:0:-1]
    rest = body(api.get(f"/clients/{client['id']}/replies?limit=2&cursor={first['next_cursor']}"))
    assert [r["text"] for r in rest["items"]] == texts[:1]
    assert rest["next_cursor"] is None
    assert first["items"][0]["phone"] == "79000000001"
    # ...and they are counted
    assert inbound_counts(api)["reply"] == 3


def test_a_number_no_client_has_is_accepted_counted_and_not_kept(api):
    # Given a client
    client = add_client(api, "79000000001")

    # When a reply and a keyword come from a number nobody has
    answers = [inbound(api, "79990000000", "hello"), inbound(api, "79990000000", "STOP")]

    # Then both are accepted (the gateway has nothing to retry), counted, and change nothing
    assert [a.status_code for a in answers] == [202, 202]
    assert {body(a)["result"] for a in answers} == {"unknown_phone"}
    assert inbound_counts(api) == {"reply": 0, "opt_out": 0, "unknown_phone": 2}
    assert body(api.get(f"/clients/{client['id']}"))["opted_out"] is False


@pytest.mark.parametrize(
    "settings", [{"inbound_opt_out_keywords": ("HALT", "Хватит")}], indirect=True
)
def test_the_keywords_are_configurable(api):
    # Given keywords HALT and Хватит instead of the defaults
    client = add_client(api, "79000000001")

    # When the client sends STOP, then хватит
    first, second = inbound(api, "79000000001", "STOP"), inbound(api, "79000000001", "хватит")

    # Then STOP is only a reply, and хватит opts it out
    assert body(first)["result"] == "stored"
    assert body(second)["result"] == "opted_out"
    assert body(api.get(f"/clients/{client['id']}"))["opted_out"] is True


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"phone": "89000000001", "text": "STOP"}, "body.phone"),
        ({"phone": "79000000001"}, "body.text"),
        ({"phone": "79000000001", "text": ""}, "body.text"),
        ({"phone": "79000000001", "text": "x" * 1601}, "body.text"),
        ({"phone": "79000000001", "text": "STOP", "extra": 1}, "body.extra"),
    ],
)
def test_a_malformed_inbound_sms_is_a_422_and_changes_nothing(api, payload, field):
    # Given a client
    client = add_client(api, "79000000001")

    # When the webhook's body is malformed, Then it is refused naming the field
    answer = api.post("/inbound-sms", payload)
    assert answer.status_code == 422
    assert field in [d["field"] for d in body(answer)["details"]]
    # ...and nothing changed
    assert body(api.get(f"/clients/{client['id']}"))["opted_out"] is False
    assert body(api.get(f"/clients/{client['id']}/replies"))["items"] == []


def test_the_replies_of_an_unknown_client_are_404(api):
    answer = api.get("/clients/00000000-0000-4000-8000-000000000000/replies")
    assert answer.status_code == 404


def test_a_reply_the_gateway_sends_again_with_its_key_is_kept_once(api):
    # Given a client
    client = add_client(api, "79000000001")
    headers = {**api.headers, "Idempotency-Key": "gateway-reply-8812"}

    # When the gateway posts its reply, times out, and posts it again with the same key
    first = api.post("/inbound-sms", {"phone": "79000000001", "text": "Когда?"}, headers=headers)
    again = api.post("/inbound-sms", {"phone": "79000000001", "text": "Когда?"}, headers=headers)

    # Then both are answered alike, and the reply is kept and counted once
    assert first.status_code == again.status_code == 202
    assert body(first) == body(again) == {"result": "stored", "client_id": client["id"]}
    replies = body(api.get(f"/clients/{client['id']}/replies"))["items"]
    assert [r["text"] for r in replies] == ["Когда?"]
    assert inbound_counts(api)["reply"] == 1
