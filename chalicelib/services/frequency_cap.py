"""The frequency cap across mailings (FREQUENCY_CAP): a sender takes one of the client's slots for
a message right after claiming it and before the gateway call, and gives it back when the
message ends without being sent.

Where the slot is taken, and what becomes of it:
- after the claim: only the one sender holding the message takes (or reuses) its slot, so a
  job delivered twice never takes two;
- keyed by the mailing (one message per mailing and client): a retry, or a job delivered again
  after a sender died, finds its slot held and reuses it, so a message never counts twice;
- given back (a conditional remove, only while this mailing holds it) when the message ends
  without a send: failed, expired, cancelled, dead-lettered, or a claim given back with no call
  (over the shared rate, paused, too late). A bad-luck answer (a timeout, a 5xx) keeps the slot:
  the gateway may have sent it, and the retry uses the same slot; when that message later ends
  unsent (its retry comes back after the end), the sender finds the slot it holds and frees it;
- a sender that dies between taking the slot and writing the outcome leaves the slot busy until
  its window ends, never longer: every slot is busy only until `window` after it was taken.
"""

from __future__ import annotations

import logging
from datetime import datetime

from chalicelib.domain.frequency_cap import FrequencyCap, look
from chalicelib.storage.frequency_caps import FrequencyCapStore

logger = logging.getLogger(__name__)

# Each refused take shows the slots; a free one seen is tried next. Racing senders can refuse
# a take only by taking a slot themselves, so a few tries settle it.
TAKE_TRIES = 8


class CapContended(Exception):
    """The client's slots kept changing under every take: try the job again later."""


class FrequencyCapGuard:
    """Takes and gives back the clients' cap slots."""

    def __init__(self, cap: FrequencyCap, store: FrequencyCapStore) -> None:
        self._cap = cap
        self._store = store

    def take(self, client_id: str, mailing_id: str, now: datetime) -> int | None:
        """The slot the message of `mailing_id` to `client_id` holds (taken now, or already
        held by it); None when the client has had its cap of messages within the window."""
        limit, at = self._cap.limit, now.timestamp()
        until = at + self._cap.window.total_seconds()
        index = 0
        for _ in range(TAKE_TRIES):
            seen = self._store.take(client_id, mailing_id, index, limit, at, until)
            if seen is None:
                return index
            found = look(seen, mailing_id, at)
            if found.held is not None:
                return found.held
            if found.free is None:
                return None
            index = found.free
        raise CapContended(f"client {client_id}: its frequency-cap slots kept changing")

    def give_back(self, client_id: str, mailing_id: str, index: int | None, now: datetime) -> None:
        """Free the slot the message of `mailing_id` held (it was not sent); with no `index`,
        the one the client's slots show it holding at `now`, if any (one read)."""
        if index is None:
            index = look(
                self._store.slots(client_id, self._cap.limit), mailing_id, now.timestamp()
            ).held
            if index is None:
                return
        if self._store.give_back(client_id, mailing_id, index):
            logger.info(
                "frequency-cap slot given back: the message was not sent",
                extra={"mailing_id": mailing_id, "client_id": client_id},
            )
