"""The one merge of models (server/scheduling/pool.py ``merge_models``, behind ``PhonePool.models()``,
/v1/models and the model registry): which phones count, in what order, and that the list agrees with
what the queue does with a request for the model."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.backends.base import PhoneState
from server.errors import ModelNotFound, NoPhoneAvailable
from server.scheduling.pool import merge_models
from tests.scheduling.pool_doubles import DoublePhone, make_pool, model_info, run

PRESENT = {PhoneState.STARTING, PhoneState.READY, PhoneState.BUSY, PhoneState.RESTARTING, PhoneState.QUARANTINED}


@pytest.mark.parametrize("state", list(PhoneState))
def test_a_phone_counts_for_its_model_while_it_is_present(state: PhoneState) -> None:
    phones = {"a": DoublePhone("a", state=state), "b": DoublePhone("b", model=model_info("other"))}
    listed = {m.name: m.phones for m in merge_models(phones)}
    assert listed == ({"m": ["a"], "other": ["b"]} if state in PRESENT else {"other": ["b"]})


def test_one_entry_per_model_with_its_phones_in_order_and_simulated_only_when_all_are() -> None:
    sim = dataclasses.replace(model_info(), simulated=True)
    phones = {
        "p0": DoublePhone("p0", model=sim),
        "p1": DoublePhone("p1", model=model_info("w8")),
        "p2": DoublePhone("p2", model=model_info()),
        "p3": DoublePhone("p3", model=None),
        "p4": DoublePhone("p4", model=dataclasses.replace(model_info("w8"), simulated=True)),
    }
    merged = merge_models(phones)
    assert [(m.name, m.phones, m.simulated) for m in merged] == [("m", ["p0", "p2"], False),
                                                                 ("w8", ["p1", "p4"], False)]
    phones["p2"].model = sim
    assert [m.simulated for m in merge_models(phones)] == [True, False]
    assert phones["p0"].model is not None and phones["p0"].model.phones == []  # the phones' own info is not touched


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(list(PhoneState)), min_size=1, max_size=3))
def test_a_listed_model_is_queued_for_and_an_unlisted_one_is_refused_at_once(states: list[PhoneState]) -> None:
    async def check() -> None:
        pool, phones = make_pool(len(states), queue_timeout_s=0.01)
        for phone, state in zip(phones.values(), states, strict=True):
            phone.state = state
        listed = [m.name for m in pool.models()]
        try:
            await run(pool, "r")
            outcome = "served"
        except NoPhoneAvailable as e:
            outcome = str(e.code)
        except ModelNotFound:
            outcome = "not_found"
        if listed == ["m"]:
            assert outcome in {"served", "queue_timeout"}
        else:
            assert listed == [] and outcome in {"no_phone_available", "not_found"}

    asyncio.run(check())
