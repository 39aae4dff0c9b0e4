"""Mailings over HTTP: create, read, list, edit, delete, and every validation rule."""

from __future__ import annotations

import uuid

import pytest

START = "2026-11-23T09:00:00+03:00"
END = "2026-11-24T21:00:00+03:00"


def mailing(**fields):
    return {"text": "Hello!", "start_at": START, "end_at": END, **fields}


def create(api, **fields):
    response = api.post("/mailings", mailing(**fields))
    assert response.status_code == 201, response.body
    return response.json


def all_mailings(api) -> list[dict]:
    return api.get("/mailings?limit=500").json["items"]


# ---------------------------------------------------------------- create and read


def test_created_mailing_is_scheduled_with_zero_counts_and_reads_back(api):
    """Given a mailing with a filter and a send window, when it is created, then it is scheduled
    with zero counts, keeps both, and reads back the same."""
    created = create(
        api,
        filter={"operator_codes": ["900", "916"], "tags": ["vip"]},
        send_window={"start": "09:00", "end": "21:00"},
    )
    assert created["status"] == "scheduled"
    assert created["stats"] == {
        "total": 0,
        "pending": 0,
        "sent": 0,
        "failed": 0,
        "expired": 0,
        "cancelled": 0,
        "skipped": 0,
    }
    assert created["filter"] == {"operator_codes": ["900", "916"], "tags": ["vip"]}
    assert created["send_window"] == {"start": "09:00", "end": "21:00"}
    assert api.get(f"/mailings/{created['id']}").json == created


def test_times_are_stored_as_the_same_instant_in_utc(api):
    """Given start and end with a +03:00 offset, when the mailing is created, then they read back
    as the same instants in UTC."""
    created = create(api)
    assert created["start_at"] == "2026-11-23T06:00:00Z"
    assert created["end_at"] == "2026-11-24T18:00:00Z"


def test_missing_filter_and_window_mean_no_constraint(api):
    """Given a mailing without filter or window, when it is created, then its filter is empty and
    it has no window."""
    created = create(api)
    assert created["filter"] == {"operator_codes": [], "tags": []}
    assert created["send_window"] is None


def test_window_may_wrap_midnight(api):
    """Given a window from 22:00 to 06:00, when the mailing is created, then it is accepted as it
    is."""
    created = create(api, send_window={"start": "22:00", "end": "06:00"})
    assert created["send_window"] == {"start": "22:00", "end": "06:00"}


def test_duplicate_filter_values_are_folded(api):
    """Given a filter repeating codes and tags, when the mailing is created, then each value is
    kept once."""
    created = create(api, filter={"operator_codes": ["900", "900"], "tags": ["a", "a", "b"]})
    assert created["filter"] == {"operator_codes": ["900"], "tags": ["a", "b"]}


def test_start_in_the_past_is_accepted_when_end_is_in_the_future(api, clock):
    """Given a start in the past and an end in the future, when the mailing is created, then it is
    scheduled."""
    created = create(api, start_at="2026-01-01T00:00:00Z")
    assert created["status"] == "scheduled"


# The test clock is 2026-11-22T12:00Z; the horizon is 366 days.
HORIZON_END = "2027-11-23T12:00:00Z"
BEYOND_HORIZON = {
    "end in year 9999": ({"end_at": "9999-12-31T23:59:59Z"}, ["body.end_at"]),
    "end at the last offset of year 9999": (
        {"end_at": "9999-12-31T23:59:59-23:59"},
        ["body.end_at"],
    ),
    "end a second past the horizon": ({"end_at": "2027-11-23T12:00:01Z"}, ["body.end_at"]),
    "start and end in year 9999": (
        {"start_at": "9999-12-30T00:00:00Z", "end_at": "9999-12-31T00:00:00Z"},
        ["body.start_at", "body.end_at"],
    ),
    "start in year 1": ({"start_at": "0001-01-01T00:00:00+01:00"}, ["body.start_at"]),
}


def test_a_mailing_may_end_exactly_at_the_horizon(api):
    # When a mailing ends 366 days from now
    created = create(api, end_at=HORIZON_END)
    # Then it is scheduled
    assert created["end_at"] == HORIZON_END


@pytest.mark.parametrize(("dates", "fields"), BEYOND_HORIZON.values(), ids=BEYOND_HORIZON.keys())
def test_a_mailing_beyond_the_horizon_is_422_and_nothing_is_stored(api, dates, fields):
    # When a mailing is created with a date beyond the horizon
    response = api.post("/mailings", mailing(**dates))
    # Then it is refused naming each date at fault, and nothing is stored
    assert response.status_code == 422, response.body
    error = response.json
    assert error["error"] == "validation_error"
    assert "366 days" in error["message"]
    assert [d["field"] for d in error["details"]] == fields
    assert all_mailings(api) == []


