"""/v1/responses on the serving base (server/serving/base.py): the conversation rendered as a chat
(server/serving/responses/items.py, the chat service's template, tools, thinking and context
handling), the reply parsed as chat parses it, and the Responses API's output items, events and
stored responses.

What the spec leaves open, and what we chose (docs/api.md, "POST /v1/responses"): ``reasoning.effort``
low and above opens the think block, anything else (or none) leaves it closed; the think text is the
``reasoning`` item's content; ``truncation: auto`` drops whole oldest turns (chat's drop-oldest),
``disabled`` is a 400, unset follows the server's ``context_overflow``; stored responses live in
memory (:class:`~server.serving.responses.store.ResponseStore`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, ClassVar

from server.backends.base import Backend, Boundary
from server.errors import InvalidRequest, NotFound, QhxError, UnsupportedParameter
from server.serving.base import OpenAIServing, Prepared, usage
from server.serving.chat.boundaries import chat_boundaries
from server.serving.chat.protocol import ChatCompletionRequest
from server.serving.chat.reply import ReplyParser
from server.serving.chat.service import ChatService, RenderedPrompt
from server.serving.driver import Outcome, TextDelta
from server.serving.metrics import ServingMetrics
from server.serving.models import ModelRegistry
from server.serving.protocol import ContextWording
from server.serving.responses.items import (
    Message,
    assistant_turn,
    input_messages,
    leading_system,
    system_message,
)
from server.serving.responses.output import ResponseOutput
from server.serving.responses.protocol import (
    DeletedResponse,
    InputTokensDetails,
    OutputTokensDetails,
    Response,
    ResponsesRequest,
    ResponseUsage,
    StreamEvent,
)
from server.serving.responses.store import ResponseStore, StoredResponse
from server.serving.tokens import ENDOFTEXT, IM_END, IM_START, HostTokenizer

THINK_CLOSE = "</think>"
THINK_OPEN = "<think>"


@dataclass(slots=True)
class ResponsePrompt(RenderedPrompt):
    """The conversation rendered as a chat, and the conversation itself (without instructions), which
    a stored response is continued from."""

    conversation: tuple[Message, ...] = ()


PreparedResponse = Prepared[ResponsesRequest, ResponsePrompt]


class _ChatOfResponse(ChatCompletionRequest):
    """The chat request a response is rendered as: its context errors name the response's fields."""

    context_wording: ClassVar[ContextWording] = ResponsesRequest.context_wording

    @property
    def max_new_requested(self) -> tuple[int | None, str]:
        return self.max_completion_tokens, "max_output_tokens"


