"""One response's output as its reply streams in: the output items and the stream events that build
them, numbered. The same object makes the streamed events and the non-streamed body, so both always
say the same.

The events, in order (https://platform.openai.com/docs/api-reference/responses-streaming)::

    response.created, response.in_progress                          when the phone took the prompt
    per output item, in reply order (reasoning, then the message and/or function calls):
      response.output_item.added
        reasoning: response.content_part.added, response.reasoning_text.delta*,
                   response.reasoning_text.done, response.content_part.done
        message:   response.content_part.added, response.output_text.delta*,
                   response.output_text.done, response.content_part.done
        function_call: response.function_call_arguments.delta*, response.function_call_arguments.done
      response.output_item.done
    response.completed | response.incomplete (max_output_tokens) | response.failed

An item's events come once the reply parser lets its text go (server/serving/chat/reply.py): a tool
call only when complete, so a call cut short is never announced. Every item that was added is done
before the response ends, which is what the official client's stream helper requires.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from server.serving.chat.reply import Piece, Reasoning, ReplyParser
from server.serving.chat.tools import ArgumentsDelta, CallStarted, Text
from server.serving.responses.protocol import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    FunctionCall,
    IncompleteDetails,
    ItemEvent,
    OutputItem,
    OutputMessage,
    OutputText,
    PartEvent,
    ReasoningDeltaEvent,
    ReasoningDoneEvent,
    ReasoningItem,
    ReasoningText,
    Response,
    ResponseError,
    ResponseEvent,
    ResponseUsage,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)


def new_item_id(prefix: str) -> str:
    """``msg_...``, ``fc_...``, ``rs_...``: OpenAI's prefixes, random hex."""
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseOutput:
    """``started()``, ``text(t)``\\*, then ``finish(...)`` or ``fail(...)``: each returns the events
    to send; :attr:`response` is the response as it stands (the body, once finished)."""

    def __init__(self, response: Response, reply: ReplyParser, *,
                 new_id: Callable[[str], str] = new_item_id) -> None:
        self.response = response
        self.generated = ""  # every text the phone generated, as it came (think block included)
        self._reply = reply
        self._new_id = new_id
        self._seq = 0
        self._open: OutputItem | None = None

    def started(self) -> list[StreamEvent]:
        return [self._lifecycle("response.created"), self._lifecycle("response.in_progress")]

    def text(self, text: str) -> list[StreamEvent]:
        self.generated += text
        return self._pieces(self._reply.feed(text))

    def finish(self, *, incomplete: bool, usage: ResponseUsage) -> list[StreamEvent]:
        """The reply ended (``incomplete``: at max_output_tokens or the context's end): its last
        pieces, every open item done, then response.completed or response.incomplete."""
        events = self._pieces(self._reply.finish())
        if not incomplete and not any(isinstance(i, (OutputMessage, FunctionCall)) for i in self.response.output):
            events += self._open_message()  # a reply that said nothing is an empty message
        events += self._close("incomplete" if incomplete else "completed")
        r = self.response
        r.usage = usage
        if incomplete:
            r.status, r.incomplete_details = "incomplete", IncompleteDetails()
            return [*events, self._lifecycle("response.incomplete")]
        r.status, r.completed_at = "completed", int(time.time())
        return [*events, self._lifecycle("response.completed")]

    def fail(self, message: str) -> list[StreamEvent]:
        """The phone failed after the stream began: the open item ends incomplete, then
        response.failed with the error."""
        events = self._close("incomplete")
        self.response.status, self.response.error = "failed", ResponseError(message=message)
        return [*events, self._lifecycle("response.failed")]

    # -- events ---------------------------------------------------------------------------------

    def _event(self, event: StreamEvent) -> StreamEvent:
        event.sequence_number = self._seq
        self._seq += 1
        return event

    def _lifecycle(self, kind: str) -> StreamEvent:
        return self._event(ResponseEvent(type=kind, response=self.response.model_copy(deep=True)))

    def _pieces(self, pieces: list[Piece]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for piece in pieces:
            if isinstance(piece, Reasoning):
                events += self._reasoning(piece.text)
            elif isinstance(piece, Text):
                events += self._message_text(piece.text)
            elif isinstance(piece, CallStarted):
                events += self._close("completed")
                events += self._add(FunctionCall(id=self._new_id("fc"), call_id=piece.id, name=piece.name))
            else:
                events += self._arguments(piece)
        return events

    def _add(self, item: OutputItem) -> list[StreamEvent]:
        self.response.output.append(item)
        self._open = item
        return [self._event(ItemEvent(type="response.output_item.added", output_index=self._index,
                                      item=item.model_copy(deep=True)))]

    @property
    def _index(self) -> int:
        return len(self.response.output) - 1

    def _reasoning(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        item = self._open
        if not isinstance(item, ReasoningItem):
            events += self._close("completed")
            item = ReasoningItem(id=self._new_id("rs"))
            events += self._add(item)
            item.content.append(ReasoningText())
            events.append(self._event(PartEvent(type="response.content_part.added", item_id=item.id,
                                                output_index=self._index, part=ReasoningText())))
        item.content[0].text += text
        events.append(self._event(ReasoningDeltaEvent(type="response.reasoning_text.delta", item_id=item.id,
                                                      output_index=self._index, delta=text)))
        return events

    def _open_message(self) -> list[StreamEvent]:
        events = self._close("completed")
        item = OutputMessage(id=self._new_id("msg"))
        events += self._add(item)
        item.content.append(OutputText())
        events.append(self._event(PartEvent(type="response.content_part.added", item_id=item.id,
                                            output_index=self._index, part=OutputText())))
        return events

    def _message_text(self, text: str) -> list[StreamEvent]:
        events = [] if isinstance(self._open, OutputMessage) else self._open_message()
        item = self._open
        assert isinstance(item, OutputMessage)
        item.content[0].text += text
        events.append(self._event(TextDeltaEvent(type="response.output_text.delta", item_id=item.id,
                                                 output_index=self._index, delta=text)))
        return events

    def _arguments(self, piece: ArgumentsDelta) -> list[StreamEvent]:
        item = self._open
        assert isinstance(item, FunctionCall)  # the parser starts every call before its arguments
        item.arguments += piece.fragment
        return [self._event(ArgumentsDeltaEvent(type="response.function_call_arguments.delta", item_id=item.id,
                                                output_index=self._index, delta=piece.fragment))]

    def _close(self, status: str) -> list[StreamEvent]:
        """The open item's closing events; it ends ``status`` (a function call is only ever complete)."""
        item, self._open = self._open, None
        if item is None:
            return []
        index = self.response.output.index(item)
        events: list[StreamEvent] = []
        if isinstance(item, ReasoningItem):
            part = item.content[0]
            events.append(self._event(ReasoningDoneEvent(type="response.reasoning_text.done", item_id=item.id,
                                                         output_index=index, text=part.text)))
            events.append(self._event(PartEvent(type="response.content_part.done", item_id=item.id,
                                                output_index=index, part=part.model_copy())))
            item.status = "incomplete" if status == "incomplete" else "completed"
        elif isinstance(item, OutputMessage):
            text_part = item.content[0]
            events.append(self._event(TextDoneEvent(type="response.output_text.done", item_id=item.id,
                                                    output_index=index, text=text_part.text)))
            events.append(self._event(PartEvent(type="response.content_part.done", item_id=item.id,
                                                output_index=index, part=text_part.model_copy())))
            item.status = "incomplete" if status == "incomplete" else "completed"
        else:
            events.append(self._event(ArgumentsDoneEvent(type="response.function_call_arguments.done",
                                                         item_id=item.id, output_index=index, name=item.name,
                                                         arguments=item.arguments)))
            item.status = "completed"
        events.append(self._event(ItemEvent(type="response.output_item.done", output_index=index,
                                            item=item.model_copy(deep=True))))
        return events
