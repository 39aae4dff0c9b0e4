"""Statistics read from storage: per mailing (with its messages) and over all mailings."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from chalicelib.storage.models import status_key

MAILING = {"text": "Hi", "start_at": "2026-11-23T09:00:00Z", "end_at": "2026-11-24T09:00:00Z"}


def create_mailing(api) -> str:
    response = api.post("/mailings", MAILING)
    assert response.status_code == 201
    return response.json["id"]


def store_messages(services, clock, mailing_id: str, statuses: list[str], first_id: int = 1000):
    """Given: messages as the delivery pipeline stores them, with the mailing's counters."""
    Message, Mailing = services.models.Message, services.models.Mailing
    for offset, status in enumerate(statuses):
        Message(
            mailing_id,
            str(uuid.uuid4()),
            message_id=first_id + offset,
            phone=f"7900{offset:07d}",
            status=status,
            status_key=status_key(mailing_id, status),
            created_at=clock(),
            updated_at=clock(),
            sent_at=clock() + timedelta(seconds=5) if status == "sent" else None,
            attempts=1 if status != "pending" else 0,
            last_error="HTTP 400" if status == "failed" else None,
        ).save()
    item = Mailing.get(mailing_id)
    item.update(
        actions=[
            getattr(Mailing, f"count_{status}").add(statuses.count(status))
            for status in set(statuses)
        ]
    )


def test_new_mailing_has_zero_counts_everywhere(api):
    """Given a new mailing, when its stats and the overall stats are read, then every count is
    zero."""
    mailing_id = create_mailing(api)
    stats = api.get(f"/mailings/{mailing_id}/stats").json
    assert stats["stats"]["total"] == 0
    assert stats["messages"] == []
    overall = api.get("/stats").json
    assert overall["mailings"] == 1
    assert overall["messages"]["total"] == 0


def test_mailing_stats_report_counts_and_messages(api, services, clock):
    """Given messages in several statuses, when the mailing's stats are read, then the counts add
    up and each message shows its fields and last error."""
    mailing_id = create_mailing(api)
    store_messages(services, clock, mailing_id, ["sent", "sent", "failed", "pending", "expired"])

    stats = api.get(f"/mailings/{mailing_id}/stats").json

    assert stats["stats"] == {
        "total": 5,
        "pending": 1,
        "sent": 2,
        "failed": 1,
        "expired": 1,
        "cancelled": 0,
        "skipped": 0,
    }
    assert len(stats["messages"]) == 5
    failed = next(m for m in stats["messages"] if m["status"] == "failed")
    assert failed["last_error"] == "HTTP 400"
    assert set(failed) == {
        "id",
        "client_id",
        "phone",
        "status",
        "created_at",
        "sent_at",
        "attempts",
        "last_error",
        "delivery",
        "skip_reason",
        "variant",
    }
    assert (failed["skip_reason"], failed["variant"]) == (None, None)
    assert isinstance(failed["id"], int)
    # No delivery receipt came: the gateway's word on the phone is not there
    assert failed["delivery"] is None


def ids_by_status(api, mailing_id: str, status: str, *, limit: int) -> list[int]:
    """When: the mailing's messages of `status` are paged `limit` at a time; their ids in the
    order listed (each page holding only that status)."""
    ids, cursor = [], None
    while True:
        query = f"status={status}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        page = api.get(f"/mailings/{mailing_id}/stats?{query}").json
        assert all(m["status"] == status for m in page["messages"])
        ids.extend(m["id"] for m in page["messages"])
        cursor = page["next_cursor"]
        if not cursor:
            return ids


def test_mailing_messages_can_be_filtered_by_status_and_paged(api, services, clock):
    """Given sent and failed messages, when the sent ones are paged three at a time, then each sent
    one comes once, in the order of the unfiltered listing (client id: sent messages are most of a
    mailing's, so they are read from its partition, not from the status index)."""
    mailing_id = create_mailing(api)
    store_messages(services, clock, mailing_id, ["sent"] * 7 + ["failed"] * 2)

    ids = ids_by_status(api, mailing_id, "sent", limit=3)

    everything = api.get(f"/mailings/{mailing_id}/stats?limit=100").json["messages"]
    assert ids == [m["id"] for m in everything if m["status"] == "sent"]
    assert len(ids) == 7 == len(set(ids))


