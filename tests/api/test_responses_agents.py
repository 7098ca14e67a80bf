"""The OpenAI Agents SDK (``openai-agents``), pointed at qhx-server through its Responses model with a
function tool, runs to the end on the simulated phone: the phone calls the tool (tools in the prompt,
a user turn last), the SDK runs it and sends the result back as a function_call_output item, the
phone answers in words (server/sim/generation.py). Skipped when the SDK is not installed (an optional
test dependency)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.live_server import LiveServer

agents = pytest.importorskip("agents")


@pytest.fixture
def weather_agent(live: LiveServer, phone_knobs: Any) -> Any:
    phone_knobs(stop_rate=0.3)  # the answer after the tool result ends by itself
    agents.set_tracing_disabled(True)  # the SDK would export traces to OpenAI otherwise
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather of a city."""
        calls.append(city)
        return f"Sunny and 21 C in {city}"

    def make(client: Any) -> Any:
        return agents.Agent(
            name="weather", instructions="Answer with the weather tool.", tools=[get_weather],
            model=agents.OpenAIResponsesModel(model=live.model, openai_client=client),
            model_settings=agents.ModelSettings(temperature=0.0, max_tokens=120),
        )

    make.calls = calls  # type: ignore[attr-defined]
    return make


async def test_an_agent_run_calls_the_tool_and_answers(live: LiveServer, weather_agent: Any) -> None:
    async with live.async_client() as client:
        result = await agents.Runner.run(weather_agent(client), "What is the weather in Paris?", max_turns=4)
    assert weather_agent.calls == ["Paris"]
    assert isinstance(result.final_output, str) and result.final_output
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]
    assert len(result.raw_responses) == 2 and all(r.usage.requests == 1 for r in result.raw_responses)


async def test_a_streamed_agent_run_chained_by_previous_response_id(live: LiveServer, weather_agent: Any) -> None:
    """Streamed, and continuing on the server's stored conversation (previous_response_id) instead of
    sending it back whole."""
    async with live.async_client() as client:
        run = agents.Runner.run_streamed(weather_agent(client), "What is the weather in Paris?", max_turns=4,
                                         auto_previous_response_id=True)
        deltas = [e.data.delta async for e in run.stream_events()
                  if e.type == "raw_response_event" and e.data.type == "response.output_text.delta"]
    assert weather_agent.calls == ["Paris"]
    assert run.final_output and "".join(deltas) == run.final_output
    first, second = run.raw_responses
    stored = live.client().responses.retrieve(second.response_id)
    assert stored.previous_response_id == first.response_id and stored.output_text == run.final_output
    assert second.usage.input_tokens_details.cached_tokens > 0  # the phone kept the first request's prompt
