"""A/B text variants and the holdout group through the in-process pipeline: each client gets one
text, the same whatever happens, a holdout share gets nothing and is counted apart, and the
statistics give the counts per variant."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from chalicelib.domain.variants import Variant, in_holdout, variant_of
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
add_client = delivery.add_client
assert_counters_match_records = delivery.assert_counters_match_records

AB = [
    {"text": "Sale: -20% for {tag}", "weight": 1},
    {"text": "Sale: a gift for {tag}", "weight": 1},
]


def create_ab(api, clock, **fields) -> dict:
    """Create a mailing with variants and no `text`, starting now, ending in two hours."""
    payload = {
        "start_at": clock().isoformat(),
        "end_at": (clock() + timedelta(hours=2)).isoformat(),
        **fields,
    }
    response = api.post("/mailings", payload)
    assert response.status_code == 201, response.body
    return body(response)


def stats(api, mailing_id: str) -> dict:
    response = api.get(f"/mailings/{mailing_id}/stats?limit=500")
    assert response.status_code == 200, response.body
    return body(response)


def test_an_ab_mailing_with_a_holdout_sends_each_client_one_text_and_counts_each(
    api, pipeline, clock, gateway
):
    # Given forty clients
    for n in range(40):
        add_client(api, f"790000000{n:02d}", tag="vip")

    # When an A/B mailing with a 25% holdout runs
    mailing = create_ab(api, clock, variants=AB, holdout_percent=25)
    pipeline.settle()

    # Then the held-out clients got nothing and are skipped with the reason holdout
    out = stats(api, mailing["id"])
    held = [m for m in out["messages"] if m["status"] == "skipped"]
    assert {m["skip_reason"] for m in held} == {"holdout"}
    assert out["skipped_by_reason"]["holdout"] == len(held)
    assert 0 < len(held) < 20
    # And everyone else got one of the two texts, personalised, each text to some of them
    texts = Counter(s.text for s in gateway.accepted())
    assert set(texts) == {"Sale: -20% for vip", "Sale: a gift for vip"}
    assert sum(texts.values()) == 40 - len(held)
    # And the statistics count each variant's sent messages as the gateway saw them
    assert [v["sent"] for v in out["variants"]] == [
        texts["Sale: -20% for vip"],
        texts["Sale: a gift for vip"],
    ]
    sent = [m for m in out["messages"] if m["status"] == "sent"]
    assert Counter(m["variant"] for m in sent) == Counter(
        {0: out["variants"][0]["sent"], 1: out["variants"][1]["sent"]}
    )
    assert_counters_match_records(pipeline, mailing["id"])


def test_the_assignment_is_the_clients_own_for_the_mailing_and_never_changes(
    api, pipeline, clock, gateway
):
    # Given clients and an A/B mailing with a holdout
    clients = [add_client(api, f"790100000{n:02d}", tag="new") for n in range(20)]
    mailing = create_ab(api, clock, variants=AB, holdout_percent=30)

    # When it fans out and the scheduler runs again and again (a re-fan-out finds the same)
    pipeline.kicks()
    for _ in range(3):
        pipeline.tick()
    pipeline.settle()

    # Then each client got the text and holdout its ids decide, once
    variants = (Variant(AB[0]["text"]), Variant(AB[1]["text"]))
    by_phone = {str(s.phone): s.text for s in gateway.accepted()}
    for client in clients:
        expected_out = in_holdout(mailing["id"], client["id"], 30)
        text = AB[variant_of(mailing["id"], client["id"], variants)]["text"]
        if expected_out:
            assert client["phone"] not in by_phone
        else:
            assert by_phone[client["phone"]] == text.replace("{tag}", "new")
    assert len(gateway.accepted()) == len(by_phone)


def test_weights_share_the_audience_and_a_mailing_reads_back_its_variants(api, clock):
    # Given an A/B mailing weighted 3 to 1
    variants = [{"text": "A", "weight": 3}, {"text": "B", "weight": 1}]

    # When it is created and read back
    created = create_ab(api, clock, variants=variants, holdout_percent=10)
    read = body(api.get(f"/mailings/{created['id']}"))

    # Then its variants and holdout are kept, the first variant's text is its text
    assert read["variants"] == [
        {"text": "A", "weight": 3, "sent": 0},
        {"text": "B", "weight": 1, "sent": 0},
    ]
    assert read["holdout_percent"] == 10
    assert read["text"] == "A"
    # And the assignment follows the weights over many clients (pure rule, no I/O)
    share = Counter(
        variant_of(created["id"], f"client-{n}", (Variant("A", 3), Variant("B", 1)))
        for n in range(4000)
    )
    assert 0.70 < share[0] / 4000 < 0.80


def test_bad_variants_and_holdouts_are_refused_naming_the_field_and_change_nothing(api, clock):
    base = {
        "start_at": clock().isoformat(),
        "end_at": clock().replace(year=clock().year + 1).isoformat(),
    }
    cases = [
        ({"variants": [{"text": "only one"}]}, "body.variants"),
        ({"variants": [{"text": f"t{n}"} for n in range(6)]}, "body.variants"),
        ({"variants": [{"text": "a", "weight": 0}, {"text": "b"}]}, "body.variants.0.weight"),
        ({"variants": [{"text": "a {nope}"}, {"text": "b"}]}, "body.variants.0.text"),
        ({"text": "x", "holdout_percent": 51}, "body.holdout_percent"),
        ({"text": "x", "variants": [{"text": "a"}, {"text": "b"}]}, "body"),
        ({}, "body"),
    ]
    before = body(api.get("/mailings"))["items"]
    for fields, field in cases:
        # When a mailing with bad variants or holdout is created
        response = api.post("/mailings", {**base, **fields})
        # Then it is a 422 naming the field
        assert response.status_code == 422, (fields, response.body)
        named = [d["field"] for d in body(response)["details"]]
        assert any(n.startswith(field) for n in named), (fields, named)
    # And nothing was created
    assert body(api.get("/mailings"))["items"] == before


def test_variants_and_holdout_freeze_once_sending_starts_but_their_texts_can_change(
    api, pipeline, clock
):
    # Given a running A/B mailing
    add_client(api, "79020000001")
    mailing = create_ab(api, clock, variants=AB)
    pipeline.kicks()

    # When an operator changes the shares, the holdout, then only the texts
    shares = api.patch(
        f"/mailings/{mailing['id']}",
        {"variants": [{"text": "x", "weight": 5}, {"text": "y", "weight": 1}]},
    )
    holdout = api.patch(f"/mailings/{mailing['id']}", {"holdout_percent": 20})
    texts = api.patch(
        f"/mailings/{mailing['id']}", {"variants": [{"text": "New A"}, {"text": "New B"}]}
    )

    # Then the shares and the holdout are refused (409 naming them), the texts change
    assert shares.status_code == 409, shares.body
    assert "body.variants" in [d["field"] for d in body(shares)["details"]]
    assert holdout.status_code == 409, holdout.body
    assert texts.status_code == 200, texts.body
    assert [v["text"] for v in body(texts)["variants"]] == ["New A", "New B"]
    assert body(texts)["text"] == "New A"