def test_failed_messages_are_listed_in_id_order(api, services, clock):
    """Given failed messages among sent ones, when the failed ones are paged two at a time, then
    each comes once, in message id order (the status index's order)."""
    mailing_id = create_mailing(api)
    store_messages(services, clock, mailing_id, ["failed", "sent"] * 5)

    ids = ids_by_status(api, mailing_id, "failed", limit=2)

    assert ids == sorted(ids)
    assert len(ids) == 5 == len(set(ids))


def test_messages_without_filter_are_paged_exactly_once(api, services, clock):
    """Given twelve messages, when they are paged five at a time without a filter, then each comes
    exactly once."""
    mailing_id = create_mailing(api)
    store_messages(services, clock, mailing_id, ["sent", "failed", "pending"] * 4)
    ids, cursor = [], None
    while True:
        query = "limit=5" + (f"&cursor={cursor}" if cursor else "")
        page = api.get(f"/mailings/{mailing_id}/stats?{query}").json
        ids.extend(m["id"] for m in page["messages"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(ids) == list(range(1000, 1012))


def test_overall_stats_add_up_every_mailing(api, services, clock):
    """Given two mailings with messages, when the overall stats are read, then they add up both and
    show each mailing's total."""
    first, second = create_mailing(api), create_mailing(api)
    store_messages(services, clock, first, ["sent", "sent", "failed"])
    store_messages(services, clock, second, ["sent", "expired", "cancelled", "pending"], 2000)

    overall = api.get("/stats").json

    assert overall["mailings"] == 2
    assert overall["messages"] == {
        "total": 7,
        "pending": 1,
        "sent": 3,
        "failed": 1,
        "expired": 1,
        "cancelled": 1,
        "skipped": 0,
    }
    per_mailing = {m["mailing_id"]: m["stats"]["total"] for m in overall["per_mailing"]}
    assert per_mailing == {first: 3, second: 4}


def test_list_of_mailings_carries_each_mailings_counts(api, services, clock):
    """Given a mailing with a sent and a failed message, when the mailings are listed, then its
    item carries those counts."""
    mailing_id = create_mailing(api)
    store_messages(services, clock, mailing_id, ["sent", "failed"])
    [item] = api.get("/mailings").json["items"]
    assert item["stats"]["sent"] == 1
    assert item["stats"]["failed"] == 1


def test_per_mailing_stats_are_paged(api, clock):
    """Given five mailings, when the overall stats are read two at a time, then the pages list them
    newest first."""
    created = []
    for _ in range(5):
        created.append(create_mailing(api))
        clock.advance(seconds=1)
    first = api.get("/stats?limit=2").json
    assert first["mailings"] == 5
    assert len(first["per_mailing"]) == 2
    second = api.get(f"/stats?limit=2&cursor={first['next_cursor']}").json
    assert [m["mailing_id"] for m in first["per_mailing"] + second["per_mailing"]] == list(
        reversed(created)
    )[:4]


def test_stats_of_unknown_mailing_is_404(api):
    """Given no such mailing, when its stats are read, then the answer is a 404."""
    assert api.get(f"/mailings/{uuid.uuid4()}/stats").status_code == 404


@pytest.mark.parametrize("query", ["status=delivered", "limit=0", "cursor=abc", "page=2"])
def test_bad_stats_parameters_are_400(api, query):
    """Given a bad status, limit or cursor, or an unknown parameter, when a mailing's stats are
    read, then the answer is a 400 bad_request."""
    mailing_id = create_mailing(api)
    response = api.get(f"/mailings/{mailing_id}/stats?{query}")
    assert response.status_code == 400
    assert response.json["error"] == "bad_request"


def test_cursor_of_one_mailing_does_not_work_for_another(api, services, clock):
    """Given a cursor from one mailing's messages, when it is used on another mailing, then the
    answer is a 400."""
    first, second = create_mailing(api), create_mailing(api)
    store_messages(services, clock, first, ["sent"] * 3)
    cursor = api.get(f"/mailings/{first}/stats?limit=1").json["next_cursor"]
    assert api.get(f"/mailings/{second}/stats?cursor={cursor}").status_code == 400
