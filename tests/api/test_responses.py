"""/v1/responses end to end: the official openai client (``responses.create``, ``stream=True``, the
``.stream()`` helper, ``.retrieve``, ``.delete``) -> uvicorn -> the pool -> a simulated phone behind a
real adb server.

The simulated phone at temperature 0 writes a function of its context's text alone, so a response and
the chat completion of the same conversation must say the same thing from the same number of prompt
tokens: that is how these tests check what a response's prompt was. With tools in the prompt and a
user turn last, the phone calls the first tool (server/sim/generation.py); after a tool response it
answers in words.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response

from tests.api.live_server import LiveServer

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "enum": [3]}},
    "required": ["city", "days"]}}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}


def create(live: LiveServer, **kw: Any) -> Response:
    kw = {"model": live.model, "temperature": 0.0, "max_output_tokens": 12, **kw}
    return live.client().responses.create(**kw)


def chat_twin(live: LiveServer, messages: list[dict[str, Any]], **kw: Any) -> Any:
    """The chat completion of the same conversation (same sampling)."""
    kw = {"model": live.model, "temperature": 0.0, "max_completion_tokens": 12, **kw}
    return live.client().chat.completions.create(messages=messages, **kw)  # type: ignore[arg-type]


def raw_events(live: LiveServer, **kw: Any) -> list[Any]:
    """The stream's events as the client parses them (stream=True)."""
    kw = {"model": live.model, "temperature": 0.0, "max_output_tokens": 12, **kw}
    return list(live.client().responses.create(stream=True, **kw))


