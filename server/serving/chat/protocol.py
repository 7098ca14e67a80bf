"""OpenAI wire types for chat completions (pydantic), in the API reference's field order (the
required fields, then alphabetical, as server/serving/protocol.py does for completions).

Spec: https://platform.openai.com/docs/api-reference/chat (openai/openai-openapi ``openapi.yaml``:
CreateChatCompletionRequest, CreateChatCompletionResponse, CreateChatCompletionStreamResponse); the
client types of openai-python (``openai/types/chat/*.py``) are the shapes tests check against.

Requests accept unknown fields (kept in ``model_extra``, logged by the service). Our extensions are
fenced in ``--- qhx extensions ---`` blocks; ``reasoning_content`` is vLLM's name for the text of
the think block, in messages and in deltas.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_serializer,
)

from server.errors import InvalidRequest, UnsupportedParameter
from server.serving.chat.tools import check_tool_name
from server.serving.protocol import (
    SEED_MAX,
    SEED_MIN,
    CompletionUsage,
    ContextWording,
    GenerationRequest,
    StreamOptions,
    _Request,
    lone_surrogate_at,
)

# --- request -----------------------------------------------------------------------------------

# what to do with a conversation that outgrows the context (docs/chat.md): a 400, or drop its oldest turns
ContextOverflow = Literal["error", "drop-oldest"]


class ContentPart(BaseModel):
    """A content part; ``text`` parts are served (the phones run the text model), and ``refusal``
    parts of assistant messages (rendered as the assistant's text)."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None
    refusal: StrictStr | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    arguments: StrictStr | dict[str, Any] | None = None  # a JSON object as text (spec); a dict is accepted
    name: StrictStr


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: StrictStr | None = None
    function: FunctionCall
    type: StrictStr = "function"


# https://platform.openai.com/docs/api-reference/chat/create#chat-create-messages
class ChatMessage(BaseModel):
    """Any of the spec's message kinds (system, developer, user, assistant, tool), in one model."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    refusal: StrictStr | None = None  # assistant messages: rendered after the content, as its text
    name: StrictStr | None = None  # accepted, not rendered (the template has no place for it)
    tool_call_id: StrictStr | None = None  # tool messages
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    # --- qhx extensions (vLLM's field; "reasoning" is accepted as its newer alias) ---
    reasoning_content: StrictStr | None = None
    reasoning: StrictStr | None = None
    # --- end qhx extensions ---


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: StrictStr = Field(min_length=1)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    @field_validator("name")
    @classmethod
    def _callable(cls, name: str) -> str:
        return check_tool_name(name)


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr
    function: FunctionDefinition | None = None

    def template_dict(self) -> dict[str, Any]:
        """The tool as the template renders it (``tojson``): what the client sent (fields it did not
        send are left out; ``parameters`` exactly as sent)."""
        return self.model_dump(exclude_unset=True)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr
    function: dict[str, Any]


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr


# https://platform.openai.com/docs/api-reference/chat/create
class ChatCompletionRequest(GenerationRequest):
    context_wording = ContextWording(  # OpenAI's words for chat
        prompt_param="messages",
        no_room="your messages resulted in {prompt_tokens} tokens, which leaves no room for the reply. Please "
                "reduce the length of the messages.",
        requested="you requested {total} tokens ({prompt_tokens} in the messages, {requested} in the "
                  "completion). Please reduce the length of the messages or completion.",
        bound="your messages resulted in a prompt of {prompt_bytes} bytes, which is at least {prompt_tokens} "
              "tokens (a bound computed without tokenizing it). Please reduce the length of the messages.",
    )

    messages: list[ChatMessage]
    model: StrictStr
    audio: dict[str, Any] | None = None
    frequency_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0)
    function_call: StrictStr | dict[str, Any] | None = None  # deprecated: rejected unless null
    functions: list[dict[str, Any]] | None = None  # deprecated: rejected unless null
    logit_bias: dict[StrictStr, StrictFloat] | None = None
    logprobs: StrictBool | None = False
    max_completion_tokens: StrictInt | None = Field(None, ge=0)
    max_tokens: StrictInt | None = Field(None, ge=0)  # deprecated alias; max_completion_tokens wins
    modalities: list[StrictStr] | None = None
    n: StrictInt | None = Field(1, ge=1, le=128)
    parallel_tool_calls: StrictBool | None = True
    presence_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    temperature: StrictFloat | None = Field(1.0, ge=0.0, le=2.0)
    tool_choice: StrictStr | NamedToolChoice | None = None
    tools: list[Tool] | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    top_p: StrictFloat | None = Field(1.0, ge=0.0, le=1.0)
    user: StrictStr | None = None  # accepted, ignored
    # --- qhx extensions (vLLM's names; not in the OpenAI spec) ---
    top_k: StrictInt | None = Field(None, ge=-1)  # 0 or -1: off
    repetition_penalty: StrictFloat | None = Field(None, gt=0.0, le=2.0)  # 1: off
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables: {"enable_thinking": true}
    enable_thinking: StrictBool | None = None  # shorthand (DashScope/SGLang style); chat_template_kwargs wins
    return_timings: StrictBool | None = False  # add the phone's timeline ("timings") to the response
    context_overflow: ContextOverflow | None = None  # a conversation that outgrows the context; null: the server's
    ignore_eos: StrictBool | None = False  # go on past the end-of-sequence tokens, up to max_completion_tokens
    min_tokens: StrictInt | None = Field(0, ge=0)  # no stop (EOS or stop string) before this many tokens
    # --- end qhx extensions ---

    @property
    def max_new_requested(self) -> tuple[int | None, str]:
        """(requested completion budget or None, the parameter it came from)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def thinking(self) -> bool:
        """Whether the think block is opened for the model (off by default for Qwen3.5-0.8B)."""
        kwargs = self.chat_template_kwargs or {}
        if "enable_thinking" in kwargs:
            return kwargs["enable_thinking"] is True
        return self.enable_thinking is True

    def check_supported(self) -> None:
        """Reject, naming the field, every non-default value we cannot honour."""
        if self.logprobs:
            raise UnsupportedParameter("logprobs are not supported.", param="logprobs")
        if self.top_logprobs:
            raise UnsupportedParameter("top_logprobs are not supported.", param="top_logprobs")
        self._reject_penalties()
        if self.response_format is not None and self.response_format.type != "text":
            raise UnsupportedParameter(
                f"response_format {self.response_format.type!r} is not supported (the phones cannot "
                "constrain decoding); only {'type': 'text'} is.",
                param="response_format",
            )
        self._check_stream_options()
        if self.functions is not None or self.function_call is not None:
            param = "functions" if self.functions is not None else "function_call"
            raise UnsupportedParameter(f"{param} is deprecated and not supported; use tools.", param=param)
        if self.audio is not None or (self.modalities and set(self.modalities) != {"text"}):
            raise UnsupportedParameter("Only text output is supported.",
                                       param="audio" if self.audio is not None else "modalities")

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as the template expects them: plain dicts, ``developer`` as ``system``, tool-call
        arguments as objects (transformers' convention), text parts only."""
        return [_template_message(i, m) for i, m in enumerate(self.messages)]

    def template_tools(self) -> list[dict[str, Any]] | None:
        return None if self.tools is None else [t.template_dict() for t in self.tools]

    def template_tool_choice(self) -> str | dict[str, Any] | None:
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice


def _template_message(i: int, m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    if isinstance(m.content, list):
        out["content"] = [_template_part(i, j, m.role, part) for j, part in enumerate(m.content)]
    else:
        out["content"] = m.content
    if m.refusal is not None and m.role == "assistant":  # what the assistant said: its text
        before = out["content"] if isinstance(out["content"], list) else (
            [{"type": "text", "text": out["content"]}] if out["content"] else [])
        out["content"] = [*before, {"type": "text", "text": m.refusal}]
    reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
    if reasoning is not None and m.role == "assistant":
        out["reasoning_content"] = reasoning
    if m.tool_calls and m.role == "assistant":
        out["tool_calls"] = [_template_call(i, j, c) for j, c in enumerate(m.tool_calls)]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _template_part(i: int, j: int, role: str, part: ContentPart) -> dict[str, Any]:
    """A content part as the template takes it: text (a refusal is the assistant's text)."""
    where = f"messages[{i}].content[{j}]"
    field = {"text": "text", "refusal": "refusal"}.get(part.type)
    if field == "refusal" and role != "assistant":
        raise InvalidRequest(f"{where}: content parts of type 'refusal' are only allowed in assistant messages.",
                             param=f"{where}.type")
    if field is None:
        raise UnsupportedParameter(
            f"{where}: content parts of type {part.type!r} are not supported; this model takes text only.",
            param=f"{where}.type",
        )
    value = part.text if field == "text" else part.refusal
    if value is None:
        raise InvalidRequest(f"{where}: a {part.type!r} content part needs its {field!r} (a string).",
                             param=f"{where}.{field}", code="missing_required_parameter")
    return {"type": "text", "text": value}


def _template_call(i: int, j: int, call: MessageToolCall) -> dict[str, Any]:
    args = call.function.arguments
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise InvalidRequest(
                f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {why}",
                param=f"messages[{i}].tool_calls[{j}].function.arguments",
            ) from exc
        if lone_surrogate_at(args) is not None:  # the escapes decoded to text that cannot be tokenized
            raise InvalidRequest(
                f"messages[{i}].tool_calls[{j}].function.arguments holds a lone UTF-16 surrogate (an unpaired "
                "\\ud800-\\udfff escape), which is not a Unicode character.",
                param=f"messages[{i}].tool_calls[{j}].function.arguments", code="invalid_value",
            )
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise InvalidRequest(
            f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object",
            param=f"messages[{i}].tool_calls[{j}].function.arguments",
        )
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}


# --- response ----------------------------------------------------------------------------------


class _Sparse(BaseModel):
    """Serialized without its None fields (deltas carry only what changed, as OpenAI's do)."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ToolCallFunction(BaseModel):
    arguments: str
    name: str


# https://platform.openai.com/docs/api-reference/chat/object
class ToolCallOut(BaseModel):
    id: str
    function: ToolCallFunction
    type: Literal["function"] = "function"


class AssistantMessage(BaseModel):
    content: str | None
    refusal: None = None
    role: Literal["assistant"] = "assistant"
    tool_calls: list[ToolCallOut] | None = None  # omitted when there are none
    # --- qhx extensions ---
    reasoning_content: str | None = None  # omitted when there is none
    # --- end qhx extensions ---

    @model_serializer(mode="wrap")
    def _omit_empty(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in ("tool_calls", "reasoning_content"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


ChatFinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class ChatChoice(BaseModel):
    finish_reason: ChatFinishReason
    index: int = 0
    logprobs: None = None
    message: AssistantMessage


class ChatCompletion(BaseModel):
    id: str
    choices: list[ChatChoice]
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    usage: CompletionUsage
    # --- qhx extensions ---
    timings: dict[str, Any] | None = None  # only when the request set return_timings
    # --- end qhx extensions ---


# https://platform.openai.com/docs/api-reference/chat-streaming/streaming
class DeltaFunction(_Sparse):
    arguments: str | None = None
    name: str | None = None


class DeltaToolCall(_Sparse):
    index: int
    id: str | None = None
    function: DeltaFunction | None = None
    type: Literal["function"] | None = None


class Delta(_Sparse):
    role: Literal["assistant"] | None = None  # first, as on OpenAI's wire: {"role": ..., "content": ""}
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    # --- qhx extensions ---
    reasoning_content: str | None = None
    # --- end qhx extensions ---


class ChunkChoice(BaseModel):
    delta: Delta
    finish_reason: ChatFinishReason | None = None
    index: int = 0
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: CompletionUsage | None = None  # present (null) on every chunk only with include_usage
    # --- qhx extensions ---
    timings: dict[str, Any] | None = None  # on the finish chunk, with return_timings
    # --- end qhx extensions ---


# --- qhx extensions: debug endpoints (/tokenize as vLLM, /apply-template as llama.cpp) -----------


class TokenizeRequest(_Request):
    """vLLM's /tokenize: either ``prompt`` (raw text) or ``messages`` (rendered with the chat
    template, with the same tool and thinking fields as a chat request)."""

    model: StrictStr
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    tool_choice: StrictStr | NamedToolChoice | None = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: StrictBool | None = None

    def as_chat(self) -> ChatCompletionRequest:
        if self.messages is None:
            raise InvalidRequest("Either prompt or messages is required.", param="messages")
        return ChatCompletionRequest.model_validate({
            "model": self.model, "messages": self.messages, "tools": self.tools, "tool_choice": self.tool_choice,
            "chat_template_kwargs": self.chat_template_kwargs, "enable_thinking": self.enable_thinking,
        })


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    # --- qhx extensions ---
    model: str
    prompt: str  # the text that was tokenized (the rendered chat prompt for messages)
    template_source: str | None = None  # where the chat template came from (messages only)
    # --- end qhx extensions ---


class ApplyTemplateResponse(BaseModel):
    prompt: str
