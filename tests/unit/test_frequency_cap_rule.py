"""The frequency cap's rule: the setting's form, and what a client's places say to a message."""

from __future__ import annotations

from datetime import timedelta

import pytest

from chalicelib.domain.frequency_cap import CapSlot, FrequencyCap, FrequencyCapInvalid, look
from chalicelib.settings import Settings, SettingsError

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("text", "cap"),
    [
        ("1/24h", FrequencyCap(1, timedelta(hours=24))),
        ("3/7d", FrequencyCap(3, timedelta(days=7))),
        (" 2 / 90m ", FrequencyCap(2, timedelta(minutes=90))),
        ("20/30s", FrequencyCap(20, timedelta(seconds=30))),
    ],
)
def test_a_cap_is_n_messages_per_window(text, cap):
    assert FrequencyCap.parse(text) == cap


@pytest.mark.parametrize("text", ["1", "1/24", "0/24h", "21/1d", "1/0h", "one/24h", "1/24w"])
def test_a_malformed_cap_is_refused(text):
    with pytest.raises(FrequencyCapInvalid):
        FrequencyCap.parse(text)


def test_the_setting_is_off_by_default_and_a_bad_one_names_itself():
    # Given no FREQUENCY_CAP, then a bad one
    # Then there is no cap, and the bad value is refused naming the variable
    assert Settings.from_env({}).frequency_cap is None
    with pytest.raises(SettingsError, match="FREQUENCY_CAP"):
        Settings.from_env({"FREQUENCY_CAP": "daily"})


def test_a_message_whose_mailing_holds_a_busy_place_reuses_it():
    slots = [CapSlot("A", NOW + 10), CapSlot("B", NOW + 10)]
    assert look(slots, "B", NOW).held == 1


def test_a_free_or_lapsed_place_is_offered_first_free_first():
    slots = [CapSlot("A", NOW + 10), CapSlot("B", NOW - 1), None]
    found = look(slots, "C", NOW)
    assert (found.held, found.free) == (None, 1)


def test_a_lapsed_place_of_the_same_mailing_is_not_held_but_free():
    found = look([CapSlot("A", NOW)], "A", NOW)
    assert (found.held, found.free) == (None, 0)


def test_no_place_left_means_capped():
    found = look([CapSlot("A", NOW + 10), CapSlot("B", NOW + 10)], "C", NOW)
    assert (found.held, found.free) == (None, None)
