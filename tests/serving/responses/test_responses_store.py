"""ResponseStore: bounded in number and in bytes (oldest out first) and in age (ttl_s), a 404 for
whatever it does not hold."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.errors import NotFound
from server.serving.responses.items import Message, input_messages
from server.serving.responses.protocol import InputItem
from server.serving.responses.store import ResponseStore

MB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_response_expires_after_its_ttl() -> None:
    clock = Clock()
    store = ResponseStore(max_items=10, ttl_s=60, max_bytes=MB, clock=clock)
    store.put("resp_a", "{}", ())
    clock.now = 59.9
    assert store.get("resp_a").body == "{}"
    clock.now = 60.0
    with pytest.raises(NotFound) as gone:
        store.get("resp_a", param="previous_response_id")
    assert gone.value.param == "previous_response_id" and gone.value.status_code == 404
    assert gone.value.message == "Response with id 'resp_a' not found."
    assert len(store) == 0


def test_the_oldest_go_beyond_the_bound_and_delete_forgets() -> None:
    store = ResponseStore(max_items=2, ttl_s=60, max_bytes=MB, clock=Clock())
    for name in ("a", "b", "c"):
        store.put(name, name, ())
    with pytest.raises(NotFound):
        store.get("a")
    assert [store.get(n).body for n in ("b", "c")] == ["b", "c"]
    store.delete("b")
    with pytest.raises(NotFound):
        store.delete("b")
    assert len(store) == 1


def test_a_bound_of_zero_keeps_nothing() -> None:
    store = ResponseStore(max_items=0, ttl_s=60, max_bytes=MB)
    store.put("a", "{}", ())
    with pytest.raises(NotFound):
        store.get("a")


def test_a_huge_id_is_named_cut_short() -> None:
    with pytest.raises(NotFound) as gone:
        ResponseStore(max_items=1, ttl_s=1, max_bytes=MB).get("x" * 10_000)
    assert len(gone.value.message) < 200


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.floats(0, 30)), max_size=40), st.integers(0, 4))
def test_it_holds_exactly_the_latest_unexpired(ops: list[tuple[str, float]], bound: int) -> None:
    """Against a model: after puts at rising times, an id is held iff it is among the ``bound`` most
    recently put ids and was put less than ttl_s ago."""
    clock = Clock()
    store = ResponseStore(max_items=bound, ttl_s=50, max_bytes=MB, clock=clock)
    when: dict[str, float] = {}
    for name, step in ops:
        clock.now += step
        store.put(name, name, ())
        when.pop(name, None)
        when[name] = clock.now
    latest = list(when)[-bound:] if bound else []
    for name in "abcdef":
        held = name in latest and clock.now - when[name] < 50
        try:
            store.get(name)
            assert held, name
        except NotFound:
            assert not held, name


def hostile(i: int, size: int) -> tuple[Message, ...]:
    """A 25-token prompt holding ``size`` bytes: reasoning text before the last user message, which
    the template drops (what a client sent to keep megabytes on the server for an hour)."""
    raw = [{"role": "user", "content": "hi"},
           {"type": "reasoning", "content": [{"type": "reasoning_text", "text": f"{i}" + "x" * size}]},
           {"role": "assistant", "content": "ok"}, {"role": "user", "content": "go"}]
    return tuple(input_messages([InputItem.model_validate(r) for r in raw], earlier=[]))


def test_responses_that_render_small_but_hold_megabytes_are_bounded_in_bytes() -> None:
    store = ResponseStore(max_items=1000, ttl_s=60, max_bytes=8 * MB)
    for i in range(5):
        store.put(f"r{i}", "{}", hostile(i, 3 * MB))
    assert len(store) == 2 and 6 * MB < store.bytes <= 8 * MB
    with pytest.raises(NotFound):
        store.get("r2")
    assert store.get("r4").conversation[1]["reasoning_content"].startswith("4")
    store.put("huge", "x" * 9 * MB, ())  # more than the whole bound: not kept, the others stay
    assert len(store) == 2
    store.delete("r3")
    assert len(store) == 1 and store.bytes < 4 * MB


def _payload(kind: str, size: int, earlier: tuple[Message, ...]) -> tuple[str, tuple[Message, ...]]:
    """A body and a conversation of ``size``-ish bytes, in one of the shapes a response can take."""
    if kind == "body":  # echoed fields: tools left out by tool_choice, instructions, metadata
        return "b" * size, ()
    if kind == "text":
        return "{}", (*earlier, {"role": "user", "content": "t" * size})
    if kind == "many":  # empty system messages: they render as nothing
        return "{}", (*earlier, *({"role": "system", "content": ""} for _ in range(size // 64)))
    if kind == "keys":  # tool-call arguments with many keys
        args: dict[str, Any] = {f"k{j}": j for j in range(size // 64)}
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}
        return "{}", (*earlier, {"role": "assistant", "content": "", "tool_calls": [call]})
    nested: Any = "n"  # deep arguments
    for _ in range(min(size // 64, 900)):
        nested = {"a": [nested]}
    return "{}", (*earlier, {"role": "assistant", "content": "",
                             "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": nested}}]})


@pytest.mark.parametrize("continues", [False, True])
@pytest.mark.parametrize("kind", ["body", "text", "many", "keys", "deep"])
def test_what_the_store_keeps_alive_stays_within_its_bytes(kind: str, continues: bool) -> None:
    """Measured from outside (tracemalloc: every allocation the store keeps alive), for each shape an
    entry can take, entries alone or each continuing the one before (sharing its messages)."""
    bound = MB
    gc.collect()
    tracemalloc.start()
    try:
        store = ResponseStore(max_items=1000, ttl_s=60, max_bytes=bound)
        base = tracemalloc.get_traced_memory()[0]
        previous: tuple[Message, ...] = ()
        for i in range(8):
            body, conversation = _payload(kind, 150_000, previous if continues else ())
            store.put(f"r{i}", body, conversation)
            previous = conversation
            del body, conversation
        del previous
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert 0 < store.bytes <= bound
    assert held <= bound + 128 * 1024, f"the store keeps {held} bytes alive, bound {bound}"
