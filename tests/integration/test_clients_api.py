"""The client directory over HTTP: create, read, list, edit, delete, and every validation rule."""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote

import pytest

from tests.conftest import AUTH, body


def create(api, **fields):
    payload = {"phone": "79001234567", **fields}
    response = api.post("/clients", payload)
    assert response.status_code == 201, response.body
    return body(response)


def all_clients(api) -> list[dict]:
    return body(api.get("/clients?limit=500"))["items"]


# ---------------------------------------------------------------- create and read


def test_created_client_can_be_read_back_with_defaults(api):
    # Given a phone number only
    # When the client is created
    created = create(api, phone="79161234567")
    # Then the server chose an id, derived the operator code and applied the defaults
    assert created["operator_code"] == "916"
    assert created["tag"] == ""
    assert created["timezone"] == "UTC"
    assert body(api.get(f"/clients/{created['id']}")) == created


def test_explicit_operator_code_tag_and_timezone_are_kept(api):
    """Given an operator code, tag and time zone, when the client is created, then all three are
    kept as given."""
    created = create(api, operator_code="999", tag="vip", timezone="Asia/Vladivostok")
    assert (created["operator_code"], created["tag"], created["timezone"]) == (
        "999",
        "vip",
        "Asia/Vladivostok",
    )


def test_duplicate_phone_is_a_conflict_and_adds_nothing(api):
    """Given a client, when another is created with the same phone, then the answer is a 409
    conflict and only one client exists."""
    create(api)
    response = api.post("/clients", {"phone": "79001234567", "tag": "other"})
    assert response.status_code == 409
    assert body(response)["error"] == "conflict"
    assert len(all_clients(api)) == 1


def test_unknown_client_is_404_with_error_body(api):
    """Given no such client, when it is read, then the answer is a 404 not_found."""
    response = api.get(f"/clients/{uuid.uuid4()}")
    assert response.status_code == 404
    assert body(response)["error"] == "not_found"


def test_malformed_client_id_is_404_not_5xx(api):
    """Given an id of 3,000 characters, when the client is read, then the answer is a 404, not a
    server error."""
    response = api.get("/clients/" + "x" * 3000)
    assert response.status_code == 404


# ---------------------------------------------------------------- validation

INVALID_CLIENTS = {
    "phone missing": {},
    "phone too short": {"phone": "7900123456"},
    "phone too long": {"phone": "790012345678"},
    "phone not starting with 7": {"phone": "89001234567"},
    "phone with plus": {"phone": "+79001234567"},
    "phone with letters": {"phone": "7900123456a"},
    "phone as number": {"phone": 79001234567},
    "operator code two digits": {"phone": "79001234567", "operator_code": "90"},
    "operator code letters": {"phone": "79001234567", "operator_code": "abc"},
    "operator code as number": {"phone": "79001234567", "operator_code": 900},
    "tag too long": {"phone": "79001234567", "tag": "x" * 65},
    "tag with control character": {"phone": "79001234567", "tag": "a\nb"},
    "tag as list": {"phone": "79001234567", "tag": ["vip"]},
    "unknown timezone": {"phone": "79001234567", "timezone": "Mars/Olympus"},
    "timezone path traversal": {"phone": "79001234567", "timezone": "../../etc/passwd"},
    "timezone wrong case": {"phone": "79001234567", "timezone": "europe/moscow"},
    "timezone null": {"phone": "79001234567", "timezone": None},
    "unknown field": {"phone": "79001234567", "name": "Ivan"},
    "body is a list": [{"phone": "79001234567"}],
}


@pytest.mark.parametrize("payload", INVALID_CLIENTS.values(), ids=INVALID_CLIENTS.keys())
def test_invalid_client_is_rejected_with_422_and_nothing_is_stored(api, payload):
    # When an invalid client is posted
    response = api.post("/clients", payload)
    # Then the caller learns which field is wrong, and the directory is unchanged
    assert response.status_code == 422, response.body
    error = body(response)
    assert error["error"] == "validation_error"
    assert error["details"], "the details name the offending field"
    assert all(set(d) == {"field", "message", "type"} for d in error["details"])
    assert all_clients(api) == []


def test_tag_of_exactly_64_characters_and_empty_tag_are_valid(api):
    """Given a tag of 64 characters and an empty tag, when clients are created with them, then both
    are kept."""
    assert create(api, phone="79001234567", tag="x" * 64)["tag"] == "x" * 64
    assert create(api, phone="79001234568", tag="")["tag"] == ""


def test_wrong_field_error_names_the_field(api):
    """Given an unknown time zone, when the client is created, then the error names body.timezone
    and the value."""
    response = api.post("/clients", {"phone": "79001234567", "timezone": "Nowhere/Land"})
    details = body(response)["details"]
    assert details[0]["field"] == "body.timezone"
    assert "Nowhere/Land" in details[0]["message"]


