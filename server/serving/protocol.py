"""OpenAI wire types for completions, models and errors (pydantic), in the spec's field order.

Spec: https://platform.openai.com/docs/api-reference (openai/openai-openapi ``openapi.yaml``:
CreateCompletionRequest, CreateCompletionResponse, Model, ListModelsResponse, Error); the client
types of openai-python (``openai/types/completion*.py``) are the shapes tests check against.

Requests accept unknown fields (clients send many; pain point 5 of openai-servers.md) and keep them
in ``model_extra`` so the service can log them. Scalars are strict (``"16"`` is not an integer), as
OpenAI's own validation is. Our extensions are fenced in ``--- qhx extensions ---`` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from server.backends.base import Boundary, GenerationParams
from server.errors import ContextLengthExceeded, InvalidRequest, UnsupportedParameter

MAX_STOP_STRINGS = 4  # spec: "Up to 4 sequences"
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a seed travels to the phone as a 64-bit integer
TOP_K_MAX = 2**31 - 1  # phones read top_k as a 32-bit integer


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        """JSON lets a string hold an escaped lone surrogate (``"\\ud800"``), which is not a character:
        it cannot be tokenized, logged or sent back as UTF-8. Refused here, for every field of every
        request, as a 400 naming the field (not a ``ValueError``: pydantic would lose the field)."""
        where = lone_surrogate_at(data)
        if where is not None:
            raise InvalidRequest(
                f"Invalid value for '{where or 'the request body'}': the text holds a lone UTF-16 surrogate (an "
                "unpaired \\ud800-\\udfff escape), which is not a Unicode character.",
                param=where or None, code="invalid_value",
            )
        return data

    @property
    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


def lone_surrogate_at(data: Any) -> str | None:
    """Where in parsed JSON the first string (or object key) holding a lone surrogate is, as a
    parameter name (``messages[0].content``; ``""`` for the top level), or None. Walks with a stack,
    so a body nested deeper than the recursion limit is no error."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not _is_utf8(value):
                return path
        elif isinstance(value, dict):
            if not all(_is_utf8(key) for key in value if isinstance(key, str)):
                return path  # the key itself cannot be named
            stack.extend((f"{path}.{key}" if path else str(key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", value[i]) for i in reversed(range(len(value))))
    return None


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class ContextWording:
    """How a request says that its prompt does not fit: OpenAI's wording, with the numbers, naming
    the request's own fields (each request type has its ``context_wording``).

    Each template follows "This model's maximum context length is N tokens. However, ";
    placeholders: ``{prompt_tokens}``, ``{requested}``, ``{total}`` (their sum), ``{prompt_bytes}``.
    """

    prompt_param: str  # what to shorten when the prompt alone is too long: "prompt", "messages"
    no_room: str  # the prompt leaves no room for a single token: {prompt_tokens}
    requested: str  # prompt + requested budget exceed the context: {total} {prompt_tokens} {requested}
    bound: str  # a bound computed without tokenizing exceeds the context: {prompt_bytes} {prompt_tokens}

    def no_room_error(self, max_context: int, prompt_tokens: int) -> ContextLengthExceeded:
        """The prompt leaves no room for a single token."""
        return _exceeded(max_context, self.no_room.format(prompt_tokens=prompt_tokens), self.prompt_param)

    def budget_error(
        self, max_context: int, prompt_tokens: int, requested: int, param: str
    ) -> ContextLengthExceeded:
        """The budget ``requested`` (set by ``param``) does not fit next to the prompt."""
        if prompt_tokens >= max_context:
            return self.no_room_error(max_context, prompt_tokens)
        said = self.requested.format(total=prompt_tokens + requested, prompt_tokens=prompt_tokens,
                                     requested=requested)
        return _exceeded(max_context, said, param)

    def bound_error(self, max_context: int, at_least: int, prompt_bytes: int) -> ContextLengthExceeded:
        """The prompt's text is at least ``at_least`` tokens (:meth:`HostTokenizer.min_tokens`)."""
        return _exceeded(max_context, self.bound.format(prompt_bytes=prompt_bytes, prompt_tokens=at_least),
                         self.prompt_param)


def _exceeded(max_context: int, said: str, param: str) -> ContextLengthExceeded:
    return ContextLengthExceeded(
        f"This model's maximum context length is {max_context} tokens. However, {said}", param=param
    )


class StreamOptions(BaseModel):
    """ChatCompletionStreamOptions (shared by completions and chat)."""

    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None


class GenerationRequest(_Request):
    """What every generating request shares (completions, chat; the serving base reads these): stop
    strings, stream options, the conversion to phone parameters. The fields are declared by each
    subclass, in its own spec order; so are ``check_supported``, ``max_new_requested`` and
    ``context_wording``."""

    context_wording: ClassVar[ContextWording]

    if TYPE_CHECKING:
        n: int | None
        return_timings: bool | None
        stop: str | list[str] | None
        stream: bool | None
        stream_options: StreamOptions | None
        presence_penalty: float | None
        frequency_penalty: float | None
        logit_bias: dict[str, float] | None
        temperature: float | None
        top_p: float | None
        top_k: int | None
        repetition_penalty: float | None
        seed: int | None
        ignore_eos: bool | None
        min_tokens: int | None

        def check_supported(self) -> None:
            """Reject, naming the field, every non-default value we cannot honour."""

        @property
        def max_new_requested(self) -> tuple[int | None, str]:
            """(requested completion budget or None, the parameter it came from)."""

    @field_validator("stop", check_fields=False)
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _min_tokens_within_max_tokens(self) -> GenerationRequest:
        requested, param = self.max_new_requested
        min_tokens = getattr(self, "min_tokens", None) or 0
        if requested is not None and min_tokens > requested:
            raise InvalidRequest(f"min_tokens ({min_tokens}) must be at most {param} ({requested}).",
                                 param="min_tokens", code="invalid_value")
        return self

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _reject_penalties(self) -> None:
        """OpenAI's penalties and logit_bias change the output and the phones cannot apply them."""
        if self.presence_penalty:
            raise UnsupportedParameter(
                "presence_penalty is not supported; repetition_penalty is.", param="presence_penalty"
            )
        if self.frequency_penalty:
            raise UnsupportedParameter(
                "frequency_penalty is not supported; repetition_penalty is.", param="frequency_penalty"
            )
        if self.logit_bias:
            raise UnsupportedParameter("logit_bias is not supported.", param="logit_bias")

    def _check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise UnsupportedParameter(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
            )

    def to_generation_params(
        self, *, request_id: str, model: str, prompt_ids: list[int], max_new: int, stop_ids: list[int],
        boundaries: list[Boundary] | None = None,
    ) -> GenerationParams:
        return GenerationParams(
            request_id=request_id,
            model=model,
            prompt_ids=prompt_ids,
            max_new=max_new,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=min(max(self.top_k or 0, 0), TOP_K_MAX),  # more than the vocabulary is all of it
            repetition_penalty=self.repetition_penalty or 1.0,
            seed=self.seed,
            stop_ids=stop_ids,
            boundaries=list(boundaries or []),
            ignore_eos=bool(getattr(self, "ignore_eos", False)),
            min_tokens=getattr(self, "min_tokens", None) or 0,
        )


# https://platform.openai.com/docs/api-reference/completions/create
class CompletionRequest(GenerationRequest):
    context_wording = ContextWording(  # OpenAI's words for completions
        prompt_param="prompt",
        no_room="your prompt is {prompt_tokens} tokens, which leaves no room for the completion. Please "
                "reduce your prompt.",
        requested="you requested {total} tokens ({prompt_tokens} in your prompt; {requested} for the "
                  "completion). Please reduce your prompt; or completion length.",
        bound="your prompt ({prompt_bytes} bytes) is at least {prompt_tokens} tokens. Please reduce your "
              "prompt.",
    )

    model: StrictStr
    # str | [str] | [int] | [[int]]; absent/null means "<|endoftext|>" (spec default)
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] | None = None
    best_of: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool | None = False
    frequency_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[StrictStr, StrictFloat] | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    max_tokens: StrictInt | None = Field(16, ge=0)  # explicit null: as many as fit in the context
    n: StrictInt | None = Field(1, ge=1, le=128)
    presence_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0)
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    suffix: StrictStr | None = None
    temperature: StrictFloat | None = Field(1.0, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(1.0, ge=0.0, le=1.0)
    user: StrictStr | None = None  # accepted, ignored
    # --- qhx extensions (vLLM's names; not in the OpenAI spec) ---
    top_k: StrictInt | None = Field(None, ge=-1)  # 0 or -1: off
    repetition_penalty: StrictFloat | None = Field(None, gt=0.0, le=2.0)  # 1: off
    return_timings: StrictBool | None = False  # add the phone's timeline ("timings") to the final chunk
    ignore_eos: StrictBool | None = False  # go on past the end-of-sequence tokens, up to max_tokens
    min_tokens: StrictInt | None = Field(0, ge=0)  # no stop (EOS or stop string) before this many tokens
    # --- end qhx extensions ---

    @property
    def max_new_requested(self) -> tuple[int | None, str]:
        """(requested completion budget or None, the parameter it came from)."""
        return self.max_tokens, "max_tokens"

    def check_supported(self) -> None:
        """Reject, naming the field, every non-default value we cannot honour (never silently ignore a
        parameter that changes the output)."""
        if self.best_of not in (None, 0, 1):
            raise UnsupportedParameter("best_of > 1 is not supported.", param="best_of")
        if self.logprobs:  # null and 0 are accepted; the response's logprobs is always null
            raise UnsupportedParameter("logprobs are not supported.", param="logprobs")
        if self.suffix:
            raise UnsupportedParameter("suffix (insertion) is not supported.", param="suffix")
        self._reject_penalties()
        self._check_stream_options()


# https://platform.openai.com/docs/api-reference/completions/object
class CompletionChoice(BaseModel):
    finish_reason: Literal["stop", "length", "content_filter"] | None
    index: int
    logprobs: None = None
    text: str


class PromptTokensDetails(BaseModel):
    """Of the prompt's tokens: ``cached_tokens``, those the phone did not process again because it
    still held them from an earlier request (docs/state-reuse.md); 0 when it processed them all."""

    cached_tokens: int = 0


class CompletionUsage(BaseModel):
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int
    # always sent, as OpenAI sends it on chat: a client reads it without checking that it is there
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class Completion(BaseModel):
    """A completion, and also a streamed chunk of one (same shape, unlike chat)."""

    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    object: Literal["text_completion"] = "text_completion"
    usage: CompletionUsage | None = None
    # --- qhx extensions ---
    timings: dict[str, Any] | None = None  # only when the request set return_timings
    # --- end qhx extensions ---


# https://platform.openai.com/docs/api-reference/models/object
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qhx-server"
    # --- qhx extensions (max_model_len as vLLM; context_length as LM Studio/Ollama asks) ---
    max_model_len: int
    context_length: int
    precision: str
    phones: list[str]
    simulated: bool  # true: tokens come from simulated phones, not from the model
    # --- end qhx extensions ---


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# https://platform.openai.com/docs/api-reference (openapi.yaml: Error, ErrorResponse)
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