def check_sequence(events: list[Any]) -> None:
    """sequence_number 0, 1, 2...; created and in_progress first; each item added before its deltas
    and done before the end; one terminal event, last."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    terminal = {"response.completed", "response.incomplete", "response.failed"}
    assert events[-1].type in terminal and not any(e.type in terminal for e in events[:-1])
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    done = [e.output_index for e in events if e.type == "response.output_item.done"]
    assert added == done == list(range(len(events[-1].response.output)))


def test_plain_text_is_a_message_and_is_stored(live: LiveServer) -> None:
    r = create(live, input="Name a phone maker.")
    assert r.id.startswith("resp_") and r.object == "response" and r.model == live.model
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and r.output_text == message.content[0].text != ""
    twin = chat_twin(live, [{"role": "user", "content": "Name a phone maker."}])
    assert r.output_text == twin.choices[0].message.content
    assert r.usage is not None and r.usage.input_tokens == twin.usage.prompt_tokens
    assert r.usage.output_tokens == twin.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert 0 <= r.usage.input_tokens_details.cached_tokens <= r.usage.input_tokens
    assert live.client().responses.retrieve(r.id).model_dump() == r.model_dump()


def test_max_output_tokens_reached_is_incomplete(live: LiveServer) -> None:
    r = create(live, input="Tell me a long story.", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 3 and r.output[0].status == "incomplete"
    events = raw_events(live, input="Tell me a long story.", max_output_tokens=3)
    check_sequence(events)
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == r.output_text


def test_instructions_are_the_system_turn(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    r = create(live, instructions="You are terse.", input="Name a phone maker.", max_output_tokens=40)
    twin = chat_twin(live, [{"role": "system", "content": "You are terse."},
                            {"role": "user", "content": "Name a phone maker."}], max_completion_tokens=40)
    assert r.status == "completed" and r.completed_at is not None
    assert (r.output_text, r.usage.input_tokens) == (twin.choices[0].message.content, twin.usage.prompt_tokens)  # type: ignore[union-attr]
    assert r.instructions == "You are terse."


def test_multi_item_input_is_the_conversation(live: LiveServer) -> None:
    items = [
        {"role": "developer", "content": "Answer in English."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi, "},
                                                        {"type": "input_text", "text": "who makes phones?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Many companies."}]},
        {"role": "user", "content": "Name one."},
    ]
    r = create(live, instructions="Be brief.", input=items)
    twin = chat_twin(live, [{"role": "system", "content": "Be brief.\n\nAnswer in English."},
                            {"role": "user", "content": "Hi, who makes phones?"},
                            {"role": "assistant", "content": "Many companies."},
                            {"role": "user", "content": "Name one."}])
    assert (r.output_text, r.usage.input_tokens) == (twin.choices[0].message.content, twin.usage.prompt_tokens)  # type: ignore[union-attr]


def test_function_call_round_trip(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    question = "Weather in Paris for 3 days?"
    r1 = create(live, input=question, tools=[WEATHER], max_output_tokens=100)
    (call,) = r1.output
    assert call.type == "function_call" and r1.status == "completed" and call.status == "completed"
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert json.loads(call.arguments) == {"city": "Paris", "days": 3}
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}
    r2 = create(live, previous_response_id=r1.id, input=[result], tools=[WEATHER], max_output_tokens=100)
    assert r2.output[-1].type == "message" and r2.output_text and r2.previous_response_id == r1.id
    # the same conversation sent whole (as a client without stored responses does) is the same prompt
    whole = [{"role": "user", "content": question}, *[o.model_dump() for o in r1.output], result]
    r3 = create(live, input=whole, tools=[WEATHER], max_output_tokens=100)
    twin = chat_twin(live, [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"},
    ], tools=[CHAT_WEATHER], max_completion_tokens=100)
    assert r2.output_text == r3.output_text == twin.choices[0].message.content
    assert r2.usage.input_tokens == r3.usage.input_tokens == twin.usage.prompt_tokens  # type: ignore[union-attr]
    # an output for a call the conversation never made
    with pytest.raises(openai.BadRequestError) as bad:
        create(live, input=[{"role": "user", "content": "hi"}, {**result, "call_id": "call_unknown"}])
    assert bad.value.body["param"] == "input[1].call_id"  # type: ignore[index]


def test_streamed_function_arguments_reassemble(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    kw: dict[str, Any] = {"input": "Weather in Paris for 3 days?", "tools": [WEATHER], "max_output_tokens": 100}
    events = raw_events(live, **kw)
    check_sequence(events)
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    final = events[-1].response
    assert events[-1].type == "response.completed" and final.output[0].type == "function_call"
    assert deltas == done.arguments == final.output[0].arguments and done.name == "get_weather"
    assert json.loads(deltas) == {"city": "Paris", "days": 3}
    # the client's stream helper rebuilds the same response
    with live.client().responses.stream(model=live.model, temperature=0.0, **kw) as stream:
        snapshots = [e.snapshot for e in stream if e.type == "response.function_call_arguments.delta"]
        helped = stream.get_final_response()
    assert snapshots[-1] == helped.output[0].arguments == deltas  # type: ignore[union-attr]
    assert helped.status == "completed"


def test_reasoning_on_is_a_reasoning_item_and_off_is_none(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    on = create(live, input="Why is the sky blue?", reasoning={"effort": "high"}, max_output_tokens=80)
    reasoning, message = on.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_") and reasoning.summary == []
    assert reasoning.content and reasoning.content[0].type == "reasoning_text" and reasoning.content[0].text
    assert message.type == "message" and on.output_text and "<think>" not in on.output_text
    assert 0 < on.usage.output_tokens_details.reasoning_tokens < on.usage.output_tokens  # type: ignore[union-attr]
    twin = chat_twin(live, [{"role": "user", "content": "Why is the sky blue?"}], max_completion_tokens=80,
                     extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert reasoning.content[0].text == twin.choices[0].message.reasoning_content
    assert on.output_text == twin.choices[0].message.content
    for effort in (None, "none", "minimal"):
        off = create(live, input="Why is the sky blue?", max_output_tokens=80,
                     **({"reasoning": {"effort": effort}} if effort else {}))
        assert [o.type for o in off.output] == ["message"]
        assert off.usage.output_tokens_details.reasoning_tokens == 0  # type: ignore[union-attr]
    events = raw_events(live, input="Why is the sky blue?", reasoning={"effort": "low"}, max_output_tokens=80)
    check_sequence(events)
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert streamed == events[-1].response.output[0].content[0].text == reasoning.content[0].text


def test_stream_and_stream_helper_say_what_create_says(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    kw: dict[str, Any] = {"input": "Name two phone makers.", "max_output_tokens": 40}
    whole = create(live, **kw)
    events = raw_events(live, **kw)
    check_sequence(events)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    (text_done,) = [e for e in events if e.type == "response.output_text.done"]
    assert text_done.text == whole.output_text == events[-1].response.output_text
    with live.client().responses.stream(model=live.model, temperature=0.0, **kw) as stream:
        helped = stream.get_final_response()
    assert helped.output_text == whole.output_text and helped.usage is not None and whole.usage is not None
    # the same prompt again: the phone reuses it, so only the cached count may differ
    assert (helped.usage.input_tokens, helped.usage.output_tokens) == (whole.usage.input_tokens,
                                                                       whole.usage.output_tokens)
    stored = live.client().responses.retrieve(events[-1].response.id)
    assert stored.model_dump() == events[-1].response.model_dump()


def test_previous_response_id_chains_turns(live: LiveServer) -> None:
    """Four turns chained by previous_response_id: each prompt is the chat of the whole conversation
    (instructions sent again, as OpenAI wants: they are not carried over), and later turns reuse
    what the phone kept (tests/api/test_responses_state.py checks how much, and on which phone)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."}]
    previous: Response | None = None
    for question in ["Name a phone maker.", "Where is it?", "Since when?", "Thanks."]:
        r = create(live, instructions="You are terse.", input=question,
                   previous_response_id=previous.id if previous else None)
        messages.append({"role": "user", "content": question})
        twin = chat_twin(live, messages)
        assert (r.output_text, r.usage.input_tokens) == (twin.choices[0].message.content, twin.usage.prompt_tokens)  # type: ignore[union-attr]
        if previous is not None:
            assert r.previous_response_id == previous.id and r.usage.input_tokens_details.cached_tokens > 0  # type: ignore[union-attr]
        messages.append({"role": "assistant", "content": r.output_text})
        previous = r
    # a turn without instructions is another prompt: the first turn's instructions are not carried over
    bare = create(live, input="And now?", previous_response_id=previous.id)  # type: ignore[union-attr]
    twin = chat_twin(live, [*messages[1:], {"role": "user", "content": "And now?"}])
    assert bare.usage.input_tokens == twin.usage.prompt_tokens and bare.instructions is None  # type: ignore[union-attr]