@pytest.mark.parametrize(("dates", "fields"), BEYOND_HORIZON.values(), ids=BEYOND_HORIZON.keys())
def test_editing_a_mailing_beyond_the_horizon_is_422_and_changes_nothing(api, dates, fields):
    # Given a mailing
    created = create(api)
    # When its dates are moved beyond the horizon, by PATCH or PUT
    patched = api.patch(f"/mailings/{created['id']}", dates)
    put = api.put(f"/mailings/{created['id']}", mailing(**dates))
    # Then both are refused naming each date at fault, and the mailing is as it was
    for response in (patched, put):
        assert response.status_code == 422, response.body
        assert [d["field"] for d in response.json["details"]] == fields
    assert api.get(f"/mailings/{created['id']}").json == created


def test_unknown_mailing_is_404(api):
    """Given no such mailing, when it is read, then the answer is a 404 not_found."""
    response = api.get(f"/mailings/{uuid.uuid4()}")
    assert response.status_code == 404
    assert response.json["error"] == "not_found"


# ---------------------------------------------------------------- validation

INVALID_MAILINGS = {
    "text missing": {"start_at": START, "end_at": END},
    "text empty": mailing(text=""),
    "text blank": mailing(text="   "),
    "text too long": mailing(text="x" * 1001),
    "text as number": mailing(text=5),
    "start missing": {"text": "hi", "end_at": END},
    "start without offset": mailing(start_at="2026-11-23T09:00:00"),
    "start not a date": mailing(start_at="tomorrow"),
    "start impossible date": mailing(start_at="2026-02-30T09:00:00Z"),
    "start as epoch number": mailing(start_at=1795000000),
    "end equal to start": mailing(end_at=START),
    "end before start": mailing(end_at="2026-11-23T08:00:00+03:00"),
    "end in the past": mailing(start_at="2020-01-01T00:00:00Z", end_at="2020-01-02T00:00:00Z"),
    "filter not an object": mailing(filter=["900"]),
    "filter unknown key": mailing(filter={"operators": ["900"]}),
    "filter operator code too short": mailing(filter={"operator_codes": ["90"]}),
    "filter operator code as number": mailing(filter={"operator_codes": [900]}),
    "filter tags not a list": mailing(filter={"tags": "vip"}),
    "filter tag too long": mailing(filter={"tags": ["x" * 65]}),
    "filter too many values": mailing(filter={"tags": [f"t{n}" for n in range(101)]}),
    "window bad format": mailing(send_window={"start": "9:00", "end": "21:00"}),
    "window hour 24": mailing(send_window={"start": "24:00", "end": "21:00"}),
    "window minute 60": mailing(send_window={"start": "09:60", "end": "21:00"}),
    "window empty": mailing(send_window={"start": "09:00", "end": "09:00"}),
    "window missing end": mailing(send_window={"start": "09:00"}),
    "window unknown key": mailing(send_window={"start": "09:00", "end": "10:00", "tz": "UTC"}),
    "read-only status": mailing(status="running"),
    "read-only stats": mailing(stats={"sent": 5}),
    "unknown field": mailing(priority="high"),
}


@pytest.mark.parametrize("payload", INVALID_MAILINGS.values(), ids=INVALID_MAILINGS.keys())
def test_invalid_mailing_is_rejected_with_422_and_nothing_is_stored(api, payload):
    """Given an invalid mailing, when it is created, then the answer is a 422 with details and no
    mailing is stored."""
    response = api.post("/mailings", payload)
    assert response.status_code == 422, response.body
    error = response.json
    assert error["error"] == "validation_error"
    assert error["details"]
    assert all_mailings(api) == []


def test_end_before_start_error_explains_the_rule(api):
    """Given an end before the start, when the mailing is created, then the error says end_at must
    be after start_at."""
    response = api.post("/mailings", mailing(end_at="2026-11-23T08:00:00+03:00"))
    assert "end_at must be after start_at" in str(response.json["details"])


def test_oversized_mailing_body_is_413(api):
    """Given a body of 80 KiB, when the mailing is created, then the answer is a 413."""
    response = api.post("/mailings", mailing(text="x" * (80 * 1024)))
    assert response.status_code == 413


# ---------------------------------------------------------------- edit and delete


