"""/v1/completions semantics: prompt handling, context limits, echo, usage, chunk shapes.

``prepare`` does every check that can fail before the HTTP status is sent (unsupported parameters,
model, prompt forms, context length) and raises :class:`server.errors.QhxError` subclasses; then
``complete`` (one JSON body) or ``stream`` (JSON chunk texts, without the SSE framing) run it through
:func:`server.serving.engine.generate_text`.

Choices where the spec is silent (docs/api.md): a missing or empty prompt is ``<|endoftext|>`` (the
spec's default); generation stops at ``<|endoftext|>`` and ``<|im_end|>``; ``max_tokens: null`` means
"as many as fit in the context"; a prompt that cannot fit is a 400 ``context_length_exceeded``, never
truncated.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from server.backends.base import Backend, GenerationParams
from server.errors import ContextLengthExceeded, InvalidRequest, UnsupportedParameter
from server.serving.engine import Delta, Outcome, generate_text
from server.serving.models import ModelRegistry
from server.serving.protocol import Completion, CompletionChoice, CompletionRequest, CompletionUsage
from server.serving.tokens import ENDOFTEXT, IM_END, HostTokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PreparedCompletion:
    """A validated request, tokenized and ready for the phone."""

    request: CompletionRequest
    id: str  # "cmpl-...": also the request id on the phone and in logs
    created: int
    model: str  # served (canonical) name
    tokenizer: HostTokenizer
    params: GenerationParams
    echo_text: str  # "" unless echo

    @property
    def stop(self) -> list[str]:
        return self.request.stop_strings


def context_error(max_context: int, prompt_tokens: int, max_tokens: int | None) -> ContextLengthExceeded:
    """OpenAI's wording, with both numbers; param names what to shorten."""
    if max_tokens is None or prompt_tokens >= max_context:
        return ContextLengthExceeded(
            f"This model's maximum context length is {max_context} tokens. However, your prompt is "
            f"{prompt_tokens} tokens, which leaves no room for the completion. Please reduce your prompt.",
            param="prompt",
        )
    return ContextLengthExceeded(
        f"This model's maximum context length is {max_context} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in your prompt; {max_tokens} for the "
        f"completion). Please reduce your prompt; or completion length.",
        param="max_tokens",
    )


