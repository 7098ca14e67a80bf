"""stream_response's admission wait (server/api/sse.py): a refusal before admission keeps its HTTP
status even when the event loop stalls, and a stream that is never admitted still starts.

Found in a burst: 120 streamed responses over a queue of 2, next to requests with 8 MB bodies whose
validation holds the event loop for seconds. 21 streams got a 200 and then ``queue_full`` inside the
stream: the wait's timer ran out during the stall, before the stream's own task had had the few
turns it takes to reach the pool. A stall must not count against the wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import pytest

from server.api import sse
from server.errors import Overloaded

WAIT_S = 0.2


@pytest.fixture(autouse=True)
def short_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "ADMISSION_WAIT_S", WAIT_S)


async def refused_after(turns: int) -> AsyncGenerator[str, None]:
    """A request that the pool refuses after ``turns`` event-loop turns (its way to the queue)."""
    for _ in range(turns):
        await asyncio.sleep(0)
    raise Overloaded("The queue is full (2 waiting); retry later.")
    yield ""  # an async generator


@pytest.mark.parametrize("turns", [1, 20, 500])
@pytest.mark.parametrize("stall_s", [0.0, WAIT_S / 2, WAIT_S * 1.5])
async def test_a_refusal_keeps_its_status_however_long_the_loop_stalls(turns: int, stall_s: float) -> None:
    """Another request's work holds the loop (``time.sleep``) right as the stream starts waiting."""
    asyncio.get_running_loop().call_soon(time.sleep, stall_s)
    with pytest.raises(Overloaded):
        await sse.stream_response(refused_after(turns), ping_s=1.0)


async def test_a_stream_never_admitted_still_starts_after_the_wait() -> None:
    """A backend that reports no admission (a phone on its own) and sends nothing yet: the 200 goes
    out after the wait, a stall or not, and the chunks follow."""
    go = asyncio.Event()

    async def late() -> AsyncGenerator[str, None]:
        await go.wait()
        yield "{}"

    loop = asyncio.get_running_loop()
    loop.call_soon(time.sleep, WAIT_S * 1.5)
    started = loop.time()
    response = await sse.stream_response(late(), ping_s=1.0)
    assert loop.time() - started >= WAIT_S
    go.set()
    body = response.body_iterator  # type: ignore[attr-defined]
    assert [chunk async for chunk in body] == [b"data: {}\n\n", sse.DONE]
