"""/v1/chat/completions semantics on top of :func:`server.serving.generation.generate_text`.

``prepare`` does everything that can fail before the HTTP status is sent (unsupported parameters,
model, messages, tools, template, context length) and raises :class:`server.errors.QhxError`
subclasses; ``complete`` (one JSON body) or ``stream`` (JSON chunk texts, without SSE framing) then
run it. ``render`` is the prompt alone, for the /tokenize and /apply-template debug endpoints.

Choices where the spec is silent are in docs/chat.md: thinking off unless
``chat_template_kwargs.enable_thinking`` (or top-level ``enable_thinking``) is true; generation
stops at ``<|im_end|>`` and ``<|endoftext|>``; no max tokens means "as many as fit in the context";
a prompt that cannot fit is a 400 ``context_length_exceeded``, never truncated.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

from server.backends.base import Backend, GenerationParams, ModelInfo
from server.errors import ContextLengthExceeded
from server.serving.chat.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatFinishReason,
    ChunkChoice,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    ToolCallFunction,
    ToolCallOut,
)
from server.serving.chat.reply import Piece, Reasoning, ReplyParser
from server.serving.chat.template import ChatTemplate
from server.serving.chat.tools import ArgumentsDelta, CallStarted, Text, ToolPlan, plan_tools
from server.serving.choices import choice_params, merge_choices
from server.serving.generation import Outcome, TextDelta, generate_text
from server.serving.metrics import ServingMetrics
from server.serving.models import ModelRegistry
from server.serving.oneshot import check_oneshot
from server.serving.protocol import CompletionUsage
from server.serving.tokens import ENDOFTEXT, IM_END, HostTokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RenderedPrompt:
    """A conversation rendered for one model: the prompt text, its ids, and how it was made."""

    info: ModelInfo
    tokenizer: HostTokenizer
    text: str  # includes the tool_choice pre-fill, if any
    ids: list[int]
    plan: ToolPlan
    thinking: bool  # the prompt ends inside an open think block
    template_source: str


@dataclass(slots=True)
class PreparedChat:
    """A validated request, rendered and tokenized, ready for the phone."""

    request: ChatCompletionRequest
    id: str  # "chatcmpl-...": also the request id on the phone and in logs
    created: int
    prompt: RenderedPrompt
    params: GenerationParams
    ignored: list[str] = field(default_factory=list)  # parameters one-shot phones will not honour

    @property
    def model(self) -> str:
        return self.prompt.info.name


def context_error(max_context: int, prompt_tokens: int, requested: int | None, param: str, *,
                  prompt_bytes: int | None = None) -> ContextLengthExceeded:
    """OpenAI's wording for chat, with both numbers; ``param`` names what to shorten.
    ``prompt_bytes``: ``prompt_tokens`` is only a lower bound, from the prompt's size in bytes."""
    if prompt_bytes is not None:
        return ContextLengthExceeded(
            f"This model's maximum context length is {max_context} tokens. However, your messages resulted "
            f"in a prompt of {prompt_bytes} bytes, which is at least {prompt_tokens} tokens (a bound computed "
            "without tokenizing it). Please reduce the length of the messages.",
            param="messages",
        )
    if requested is None or prompt_tokens >= max_context:
        return ContextLengthExceeded(
            f"This model's maximum context length is {max_context} tokens. However, your messages resulted "
            f"in {prompt_tokens} tokens, which leaves no room for the reply. Please reduce the length of the "
            "messages.",
            param="messages",
        )
    return ContextLengthExceeded(
        f"This model's maximum context length is {max_context} tokens. However, you requested "
        f"{prompt_tokens + requested} tokens ({prompt_tokens} in the messages, {requested} in the completion). "
        "Please reduce the length of the messages or completion.",
        param=param,
    )