class ResponsesService(OpenAIServing[ResponsesRequest, ResponsePrompt]):
    """The /v1/responses endpoints, minus HTTP: create (``prepare``, then ``complete`` or ``stream``),
    ``retrieve`` and ``delete``."""

    id_prefix = "resp"
    id_separator = "_"
    stop_tokens = (IM_END, ENDOFTEXT)
    body_type = Response
    chunk_type = StreamEvent

    def __init__(self, backend: Backend, registry: ModelRegistry, chat: ChatService, store: ResponseStore, *,
                 metrics: ServingMetrics | None = None) -> None:
        super().__init__(backend, registry, metrics=metrics)
        self._chat = chat
        self._store = store

    # -- stored responses -----------------------------------------------------------------------

    def retrieve(self, response_id: str) -> str:
        """A stored response's JSON (404 when there is none)."""
        return self._store.get(response_id).body

    def delete(self, response_id: str) -> str:
        self._store.delete(response_id)
        return DeletedResponse(id=response_id).model_dump_json()

    def _previous(self, response_id: str) -> StoredResponse:
        """The response ``previous_response_id`` names; a 404 with OpenAI's code and words when there is
        none (clients such as Codex tell it by ``code: previous_response_not_found`` and send the whole
        conversation instead)."""
        try:
            return self._store.get(response_id)
        except NotFound as exc:
            shown = response_id if len(response_id) <= 128 else response_id[:128] + "..."
            raise NotFound(f"Previous response with id '{shown}' not found.", param="previous_response_id",
                           code="previous_response_not_found") from exc

    # -- the prompt -----------------------------------------------------------------------------

    async def _prompt(self, request: ResponsesRequest) -> ResponsePrompt:
        earlier: tuple[Message, ...] = ()
        if request.previous_response_id is not None:
            earlier = self._previous(request.previous_response_id).conversation
        conversation = (*earlier, *input_messages(request.input, earlier))
        chat = _chat_request(request, system_message(request.instructions, conversation))
        try:
            rendered = await self._chat.prompt(chat)
        except InvalidRequest as exc:
            if exc.param != "messages":
                raise
            # the template's complaint about the messages is about the input they came from
            raise type(exc)(exc.message, param="input", code=exc.code) from exc
        if rendered.dropped:  # truncation auto: the turns dropped are gone from the conversation too
            head = leading_system(conversation)
            conversation = conversation[:head] + conversation[head + rendered.dropped:]
        fields = {f.name: getattr(rendered, f.name) for f in dataclasses.fields(RenderedPrompt)}
        return ResponsePrompt(**fields, conversation=conversation)

    def _boundaries(self, prompt: ResponsePrompt) -> list[Boundary]:
        """As chat's: the end of the system/tools block and the last message boundary, where the next
        turn of the conversation starts again (docs/state-reuse.md)."""
        return chat_boundaries(prompt.ids, prompt.tokenizer.special_id(IM_START),
                               opens_with_system=prompt.text.startswith(f"{IM_START}system"))

    # -- running --------------------------------------------------------------------------------

    def _output(self, p: PreparedResponse) -> ResponseOutput:
        reply = ReplyParser(p.prompt.plan, thinking=p.prompt.thinking,
                            parallel_tool_calls=p.request.parallel_tool_calls is not False)
        return ResponseOutput(_head(p), reply)

    def _choice_stream(self, p: PreparedResponse, index: int) -> Any:
        raise NotImplementedError("a response has one output: complete() and stream() run it")

    async def complete(self, p: PreparedResponse) -> str:
        out = self._output(p)
        (outcome,) = await self._collect(p, lambda _i, text: out.text(text))
        self._finish(p, out, outcome)
        return out.response.model_dump_json()

    async def stream(self, p: PreparedResponse) -> AsyncGenerator[str, None]:
        """The events' JSON texts from the phone's admission on (so that queueing errors stay HTTP
        errors); a phone failing after that ends the stream with response.failed."""
        out = self._output(p)
        started = False
        try:
            async with contextlib.aclosing(self._choices(p)) as items:
                async for _i, ev in items:
                    events = [] if started else out.started()
                    started = True
                    if isinstance(ev, TextDelta):
                        events += out.text(ev.text)
                    else:
                        events += self._finish(p, out, ev)
                    for event in events:
                        yield event.model_dump_json()
        except QhxError as exc:
            if not started:
                raise
            self._logger.warning("response %s failed mid-stream: %s: %s", p.id, type(exc).__name__, exc)
            failed = out.fail(exc.message)
            self._keep(p, out)
            for event in failed:
                yield event.model_dump_json()

    def _finish(self, p: PreparedResponse, out: ResponseOutput, outcome: Outcome) -> list[StreamEvent]:
        u = usage([outcome])
        reasoning = reasoning_tokens(out.generated, p.prompt.tokenizer, thinking=p.prompt.thinking,
                                     completion_tokens=u.completion_tokens)
        events = out.finish(incomplete=outcome.finish_reason == "length", usage=ResponseUsage(
            input_tokens=u.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=u.prompt_tokens_details.cached_tokens),
            output_tokens=u.completion_tokens, output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning),
            total_tokens=u.total_tokens,
        ))
        self._keep(p, out)
        return events

    def _keep(self, p: PreparedResponse, out: ResponseOutput) -> None:
        """Store the response (unless ``store: false``), with the conversation it continues."""
        if p.request.store is False:
            return
        conversation = (*p.prompt.conversation, *assistant_turn(out.response.output))
        self._store.put(p.id, out.response.model_dump_json(), conversation)


