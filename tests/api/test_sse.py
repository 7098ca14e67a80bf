"""server/api/sse.py: when a stream commits to its 200.

Issue 10 (adversarial pass): under a burst, a streamed request with ``n`` = 2 got a 200 whose only
event was ``queue_full``: the stream committed after a fixed 50 ms, and the refusal of its second
choice took longer than that on a loaded event loop. A stream now commits once every choice is past
admission (queued for a phone or running on one), or on its first chunk; never on a clock that a
refusal can lose against.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from starlette.responses import Response

from server.api.shutdown import Drain
from server.api.sse import stream_response
from server.backends.base import admission
from server.errors import Overloaded


async def _refused_after(delay_s: float, *, expect: int = 1, admitted: int = 0) -> AsyncGenerator[str, None]:
    ticket = admission.get()
    assert ticket is not None  # the stream hands the generation its admission ticket
    ticket.expect(expect)
    for _ in range(admitted):
        ticket.admitted()
    await asyncio.sleep(delay_s)  # the refusal takes far longer than a few event-loop turns
    raise Overloaded("The queue is full; retry later.")
    yield "never"  # pragma: no cover - makes this an async generator


async def test_a_refusal_slower_than_a_few_loop_turns_keeps_its_status_code() -> None:
    with pytest.raises(Overloaded):
        await stream_response(_refused_after(0.2), ping_s=15)


async def test_a_refusal_of_the_second_choice_keeps_its_status_code_when_the_first_was_queued() -> None:
    with pytest.raises(Overloaded):
        await stream_response(_refused_after(0.2, expect=2, admitted=1), ping_s=15)


async def test_a_queued_request_commits_to_200_before_its_first_chunk() -> None:
    """Queued for a phone (admitted): the 200 and pings go out while it waits, not after."""
    first_chunk_sent = asyncio.Event()

    async def queued() -> AsyncGenerator[str, None]:
        ticket = admission.get()
        assert ticket is not None
        ticket.admitted()
        await asyncio.sleep(0.3)  # waiting for a phone
        first_chunk_sent.set()
        yield '{"ok": true}'

    response = await stream_response(queued(), ping_s=15)
    assert response.status_code == 200
    assert not first_chunk_sent.is_set()
    assert await _events(response) == [b'data: {"ok": true}\n\n', b"data: [DONE]\n\n"]


async def test_a_stream_whose_backend_reports_no_admission_commits_on_its_first_chunk() -> None:
    async def plain() -> AsyncGenerator[str, None]:
        await asyncio.sleep(0.1)
        yield '{"ok": true}'

    response = await stream_response(plain(), ping_s=15)
    assert response.status_code == 200
    assert await _events(response) == [b'data: {"ok": true}\n\n', b"data: [DONE]\n\n"]


async def _events(response: Response) -> list[bytes]:
    """What the stream's body sends (the SSE framing our body iterator yields)."""
    body = response.body_iterator  # type: ignore[attr-defined]
    return [event async for event in body]


async def test_a_stream_stopped_by_the_shutdown_ends_with_its_error_and_lets_its_clean_up_finish() -> None:
    """The drain cancels the chunks once; closing the stream afterwards must not cancel them again:
    a second cancel landed in the generation's clean-up (the phone's cancel, the wait for its done)
    and cut it short."""
    cleaned = asyncio.Event()

    async def generation() -> AsyncGenerator[str, None]:
        try:
            yield '{"n": 1}'
            await asyncio.sleep(30)  # a long generation
            yield '{"n": 2}'
        finally:
            await asyncio.sleep(0.2)  # the phone confirms the cancel
            cleaned.set()

    drain = Drain(grace_s=60)
    response = await stream_response(generation(), ping_s=15, drain=drain)
    body = response.body_iterator  # type: ignore[attr-defined]
    assert await body.__anext__() == b'data: {"n": 1}\n\n'
    drain.expire()
    await asyncio.sleep(0.05)  # the generation is in its clean-up (as while the error event is sent)
    rest = [event async for event in body]
    assert len(rest) == 1 and b'"code":"server_shutting_down"' in rest[0]
    assert cleaned.is_set()