class ChatService:
    """The /v1/chat/completions endpoint, minus HTTP."""

    def __init__(
        self, backend: Backend, registry: ModelRegistry, *, metrics: ServingMetrics | None = None
    ) -> None:
        self._backend = backend
        self._registry = registry
        self._metrics = metrics
        self._templates: dict[str, ChatTemplate] = {}  # tokenizer folder -> its template

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
        info = self._registry.resolve(request.model)
        tok = await self._registry.tokenizer(info)
        plan = plan_tools(request.template_tools(), request.template_tool_choice())
        # a forced call is written right after a closed (empty) think block
        thinking = request.thinking and not plan.prefill and add_generation_prompt
        template = self.template_for(info)
        text = template.render(  # enable_thinking of chat_template_kwargs is in `thinking`
            request.template_messages(), plan.rendered, add_generation_prompt=add_generation_prompt,
            enable_thinking=thinking, template_kwargs=request.chat_template_kwargs,
        )
        if add_generation_prompt:
            text += plan.prefill
        if tok.min_tokens(text) > info.max_context:  # before tokenizing: huge prompts fail in ~1 ms
            raise context_error(info.max_context, tok.min_tokens(text), None, "messages",
                                prompt_bytes=len(text.encode("utf-8")))
        ids = await tok.encode_async(text)
        return RenderedPrompt(info, tok, text, ids, plan, thinking, template.source)

    async def prepare(self, request: ChatCompletionRequest) -> PreparedChat:
        chat_id = f"chatcmpl-{uuid.uuid4().hex}"
        if request.unknown_fields:
            logger.info("request %s: ignoring unknown fields %s", chat_id, request.unknown_fields)
        request.check_supported()
        prompt = await self.render(request)
        max_context, n_prompt = prompt.info.max_context, len(prompt.ids)
        requested, param = request.max_new_requested
        if requested is None:
            max_new = max_context - n_prompt
            if max_new <= 0:
                raise context_error(max_context, n_prompt, None, param)
        else:
            max_new = requested
            if n_prompt + max_new > max_context:
                raise context_error(max_context, n_prompt, max_new, param)
        tok = prompt.tokenizer
        params = request.to_generation_params(
            request_id=chat_id, model=prompt.info.name, prompt_ids=prompt.ids, max_new=max_new,
            stop_ids=[tok.special_id(IM_END), tok.special_id(ENDOFTEXT)], prompt_text=prompt.text,
        )
        ignored = check_oneshot(self._backend, params, request.n or 1)
        return PreparedChat(request, chat_id, int(time.time()), prompt, params, ignored)

    # -- running ------------------------------------------------------------------------------

    async def _run(self, p: PreparedChat) -> AsyncGenerator[TextDelta | Outcome, None]:
        if p.params.max_new == 0:  # nothing to generate: no phone needed
            yield TextDelta("", 0)
            yield Outcome("length", len(p.params.prompt_ids), 0, None, None, {})
            return
        generation = cast(  # an async generator, annotated as an iterator by the engine
            AsyncGenerator[TextDelta | Outcome, None],
            generate_text(self._backend, p.params, p.prompt.tokenizer, stop=p.request.stop_strings,
                          metrics=self._metrics),
        )
        async with contextlib.aclosing(generation) as events:
            async for ev in events:
                yield ev

    def _reply(self, p: PreparedChat) -> ReplyParser:
        return ReplyParser(p.prompt.plan, thinking=p.prompt.thinking,
                           parallel_tool_calls=p.request.parallel_tool_calls is not False)

    def _choices(self, p: PreparedChat) -> AsyncGenerator[tuple[int, TextDelta | Outcome], None]:
        """The request's ``n`` choices at once, as (index, item) (server/serving/choices.py)."""
        n = p.request.n or 1
        return merge_choices(n, lambda i: self._run(replace(p, params=choice_params(p.params, i, n))))

    async def complete(self, p: PreparedChat) -> str:
        """The whole reply, as the response's JSON text."""
        n = p.request.n or 1
        replies = [self._reply(p) for _ in range(n)]
        outcomes: list[Outcome | None] = [None] * n
        async with contextlib.aclosing(self._choices(p)) as items:
            async for i, ev in items:
                if isinstance(ev, TextDelta):
                    replies[i].feed(ev.text)
                else:
                    outcomes[i] = ev
        done = [o for o in outcomes if o is not None]
        assert len(done) == n
        choices = []
        for i, (reply, outcome) in enumerate(zip(replies, done, strict=True)):
            reply.finish()
            calls = [ToolCallOut(id=c.id, function=ToolCallFunction(arguments=c.arguments, name=c.name))
                     for c in reply.calls]
            message = AssistantMessage(
                content=reply.content if reply.content or not calls else None,
                tool_calls=calls or None,
                reasoning_content=reply.reasoning or None,
            )
            choices.append(ChatChoice(finish_reason=_finish_reason(outcome, reply), index=i, message=message))
        body = ChatCompletion(
            id=p.id, created=p.created, model=p.model, choices=choices, usage=_usage(done),
            timings=_timings(p, *done),
        )
        return body.model_dump_json(exclude=None if p.request.return_timings else {"timings"})

    async def stream(self, p: PreparedChat) -> AsyncGenerator[str, None]:
        """The chunks' JSON texts in OpenAI's order: the role chunk (when the phone accepted the
        prompt), reasoning/content/tool-call deltas, the finish chunk (empty delta), then (with
        ``stream_options.include_usage``) a usage chunk with no choices. The SSE layer adds framing
        and ``[DONE]``. With ``n`` > 1 the choices' chunks interleave, each with its index."""
        include_usage = p.request.include_usage
        exclude = {"timings"} if include_usage else {"timings", "usage"}

        def chunk(index: int, delta: Delta, finish: ChatFinishReason | None = None,
                  timings: dict[str, object] | None = None) -> str:
            c = ChatCompletionChunk(
                id=p.id, created=p.created, model=p.model,
                choices=[ChunkChoice(delta=delta, finish_reason=finish, index=index)], timings=timings,
            )
            return c.model_dump_json(exclude=exclude - {"timings"} if timings is not None else exclude)

        n = p.request.n or 1
        replies = [self._reply(p) for _ in range(n)]
        role_sent = [False] * n
        outcomes: list[Outcome] = []
        async with contextlib.aclosing(self._choices(p)) as items:
            async for i, ev in items:
                reply = replies[i]
                if isinstance(ev, TextDelta):
                    if not role_sent[i]:  # at admission: queueing errors stay HTTP errors
                        role_sent[i] = True
                        yield chunk(i, Delta(role="assistant", content=""))
                    for piece in reply.feed(ev.text):
                        yield chunk(i, _delta(piece))
                    continue
                for piece in reply.finish():
                    yield chunk(i, _delta(piece))
                outcomes.append(ev)
                yield chunk(i, Delta(), _finish_reason(ev, reply), _timings(p, ev))
        if include_usage:
            usage = ChatCompletionChunk(id=p.id, created=p.created, model=p.model, choices=[],
                                        usage=_usage(outcomes))
            yield usage.model_dump_json(exclude={"timings"})


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


def _usage(outcomes: list[Outcome]) -> CompletionUsage:
    """The prompt counts once for all choices (as OpenAI counts it), completions add up."""
    prompt = outcomes[0].prompt_tokens if outcomes else 0
    completion = sum(o.completion_tokens for o in outcomes)
    return CompletionUsage(completion_tokens=completion, prompt_tokens=prompt, total_tokens=prompt + completion)


def _timings(p: PreparedChat, *outcomes: Outcome) -> dict[str, object] | None:
    """One choice's timeline; several choices' as a list under ``choices``."""
    if not p.request.return_timings:
        return None
    each: list[dict[str, object]] = [{"phone": o.phone, **o.timings} for o in outcomes]
    return each[0] if len(each) == 1 else {"choices": each}
