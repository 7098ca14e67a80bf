"""/v1/completions semantics: prompt handling, context limits, echo, usage, chunk shapes.

``prepare`` does every check that can fail before the HTTP status is sent (unsupported parameters,
model, prompt forms, context length) and raises :class:`server.errors.QhxError` subclasses; then
``complete`` (one JSON body) or ``stream`` (JSON chunk texts, without the SSE framing) run it through
:func:`server.serving.generation.generate_text`.

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
from dataclasses import dataclass, field, replace

from server.backends.base import Backend, GenerationParams
from server.errors import ContextLengthExceeded, InvalidRequest, UnsupportedParameter
from server.serving.choices import choice_params, merge_choices
from server.serving.generation import Outcome, TextDelta, generate_text
from server.serving.metrics import ServingMetrics
from server.serving.models import ModelRegistry
from server.serving.oneshot import check_oneshot
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
    ignored: list[str] = field(default_factory=list)  # parameters one-shot phones will not honour

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

    def __init__(
        self, backend: Backend, registry: ModelRegistry, *, metrics: ServingMetrics | None = None
    ) -> None:
        self._backend = backend
        self._registry = registry
        self._metrics = metrics

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
        ignored = check_oneshot(self._backend, params, request.n or 1)
        echo = (text if request.prompt not in (None, "", []) else "") if request.echo else ""
        return PreparedCompletion(request, cmpl_id, int(time.time()), info.name, tok, params, echo, ignored)

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

    async def _run(self, p: PreparedCompletion) -> AsyncGenerator[TextDelta | Outcome, None]:
        if p.params.max_new == 0:  # nothing to generate: no phone needed
            yield TextDelta("", 0)
            yield Outcome("length", len(p.params.prompt_ids), 0, None, None, {})
            return
        generation = generate_text(self._backend, p.params, p.tokenizer, stop=p.stop, metrics=self._metrics)
        async with contextlib.aclosing(generation) as events:
            async for ev in events:
                yield ev

    def _choices(self, p: PreparedCompletion) -> AsyncGenerator[tuple[int, TextDelta | Outcome], None]:
        """The request's ``n`` choices at once, as (index, item) (server/serving/choices.py)."""
        n = p.request.n or 1
        return merge_choices(n, lambda i: self._run(replace(p, params=choice_params(p.params, i, n))))

    async def complete(self, p: PreparedCompletion) -> str:
        """The whole completion, as the response's JSON text."""
        n = p.request.n or 1
        parts: list[list[str]] = [[p.echo_text] for _ in range(n)]
        outcomes: list[Outcome | None] = [None] * n
        async with contextlib.aclosing(self._choices(p)) as items:
            async for i, ev in items:
                if isinstance(ev, TextDelta):
                    parts[i].append(ev.text)
                else:
                    outcomes[i] = ev
        done = [o for o in outcomes if o is not None]
        assert len(done) == n
        body = Completion(
            id=p.id, created=p.created, model=p.model,
            choices=[CompletionChoice(finish_reason=o.finish_reason, index=i, text="".join(parts[i]))
                     for i, o in enumerate(done)],
            usage=_usage(done), timings=self._timings(p, *done),
        )
        return body.model_dump_json(exclude=None if p.request.return_timings else {"timings"})

    async def stream(self, p: PreparedCompletion) -> AsyncGenerator[str, None]:
        """The chunks' JSON texts, OpenAI's order: text chunks, the finish chunk, then (with
        ``stream_options.include_usage``) a usage chunk with no choices. The SSE layer adds framing
        and ``[DONE]``. With ``n`` > 1 the choices' chunks interleave, each with its index."""
        include_usage = p.request.include_usage
        exclude = {"timings"} if include_usage else {"timings", "usage"}

        def chunk(index: int, text: str, finish: str | None = None,
                  timings: dict[str, object] | None = None) -> str:
            c = Completion(
                id=p.id, created=p.created, model=p.model,
                choices=[CompletionChoice(finish_reason=finish, index=index, text=text)],  # type: ignore[arg-type]
                timings=timings,
            )
            return c.model_dump_json(exclude=exclude - {"timings"} if timings is not None else exclude)

        echo_pending = [bool(p.echo_text)] * (p.request.n or 1)
        outcomes: list[Outcome] = []
        async with contextlib.aclosing(self._choices(p)) as items:
            async for i, ev in items:
                if isinstance(ev, TextDelta):
                    if echo_pending[i]:  # at admission: queueing errors stay HTTP errors
                        echo_pending[i] = False
                        yield chunk(i, p.echo_text)
                    if ev.text:
                        yield chunk(i, ev.text)
                    continue
                outcomes.append(ev)
                yield chunk(i, "", ev.finish_reason, self._timings(p, ev))
        if include_usage:
            usage = Completion(id=p.id, created=p.created, model=p.model, choices=[], usage=_usage(outcomes))
            yield usage.model_dump_json(exclude={"timings"})

    @staticmethod
    def _timings(p: PreparedCompletion, *outcomes: Outcome) -> dict[str, object] | None:
        """One choice's timeline; several choices' as a list under ``choices``."""
        if not p.request.return_timings:
            return None
        each: list[dict[str, object]] = [{"phone": o.phone, **o.timings} for o in outcomes]
        return each[0] if len(each) == 1 else {"choices": each}


def _usage(outcomes: list[Outcome]) -> CompletionUsage:
    """The prompt counts once for all choices (as OpenAI counts it), completions add up."""
    prompt = outcomes[0].prompt_tokens if outcomes else 0
    completion = sum(o.completion_tokens for o in outcomes)
    return CompletionUsage(completion_tokens=completion, prompt_tokens=prompt, total_tokens=prompt + completion)
