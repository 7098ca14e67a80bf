"""OpenAI wire types for the Responses API (pydantic), in the API reference's field order (the required
fields, then alphabetical, as the other families' protocol modules).

Spec: https://platform.openai.com/docs/api-reference/responses (openai/openai-openapi ``openapi.yaml``:
CreateResponse, Response, ResponseStreamEvent); the client types of openai-python
(``openai/types/responses/*.py``) and its stream helper (``openai/lib/streaming/responses``) are the
shapes tests check against.

Requests accept unknown fields (kept in ``model_extra``, logged by the service). A field we know
but cannot honour with a non-default value is a 400 naming it (``check_supported``); docs/api.md
lists each. Our extensions are fenced in ``--- qhx extensions ---`` blocks.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

from server.errors import InvalidRequest, UnsupportedParameter
from server.serving.chat.tools import check_tool_name
from server.serving.protocol import ContextWording, GenerationRequest, StreamOptions

# --- request -----------------------------------------------------------------------------------


class ContentPart(BaseModel):
    """A content part of an input item: ``input_text`` (``output_text`` and ``refusal`` in assistant
    messages, ``reasoning_text`` in reasoning items); images, files and audio are refused by the
    conversion (server/serving/responses/items.py)."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None
    refusal: StrictStr | None = None


# https://platform.openai.com/docs/api-reference/responses/create#responses-create-input
class InputItem(BaseModel):
    """Any input item, in one model: a message (``type`` "message" or absent), ``function_call``,
    ``function_call_output``, ``reasoning``; each kind's fields are checked where it is converted."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr | None = None  # absent: a message (EasyInputMessage)
    id: StrictStr | None = None
    status: StrictStr | None = None
    # messages
    role: StrictStr | None = None
    content: StrictStr | list[ContentPart] | None = None
    # function_call
    arguments: StrictStr | dict[str, Any] | None = None  # a JSON object as text (spec); a dict is accepted
    call_id: StrictStr | None = None
    name: StrictStr | None = None
    # function_call_output
    output: StrictStr | list[ContentPart] | None = None
    # reasoning
    summary: list[ContentPart] | None = None
    encrypted_content: StrictStr | None = None


class FunctionTool(BaseModel):
    """A tool: ``function`` ones are served; any other type (web_search, file_search, mcp, ...) is
    refused naming ``tools[i].type``."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr
    name: StrictStr | None = Field(None, min_length=1)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    @field_validator("name")
    @classmethod
    def _callable(cls, name: str | None) -> str | None:
        return None if name is None else check_tool_name(name)


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    generate_summary: StrictStr | None = None  # deprecated alias of summary: accepted, ignored
    summary: StrictStr | None = None  # accepted: the think text itself is the item's content


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: TextFormat | None = None
    verbosity: StrictStr | None = None  # accepted, ignored (a hint the model has no knob for)


# what reasoning.effort means here: the think block on or off (Qwen3.5 has no thinking budget)
THINKING_EFFORTS = frozenset({"low", "medium", "high", "xhigh"})
MAX_METADATA = 16  # spec: "up to 16 key-value pairs", keys up to 64 characters, values up to 512
# include values that ask for something we would have to make up
_UNSUPPORTED_INCLUDES = frozenset({"message.output_text.logprobs"})


