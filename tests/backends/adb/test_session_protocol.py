"""Session protocol edge cases, driven by scripted stand-ins for qhx_generate on a simulated phone.

The launch command is pointed at a small shell script in the phone's sandbox, so the whole real path
(adb server, shell v2 stream, reader task) is exercised with an exact, misbehaving event sequence.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import pytest

from server.backends.adb.phone import Phone
from server.backends.base import Boundary, Finished, GenerationParams, PhoneState
from server.errors import ProtocolViolation
from server.sim.harness import SimPhone
from tests.backends.adb_helpers import wait_state

READY = '{"ev":"ready","proto":1,"model":"qwen3.5-0.8b","precision":"fp16","max_context":1024}'


def script(sim: SimPhone, name: str, body: str) -> str:
    """Write a script into the phone's /data/local/tmp and return a launch command running it."""
    path = sim.phone_path(f"/data/local/tmp/{name}.sh")
    path.write_text("#!/bin/sh\n" + body + "\n")
    return f"sh /data/local/tmp/{name}.sh {{prompt}}"


@pytest.fixture
def sim(spare_sim: SimPhone) -> SimPhone:
    return spare_sim


def ev(kind: str, **fields: object) -> str:
    return "echo '" + json.dumps({"ev": kind, "id": "v", **fields}) + "'"


VIOLATIONS = {
    "tok_before_start": ev("tok", ids=[1], t_ms=0),
    "done_before_start": ev("done", reason="length", prompt_tokens=1, completion_tokens=0),
    "other_id": ev("start", prompt_tokens=1, state_tokens=0).replace('"v"', '"someone-else"'),
    "second_start": ev("start", prompt_tokens=1, state_tokens=0) + "\n" + ev("start", prompt_tokens=1),
    "tok_without_ids": ev("start", prompt_tokens=1, state_tokens=0) + "\n" + ev("tok", t_ms=0),
    "string_ids": ev("start", prompt_tokens=1, state_tokens=0) + "\n" + ev("tok", ids=["7"], t_ms=0),
    "string_count": ev("start", prompt_tokens="one", state_tokens=0),
    "bad_reason": ev("start", prompt_tokens=1, state_tokens=0)
    + "\n"
    + ev("done", reason="tired", prompt_tokens=1, completion_tokens=0),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
async def test_events_out_of_order_are_a_protocol_violation_and_restart_the_session(
    sim: SimPhone, make_phone: Callable[..., Awaitable[Phone]], case: str
) -> None:
    body = f"echo '{READY}'\nread line\n{VIOLATIONS[case]}\ncat >/dev/null"
    phone = await make_phone(sim, launch_command=script(sim, case, body), device_mode="session")
    first = phone.runtime
    with pytest.raises(ProtocolViolation):
        async for _ in phone.generate(GenerationParams("v", "qwen3.5-0.8b", [1], 4)):
            pass
    assert phone.state is not PhoneState.READY or phone.runtime is not first
    await wait_state(phone, PhoneState.READY)
    assert phone.runtime is not first
    await phone.aclose()


async def test_unknown_events_and_fields_are_ignored(
    sim: SimPhone, make_phone: Callable[..., Awaitable[Phone]]
) -> None:
    body = "\n".join(
        [
            f"echo '{READY}'",
            "read line",
            ev("start", prompt_tokens=1, state_tokens=0, future_field=1),
            'echo \'{"ev":"thermal","celsius":41}\'',
            ev("tok", ids=[7, 8], t_ms=1.5, logprobs=[0.1]),
            ev("done", reason="stop", prompt_tokens=1, completion_tokens=2, prefill_ms=1, decode_ms=2),
            "cat >/dev/null",
        ]
    )
    phone = await make_phone(sim, launch_command=script(sim, "forward", body), device_mode="session")
    events = [e async for e in phone.generate(GenerationParams("v", "qwen3.5-0.8b", [1], 4))]
    assert isinstance(events[-1], Finished) and events[-1].reason == "stop"
    assert [i for e in events[1:-1] for i in e.ids] == [7, 8]  # type: ignore[union-attr]
    await phone.aclose()


async def test_fatal_error_before_ready_is_a_failed_start_not_a_fallback(
    sim: SimPhone, make_phone: Callable[..., Awaitable[Phone]]
) -> None:
    body = 'echo \'{"ev":"error","id":null,"code":"runtime","message":"HTP gone"}\'\nexit 1'
    phone = await make_phone(sim, wait=False, launch_command=script(sim, "fatal", body))
    await wait_state(phone, PhoneState.RESTARTING)
    assert "HTP gone" in (phone.last_error or "")
    assert phone.mode is None
    await phone.aclose()


async def test_a_runtime_that_exits_quietly_falls_back_to_one_shot(
    sim: SimPhone, make_phone: Callable[..., Awaitable[Phone]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        phone = await make_phone(sim, launch_command=script(sim, "quiet", "exit 0"))
    assert phone.mode == "oneshot"
    assert sum("one-shot mode" in r.getMessage() for r in caplog.records) == 1
    await phone.aclose()


async def test_session_mode_refuses_to_fall_back(
    sim: SimPhone, make_phone: Callable[..., Awaitable[Phone]]
) -> None:
    phone = await make_phone(
        sim, wait=False, device_mode="session", launch_command=script(sim, "text", "echo hello; sleep 1")
    )
    await wait_state(phone, PhoneState.RESTARTING)
    assert "device_mode=session" in (phone.last_error or "")
    await phone.aclose()


async def test_no_ready_within_the_timeout_is_a_failed_start(
    sim: SimPhone, make_phone: Callable[..., Awaitable[Phone]]
) -> None:
    phone = await make_phone(
        sim,
        wait=False,
        device_mode="session",
        ready_timeout_s=0.5,
        launch_command=script(sim, "silent", "cat >/dev/null"),
    )
    await wait_state(phone, PhoneState.RESTARTING)
    assert "no `ready`" in (phone.last_error or "")
    await phone.aclose()


async def test_a_runtime_that_refuses_the_saves_it_advertised_is_used_without_checkpoints(
    sim: SimPhone, make_phone: Callable[..., Awaitable[Phone]], caplog: pytest.LogCaptureFixture
) -> None:
    """ready says 2 checkpoint slots but every `save` gets bad_request: the request runs again without
    saves (the caller sees nothing of it), and later requests send none."""
    ready = READY[:-1] + ',"checkpoints":2}'
    refuse = 'echo \'{"ev":"error","id":"v","code":"bad_request","message":"no saves here"}\''
    serve = "\n".join([ev("start", prompt_tokens=3, state_tokens=0, restored=None),
                       ev("done", reason="length", prompt_tokens=3, completion_tokens=0, saved=[])])
    body = f"echo '{ready}'\nwhile read line; do case \"$line\" in *'\"save\"'*) {refuse};; *) {serve};; esac; done"
    phone = await make_phone(sim, launch_command=script(sim, "nosave", body), device_mode="session")
    assert phone.health()[0].checkpoint_slots == 2
    params = GenerationParams("v", "qwen3.5-0.8b", [1, 2, 3], 0, boundaries=[Boundary(2)])
    with caplog.at_level(logging.WARNING, logger="server.backends.adb.session"):
        events = [e async for e in phone.generate(params)]
        assert isinstance(events[-1], Finished) and events[-1].reason == "length"
        assert "refused checkpoint saves" in caplog.text
        assert phone.health()[0].checkpoint_slots == 0
        caplog.clear()
        events = [e async for e in phone.generate(params)]
        assert isinstance(events[-1], Finished) and not caplog.text
    await phone.aclose()