def test_malformed_json_is_400(api):
    """Given a body that is not JSON, when a client is created, then the answer is a 400
    bad_request."""
    response = api.post("/clients", '{"phone": "79001234567"')
    assert response.status_code == 400
    assert body(response)["error"] == "bad_request"


def test_empty_body_is_400(api):
    """Given an empty body, when a client is created, then the answer is a 400."""
    response = api.post("/clients", "")
    assert response.status_code == 400


def test_wrong_content_type_is_415(api):
    """Given a text/plain body, when a client is created, then the answer is a 415 and no client is
    stored."""
    headers = {**AUTH, "Content-Type": "text/plain"}
    response = api.post("/clients", json.dumps({"phone": "79001234567"}), headers=headers)
    assert response.status_code == 415
    assert body(response)["error"] == "unsupported_media_type"
    assert all_clients(api) == []


def test_json_with_charset_is_accepted(api):
    """Given application/json with a charset, when a client is created, then it is created."""
    headers = {**AUTH, "Content-Type": "application/json; charset=utf-8"}
    response = api.post("/clients", json.dumps({"phone": "79001234567"}), headers=headers)
    assert response.status_code == 201


def test_oversized_body_is_413_and_nothing_is_stored(api):
    """Given a body of 70 KiB, when a client is created, then the answer is a 413 and no client is
    stored."""
    payload = json.dumps({"phone": "79001234567", "tag": "x" * (70 * 1024)})
    response = api.post("/clients", payload)
    assert response.status_code == 413
    assert body(response)["error"] == "payload_too_large"
    assert all_clients(api) == []


def test_the_body_limit_is_the_max_body_bytes_setting(api, services):
    from chalicelib.container import Services, use_services

    # Given an operator who lowered MAX_BODY_BYTES to 2 KiB
    settings = services.settings.model_copy(update={"max_body_bytes": 2048})
    use_services(Services.build(settings))
    # When a 3 KiB client arrives, it is refused; a small one still passes
    payload = json.dumps({"phone": "79001234567", "tag": "x" * 60, "pad": "y" * 3000})
    refused = api.post("/clients", payload)
    assert refused.status_code == 413
    assert "at most 2048 are accepted" in body(refused)["message"]
    assert api.post("/clients", {"phone": "79001234567"}).status_code == 201


# Digits that `\\d` and `int()` take for numbers: the gateway would get a different ASCII number.
NON_ASCII_PHONES = {
    "7 then Arabic-Indic digits": "7\u0669\u0660\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667",
    "7 then full-width digits": "7\uff19\uff10\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17",
    "all Arabic-Indic digits": "\u0667\u0669\u0660\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667",
    "one Devanagari digit": "7900123456\u096d",
    "a trailing newline": "79001234567\n",
}
PHONE_RULE = "phone must be 11 ASCII digits starting with 7, like 79001234567"


@pytest.mark.parametrize("phone", NON_ASCII_PHONES.values(), ids=NON_ASCII_PHONES.keys())
def test_a_phone_of_non_ascii_digits_is_refused_by_name_and_stores_nothing(api, phone):
    # When a client is posted with a phone of digits that are not ASCII 0-9
    response = api.post("/clients", {"phone": phone})
    # Then it is a 422 naming the phone field in the operator's words, and nothing is stored
    assert response.status_code == 422, response.body
    assert body(response)["details"] == [
        {"field": "body.phone", "message": PHONE_RULE, "type": "value_error"}
    ]
    assert all_clients(api) == []


@pytest.mark.parametrize("phone", NON_ASCII_PHONES.values(), ids=NON_ASCII_PHONES.keys())
def test_editing_a_phone_to_non_ascii_digits_is_refused_and_changes_nothing(api, phone):
    # Given a client
    created = create(api, phone="79001234567")
    # When its phone is changed to non-ASCII digits, by PATCH or PUT
    patched = api.patch(f"/clients/{created['id']}", {"phone": phone})
    put = api.put(f"/clients/{created['id']}", {"phone": phone})
    # Then both are 422 naming the phone, and the client is as it was
    for response in (patched, put):
        assert response.status_code == 422, response.body
        assert body(response)["details"][0]["field"] == "body.phone"
        assert body(response)["details"][0]["message"] == PHONE_RULE
    assert body(api.get(f"/clients/{created['id']}")) == created