# https://platform.openai.com/docs/api-reference/responses/create
class ResponsesRequest(GenerationRequest):
    context_wording = ContextWording(  # OpenAI's words, naming this request's fields
        prompt_param="input",
        no_room="your input resulted in {prompt_tokens} tokens, which leaves no room for the output. Please "
                "reduce the length of the input.",
        requested="you requested {total} tokens ({prompt_tokens} in the input, {requested} in the output). "
                  "Please reduce the length of the input or max_output_tokens.",
        bound="your input resulted in a prompt of {prompt_bytes} bytes, which is at least {prompt_tokens} "
              "tokens (a bound computed without tokenizing it). Please reduce the length of the input.",
    )

    model: StrictStr
    background: StrictBool | None = None
    conversation: StrictStr | dict[str, Any] | None = None
    include: list[StrictStr] | None = None
    # the list first: a bad item is reported by its place (input[2].call_id), not as "not a string"
    input: list[InputItem] | StrictStr | None = None
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    max_tool_calls: StrictInt | None = Field(None, ge=0)  # built-in tool calls: accepted (there are none)
    metadata: dict[StrictStr, StrictStr] | None = None
    parallel_tool_calls: StrictBool | None = True
    previous_response_id: StrictStr | None = None
    prompt: dict[str, Any] | None = None  # reusable prompts (a dashboard feature): refused
    prompt_cache_key: StrictStr | None = None  # accepted: routing by prefix does what it asks
    prompt_cache_retention: StrictStr | None = None  # accepted, ignored
    reasoning: ReasoningConfig | None = None
    safety_identifier: StrictStr | None = None  # accepted, ignored
    service_tier: StrictStr | None = None  # accepted, ignored
    store: StrictBool | None = True
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None  # include_obfuscation: accepted (no obfuscation is added)
    temperature: StrictFloat | None = Field(1.0, ge=0.0, le=2.0)
    text: TextConfig | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    tools: list[FunctionTool] | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    top_p: StrictFloat | None = Field(1.0, ge=0.0, le=1.0)
    truncation: Literal["auto", "disabled"] | None = None
    user: StrictStr | None = None  # deprecated: accepted, ignored
    # --- qhx extensions (vLLM's names, as on chat; not in the OpenAI spec) ---
    top_k: StrictInt | None = Field(None, ge=-1)  # 0 or -1: off
    repetition_penalty: StrictFloat | None = Field(None, gt=0.0, le=2.0)  # 1: off
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None  # as on chat: up to 4, cut exactly, excluded
    # --- end qhx extensions ---
    # what the serving base reads that this API does not have: refused unless left at the default
    n: Literal[1] | None = 1  # one output per response
    frequency_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[StrictStr, StrictFloat] | None = None
    presence_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0)
    return_timings: Literal[False] | None = False

    @property
    def max_new_requested(self) -> tuple[int | None, str]:
        """(requested output budget or None: as many as fit, the parameter it came from)."""
        return self.max_output_tokens, "max_output_tokens"

    @property
    def thinking(self) -> bool:
        """The think block is opened for efforts that ask for reasoning; off otherwise (and by
        default, as on chat)."""
        effort = self.reasoning.effort if self.reasoning is not None else None
        return effort in THINKING_EFFORTS

    def check_supported(self) -> None:
        """Reject, naming the field, every non-default value we cannot honour."""
        if self.background:
            raise UnsupportedParameter("Background mode is not supported; send the request without "
                                       "'background' (or stream it).", param="background")
        if self.conversation is not None:
            raise UnsupportedParameter("The Conversations API is not supported; continue a conversation "
                                       "with previous_response_id.", param="conversation")
        if self.prompt is not None:
            raise UnsupportedParameter("Reusable prompts are not supported; send instructions and input.",
                                       param="prompt")
        if self.top_logprobs:
            raise UnsupportedParameter("top_logprobs are not supported.", param="top_logprobs")
        self._reject_penalties()
        for i, value in enumerate(self.include or []):
            if value in _UNSUPPORTED_INCLUDES:
                raise UnsupportedParameter(f"include {value!r} is not supported (no logprobs).",
                                           param=f"include[{i}]")
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type != "text":
            raise UnsupportedParameter(
                f"text.format {fmt.type!r} is not supported (the phones cannot constrain decoding); only "
                "{'type': 'text'} is.", param="text.format",
            )
        self._check_stream_options()
        self._check_metadata()
        if self.input is None and self.previous_response_id is None:
            raise InvalidRequest("Missing required parameter: 'input'.", param="input",
                                 code="missing_required_parameter")

    def _check_metadata(self) -> None:
        metadata = self.metadata or {}
        if len(metadata) > MAX_METADATA:
            raise InvalidRequest(f"metadata holds {len(metadata)} pairs; at most {MAX_METADATA} are allowed.",
                                 param="metadata", code="invalid_value")
        for key, value in metadata.items():
            if len(key) > 64 or len(value) > 512:
                raise InvalidRequest("metadata keys are at most 64 characters and values at most 512.",
                                     param=f"metadata.{key[:64]}", code="invalid_value")


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


# --- response ----------------------------------------------------------------------------------


# https://platform.openai.com/docs/api-reference/responses/object
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)
    text: str = ""


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    content: list[OutputText] = Field(default_factory=list)
    role: Literal["assistant"] = "assistant"


class FunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    arguments: str = ""
    call_id: str
    name: str


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


class ReasoningItem(BaseModel):
    """The think block: its text is the item's ``content`` (the raw reasoning, as open-weight models
    return it); ``summary`` is empty (nothing summarizes it)."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    content: list[ReasoningText] = Field(default_factory=list)
    encrypted_content: None = None
    summary: list[Any] = Field(default_factory=list)


OutputItem = OutputMessage | FunctionCall | ReasoningItem
Status = Literal["completed", "failed", "in_progress", "incomplete"]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens the phone did not process again (docs/state-reuse.md)


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseError(BaseModel):
    code: str = "server_error"
    message: str


class Response(BaseModel):
    """The response object: what create returns, what streams carry in their lifecycle events, what
    retrieve gives back."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Status
    background: bool = False
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    prompt_cache_key: str | None = None
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    safety_identifier: str | None = None
    service_tier: str = "default"
    store: bool = True
    temperature: float = 1.0
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_logprobs: int = 0
    top_p: float = 1.0
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None


# https://platform.openai.com/docs/api-reference/responses-streaming
class StreamEvent(BaseModel):
    """A streamed event: its ``type`` and ``sequence_number`` (0, 1, 2... over the stream), then the
    type's own fields (the subclasses)."""

    type: str
    sequence_number: int = 0


class ResponseEvent(StreamEvent):
    """response.created, .in_progress, .completed, .incomplete, .failed."""

    response: Response


class ItemEvent(StreamEvent):
    """response.output_item.added, .done."""

    output_index: int
    item: OutputItem


class PartEvent(StreamEvent):
    """response.content_part.added, .done."""

    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText | ReasoningText


class TextDeltaEvent(StreamEvent):
    """response.output_text.delta."""

    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class TextDoneEvent(StreamEvent):
    """response.output_text.done."""

    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningDeltaEvent(StreamEvent):
    """response.reasoning_text.delta."""

    item_id: str
    output_index: int
    content_index: int = 0
    delta: str


class ReasoningDoneEvent(StreamEvent):
    """response.reasoning_text.done."""

    item_id: str
    output_index: int
    content_index: int = 0
    text: str


class ArgumentsDeltaEvent(StreamEvent):
    """response.function_call_arguments.delta."""

    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(StreamEvent):
    """response.function_call_arguments.done."""

    item_id: str
    output_index: int
    name: str
    arguments: str