class CompletionService:
    """The /v1/completions endpoint, minus HTTP."""

    def __init__(self, backend: Backend, registry: ModelRegistry) -> None:
        self._backend = backend
        self._registry = registry

    async def prepare(self, request: CompletionRequest) -> PreparedCompletion:
        cmpl_id = f"cmpl-{uuid.uuid4().hex}"
        if request.unknown_fields:
            logger.info("request %s: ignoring unknown fields %s", cmpl_id, request.unknown_fields)
        request.check_supported()
        info = self._registry.resolve(request.model)
        tok = await self._registry.tokenizer(info)
        text, ids = await self._prompt(request, tok, info.max_context)
        n_prompt = len(ids)
        if request.max_tokens is None:
            max_new = info.max_context - n_prompt
            if max_new <= 0:
                raise context_error(info.max_context, n_prompt, None)
        else:
            max_new = request.max_tokens
            if n_prompt + max_new > info.max_context:
                raise context_error(info.max_context, n_prompt, max_new)
        params = request.to_generation_params(
            request_id=cmpl_id, model=info.name, prompt_ids=ids, max_new=max_new,
            stop_ids=[tok.special_id(ENDOFTEXT), tok.special_id(IM_END)], prompt_text=text,
        )
        echo = (text if request.prompt not in (None, "", []) else "") if request.echo else ""
        return PreparedCompletion(request, cmpl_id, int(time.time()), info.name, tok, params, echo)

    async def _prompt(self, request: CompletionRequest, tok: HostTokenizer, max_context: int) -> tuple[str, list[int]]:
        """(text, ids) of the prompt in any of the spec's four forms."""
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) > 1:
                raise UnsupportedParameter(
                    f"Batched prompts are not supported: send one prompt per request (got {len(prompt)}).",
                    param="prompt",
                )
            prompt = prompt[0]  # type: ignore[assignment]
        if prompt is None or prompt == "" or prompt == []:
            eot = tok.special_id(ENDOFTEXT)
            return ENDOFTEXT, [eot]
        if isinstance(prompt, str):
            if tok.min_tokens(prompt) > max_context:  # before tokenizing: a 1 MB prompt fails in ~1 ms
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {max_context} tokens. However, your prompt "
                    f"({len(prompt.encode('utf-8'))} bytes) is at least {tok.min_tokens(prompt)} tokens. "
                    "Please reduce your prompt.",
                    param="prompt",
                )
            return prompt, await tok.encode_async(prompt)
        ids: list[int] = prompt  # type: ignore[assignment]
        if len(ids) > max_context:
            raise context_error(max_context, len(ids), None)
        bad = next((i for i in ids if not 0 <= i < tok.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"Invalid token id {bad} in prompt: ids must be in [0, {tok.vocab_size}).", param="prompt"
            )
        return tok.decode(ids), list(ids)

    # -- running ------------------------------------------------------------------------------

    async def _run(self, p: PreparedCompletion) -> AsyncGenerator[Delta | Outcome, None]:
        if p.params.max_new == 0:  # nothing to generate: no phone needed
            yield Delta("", 0)
            yield Outcome("length", len(p.params.prompt_ids), 0, None, None, {})
            return
        async with contextlib.aclosing(generate_text(self._backend, p.params, p.tokenizer, stop=p.stop)) as events:
            async for ev in events:
                yield ev

    async def complete(self, p: PreparedCompletion) -> str:
        """The whole completion, as the response's JSON text."""
        parts = [p.echo_text]
        outcome: Outcome | None = None
        async with contextlib.aclosing(self._run(p)) as events:
            async for ev in events:
                if isinstance(ev, Delta):
                    parts.append(ev.text)
                else:
                    outcome = ev
        assert outcome is not None
        body = Completion(
            id=p.id, created=p.created, model=p.model,
            choices=[CompletionChoice(finish_reason=outcome.finish_reason, index=0, text="".join(parts))],
            usage=_usage(outcome), timings=self._timings(p, outcome),
        )
        return body.model_dump_json(exclude=None if p.request.return_timings else {"timings"})

    async def stream(self, p: PreparedCompletion) -> AsyncGenerator[str, None]:
        """The chunks' JSON texts, OpenAI's order: text chunks, the finish chunk, then (with
        ``stream_options.include_usage``) a usage chunk with no choices. The SSE layer adds framing
        and ``[DONE]``."""
        include_usage = p.request.include_usage
        exclude = {"timings"} if include_usage else {"timings", "usage"}

        def chunk(text: str, finish: str | None = None, timings: dict[str, object] | None = None) -> str:
            c = Completion(
                id=p.id, created=p.created, model=p.model,
                choices=[CompletionChoice(finish_reason=finish, index=0, text=text)],  # type: ignore[arg-type]
                timings=timings,
            )
            return c.model_dump_json(exclude=exclude - {"timings"} if timings is not None else exclude)

        echo_pending = bool(p.echo_text)
        async with contextlib.aclosing(self._run(p)) as events:
            async for ev in events:
                if isinstance(ev, Delta):
                    if echo_pending:  # at admission: queueing errors stay HTTP errors
                        echo_pending = False
                        yield chunk(p.echo_text)
                    if ev.text:
                        yield chunk(ev.text)
                    continue
                yield chunk("", ev.finish_reason, self._timings(p, ev))
                if include_usage:
                    usage = Completion(id=p.id, created=p.created, model=p.model, choices=[], usage=_usage(ev))
                    yield usage.model_dump_json(exclude={"timings"})

    @staticmethod
    def _timings(p: PreparedCompletion, o: Outcome) -> dict[str, object] | None:
        if not p.request.return_timings:
            return None
        return {"phone": o.phone, **o.timings}


def _usage(o: Outcome) -> CompletionUsage:
    return CompletionUsage(
        completion_tokens=o.completion_tokens, prompt_tokens=o.prompt_tokens, total_tokens=o.total_tokens
    )
