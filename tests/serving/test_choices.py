"""n > 1: the choices of one request run at once and merge (server/serving/choices.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import pytest

from server.backends.base import GenerationParams
from server.errors import Overloaded, PhoneLost
from server.serving.choices import choice_params, merge_choices


def test_each_choice_is_its_own_request_with_its_own_seed() -> None:
    base = GenerationParams(request_id="cmpl-1", model="m", prompt_ids=[1], max_new=4, seed=7)
    assert choice_params(base, 0, 1) is base
    two = [choice_params(base, i, 2) for i in range(2)]
    assert [(p.request_id, p.seed) for p in two] == [("cmpl-1-0", 7), ("cmpl-1-1", 8)]
    unseeded = GenerationParams(request_id="c", model="m", prompt_ids=[1], max_new=4)
    assert choice_params(unseeded, 1, 2).seed is None


async def ticker(name: str, count: int, delay: float, log: list[str]) -> AsyncGenerator[str, None]:
    try:
        for k in range(count):
            await asyncio.sleep(delay)
            yield f"{name}{k}"
    finally:
        log.append(f"{name} closed")


async def collect(gen: AsyncGenerator[tuple[int, str], None]) -> list[tuple[int, str]]:
    async with contextlib.aclosing(gen) as items:
        return [item async for item in items]


async def test_one_choice_is_passed_through() -> None:
    log: list[str] = []
    assert await collect(merge_choices(1, lambda i: ticker("a", 2, 0, log))) == [(0, "a0"), (0, "a1")]


async def test_choices_interleave_each_with_its_index() -> None:
    log: list[str] = []
    delays = [0.01, 0.015, 0.004]
    got = await collect(merge_choices(3, lambda i: ticker("abc"[i], 3, delays[i], log)))
    assert sorted(got) == [(i, f"{'abc'[i]}{k}") for i in range(3) for k in range(3)]
    assert [x for _, x in got if x.startswith("b")] == ["b0", "b1", "b2"]  # each choice in order
    assert got[0] == (2, "c0")  # merged by arrival, not by index
    assert sorted(log) == ["a closed", "b closed", "c closed"]


async def test_a_failing_choice_fails_the_request_and_cancels_the_others() -> None:
    log: list[str] = []

    def run(i: int) -> AsyncGenerator[str, None]:
        return failing(log) if i == 1 else ticker(f"t{i}", 100, 0.01, log)

    async def failing(log: list[str]) -> AsyncGenerator[str, None]:
        yield "f0"
        await asyncio.sleep(0.03)
        raise PhoneLost("gone")

    with pytest.raises(PhoneLost):
        await collect(merge_choices(3, run))
    assert sorted(log) == ["t0 closed", "t2 closed"]


async def test_an_error_before_any_item_comes_before_anything_is_yielded() -> None:
    log: list[str] = []

    async def refused() -> AsyncGenerator[str, None]:
        raise Overloaded("full")
        yield "never"  # pragma: no cover

    def run(i: int) -> AsyncGenerator[str, None]:
        return refused() if i == 2 else ticker(f"t{i}", 3, 0.001, log)

    gen = merge_choices(3, run)
    with pytest.raises(Overloaded):
        await gen.__anext__()
    await gen.aclose()
    assert sorted(log) == ["t0 closed", "t1 closed"]


async def test_closing_early_cancels_every_choice() -> None:
    log: list[str] = []
    gen = merge_choices(2, lambda i: ticker(f"t{i}", 1000, 0.005, log))
    assert (await gen.__anext__())[1] in ("t00", "t10")
    await gen.aclose()
    assert sorted(log) == ["t0 closed", "t1 closed"]
