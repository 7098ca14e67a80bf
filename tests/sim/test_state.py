"""The simulated phone's live state and checkpoint slots (server.sim.state)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.sim.state import MAX_SAVES, BadCheckpoint, PhoneState, Save
from server.sim.vocab import SPECIAL_START_ID


def test_start_state_by_reset_continuation_and_restore() -> None:
    phone = PhoneState(2)
    phone.live = [1, 2, 3]
    phone.save(1, [7, 8])
    assert phone.start(reset=True, restore=None) == []
    assert phone.start(reset=False, restore=None) == [1, 2, 3]
    # restore takes precedence over reset, whichever way reset is set
    assert phone.start(reset=True, restore=1) == [7, 8]
    assert phone.start(reset=False, restore=1) == [7, 8]


def test_slots_are_copies_both_ways() -> None:
    phone = PhoneState(1)
    tokens = [1, 2]
    phone.save(0, tokens)
    tokens.append(3)  # the live state goes on growing after a save
    started = phone.start(reset=True, restore=0)
    started.append(9)  # and after a restore
    assert phone.start(reset=True, restore=0) == [1, 2]


@pytest.mark.parametrize(("slots", "restore", "message"), [
    (2, 0, "slot 0 is empty"),
    (2, 2, "unknown slot 2 (slots are 0..1)"),
    (2, -1, "unknown slot -1"),
    (0, 0, "no checkpoint slots"),
])
def test_restore_of_an_empty_or_unknown_slot_is_refused(slots: int, restore: int, message: str) -> None:
    phone = PhoneState(slots)
    with pytest.raises(BadCheckpoint, match=message.replace("(", r"\(").replace(")", r"\)")):
        phone.start(reset=True, restore=restore)


@given(held=st.integers(0, 50), prompt=st.integers(0, 50), at=st.integers(-5, 110), slot=st.integers(-2, 5))
def test_a_save_is_accepted_exactly_inside_the_prompt_on_a_known_slot(held: int, prompt: int, at: int,
                                                                      slot: int) -> None:
    phone = PhoneState(4)
    valid = held < at <= held + prompt and 0 <= slot < 4
    if valid:
        phone.check_saves([Save(slot, at)], held, prompt)
    else:
        with pytest.raises(BadCheckpoint):
            phone.check_saves([Save(slot, at)], held, prompt)


def test_at_most_two_saves_per_request() -> None:
    phone = PhoneState(4)
    phone.check_saves([Save(0, 1), Save(1, 2)], 0, 5)
    with pytest.raises(BadCheckpoint, match=f"at most {MAX_SAVES}"):
        phone.check_saves([Save(0, 1), Save(1, 2), Save(2, 3)], 0, 5)


def test_poison_keeps_what_was_processed_and_adds_one_random_ordinary_token() -> None:
    phone = PhoneState(1)
    phone.save(0, [5])
    junk = set()
    for _ in range(20):
        phone.poison([1, 2, 3])
        assert phone.live[:3] == [1, 2, 3] and len(phone.live) == 4
        assert 0 <= phone.live[3] < SPECIAL_START_ID
        junk.add(phone.live[3])
    assert len(junk) > 1  # not one fixed token a host could learn to expect
    assert phone.start(reset=True, restore=0) == [5]  # slots are not touched
