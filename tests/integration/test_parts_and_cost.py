"""Parts and cost before launch, on the in-process pipeline: the preview and every mailing say
how many SMS parts the text takes over its audience (and what they cost, with prices set), and
a text whose longest message exceeds max_parts is refused before anything is created."""

from __future__ import annotations

import pytest

from tests.conftest import body
from tests.integration import test_delivery as delivery

# The delivery suite's fixtures (moto, virtual SQS, the sandbox gateway, the pipeline driver).
gateway, gateway_client, settings, sqs, services, pipeline = (
    delivery.gateway,
    delivery.gateway_client,
    delivery.settings,
    delivery.sqs,
    delivery.services,
    delivery.pipeline,
)
add_client, create_mailing = delivery.add_client, delivery.create_mailing

PRICED = {
    "price_per_part": 2.0,
    "price_per_part_by_operator": (("916", 0.5),),
    "price_currency": "EUR",
}
# With a tag of 64 Cyrillic letters (the longest a tag may be) this text is 93 UCS-2 units: two
# parts; with a Latin tag, one GSM-7 part.
DISCOUNT = "Dear {tag}, your discount is ready"
# A tag of 64 Cyrillic letters, the longest a tag may be: in a 100-letter GSM-7 text it makes
# the message UCS-2 and 164 units long, three parts of 67.
LONGEST_TAG = "Ж" * 64


def preview(api, text: str | None = None, **fields) -> dict:
    payload = {"filter": fields.pop("filter", {}), **fields}
    if text is not None:
        payload["text"] = text
    response = api.post("/mailings/preview", payload)
    assert response.status_code == 200, response.body
    return body(response)


def test_preview_of_a_plain_text_counts_one_gsm7_part_per_message_to_send(api, services):
    # Given three vip clients, one of whom opted out, and a client of another tag
    add_client(api, "79160000001", tag="vip")
    add_client(api, "79160000002", tag="vip")
    add_client(api, "79160000003", tag="vip", opted_out=True)
    add_client(api, "79160000004", tag="new")
    # When an operator previews a short Latin text for the vip clients
    answer = preview(api, "Sale today, 20% off for {tag}s!", filter={"tags": ["vip"]})
    # Then each message is one GSM-7 part, and two messages would be sent
    assert answer["parts"] == {
        "encoding": "GSM-7",
        "per_message_min": 1,
        "per_message_max": 1,
        "total": 2,
        "approximate": False,
    }
    # And with no prices configured there is no cost estimate
    assert answer["cost_estimate"] is None


def test_preview_without_a_text_has_no_parts(api, services):
    # Given a client
    add_client(api, "79160000001")
    # When the audience is previewed without a text
    answer = preview(api)
    # Then it is counted as before, and no parts are invented
    assert answer["count"] == 1
    assert answer["parts"] is None


def test_a_cyrillic_tag_makes_its_clients_messages_ucs2_and_longer(api, services):
    # Given a client whose tag is a long Cyrillic text and one whose tag is short Latin
    add_client(api, "79160000001", tag=LONGEST_TAG)
    add_client(api, "79160000002", tag="vip")
    # When a short Latin text naming the tag is previewed
    answer = preview(api, DISCOUNT)
    # Then the text is UCS-2 over the audience (one message needs it), one message takes one
    # part and the other two, three in all
    assert answer["parts"] == {
        "encoding": "UCS-2",
        "per_message_min": 1,
        "per_message_max": 2,
        "total": 3,
        "approximate": False,
    }


@pytest.mark.parametrize("settings", [PRICED], indirect=True)
def test_every_mailing_carries_its_parts_and_their_cost_at_each_operators_price(
    api, services, clock
):
    # Given prices of 2 EUR a part, 0.5 for operator 916, and a client of each operator
    add_client(api, "79160000001", tag="vip")
    add_client(api, "79030000002", tag="vip")
    # When a mailing of a 161-character Latin text (two GSM-7 parts) is created
    created = create_mailing(api, clock, text="x" * 161)
    # Then it carries two parts a message, four in all, costing 2 * 0.5 + 2 * 2.0 EUR
    expected_parts = {
        "encoding": "GSM-7",
        "per_message_min": 2,
        "per_message_max": 2,
        "total": 4,
        "approximate": False,
    }
    assert created["parts"] == expected_parts
    assert created["cost_estimate"] == {"amount": 5.0, "currency": "EUR"}
    assert created["max_parts"] == 4
    # And so does the mailing when read alone and in the listing
    read = body(api.get(f"/mailings/{created['id']}"))
    listed = body(api.get("/mailings"))["items"]
    for mailing in (read, *listed):
        assert mailing["parts"] == expected_parts
        assert mailing["cost_estimate"] == {"amount": 5.0, "currency": "EUR"}
    # And a preview of the same text says the same
    assert preview(api, "x" * 161)["cost_estimate"] == {"amount": 5.0, "currency": "EUR"}


def test_editing_the_text_estimates_its_parts_again(api, services, clock):
    # Given a mailing of a one-part text to one client
    add_client(api, "79160000001")
    mailing = create_mailing(api, clock, start=delivery.timedelta(hours=1), text="Hello")
    assert mailing["parts"]["per_message_max"] == 1
    # When its text is changed to 71 Cyrillic characters
    response = api.patch(f"/mailings/{mailing['id']}", {"text": "Ж" * 71})
    # Then the mailing says UCS-2, two parts
    assert response.status_code == 200, response.body
    assert body(response)["parts"]["encoding"] == "UCS-2"
    assert body(response)["parts"]["total"] == 2