def test_an_operator_code_of_non_ascii_digits_is_refused_by_name(api):
    """Given an operator code of full-width digits, when the client is created, then the 422 names
    the field and asks for ASCII digits, and nothing is stored."""
    response = api.post("/clients", {"phone": "79001234567", "operator_code": "\uff19\uff10\uff10"})
    assert response.status_code == 422, response.body
    assert body(response)["details"] == [
        {
            "field": "body.operator_code",
            "message": "operator code must be 3 ASCII digits, like 900",
            "type": "value_error",
        }
    ]
    assert all_clients(api) == []


@pytest.mark.parametrize("phone", NON_ASCII_PHONES.values(), ids=NON_ASCII_PHONES.keys())
def test_searching_by_a_phone_of_non_ascii_digits_is_refused_by_name(api, phone):
    # Given the client whose ASCII number those digits read as
    create(api, phone="79001234567")
    # When the list is searched by the non-ASCII number
    response = api.get(f"/clients?phone={quote(phone)}")
    # Then the parameter is refused by name rather than matching anyone
    assert response.status_code == 400, response.body
    assert body(response)["details"][0]["field"] == "query.phone"
    assert body(response)["details"][0]["message"] == PHONE_RULE


@pytest.mark.parametrize("phone", NON_ASCII_PHONES.values(), ids=NON_ASCII_PHONES.keys())
def test_an_opt_out_of_non_ascii_digits_is_refused_and_opts_nobody_out(api, phone):
    # Given the client whose ASCII number those digits read as
    created = create(api, phone="79001234567")
    # When a STOP webhook posts the number in other digits
    response = api.post("/opt-outs", {"phone": phone})
    # Then it is a 422 naming the phone, and the client is unchanged
    assert response.status_code == 422, response.body
    assert body(response)["details"][0]["field"] == "body.phone"
    assert body(response)["details"][0]["message"] == PHONE_RULE
    assert body(api.get(f"/clients/{created['id']}")) == created


# ---------------------------------------------------------------- edit


def test_put_replaces_every_field_and_rederives_the_operator_code(api):
    """Given a client with every field set, when PUT gives only a new phone, then the other fields
    take their defaults, the operator code comes from the phone and the creation time stays."""
    created = create(api, operator_code="999", tag="vip", timezone="Europe/Moscow")
    response = api.put(f"/clients/{created['id']}", {"phone": "79261234567"})
    assert response.status_code == 200
    replaced = body(response)
    fields = ("phone", "operator_code", "tag", "timezone")
    assert [replaced[f] for f in fields] == ["79261234567", "926", "", "UTC"]
    assert replaced["created_at"] == created["created_at"]


def test_patch_changes_only_given_fields(api):
    """Given a client, when PATCH changes its tag, then only the tag changes."""
    created = create(api, tag="vip", timezone="Europe/Moscow")
    patched = body(api.patch(f"/clients/{created['id']}", {"tag": "regular"}))
    assert patched["tag"] == "regular"
    assert patched["timezone"] == "Europe/Moscow"
    assert patched["phone"] == created["phone"]


def test_patch_with_null_is_422_and_changes_nothing(api):
    """Given a client, when PATCH sets its tag to null, then the answer is a 422 and the tag is
    unchanged."""
    created = create(api, tag="vip")
    response = api.patch(f"/clients/{created['id']}", {"tag": None})
    assert response.status_code == 422
    assert body(api.get(f"/clients/{created['id']}"))["tag"] == "vip"


def test_patch_with_invalid_value_changes_nothing(api):
    """Given a client, when PATCH holds one valid and one invalid field, then the answer is a 422
    and neither changes."""
    created = create(api, tag="vip")
    response = api.patch(f"/clients/{created['id']}", {"tag": "new", "timezone": "Bad/Zone"})
    assert response.status_code == 422
    assert body(api.get(f"/clients/{created['id']}"))["tag"] == "vip"


def test_changing_phone_to_one_in_use_is_409_and_changes_nothing(api):
    """Given two clients, when one's phone is changed to the other's, then the answer is a 409 and
    the phone is unchanged."""
    first = create(api, phone="79001111111")
    create(api, phone="79002222222")
    response = api.patch(f"/clients/{first['id']}", {"phone": "79002222222"})
    assert response.status_code == 409
    assert body(api.get(f"/clients/{first['id']}"))["phone"] == "79001111111"


def test_changing_phone_frees_the_old_number(api):
    """Given a client whose phone was changed, when another client takes the old number, then it is
    created."""
    first = create(api, phone="79001111111")
    api.patch(f"/clients/{first['id']}", {"phone": "79003333333"})
    # The old number can now be used by another client
    second = create(api, phone="79001111111")
    assert second["id"] != first["id"]


def test_edit_of_unknown_client_is_404(api):
    """Given no such client, when it is edited by PUT or PATCH, then the answer is a 404."""
    assert api.put(f"/clients/{uuid.uuid4()}", {"phone": "79001234567"}).status_code == 404
    assert api.patch(f"/clients/{uuid.uuid4()}", {"tag": "x"}).status_code == 404


