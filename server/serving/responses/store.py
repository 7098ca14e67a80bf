"""Stored responses, in memory: what ``GET /v1/responses/{id}`` returns and what
``previous_response_id`` continues.

Bounded three times: at most ``max_items`` responses and ``max_bytes`` of memory (the oldest go
first), each for ``ttl_s`` seconds after it was stored. Nothing survives a restart. Each entry holds
the response's JSON and its conversation as chat messages (the input it continued, its own input and
its output, without ``instructions``).

The byte bound is needed: what an entry holds is not bounded by the model's context. The template
drops reasoning text before the last user message and empty system messages render as nothing, so
a 25-token prompt can come with megabytes of either (up to the body limit), and the response JSON
echoes fields the prompt never held (``tools`` that a named ``tool_choice`` leaves out, say). An
entry's size is what Python holds for it (:func:`held_bytes`), the messages it shares with the
entries it continued included, since those may go first and leave them to it.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.errors import NotFound
from server.serving.responses.items import Message

logger = logging.getLogger(__name__)

ENTRY_OVERHEAD = 256  # bytes: the entry object and its slot in the store's dict, roughly


@dataclass(frozen=True, slots=True)
class StoredResponse:
    body: str  # the response's JSON, as created
    conversation: tuple[Message, ...]  # the chat messages a continuation starts from
    expires: float  # on the store's clock
    size: int  # bytes: held_bytes() of the entry


class ResponseStore:
    """Responses by id, bounded in number, in bytes and in age (``clock``: seconds, monotonic)."""

    def __init__(self, *, max_items: int, ttl_s: float, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_items
        self._max_bytes = max_bytes
        self._ttl = ttl_s
        self._clock = clock
        self._items: collections.OrderedDict[str, StoredResponse] = collections.OrderedDict()  # oldest first
        self._bytes = 0

    def __len__(self) -> int:
        self._expire()
        return len(self._items)

    @property
    def bytes(self) -> int:
        """The sizes of the entries held (:func:`held_bytes`), at most ``max_bytes``."""
        self._expire()
        return self._bytes

    def put(self, response_id: str, body: str, conversation: tuple[Message, ...]) -> None:
        """Keep a response (the oldest go beyond the bounds); one bigger than ``max_bytes`` on its own
        is not kept (logged): its id is then a 404, as an evicted one's."""
        self._expire()
        self._drop(response_id)
        size = held_bytes(body, conversation)
        if size > self._max_bytes:
            logger.warning("response %s not stored: it holds %d bytes, more than responses_store_max_bytes (%d)",
                           response_id, size, self._max_bytes)
            return
        self._items[response_id] = StoredResponse(body, conversation, self._clock() + self._ttl, size)
        self._bytes += size
        while len(self._items) > self._max or self._bytes > self._max_bytes:
            self._drop(next(iter(self._items)))

    def get(self, response_id: str, *, param: str | None = None) -> StoredResponse:
        """The stored response; :class:`NotFound` (404, naming ``param``) when there is none (never
        stored, stored with ``store: false``, expired, evicted or deleted)."""
        self._expire()
        stored = self._items.get(response_id)
        if stored is None:
            shown = response_id if len(response_id) <= 128 else response_id[:128] + "..."
            raise NotFound(f"Response with id '{shown}' not found.", param=param)
        return stored

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        self._drop(response_id)

    def _drop(self, response_id: str) -> None:
        stored = self._items.pop(response_id, None)
        if stored is not None:
            self._bytes -= stored.size

    def _expire(self) -> None:
        now = self._clock()
        while self._items:
            oldest_id, oldest = next(iter(self._items.items()))
            if oldest.expires > now:
                return
            self._drop(oldest_id)


def held_bytes(body: str, conversation: tuple[Message, ...]) -> int:
    """The bytes an entry keeps alive: ``sys.getsizeof`` of the body and of every dict, list, tuple
    and string of the conversation (walked without recursion: tool-call arguments nest as deep as
    strict JSON lets them), plus :data:`ENTRY_OVERHEAD`. What is shared (field names, messages of
    the conversation continued) counts once per use: an upper bound."""
    total = ENTRY_OVERHEAD + sys.getsizeof(body) + sys.getsizeof(conversation)
    stack: list[Any] = list(conversation)
    while stack:
        obj = stack.pop()
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj)  # keys too: tool-call arguments may hold any number of any size
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return total
