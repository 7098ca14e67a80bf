"""``n`` choices of one request, shared by /v1/completions and /v1/chat/completions.

Each choice is a phone request of its own (``choice_params``: request id ``<id>-<index>``, and
``seed + index`` when the request has a seed, so that seeded choices differ as OpenAI's do). They
queue in the pool like any request, so with ``n`` idle phones they run at once and with one phone in
turn. ``merge_choices`` runs the ``n`` generations concurrently and yields ``(index, item)`` in the
order items arrive; chunks of different choices interleave, each with its ``index``::

    async with contextlib.aclosing(merge_choices(n, lambda i: run(choice_params(params, i, n)))) as items:
        async for index, item in items:
            ...

A failing choice fails the request: the others are cancelled (their phones are freed) and the error
is raised; an error raised before any item (queue full, no phone) thus keeps its HTTP status. With
``n == 1`` the single generation is passed through as is (no extra task).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

import anyio

from server.backends.base import GenerationParams, admission
from server.serving.driver import CLEANUP_TIMEOUT_S

logger = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()


def choice_params(params: GenerationParams, index: int, n: int) -> GenerationParams:
    """The phone request of choice ``index`` out of ``n`` (``params`` itself when n is 1)."""
    if n == 1:
        return params
    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, request_id=f"{params.request_id}-{index}", seed=seed)


async def merge_choices(
    n: int, run: Callable[[int], AsyncGenerator[T, None]]
) -> AsyncGenerator[tuple[int, T], None]:
    """``run(index)`` for every index in ``range(n)`` at once, merged as ``(index, item)``."""
    ticket = admission.get()
    if ticket is not None:
        ticket.expect(n)  # the stream's 200 waits for all n to be queued or running
    if n == 1:
        async with contextlib.aclosing(run(0)) as items:
            async for item in items:
                yield 0, item
        return
    arrived: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()  # items, errors and ends

    async def pump(index: int) -> None:
        try:
            async with contextlib.aclosing(run(index)) as items:
                async for item in items:
                    arrived.put_nowait((index, item))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
            arrived.put_nowait((index, exc))
        else:
            arrived.put_nowait((index, _END))

    tasks = [asyncio.get_running_loop().create_task(pump(i), name=f"choice-{i}") for i in range(n)]
    try:
        running = n
        while running:
            index, item = await arrived.get()
            if item is _END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            # shielded: under an anyio cancel scope every await is re-cancelled, but each choice's
            # phone clean-up is worth waiting for (each is bounded by the stream driver)
            with anyio.CancelScope(shield=True):
                _, late = await asyncio.wait(pending, timeout=CLEANUP_TIMEOUT_S + 1)
            if late:
                logger.error("%d choice(s) did not let go of their phones in time", len(late))
