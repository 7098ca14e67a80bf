"""/v1/chat/completions on the serving base (server/serving/base.py): the conversation rendered with
the chat template (tools, thinking), the reply parsed into content, reasoning and tool calls, and
chat's response and chunk shapes. ``render`` is the prompt alone, for the /tokenize and
/apply-template debug endpoints.

Choices where the spec is silent are in docs/chat.md: thinking off unless
``chat_template_kwargs.enable_thinking`` (or top-level ``enable_thinking``) is true; generation
stops at ``<|im_end|>`` and ``<|endoftext|>``; no max tokens means "as many as fit in the context";
a prompt that cannot fit is a 400 ``context_length_exceeded``, never truncated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from server.backends.base import Backend, Boundary, ModelInfo
from server.errors import ContextLengthExceeded
from server.logs import note_request
from server.serving.base import OpenAIServing, Prepared, Prompt
from server.serving.chat.boundaries import chat_boundaries
from server.serving.chat.history import HistoryRender, as_generated
from server.serving.chat.overflow import Turns, replay_cut, turn_positions
from server.serving.chat.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatFinishReason,
    ChunkChoice,
    ContextOverflow,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    ToolCallFunction,
    ToolCallOut,
)
from server.serving.chat.reply import Piece, Reasoning, ReplyParser
from server.serving.chat.template import ChatTemplate
from server.serving.chat.tools import ArgumentsDelta, CallStarted, Text, ToolPlan, plan_tools
from server.serving.driver import Outcome
from server.serving.metrics import ServingMetrics
from server.serving.models import ModelRegistry
from server.serving.tokens import ENDOFTEXT, IM_END, IM_START

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RenderedPrompt(Prompt):
    """A conversation rendered for one model (``text`` includes the tool_choice pre-fill, if any),
    and how it was made."""

    plan: ToolPlan
    thinking: bool  # the prompt ends inside an open think block
    template_source: str
    dropped: int = 0  # oldest messages dropped to fit the context (context_overflow drop-oldest)


PreparedChat = Prepared[ChatCompletionRequest, RenderedPrompt]


class ChatService(OpenAIServing[ChatCompletionRequest, RenderedPrompt]):
    """The /v1/chat/completions endpoint, minus HTTP."""

    id_prefix = "chatcmpl"
    stop_tokens = (IM_END, ENDOFTEXT)
    body_type = ChatCompletion
    chunk_type = ChatCompletionChunk

    def __init__(
        self, backend: Backend, registry: ModelRegistry, *, metrics: ServingMetrics | None = None,
        context_overflow: ContextOverflow = "error", history_render: HistoryRender = "template",
    ) -> None:
        super().__init__(backend, registry, metrics=metrics)
        self._templates: dict[str, ChatTemplate] = {}  # tokenizer folder -> its template
        self._context_overflow = context_overflow  # unless the request says (its context_overflow)
        self._history_render = history_render

    def template_for(self, info: ModelInfo) -> ChatTemplate:
        """The model's chat template: its bundle's own when the tokenizer folder holds one (see
        :func:`~server.serving.chat.template.load_chat_template`), else the built-in one."""
        folder = str(Path(info.tokenizer_path).parent) if info.tokenizer_path else ""
        template = self._templates.get(folder)
        if template is None:
            template = ChatTemplate.for_bundle(Path(folder) if folder else None)
            logger.info("model %s: chat template %s", info.name, template.source)
            self._templates[folder] = template
        return template

    async def render(self, request: ChatCompletionRequest, *, add_generation_prompt: bool = True) -> RenderedPrompt:
        """Render and tokenize the conversation (no length checks beyond a cheap bound)."""
        rendered = await self._render_text(request, add_generation_prompt=add_generation_prompt)
        self._check_may_fit(request, rendered.text, rendered.info, rendered.tokenizer)
        rendered.ids = await rendered.tokenizer.encode_async(rendered.text)
        return rendered

    async def _render_text(self, request: ChatCompletionRequest, *, add_generation_prompt: bool) -> RenderedPrompt:
        """The conversation rendered, not tokenized yet (``ids`` empty)."""
        info, tok = await self._model(request.model)
        plan = plan_tools(request.template_tools(), request.template_tool_choice())
        # a forced call is written right after a closed (empty) think block
        thinking = request.thinking and not plan.prefill and add_generation_prompt
        template = self.template_for(info)
        messages = request.template_messages()
        text = template.render(  # enable_thinking of chat_template_kwargs is in `thinking`
            messages, plan.rendered, add_generation_prompt=add_generation_prompt,
            enable_thinking=thinking, template_kwargs=request.chat_template_kwargs,
        )
        if self._history_render == "as-generated":
            text = as_generated(text, messages, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt:
            text += plan.prefill
        return RenderedPrompt(info, tok, text, [], plan, thinking, template.source)

    async def prompt(self, request: ChatCompletionRequest) -> RenderedPrompt:
        """The prompt a chat completion of ``request`` would send (``context_overflow`` applied), for
        an endpoint family rendered as a chat (the Responses API)."""
        return await self._prompt(request)

    async def _prompt(self, request: ChatCompletionRequest) -> RenderedPrompt:
        if (request.context_overflow or self._context_overflow) == "drop-oldest":
            return await self._drop_oldest(request)
        return await self.render(request)

    async def _drop_oldest(self, request: ChatCompletionRequest) -> RenderedPrompt:
        """The conversation, or when it does not fit, its system message and its last turns
        (chat/overflow.py); the whole conversation when even its last turn alone does not fit, for
        the usual 400."""
        whole = await self._render_text(request, add_generation_prompt=True)
        info, tok, turns = whole.info, whole.tokenizer, Turns.of(request.messages)
        room = request.max_new_requested[0]
        room = 1 if room is None else room

        def fits(n_prompt: int) -> bool:
            return n_prompt + room <= info.max_context

        target = min(info.max_context // 2, info.max_context - room)
        first: int | None = None
        if tok.min_tokens(whole.text) <= info.max_context:
            whole.ids = await tok.encode_async(whole.text)
            if fits(len(whole.ids)) or len(turns) < 2:
                return whole
            positions = turn_positions(whole.ids, tok.special_id(IM_START), request.messages, turns,
                                       system_block=whole.text.startswith(f"{IM_START}system"))
            first = replay_cut(positions, fits, target) if positions is not None else None
        elif len(turns) < 2:
            return await self.render(request)  # the usual 400, without tokenizing

        async def keeping(first: int) -> RenderedPrompt | None:
            kept = request.messages[:turns.head] + request.messages[turns.starts[first]:]
            try:
                cut = await self.render(request.model_copy(update={"messages": kept}))
            except ContextLengthExceeded:  # still too large to tokenize
                return None
            cut.dropped = turns.dropped(first)
            return cut

        if first is not None and first > 0:
            cut = await keeping(first)
            if cut is not None and fits(len(cut.ids)):
                return self._dropped(request, cut)
        # the replay could not be made (or missed): the fewest oldest turns that bring it under target
        lo, hi = (first or 0) + 1, len(turns) - 1
        best: RenderedPrompt | None = None
        while lo <= hi:
            mid = (lo + hi) // 2
            cut = await keeping(mid)
            if cut is not None and len(cut.ids) <= target:
                best, hi = cut, mid - 1
            else:
                lo = mid + 1
        if best is None:
            best = await keeping(len(turns) - 1)
        if best is not None and fits(len(best.ids)):
            return self._dropped(request, best)
        return await self.render(request)  # not even the last turn fits: the usual 400

    def _dropped(self, request: ChatCompletionRequest, cut: RenderedPrompt) -> RenderedPrompt:
        note_request(dropped=cut.dropped)
        self._logger.info("dropped the %d oldest of %d messages to fit the context (%d prompt tokens now)",
                          cut.dropped, len(request.messages), len(cut.ids))
        return cut

    def _boundaries(self, prompt: RenderedPrompt) -> list[Boundary]:
        """The end of the system/tools block and the last message boundary, past its header
        (chat/boundaries.py)."""
        newline = prompt.tokenizer.encode("\n")
        return chat_boundaries(prompt.ids, prompt.tokenizer.special_id(IM_START),
                               opens_with_system=prompt.text.startswith(f"{IM_START}system"),
                               newline=newline[0] if len(newline) == 1 else None)

    def _reply(self, p: PreparedChat) -> ReplyParser:
        return ReplyParser(p.prompt.plan, thinking=p.prompt.thinking,
                           parallel_tool_calls=p.request.parallel_tool_calls is not False)

    def _choice_stream(self, p: PreparedChat, index: int) -> _ChatChunks:
        return _ChatChunks(self._reply(p), index)

    async def complete(self, p: PreparedChat) -> str:
        """The whole reply, as the response's JSON text."""
        replies = [self._reply(p) for _ in range(p.n)]
        outcomes = await self._collect(p, lambda i, text: replies[i].feed(text))
        choices = [_choice(i, reply, outcome)
                   for i, (reply, outcome) in enumerate(zip(replies, outcomes, strict=True))]
        return self._body_json(p, choices, outcomes)


