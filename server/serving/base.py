"""The serving base: what every OpenAI endpoint family shares, minus HTTP (vLLM's ``OpenAIServing``).

A family's service (:class:`~server.serving.completions.CompletionService`,
:class:`~server.serving.chat.service.ChatService`) is an :class:`OpenAIServing` over its request
type and its prompt type, and says only what differs. The base runs every request the same way.

``prepare(request)`` does every check that can fail before the HTTP status is sent, raising
:class:`server.errors.QhxError` subclasses: a request id (``id_prefix``), unknown fields logged (on
the family's logger), ``request.check_supported()``, the family's ``_prompt`` (built with
:meth:`~OpenAIServing._model` and :meth:`~OpenAIServing._check_may_fit`), the completion budget
(:meth:`~OpenAIServing._max_new`: the context checks, in the request's ``context_wording``), the
phone parameters (``stop_tokens``) and what one-shot phones would ignore. Out comes a
:class:`Prepared`.

Then ``complete(p)`` (one JSON body) or ``stream(p)`` (JSON chunk texts; the SSE layer adds framing
and ``[DONE]``) run the request's ``n`` choices (:meth:`~OpenAIServing._choices`), each a phone
request through :func:`~server.serving.driver.generate_text`, or none at all when the budget
is 0. The base owns the stream: each choice's :class:`ChoiceStream` turns admission, text and the
outcome into the family's chunk choices, which the base wraps in ``chunk_type`` chunks (``usage``
only with ``stream_options.include_usage``, ``timings`` on the finish chunk with
``return_timings``), then :meth:`~OpenAIServing._stream_end` (the usage chunk). ``complete`` is the
family's: :meth:`~OpenAIServing._collect` runs the choices to their ends, the family turns what
they said into its choices, :meth:`~OpenAIServing._body_json` makes the ``body_type`` body (usage
of all choices, timings).

Adding an endpoint family (the Responses API, say):

1. its wire types in a ``protocol.py`` of its own; its request subclasses
   :class:`~server.serving.protocol.GenerationRequest` (stop strings, stream options, the conversion
   to phone parameters) and gives ``n``, ``return_timings``, ``check_supported``,
   ``max_new_requested`` (the budget and the parameter that set it) and ``context_wording``;
2. its service, ``class ResponsesService(OpenAIServing[ResponsesRequest, Prompt])``: class
   attributes ``id_prefix``, ``stop_tokens``, ``body_type`` and ``chunk_type``; ``_prompt``
   (resolve the model, render, bound the size, tokenize), ``_choice_stream`` (one choice's chunk
   choices) and ``complete`` (its body); it overrides ``_stream_end`` (and ``_chunk_json``) when
   its stream is not OpenAI's chunk stream (the Responses API's events end with
   ``response.completed``);
3. a thin router in server/api/routes, and the service built in the app's lifespan.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel

from server.backends.base import Backend, Boundary, GenerationParams, ModelInfo
from server.serving.choices import choice_params, merge_choices
from server.serving.driver import Outcome, TextDelta, generate_text
from server.serving.metrics import ServingMetrics
from server.serving.models import ModelRegistry
from server.serving.oneshot import check_oneshot
from server.serving.protocol import CompletionUsage, GenerationRequest, PromptTokensDetails
from server.serving.tokens import HostTokenizer


@dataclass(slots=True)
class Prompt:
    """A request's prompt for one model: its text and ids, and the model's tokenizer."""

    info: ModelInfo
    tokenizer: HostTokenizer
    text: str
    ids: list[int]


R = TypeVar("R", bound=GenerationRequest)
Q = TypeVar("Q", bound=Prompt)


@dataclass(slots=True)
class Prepared(Generic[R, Q]):
    """A validated request, its prompt tokenized, ready for the phone."""

    request: R
    id: str  # "cmpl-...", "chatcmpl-...": also the request id on the phone and in logs
    created: int
    prompt: Q
    params: GenerationParams
    ignored: list[str] = field(default_factory=list)  # parameters one-shot phones will not honour

    @property
    def model(self) -> str:
        """The served (canonical) model name."""
        return self.prompt.info.name

    @property
    def n(self) -> int:
        return self.request.n or 1


class ChoiceStream(Protocol):
    """One choice in a stream (the family's ``_choice_stream`` makes one per choice): what it
    sends, as the family's chunk choices; the base wraps each in a chunk of its own."""

    def admitted(self) -> Iterable[BaseModel]:
        """The phone accepted the prompt: the choice's opening chunks (chat's role chunk)."""
        ...

    def text(self, text: str) -> Iterable[BaseModel]:
        """Generated text, safe to show (may be "")."""
        ...

    def finished(self, outcome: Outcome) -> Iterable[BaseModel]:
        """The choice ended: its last chunks, the one with the finish reason last (it gets the
        timings)."""
        ...


def usage(outcomes: list[Outcome]) -> CompletionUsage:
    """The prompt counts once for all choices (as OpenAI counts it), completions add up; of the
    prompt, the tokens no choice's phone processed again are cached (the fewest over choices)."""
    prompt = outcomes[0].prompt_tokens if outcomes else 0
    completion = sum(o.completion_tokens for o in outcomes)
    cached = min((o.cached_tokens for o in outcomes), default=0)
    return CompletionUsage(completion_tokens=completion, prompt_tokens=prompt, total_tokens=prompt + completion,
                           prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def timings(p: Prepared[Any, Any], *outcomes: Outcome) -> dict[str, object] | None:
    """With ``return_timings``: one choice's timeline; several choices' as a list under ``choices``."""
    if not p.request.return_timings:
        return None
    each: list[dict[str, object]] = [{"phone": o.phone, **o.timings} for o in outcomes]
    return each[0] if len(each) == 1 else {"choices": each}


class OpenAIServing(abc.ABC, Generic[R, Q]):
    """An endpoint family's service, minus HTTP: ``prepare``, then ``complete`` or ``stream``."""

    id_prefix: ClassVar[str]  # of response ids: "cmpl", "chatcmpl"
    id_separator: ClassVar[str] = "-"  # between the prefix and the hex: OpenAI's ids are "resp_<hex>"
    stop_tokens: ClassVar[tuple[str, ...]]  # special tokens that end generation
    body_type: ClassVar[type[BaseModel]]  # the whole response: id, created, model, choices, usage, timings
    chunk_type: ClassVar[type[BaseModel]]  # a streamed chunk: id, created, model, choices, usage, timings

    def __init__(
        self, backend: Backend, registry: ModelRegistry, *, metrics: ServingMetrics | None = None
    ) -> None:
        self._backend = backend
        self._registry = registry
        self._metrics = metrics
        self._logger = logging.getLogger(type(self).__module__)  # the family's lines carry its name

    # -- the family's part ----------------------------------------------------------------------

    @abc.abstractmethod
    async def _prompt(self, request: R) -> Q:
        """The request's prompt, tokenized (a prompt that cannot fit at all is refused here)."""

    def _boundaries(self, prompt: Q) -> list[Boundary]:
        """Where in the prompt a later request is likely to start again, for the phone to keep
        (docs/state-reuse.md): by default the end of the prompt (a completion continued, or its
        prompt sent again with other parameters). Chat says where its turns begin."""
        return [Boundary(len(prompt.ids))]

    @abc.abstractmethod
    def _choice_stream(self, p: Prepared[R, Q], index: int) -> ChoiceStream:
        """What shapes choice ``index``'s chunks."""

    @abc.abstractmethod
    async def complete(self, p: Prepared[R, Q]) -> str:
        """The whole response, as its JSON text."""

    # -- preparing ------------------------------------------------------------------------------

    async def prepare(self, request: R) -> Prepared[R, Q]:
        """Every check that can fail before the HTTP status is sent; the request ready to run."""
        request_id = f"{self.id_prefix}{self.id_separator}{uuid.uuid4().hex}"
        if request.unknown_fields:
            self._logger.info("request %s: ignoring unknown fields %s", request_id, request.unknown_fields)
        request.check_supported()
        prompt = await self._prompt(request)
        params = self._params(request, request_id, prompt, self._max_new(request, prompt))
        ignored = check_oneshot(self._backend, params, request.n or 1)
        return Prepared(request, request_id, int(time.time()), prompt, params, ignored)

    async def _model(self, name: str) -> tuple[ModelInfo, HostTokenizer]:
        """The served model called ``name`` (404/503 otherwise) and its tokenizer."""
        info = self._registry.resolve(name)
        return info, await self._registry.tokenizer(info)

    @staticmethod
    def _check_may_fit(request: R, text: str, info: ModelInfo, tokenizer: HostTokenizer) -> None:
        """Refuse, before tokenizing, a prompt text that cannot fit: a 1 MB prompt fails in ~1 ms."""
        at_least = tokenizer.min_tokens(text)
        if at_least > info.max_context:
            raise request.context_wording.bound_error(info.max_context, at_least, len(text.encode("utf-8")))

    @staticmethod
    def _max_new(request: R, prompt: Q) -> int:
        """The completion budget: the request's, or as many tokens as fit (``max_tokens: null``);
        a 400 when the prompt leaves no room or the budget does not fit next to it."""
        max_context, n_prompt = prompt.info.max_context, len(prompt.ids)
        requested, param = request.max_new_requested
        if requested is None:
            if n_prompt >= max_context:
                raise request.context_wording.no_room_error(max_context, n_prompt)
            return max_context - n_prompt
        if n_prompt + requested > max_context:
            raise request.context_wording.budget_error(max_context, n_prompt, requested, param)
        return requested

    def _params(self, request: R, request_id: str, prompt: Q, max_new: int) -> GenerationParams:
        tok = prompt.tokenizer
        return request.to_generation_params(
            request_id=request_id, model=prompt.info.name, prompt_ids=prompt.ids, max_new=max_new,
            stop_ids=[tok.special_id(t) for t in self.stop_tokens], boundaries=self._boundaries(prompt),
        )

    # -- running --------------------------------------------------------------------------------

    async def _run(self, p: Prepared[R, Q]) -> AsyncGenerator[TextDelta | Outcome, None]:
        """One choice (``p.params`` is its phone request): ``TextDelta``s, then its ``Outcome``."""
        if p.params.max_new == 0:  # nothing to generate: no phone needed
            yield TextDelta("", 0)
            yield Outcome("length", len(p.params.prompt_ids), 0, None, None, {})
            return
        generation = generate_text(self._backend, p.params, p.prompt.tokenizer, stop=p.request.stop_strings,
                                   metrics=self._metrics)
        async with contextlib.aclosing(generation) as events:
            async for ev in events:
                yield ev

    def _choices(self, p: Prepared[R, Q]) -> AsyncGenerator[tuple[int, TextDelta | Outcome], None]:
        """The request's ``n`` choices at once, as (index, item) (server/serving/choices.py)."""
        n = p.n
        return merge_choices(n, lambda i: self._run(self._choice(p, i)))

    @staticmethod
    def _choice(p: Prepared[R, Q], index: int) -> Prepared[R, Q]:
        """Choice ``index`` of ``p``: its own phone request (server/serving/choices.py)."""
        return dataclasses.replace(p, params=choice_params(p.params, index, p.n))

    async def _collect(self, p: Prepared[R, Q], feed: Callable[[int, str], object]) -> list[Outcome]:
        """Run the ``n`` choices to their ends for a body: each text to ``feed(index, text)``; the
        outcomes in choice order."""
        outcomes: list[Outcome | None] = [None] * p.n
        async with contextlib.aclosing(self._choices(p)) as items:
            async for i, ev in items:
                if isinstance(ev, TextDelta):
                    feed(i, ev.text)
                else:
                    outcomes[i] = ev
        done = [o for o in outcomes if o is not None]
        assert len(done) == p.n
        return done

    # -- shaping --------------------------------------------------------------------------------

    async def stream(self, p: Prepared[R, Q]) -> AsyncGenerator[str, None]:
        """The chunks' JSON texts in OpenAI's order: each choice's chunks from admission on (so
        queueing errors stay HTTP errors), its finish chunk, then :meth:`_stream_end`. With ``n`` > 1
        the choices' chunks interleave, each with its index."""
        choices = [self._choice_stream(p, i) for i in range(p.n)]
        admitted = [False] * p.n
        outcomes: list[Outcome] = []
        async with contextlib.aclosing(self._choices(p)) as items:
            async for i, ev in items:
                if isinstance(ev, Outcome):
                    outcomes.append(ev)
                    *last, finish = choices[i].finished(ev)
                    for choice in last:
                        yield self._chunk_json(p, [choice])
                    yield self._chunk_json(p, [finish], timings(p, ev))
                    continue
                if not admitted[i]:  # the first item: the phone accepted the prompt
                    admitted[i] = True
                    for choice in choices[i].admitted():
                        yield self._chunk_json(p, [choice])
                for choice in choices[i].text(ev.text):
                    yield self._chunk_json(p, [choice])
        for end in self._stream_end(p, outcomes):
            yield end

    def _stream_end(self, p: Prepared[R, Q], outcomes: list[Outcome]) -> Iterable[str]:
        """After every choice finished: with ``stream_options.include_usage``, a chunk with no
        choices and the usage of all of them."""
        if p.request.include_usage:
            chunk = self.chunk_type(**_head(p), choices=[], usage=usage(outcomes))
            yield chunk.model_dump_json(exclude={"timings"})

    def _chunk_json(
        self, p: Prepared[R, Q], choices: Sequence[BaseModel], timeline: dict[str, object] | None = None
    ) -> str:
        """One chunk's JSON: ``usage`` (null) only with ``include_usage``, ``timings`` only when
        ``timeline`` is given."""
        chunk = self.chunk_type(**_head(p), choices=choices, timings=timeline)
        exclude = {"timings"} if p.request.include_usage else {"timings", "usage"}
        return chunk.model_dump_json(exclude=exclude if timeline is None else exclude - {"timings"})

    def _body_json(self, p: Prepared[R, Q], choices: Sequence[BaseModel], outcomes: list[Outcome]) -> str:
        """The whole response's JSON, with the usage of all choices; ``timings`` only with
        ``return_timings``."""
        body = self.body_type(**_head(p), choices=choices, usage=usage(outcomes),
                              timings=timings(p, *outcomes))
        return body.model_dump_json(exclude=None if p.request.return_timings else {"timings"})


def _head(p: Prepared[Any, Any]) -> dict[str, Any]:
    """What every body and chunk of a response starts with."""
    return {"id": p.id, "created": p.created, "model": p.model}
