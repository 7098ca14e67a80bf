"""/v1/completions on the serving base (server/serving/base.py): the prompt's four forms, echo, and
the response and chunk shapes (a completion and its chunks have the same shape).

Choices where the spec is silent (docs/api.md): a missing or empty prompt is ``<|endoftext|>`` (the
spec's default); generation stops at ``<|endoftext|>`` and ``<|im_end|>``; ``max_tokens: null`` means
"as many as fit in the context"; a prompt that cannot fit is a 400 ``context_length_exceeded``, never
truncated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from server.backends.base import ModelInfo
from server.errors import InvalidRequest, UnsupportedParameter
from server.serving.base import OpenAIServing, Prepared, Prompt
from server.serving.driver import Outcome
from server.serving.protocol import Completion, CompletionChoice, CompletionRequest
from server.serving.tokens import ENDOFTEXT, IM_END, HostTokenizer


@dataclass(slots=True)
class CompletionPrompt(Prompt):
    """The prompt in any of the spec's four forms, as text and ids."""

    echo: str = ""  # what ``echo`` puts before each choice's text ("" unless echo)


PreparedCompletion = Prepared[CompletionRequest, CompletionPrompt]


class CompletionService(OpenAIServing[CompletionRequest, CompletionPrompt]):
    """The /v1/completions endpoint, minus HTTP."""

    id_prefix = "cmpl"
    stop_tokens = (ENDOFTEXT, IM_END)
    body_type = chunk_type = Completion  # a completion and its chunks have one shape

    async def _prompt(self, request: CompletionRequest) -> CompletionPrompt:
        info, tok = await self._model(request.model)
        text, ids = await self._text_and_ids(request, info, tok)
        prompt = CompletionPrompt(info, tok, text, ids)
        if request.echo and request.prompt not in (None, "", []):
            prompt.echo = text
        return prompt

    async def _text_and_ids(
        self, request: CompletionRequest, info: ModelInfo, tok: HostTokenizer
    ) -> tuple[str, list[int]]:
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
            self._check_may_fit(request, prompt, info, tok)
            return prompt, await tok.encode_async(prompt)
        ids: list[int] = prompt  # type: ignore[assignment]
        if len(ids) > info.max_context:
            raise request.context_wording.no_room_error(info.max_context, len(ids))
        bad = next((i for i in ids if not 0 <= i < tok.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"Invalid token id {bad} in prompt: ids must be in [0, {tok.vocab_size}).", param="prompt"
            )
        return tok.decode(ids), list(ids)

    def _choice_stream(self, p: PreparedCompletion, index: int) -> _CompletionChunks:
        return _CompletionChunks(p.prompt.echo, index)

    async def complete(self, p: PreparedCompletion) -> str:
        """The whole completion, as the response's JSON text."""
        texts = [[p.prompt.echo] for _ in range(p.n)]
        outcomes = await self._collect(p, lambda i, text: texts[i].append(text))
        choices = [CompletionChoice(finish_reason=o.finish_reason, index=i, text="".join(texts[i]))
                   for i, o in enumerate(outcomes)]
        return self._body_json(p, choices, outcomes)


@dataclass(slots=True)
class _CompletionChunks:
    """One choice's chunks: the echoed prompt at admission, its text, then the finish chunk."""

    echo: str
    index: int

    def admitted(self) -> Iterable[CompletionChoice]:
        return [self._choice(self.echo)] if self.echo else []

    def text(self, text: str) -> Iterable[CompletionChoice]:
        return [self._choice(text)] if text else []

    def finished(self, outcome: Outcome) -> Iterable[CompletionChoice]:
        return [self._choice("", outcome.finish_reason)]

    def _choice(self, text: str, finish: Literal["stop", "length"] | None = None) -> CompletionChoice:
        return CompletionChoice(finish_reason=finish, index=self.index, text=text)