def test_store_false_is_not_kept_and_cannot_be_continued(live: LiveServer) -> None:
    r = create(live, input="Name a phone maker.", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError) as missing:
        live.client().responses.retrieve(r.id)
    assert missing.value.body == {"message": f"Response with id '{r.id}' not found.",  # type: ignore[comparison-overlap]
                                  "type": "invalid_request_error", "param": None, "code": None}
    with pytest.raises(openai.NotFoundError) as cont:
        create(live, input="And then?", previous_response_id=r.id)
    assert cont.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_delete_forgets_a_response(live: LiveServer) -> None:
    r = create(live, input="Name a phone maker.")
    deleted = httpx.delete(f"{live.base_url}/v1/responses/{r.id}", timeout=5)
    assert deleted.status_code == 200 and deleted.json() == {"id": r.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        live.client().responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        live.client().responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        create(live, input="And then?", previous_response_id=r.id)


def test_a_missing_previous_response_is_openai_s_previous_response_not_found(live: LiveServer) -> None:
    """However the previous response is missing (never was, store: false, deleted) and however the
    continuation asks (a body, a stream, the client's stream helper): one 404 with OpenAI's words and
    code, by which clients (Codex, proxies) tell it apart and send the whole conversation instead."""
    client = live.client()
    kept = create(live, input="hi", max_output_tokens=1)
    unstored = create(live, input="hi", max_output_tokens=1, store=False)
    client.responses.delete(kept.id)

    def helper(**kw: Any) -> None:
        with client.responses.stream(**kw):
            pass

    calls = [client.responses.create, lambda **kw: client.responses.create(stream=True, **kw), helper]
    for rid in ("resp_never", unstored.id, kept.id):
        for call in calls:
            with pytest.raises(openai.NotFoundError) as missing:
                call(model=live.model, input="And then?", previous_response_id=rid)
            assert missing.value.body == {"message": f"Previous response with id '{rid}' not found.",
                                          "type": "invalid_request_error", "param": "previous_response_id",
                                          "code": "previous_response_not_found"}


def test_stream_disconnect_frees_the_phone(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(speed=1)  # the real rate: ~22.7 tok/s
    body = {"model": live.model, "input": "Go on", "max_output_tokens": 500, "stream": True}
    with httpx.stream("POST", live.base_url + "/v1/responses", json=body, timeout=30) as r:
        lines = r.iter_lines()  # held: a line iterator let go of closes the connection
        deltas = 0
        while deltas < 3:
            deltas += '"response.output_text.delta"' in next(lines)
        assert live.devices()[0]["request_in_flight"] is not None
    # leaving the block closed the connection
    live.wait_idle(timeout=2.0)
    served = live.devices()[0]["tokens_served"]
    time.sleep(0.3)
    assert live.devices()[0]["tokens_served"] == served  # nothing generated for nobody


def test_a_disconnect_anywhere_in_the_stream_frees_the_phone_and_stores_all_or_nothing(
        live: LiveServer, phone_knobs: Any) -> None:
    """Cut after the k-th event, for k from the first to the last but one: the phone is freed, and
    the response is either not stored (cut before its end) or stored whole (terminal status, every
    item done), never half-built."""
    phone_knobs(speed=1)
    body = {"model": live.model, "input": "Go on", "max_output_tokens": 4, "stream": True, "temperature": 0.0}
    total = len(raw_events(live, **{k: v for k, v in body.items() if k != "stream"}))
    for k in sorted({1, 2, 3, total // 2, total - 2, total - 1}):
        seen: list[dict[str, Any]] = []
        with httpx.stream("POST", live.base_url + "/v1/responses", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[len("data: "):]))
                    if len(seen) == k:
                        break
        live.wait_idle(timeout=10.0)
        stored = httpx.get(f"{live.base_url}/v1/responses/{seen[0]['response']['id']}", timeout=5)
        if stored.status_code == 404:
            continue
        kept = stored.json()
        assert kept["status"] == "incomplete" and kept["usage"]["output_tokens"] == 4, (k, kept)
        assert kept["output"] and all(item["status"] != "in_progress" for item in kept["output"]), (k, kept)


def test_one_response_continued_twice_at_once_branches_and_survives_its_deletion(live: LiveServer,
                                                                                  phone_knobs: Any) -> None:
    """Two continuations of the same response run at once while it is deleted: each branch is the chat
    of its own conversation, and each can be continued in turn."""
    phone_knobs(speed=1)
    root = create(live, input="Name a phone maker.", max_output_tokens=4)
    history = [{"role": "user", "content": "Name a phone maker."}, {"role": "assistant", "content": root.output_text}]

    async def both() -> list[Any]:
        async with live.async_client() as client:
            branches = [client.responses.create(model=live.model, input=q, previous_response_id=root.id,
                                                max_output_tokens=4, temperature=0.0) for q in ("Where?", "When?")]
            deleted = asyncio.to_thread(client_delete, root.id)
            return await asyncio.gather(*branches, deleted)

    def client_delete(rid: str) -> int:
        time.sleep(0.1)  # while the branches run (or wait for the phone)
        return httpx.delete(f"{live.base_url}/v1/responses/{rid}", timeout=5).status_code

    *branches, deleted = asyncio.run(both())
    assert deleted == 200
    phone_knobs(speed=0)  # the twins need no real rate
    for question, branch in zip(("Where?", "When?"), branches, strict=True):
        messages = [*history, {"role": "user", "content": question}]
        twin = chat_twin(live, messages, max_completion_tokens=4)
        assert (branch.output_text, branch.usage.input_tokens) == (twin.choices[0].message.content,
                                                                   twin.usage.prompt_tokens)
        after = create(live, input="More.", previous_response_id=branch.id, max_output_tokens=4)
        twin = chat_twin(live, [*messages, {"role": "assistant", "content": branch.output_text},
                                {"role": "user", "content": "More."}], max_completion_tokens=4)
        assert after.usage.input_tokens == twin.usage.prompt_tokens  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"background": True}, "background"),
        ({"conversation": "conv_123"}, "conversation"),
        ({"prompt": {"id": "pmpt_123"}}, "prompt"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}, "text.format"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}, "tools": [WEATHER]}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"include": ["message.output_text.logprobs"]}, "include[0]"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input[0].content[0].type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}, "input[0].arguments"),
        ({"input": [{"role": "user", "content": "hi"}, {"role": "developer", "content": "late"}]}, "input[1].role"),
        ({"input": [{"role": "assistant", "content": "only me"}]}, "input"),
        ({"input": None}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(live: LiveServer, fields: dict[str, Any],
                                                          param: str) -> None:
    body = {"model": live.model, "input": "hi", **fields}
    r = httpx.post(live.base_url + "/v1/responses", json=body, timeout=10)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_a_bad_tool_choice_is_described_in_this_api_s_form(live: LiveServer) -> None:
    """Not chat's ``{'type': 'function', 'function': {'name': ...}}``, which a Responses client cannot send."""
    for choice in ("bogus", {"type": "function"}, {"type": "allowed_tools", "mode": "auto", "tools": []},
                   {"type": "function", "function": {"name": "get_weather"}}):
        r = httpx.post(live.base_url + "/v1/responses", timeout=10,
                       json={"model": live.model, "input": "hi", "tools": [WEATHER], "tool_choice": choice})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "tool_choice", r.text
        assert "{'type': 'function', 'name': ...}" in error["message"] and "'function': {" not in error["message"]


def test_a_tool_name_the_model_cannot_call_is_a_400_on_every_endpoint(live: LiveServer) -> None:
    """Qwen3.5 calls as ``<function=NAME>``: a name with whitespace, '<' or '>' came back as markup in
    the text, or as a call to part of its name ("a>b": a call to "a"). Other names work, as written."""
    for name in ("get weather", "a>b", "x\ny", "<tool_call>"):
        tool = {**WEATHER, "name": name}
        r = httpx.post(live.base_url + "/v1/responses", timeout=10,
                       json={"model": live.model, "input": "Weather?", "tools": [tool]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].name", r.text
        chat = httpx.post(live.base_url + "/v1/chat/completions", timeout=10, json={
            "model": live.model, "messages": [{"role": "user", "content": "Weather?"}],
            "tools": [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}]})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "tools[0].function.name", chat.text
    for name in ("ünï", "f.g:h/i", "-"):
        (call,) = create(live, input="Weather?", tools=[{**WEATHER, "name": name}], max_output_tokens=60).output
        assert call.type == "function_call" and call.name == name


def test_unknown_ids_are_a_404_in_openai_s_envelope(live: LiveServer) -> None:
    for method in ("GET", "DELETE"):
        r = httpx.request(method, f"{live.base_url}/v1/responses/resp_nope", timeout=5)
        assert r.status_code == 404
        assert r.json() == {"error": {"message": "Response with id 'resp_nope' not found.",
                                      "type": "invalid_request_error", "param": None, "code": None}}


def test_accepted_fields_are_echoed(live: LiveServer) -> None:
    r = create(live, input="hi", metadata={"user": "42"}, store=True, truncation="disabled", top_p=0.5,
               text={"format": {"type": "text"}, "verbosity": "low"}, parallel_tool_calls=False,
               tools=[WEATHER], tool_choice="none", user="someone", extra_body={"some_new_field": 1})
    assert r.metadata == {"user": "42"} and r.top_p == 0.5 and r.truncation == "disabled"
    assert r.parallel_tool_calls is False and r.tool_choice == "none" and r.user == "someone"
    assert r.text is not None and r.text.format.type == "text"
    assert [t.name for t in r.tools] == ["get_weather"]  # type: ignore[union-attr]
    assert [o.type for o in r.output] == ["message"]  # tool_choice none: no call


def test_the_wire_names_each_event_and_ends_with_the_last_one(live: LiveServer) -> None:
    """As OpenAI sends a response stream: ``event: <type>`` before each ``data:`` line, no ``[DONE]``."""
    body = {"model": live.model, "input": "hi", "max_output_tokens": 3, "stream": True}
    with httpx.stream("POST", live.base_url + "/v1/responses", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        blocks = [b for b in r.read().decode().split("\n\n") if b and not b.startswith(":")]
    pairs = [block.split("\n") for block in blocks]
    assert all(len(p) == 2 and p[0].startswith("event: ") and p[1].startswith("data: ") for p in pairs), blocks
    for event_line, data_line in pairs:
        assert json.loads(data_line[len("data: "):])["type"] == event_line[len("event: "):]
    assert pairs[-1][0] == "event: response.incomplete"


def test_what_is_not_served_answers_as_the_docs_say(live: LiveServer) -> None:
    base = live.base_url + "/v1"
    assert httpx.post(f"{base}/responses/resp_1/cancel", timeout=5).status_code == 404
    assert httpx.get(f"{base}/responses/resp_1/input_items", timeout=5).status_code == 404
    assert httpx.post(f"{base}/responses/input_tokens", json={}, timeout=5).status_code == 405
    assert httpx.post(f"{base}/conversations", json={}, timeout=5).status_code == 404
    r = create(live, input="hi")
    again = httpx.get(f"{base}/responses/{r.id}", params={"stream": "true"}, timeout=5)
    assert again.status_code == 400 and again.json()["error"]["param"] == "stream"


def test_truncation_auto_drops_the_oldest_turns_and_disabled_refuses(live: LiveServer) -> None:
    long = " ".join(["phones"] * 300)  # ~300 tokens a turn: four turns do not fit in 1,024
    history = [item for i in range(4) for item in ({"role": "user", "content": f"{i}: {long}"},
                                                   {"role": "assistant", "content": "Noted."})]
    items = [*history, {"role": "user", "content": "Summarize."}]
    with pytest.raises(openai.BadRequestError) as refused:
        create(live, input=items, truncation="disabled")
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "input"
    raw = live.client().responses.with_raw_response.create(model=live.model, input=items, truncation="auto",  # type: ignore[arg-type]
                                                           max_output_tokens=4, temperature=0.0)
    r = raw.parse()
    dropped = int(raw.headers["X-QHX-Context-Dropped"])
    assert dropped >= 2 and r.usage is not None and r.usage.input_tokens <= 1024 - 4
    # the stored conversation is what was kept: its continuation fits without dropping anything
    follow = create(live, input="More.", previous_response_id=r.id, truncation="disabled", max_output_tokens=4)
    assert follow.usage is not None and follow.usage.input_tokens < r.usage.input_tokens + 40


def test_a_phone_dying_mid_stream_fails_the_response(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(crash_after=3)
    events = raw_events(live, input="Go on", max_output_tokens=50)
    check_sequence(events)
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error.code == "server_error" and failed.response.error.message  # type: ignore[union-attr]
    assert failed.response.output[0].status == "incomplete"
    assert live.client().responses.retrieve(failed.response.id).status == "failed"
    live.phone.configure(crash_after=None)
    live.wait_idle(timeout=15)  # the session restarts


async def test_a_full_queue_is_a_429_before_the_stream_starts(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(speed=1)  # max_queue is 1: one response runs, one waits, the third is refused
    async with live.async_client() as client:

        async def hold() -> str:
            stream = await client.responses.create(model=live.model, input="Go on", max_output_tokens=15,
                                                   stream=True)
            return [event.type async for event in stream][-1]

        running = asyncio.ensure_future(hold())
        await asyncio.sleep(0.3)
        waiting = asyncio.ensure_future(hold())
        await asyncio.sleep(0.3)
        with pytest.raises(openai.RateLimitError):
            await hold()
        assert await running == await waiting == "response.incomplete"


def test_a_bad_input_item_is_named_by_its_place(live: LiveServer) -> None:
    body = {"model": live.model, "input": [{"role": "user", "content": "hi"},
                                           {"type": "function_call", "call_id": 7, "name": "f", "arguments": "{}"}]}
    r = httpx.post(live.base_url + "/v1/responses", json=body, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1].call_id"
    # arguments as an object (as chat accepts them) is the same as its JSON text
    call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": {"city": "Paris", "days": 3}}
    items = [{"role": "user", "content": "Weather?"}, call, {"type": "function_call_output", "call_id": "c1", "output": "Sun"}]
    as_object = create(live, input=items, tools=[WEATHER])
    as_text = create(live, input=[items[0], {**call, "arguments": json.dumps(call["arguments"])}, items[2]], tools=[WEATHER])
    assert as_object.output_text == as_text.output_text and as_object.usage.input_tokens == as_text.usage.input_tokens  # type: ignore[union-attr]