def reasoning_tokens(generated: str, tokenizer: HostTokenizer, *, thinking: bool, completion_tokens: int) -> int:
    """The output tokens of the think block (up to and including ``</think>``): all of them when the
    reply never closed it. Counted on the host by tokenizing the block's text, since the phone counts
    tokens, not which were reasoning (exact when the model wrote the text as the tokenizer splits it)."""
    if not thinking and not generated.lstrip().startswith(THINK_OPEN):
        return 0
    end = generated.find(THINK_CLOSE)
    if end < 0:
        return completion_tokens
    return min(completion_tokens, len(tokenizer.encode(generated[: end + len(THINK_CLOSE)])))


def _chat_request(request: ResponsesRequest, messages: list[Message]) -> _ChatOfResponse:
    overflow = {"auto": "drop-oldest", "disabled": "error"}.get(request.truncation or "")
    return _ChatOfResponse.model_validate({
        "model": request.model, "messages": messages, "tools": _chat_tools(request),
        "tool_choice": _chat_tool_choice(request.tool_choice), "parallel_tool_calls": request.parallel_tool_calls,
        "max_completion_tokens": request.max_output_tokens, "enable_thinking": request.thinking,
        "context_overflow": overflow,
    })


def _chat_tools(request: ResponsesRequest) -> list[dict[str, Any]] | None:
    if request.tools is None:
        return None
    tools = []
    for i, tool in enumerate(request.tools):
        if tool.type != "function":
            raise UnsupportedParameter(
                f"tools[{i}]: tools of type {tool.type!r} are not supported; only 'function' tools are (there "
                "are no built-in tools).", param=f"tools[{i}].type",
            )
        if tool.name is None:
            raise InvalidRequest(f"tools[{i}]: a function tool needs its name.", param=f"tools[{i}].name",
                                 code="missing_required_parameter")
        function = tool.model_dump(exclude_unset=True, exclude={"type"})
        tools.append({"type": "function", "function": function})
    return tools


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """The chat form of a Responses ``tool_choice``; what is neither is refused here, in this API's
    words (chat's would describe chat's form)."""
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise UnsupportedParameter(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...} (allowed_tools "
        "and built-in tool choices are not supported).", param="tool_choice",
    )


def _head(p: PreparedResponse) -> Response:
    """The response as created (status in_progress, no output yet): what the request set."""
    r = p.request
    text: dict[str, Any] = {"format": {"type": "text"}}
    if r.text is not None and r.text.verbosity is not None:
        text["verbosity"] = r.text.verbosity
    return Response(
        id=p.id, created_at=p.created, status="in_progress", instructions=r.instructions,
        max_output_tokens=r.max_output_tokens, max_tool_calls=r.max_tool_calls, metadata=dict(r.metadata or {}),
        model=p.model, parallel_tool_calls=r.parallel_tool_calls is not False,
        previous_response_id=r.previous_response_id, prompt_cache_key=r.prompt_cache_key,
        reasoning={"effort": r.reasoning.effort if r.reasoning else None,
                   "summary": r.reasoning.summary if r.reasoning else None},
        safety_identifier=r.safety_identifier, store=r.store is not False,
        temperature=1.0 if r.temperature is None else r.temperature, text=text,
        tool_choice=r.tool_choice if r.tool_choice is not None else "auto",
        tools=[t.model_dump(exclude_unset=True) for t in r.tools or []],
        top_p=1.0 if r.top_p is None else r.top_p, truncation=r.truncation or "disabled", user=r.user,
    )