def test_a_text_too_long_for_max_parts_because_of_a_tag_is_refused_naming_the_tag(
    api, services, clock
):
    # Given a client whose tag is 64 Cyrillic letters
    add_client(api, "79160000001", tag=LONGEST_TAG)
    add_client(api, "79160000002", tag="vip")
    # When a mailing is created whose text fits one part, but with the tag takes three
    response = api.post(
        "/mailings",
        {
            "text": "Dear {tag}, " + "a" * 90,
            "start_at": clock().isoformat(),
            "end_at": (clock() + delivery.timedelta(hours=1)).isoformat(),
            "max_parts": 2,
        },
    )
    # Then it is refused on body.text, naming the tag and the parts its message would take
    assert response.status_code == 422, response.body
    error = body(response)
    assert error["error"] == "validation_error"
    [detail] = error["details"]
    assert detail["field"] == "body.text"
    assert "{tag}" in detail["message"]
    assert "3 parts in UCS-2" in detail["message"]
    assert "max_parts 2" in detail["message"]
    # And nothing was created
    assert body(api.get("/mailings"))["items"] == []


def test_a_text_too_long_by_itself_is_refused_and_the_mailing_stays_as_it_was(api, services, clock):
    # Given a mailing of a short text, with max_parts 1
    add_client(api, "79160000001")
    mailing = create_mailing(api, clock, start=delivery.timedelta(hours=1), max_parts=1)
    # When its text is edited to 161 Latin characters (two parts)
    response = api.patch(f"/mailings/{mailing['id']}", {"text": "y" * 161})
    # Then the edit is refused, saying the text alone is too long
    assert response.status_code == 422, response.body
    [detail] = body(response)["details"]
    assert detail["field"] == "body.text"
    assert "the text alone takes 2 parts" in detail["message"]
    # And the mailing keeps its text and its parts
    kept = body(api.get(f"/mailings/{mailing['id']}"))
    assert kept["text"] == mailing["text"]
    assert kept["parts"] == mailing["parts"]
    # And raising max_parts in the same edit lets it through
    response = api.patch(f"/mailings/{mailing['id']}", {"text": "y" * 161, "max_parts": 2})
    assert response.status_code == 200, response.body
    assert body(response)["parts"]["per_message_max"] == 2


def test_a_tag_named_by_the_filter_bounds_the_message_before_any_client_has_it(
    api, services, clock
):
    # Given no client at all
    # When a mailing for a long Cyrillic tag is created whose text names the tag
    response = api.post(
        "/mailings",
        {
            "text": DISCOUNT,
            "start_at": clock().isoformat(),
            "end_at": (clock() + delivery.timedelta(hours=1)).isoformat(),
            "filter": {"tags": [LONGEST_TAG]},
            "max_parts": 1,
        },
    )
    # Then it is refused: that tag's clients would get two parts
    assert response.status_code == 422, response.body
    assert "{tag}" in body(response)["details"][0]["message"]


@pytest.mark.parametrize("max_parts", [0, 11, "two"])
def test_max_parts_out_of_range_is_a_clear_error(api, services, clock, max_parts):
    # When a mailing asks for max_parts outside 1..10
    response = api.post(
        "/mailings",
        {
            "text": "Hello",
            "start_at": clock().isoformat(),
            "end_at": (clock() + delivery.timedelta(hours=1)).isoformat(),
            "max_parts": max_parts,
        },
    )
    # Then it is a 422 on body.max_parts, and nothing is created
    assert response.status_code == 422, response.body
    assert body(response)["details"][0]["field"] == "body.max_parts"
    assert body(api.get("/mailings"))["items"] == []


def test_an_ab_mailing_counts_each_variants_parts_for_its_share_less_the_holdout(
    api, services, clock
):
    # Given four vip clients
    for n in range(4):
        add_client(api, f"7916000000{n}", tag="vip")
    # When a mailing sends a one-part Latin text and a two-part Cyrillic one, in equal shares,
    # with half the audience held out
    response = api.post(
        "/mailings",
        {
            "variants": [{"text": "Sale today", "weight": 1}, {"text": "Ж" * 71, "weight": 1}],
            "holdout_percent": 50,
            "start_at": clock().isoformat(),
            "end_at": (clock() + delivery.timedelta(hours=1)).isoformat(),
            "filter": {"tags": ["vip"]},
        },
    )
    assert response.status_code == 201, response.body
    mailing = body(response)
    # Then its parts span both texts: UCS-2 (one variant needs it), one to two parts a message,
    # and a total of the two messages sent: one of each text on average, 1 + 2 parts
    assert mailing["parts"] == {
        "encoding": "UCS-2",
        "per_message_min": 1,
        "per_message_max": 2,
        "total": 3,
        "approximate": False,
    }


def test_a_variant_too_long_for_max_parts_is_refused_on_its_own_field(api, services, clock):
    # Given a vip client
    add_client(api, "79160000001", tag="vip")
    # When a mailing's second variant takes two parts and max_parts is 1
    response = api.post(
        "/mailings",
        {
            "variants": [{"text": "Short"}, {"text": "Ж" * 71}],
            "max_parts": 1,
            "start_at": clock().isoformat(),
            "end_at": (clock() + delivery.timedelta(hours=1)).isoformat(),
            "filter": {"tags": ["vip"]},
        },
    )
    # Then it is a 422 on that variant's text, and nothing is created
    assert response.status_code == 422, response.body
    [detail] = body(response)["details"]
    assert detail["field"] == "body.variants[1].text"
    assert detail["type"] == "too_many_parts"
    assert body(api.get("/mailings"))["items"] == []