def _choice(index: int, reply: ReplyParser, outcome: Outcome) -> ChatChoice:
    """A whole choice: the reply's content, reasoning and complete tool calls."""
    reply.finish()
    calls = [ToolCallOut(id=c.id, function=ToolCallFunction(arguments=c.arguments, name=c.name))
             for c in reply.calls]
    message = AssistantMessage(
        content=reply.content if reply.content or not calls else None,
        tool_calls=calls or None,
        reasoning_content=reply.reasoning or None,
    )
    return ChatChoice(finish_reason=_finish_reason(outcome, reply), index=index, message=message)


@dataclass(slots=True)
class _ChatChunks:
    """One choice's chunks: the role chunk at admission, reasoning/content/tool-call deltas, then
    the finish chunk (an empty delta)."""

    reply: ReplyParser
    index: int

    def admitted(self) -> Iterable[ChunkChoice]:
        return [self._choice(Delta(role="assistant", content=""))]

    def text(self, text: str) -> Iterable[ChunkChoice]:
        return [self._choice(_delta(piece)) for piece in self.reply.feed(text)]

    def finished(self, outcome: Outcome) -> Iterable[ChunkChoice]:
        choices = [self._choice(_delta(piece)) for piece in self.reply.finish()]
        choices.append(self._choice(Delta(), _finish_reason(outcome, self.reply)))
        return choices

    def _choice(self, delta: Delta, finish: ChatFinishReason | None = None) -> ChunkChoice:
        return ChunkChoice(delta=delta, finish_reason=finish, index=self.index)


def _delta(piece: Piece) -> Delta:
    if isinstance(piece, Reasoning):
        return Delta(reasoning_content=piece.text)
    if isinstance(piece, Text):
        return Delta(content=piece.text)
    if isinstance(piece, CallStarted):
        return Delta(tool_calls=[DeltaToolCall(
            index=piece.index, id=piece.id, type="function", function=DeltaFunction(name=piece.name, arguments="")
        )])
    assert isinstance(piece, ArgumentsDelta)
    return Delta(tool_calls=[DeltaToolCall(index=piece.index, function=DeltaFunction(arguments=piece.fragment))])


def _finish_reason(outcome: Outcome, reply: ReplyParser) -> ChatFinishReason:
    # reply.calls are complete calls only (a call cut short is content); a reply cut by max tokens
    # after a complete call stays "length": the model did not end its turn
    return "tool_calls" if reply.calls and outcome.finish_reason == "stop" else outcome.finish_reason