def test_put_replaces_every_field(api):
    """Given a mailing with a filter and a window, when it is replaced by PUT without them, then
    both are gone and its creation time stays."""
    created = create(api, filter={"tags": ["vip"]}, send_window={"start": "09:00", "end": "21:00"})
    response = api.put(f"/mailings/{created['id']}", mailing(text="New text"))
    assert response.status_code == 200
    replaced = response.json
    assert replaced["text"] == "New text"
    assert replaced["filter"] == {"operator_codes": [], "tags": []}
    assert replaced["send_window"] is None
    assert replaced["created_at"] == created["created_at"]


def test_patch_changes_only_given_fields(api):
    """Given a mailing with a filter and a window, when PATCH changes its text, then only the text
    changes."""
    created = create(api, filter={"tags": ["vip"]}, send_window={"start": "09:00", "end": "21:00"})
    patched = api.patch(f"/mailings/{created['id']}", {"text": "Changed"}).json
    assert patched["text"] == "Changed"
    assert patched["filter"] == created["filter"]
    assert patched["send_window"] == created["send_window"]


def test_patch_send_window_null_removes_the_window(api):
    """Given a mailing with a window, when PATCH sets send_window to null, then it has no window."""
    created = create(api, send_window={"start": "09:00", "end": "21:00"})
    patched = api.patch(f"/mailings/{created['id']}", {"send_window": None}).json
    assert patched["send_window"] is None


def test_patch_that_puts_end_before_start_is_422_and_changes_nothing(api):
    """Given a mailing, when PATCH moves its end before its start, then the answer is a 422 and the
    end is unchanged."""
    created = create(api)
    response = api.patch(f"/mailings/{created['id']}", {"end_at": "2026-11-23T05:00:00Z"})
    assert response.status_code == 422
    assert api.get(f"/mailings/{created['id']}").json["end_at"] == created["end_at"]


@pytest.mark.parametrize("field", ["text", "start_at", "end_at", "filter"])
def test_patch_with_null_for_required_field_is_422(api, field):
    """Given a mailing, when PATCH sets a required field to null, then the answer is a 422."""
    created = create(api)
    response = api.patch(f"/mailings/{created['id']}", {field: None})
    assert response.status_code == 422


def test_edit_of_unknown_mailing_is_404(api):
    """Given no such mailing, when it is edited by PUT or PATCH, then the answer is a 404."""
    assert api.put(f"/mailings/{uuid.uuid4()}", mailing()).status_code == 404
    assert api.patch(f"/mailings/{uuid.uuid4()}", {"text": "x"}).status_code == 404


def test_deleted_mailing_is_gone(api):
    """Given a mailing, when it is deleted, then it reads as 404, a second delete is a 404, and the
    list is empty."""
    created = create(api)
    assert api.delete(f"/mailings/{created['id']}").status_code == 204
    assert api.get(f"/mailings/{created['id']}").status_code == 404
    assert api.delete(f"/mailings/{created['id']}").status_code == 404
    assert all_mailings(api) == []


# ---------------------------------------------------------------- listing


def test_mailings_are_listed_newest_first_in_pages(api, clock):
    """Given seven mailings created a second apart, when they are listed in pages of three, then
    each comes once, newest first."""
    created = []
    for n in range(7):
        created.append(create(api, text=f"mailing {n}")["id"])
        clock.advance(seconds=1)
    seen, cursor = [], None
    while True:
        page = api.get("/mailings?limit=3" + (f"&cursor={cursor}" if cursor else "")).json
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(created))


@pytest.mark.parametrize("query", ["limit=0", "limit=x", "cursor=%%%", "status=sent"])
def test_bad_mailing_listing_parameters_are_400(api, query):
    """Given a bad limit or cursor, or a filter the list does not take, when the mailings are
    listed, then the answer is a 400 bad_request."""
    response = api.get(f"/mailings?{query}")
    assert response.status_code == 400
    assert response.json["error"] == "bad_request"


def test_patch_of_times_with_offsets_is_applied(api):
    """Given a mailing, when PATCH sets times with an offset, then they read back as the same
    instants in UTC."""
    created = create(api)
    response = api.patch(
        f"/mailings/{created['id']}",
        {"start_at": "2026-11-23T10:00:00+03:00", "end_at": "2026-11-25T10:00:00+03:00"},
    )
    assert response.status_code == 200, response.body
    assert response.json["start_at"] == "2026-11-23T07:00:00Z"
    assert response.json["end_at"] == "2026-11-25T07:00:00Z"


def test_patch_error_for_null_names_the_field(api):
    """Given a mailing, when PATCH sets text to null, then the 422 says text may be omitted but not
    null."""
    created = create(api)
    response = api.patch(f"/mailings/{created['id']}", {"text": None})
    assert response.status_code == 422
    assert "text may be omitted but not null" in response.body.decode()