# ---------------------------------------------------------------- delete


def test_deleted_client_is_gone_and_its_phone_is_free(api):
    """Given a client, when it is deleted, then it reads as 404, a second delete is a 404, and its
    phone can be used again."""
    created = create(api)
    assert api.delete(f"/clients/{created['id']}").status_code == 204
    assert api.get(f"/clients/{created['id']}").status_code == 404
    assert api.delete(f"/clients/{created['id']}").status_code == 404
    assert create(api)["phone"] == created["phone"]


# ---------------------------------------------------------------- listing


def test_listing_filters_by_operator_code_and_tag(api):
    """Given clients of two operators and two tags, when they are listed by operator code, tag or
    both, then exactly the matching ones come back."""
    a = create(api, phone="79001000001", tag="vip")
    b = create(api, phone="79001000002", tag="new")
    c = create(api, phone="79161000003", tag="vip")

    def ids(query: str) -> set[str]:
        return {item["id"] for item in body(api.get(f"/clients?{query}"))["items"]}

    assert ids("operator_code=900") == {a["id"], b["id"]}
    assert ids("tag=vip") == {a["id"], c["id"]}
    assert ids("operator_code=900&tag=vip") == {a["id"]}
    assert ids("operator_code=916&tag=new") == set()
    assert ids("") == {a["id"], b["id"], c["id"]}


def test_listing_by_phone_finds_the_one_client_with_that_number(api):
    # Given two clients
    wanted = create(api, phone="79001000001", tag="vip")
    create(api, phone="79001000002", tag="vip")

    def phones(query: str) -> list[str]:
        page = body(api.get(f"/clients?{query}"))
        assert page["next_cursor"] is None
        return [item["phone"] for item in page["items"]]

    # When the list is searched by a phone number, alone or with filters it meets
    assert phones("phone=79001000001") == [wanted["phone"]]
    assert phones("phone=79001000001&tag=vip&operator_code=900") == [wanted["phone"]]
    # Then a filter it does not meet, or a number nobody has, finds nothing
    assert phones("phone=79001000001&tag=new") == []
    assert phones("phone=79009999999") == []
    # And a malformed number is refused by name
    response = api.get("/clients?phone=8900")
    assert response.status_code == 400
    assert body(response)["details"][0]["field"] == "query.phone"


def test_empty_tag_filter_finds_clients_without_tag(api):
    """Given a client with a tag and one without, when clients are listed with an empty tag, then
    only the untagged one comes back."""
    untagged = create(api, phone="79001000001")
    create(api, phone="79001000002", tag="vip")
    items = body(api.get("/clients?tag="))["items"]
    assert [item["id"] for item in items] == [untagged["id"]]


@pytest.mark.parametrize("query", ["", "operator_code=900", "tag=vip", "operator_code=900&tag=vip"])
def test_pages_walk_every_client_exactly_once(api, query):
    # Given 23 matching clients
    expected = {create(api, phone=f"790010000{n:02d}", tag="vip")["id"] for n in range(23)}
    # When they are read 5 at a time
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        suffix = f"&cursor={cursor}" if cursor else ""
        response = api.get(f"/clients?limit=5&{query}{suffix}")
        assert response.status_code == 200
        page = body(response)
        assert len(page["items"]) <= 5
        seen.extend(item["id"] for item in page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    # Then every client appears exactly once
    assert sorted(seen) == sorted(expected)
    assert pages >= 5


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=abc",
        "cursor=not-a-cursor",
        "cursor=eyJ2IjoxfQ",  # valid base64 JSON, not one of ours
        "operator_code=9",
        "unknown=1",
    ],
)
def test_bad_listing_parameters_are_400(api, query):
    """Given a bad filter, limit or cursor, or an unknown parameter, when clients are listed, then
    the answer is a 400 bad_request."""
    response = api.get(f"/clients?{query}")
    assert response.status_code == 400, response.body
    assert body(response)["error"] == "bad_request"


def test_cursor_of_another_filter_is_rejected(api):
    """Given a cursor from a listing by tag, when it is used with another filter, then the answer
    is a 400."""
    for n in range(3):
        create(api, phone=f"7900100000{n}", tag="vip")
    cursor = body(api.get("/clients?limit=1&tag=vip"))["next_cursor"]
    assert cursor
    response = api.get(f"/clients?limit=1&operator_code=900&cursor={cursor}")
    assert response.status_code == 400


def test_page_size_is_capped(api):
    """Given a huge limit, when clients are listed, then the listing is answered (the page size
    capped), not refused."""
    response = api.get("/clients?limit=100000")
    assert response.status_code == 200
