"""The ``Backend`` contract (server/backends/base.py) as one reusable set of tests, the way httpx tests
its transports: every implementation subclasses :class:`BackendContract` in a ``test_contract_*.py``
module, provides the two fixtures below, and must pass all of it.

    backend        a started backend serving ``model``, shared by the tests of the class (each test
                   leaves it idle); its requests end on their own within ``max_new`` tokens
    fresh_backend  makes a started backend the test may close (for ``aclose``)

What it holds every implementation to: events ``Started -> Tokens* -> Finished`` with the request's
id; the prompt counted as its ids; the token count and the finish reason agree with the ids sent;
closing the iterator early, or cancelling the task that consumes it, ends the request and leaves the
backend free for the next one right away; ``cancel`` of an id it does not run is a no-op; the shapes
of ``models()`` and ``health()``; ``aclose()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from server.backends.base import (
    Backend,
    Event,
    Finished,
    GenerationParams,
    ModelInfo,
    PhoneHealth,
    PhoneState,
    Started,
    Tokens,
)
from server.errors import QhxError

PROMPT = [9707, 11, 1879, 0]
BOUND_S = 30.0  # no contract step may take this long (a hang fails instead of blocking the suite)
_ids = itertools.count()


async def collect(events: AsyncIterator[Event]) -> list[Event]:
    async with asyncio.timeout(BOUND_S):
        return [ev async for ev in events]


async def first_event(events: AsyncIterator[Event]) -> Event:
    async with asyncio.timeout(BOUND_S):
        return await anext(events)


class BackendContract:
    """Subclass as ``TestXContract`` and override the fixtures (and the class attributes that describe
    the implementation)."""

    model = "qwen3.5-0.8b"  # the model the backend serves
    max_new = 6
    long_max_new = 200  # a request likely still running when the test closes it
    lists_models = True  # models() lists the model it serves (the serving layer's double lists none)
    closes_phones = True  # aclose() takes its phones offline (doubles hold nothing to close)

    @pytest.fixture
    def backend(self) -> Backend:
        raise NotImplementedError

    @pytest.fixture
    def fresh_backend(self) -> Callable[[], Awaitable[Backend]]:
        raise NotImplementedError

    def params(self, max_new: int | None = None, prompt: list[int] | None = None, **kw: Any) -> GenerationParams:
        return GenerationParams(f"contract-{next(_ids)}", self.model, list(prompt or PROMPT),
                                max_new or self.max_new, **kw)

    def running(self, backend: Backend, request_id: str) -> bool:
        return any(h.request_in_flight == request_id for h in backend.health())

    async def assert_serves(self, backend: Backend) -> None:
        """The backend takes a new request at once and runs it to its end."""
        events = await collect(backend.generate(self.params()))
        assert isinstance(events[0], Started) and isinstance(events[-1], Finished), events

    # -- one request ----------------------------------------------------------------------------

    async def test_events_come_started_then_tokens_then_finished_with_the_request_id(self, backend: Backend) -> None:
        p = self.params()
        events = await collect(backend.generate(p))
        assert isinstance(events[0], Started), events
        assert isinstance(events[-1], Finished), events
        assert all(isinstance(ev, Tokens) for ev in events[1:-1]), events
        assert {ev.request_id for ev in events} == {p.request_id}

    @pytest.mark.parametrize("max_new", [1, 6])
    async def test_the_count_and_the_finish_reason_agree_with_the_ids_sent(self, backend: Backend, max_new: int) -> None:
        for _ in range(2):  # the second request counts its own tokens only
            p = self.params(max_new=max_new)
            events = await collect(backend.generate(p))
            finished = events[-1]
            assert isinstance(finished, Finished)
            ids = [i for ev in events if isinstance(ev, Tokens) for i in ev.ids]
            assert len(ids) <= p.max_new
            assert finished.completion_tokens == len(ids)
            assert finished.reason in ("stop", "length")
            assert (finished.reason == "length") == (len(ids) == p.max_new), (finished, ids)

    @pytest.mark.parametrize("prompt", [[9707], PROMPT, PROMPT * 5])
    async def test_prompt_tokens_are_the_prompt_ids(self, backend: Backend, prompt: list[int]) -> None:
        events = await collect(backend.generate(self.params(prompt=prompt)))
        started, finished = events[0], events[-1]
        assert isinstance(started, Started) and isinstance(finished, Finished)
        assert started.prompt_tokens == finished.prompt_tokens == len(prompt)

    # -- ending early ---------------------------------------------------------------------------

    async def test_closing_the_iterator_early_ends_the_request_and_frees_the_backend(self, backend: Backend) -> None:
        p = self.params(max_new=self.long_max_new)
        events = backend.generate(p)
        assert isinstance(await first_event(events), Started)
        async with asyncio.timeout(BOUND_S):
            await events.aclose()  # type: ignore[attr-defined]
        assert not self.running(backend, p.request_id)
        await self.assert_serves(backend)

    async def test_cancelling_the_consuming_task_ends_the_request_and_frees_the_backend(
        self, backend: Backend
    ) -> None:
        p = self.params(max_new=self.long_max_new)
        started = asyncio.Event()

        async def consume() -> None:
            async for ev in backend.generate(p):
                if isinstance(ev, Tokens):
                    started.set()

        task = asyncio.create_task(consume())
        waiting = asyncio.create_task(started.wait())
        async with asyncio.timeout(BOUND_S):
            await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
            task.cancel()
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert not self.running(backend, p.request_id)
        await self.assert_serves(backend)

    async def test_cancel_of_a_request_it_does_not_run_is_a_no_op(self, backend: Backend) -> None:
        await backend.cancel("contract-never-seen")  # idle
        p = self.params()
        events = backend.generate(p)
        assert isinstance(await first_event(events), Started)
        await backend.cancel("contract-never-seen")  # while another request runs: that one carries on
        rest = await collect(events)
        finished = rest[-1]
        assert isinstance(finished, Finished) and finished.reason in ("stop", "length")
        await backend.cancel(p.request_id)  # over already
        await self.assert_serves(backend)

    # -- views and lifetime -----------------------------------------------------------------------

    async def test_models_and_health_have_their_shapes(self, backend: Backend) -> None:
        await self.assert_serves(backend)
        models = backend.models()
        assert isinstance(models, list) and all(isinstance(m, ModelInfo) for m in models)
        names = [m.name for m in models]
        assert len(names) == len(set(names))
        for m in models:
            assert m.name and m.precision and m.max_context > 0
            assert isinstance(m.phones, list) and all(isinstance(k, str) and k for k in m.phones)
        if self.lists_models:
            assert self.model in names
        health = backend.health()
        assert isinstance(health, list) and health and all(isinstance(h, PhoneHealth) for h in health)
        assert all(isinstance(h.state, PhoneState) and h.serial for h in health)
        assert not any(h.request_in_flight for h in health)  # at rest

    async def test_aclose_ends_the_backend_and_may_be_called_again(
        self, fresh_backend: Callable[[], Awaitable[Backend]]
    ) -> None:
        backend = await fresh_backend()
        await self.assert_serves(backend)
        async with asyncio.timeout(BOUND_S):
            await backend.aclose()
            await backend.aclose()
        if self.closes_phones:
            assert all(h.state is PhoneState.OFFLINE for h in backend.health())
            with pytest.raises(QhxError):
                await collect(backend.generate(self.params()))
