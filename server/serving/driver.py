"""The stream driver shared by every endpoint family: one backend request in, text deltas out.

``generate_text`` turns one backend request (token ids in, ``Started`` / ``Tokens`` / ``Finished``
out) into what an OpenAI endpoint needs: text that is safe to show (UTF-8 complete, stop strings
held back and cut), exact token counts, and a finish reason::

    async with contextlib.aclosing(generate_text(backend, params, tok, stop=["\\n\\n"])) as events:
        async for ev in events:
            if isinstance(ev, TextDelta):
                ...  # ev.text may be "" (the first item: the phone accepted the prompt)
            else:
                ...  # Outcome: always the last item

One generation's state is a :class:`_Generation` (events in, deltas and the outcome out); the
backend's events arrive through a :class:`_BackendRun`.

Cancellation: the backend request runs in a pump task of its own. Closing the iterator, a stop
string match, or the consuming task being cancelled (client disconnect) cancels that task exactly
once, which cancels the request on the phone (backend contract: the phone gets ``cancel`` and is
waited for, bounded). A single cancellation matters: anyio cancel scopes (sse-starlette's task group)
re-deliver cancellation at every await, which would cut the phone's own clean-up short if it ran in
the consumer's task.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import anyio

from server.backends.base import Backend, Event, Finished, GenerationParams, Started, Tokens
from server.errors import BackendError, ProtocolViolation
from server.logs import note_generation
from server.serving.stops import TokenStops
from server.serving.tokens import HostTokenizer

if TYPE_CHECKING:
    from server.serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)

# Longest the consumer waits for the phone to confirm a cancellation (the phone bounds it too).
CLEANUP_TIMEOUT_S = 15.0


@dataclass(slots=True)
class TextDelta:
    """Text the client may see now (stop-string safe, whole UTF-8 characters)."""

    text: str
    token_count: int  # completion tokens consumed so far


@dataclass(slots=True)
class Outcome:
    """How the generation ended; always the last item of ``generate_text``."""

    finish_reason: Literal["stop", "length"]  # "stop": stop id or stop string; "length": max_new/context
    prompt_tokens: int
    completion_tokens: int
    matched_stop: str | int | None  # the stop string that matched (None for a stop id: the phone does
    #                                 not say which one)
    phone: str | None  # serial of the phone that ran it
    timings: dict[str, float | None] = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens the phone did not process again (``Started.cached_tokens``)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _now_ms() -> float:
    return time.monotonic() * 1000.0


async def generate_text(
    backend: Backend, params: GenerationParams, tokenizer: HostTokenizer, *, stop: list[str],
    metrics: ServingMetrics | None = None,
) -> AsyncGenerator[TextDelta | Outcome, None]:
    """Run ``params`` on ``backend``; yield ``TextDelta``s then one ``Outcome``.

    The first item is ``TextDelta("", 0)`` as soon as the phone accepted the prompt (``Started``): a
    natural moment to send a role chunk; queueing or admission errors (429, 503) are raised before it.
    Backend failures propagate as :class:`server.errors.QhxError` subclasses. Timings (``Outcome
    .timings``, ms): ``queue_ms`` (host: request to ``Started``), ``prefill_ms`` and ``decode_ms``
    (phone), ``phone_first_token_t_ms`` / ``phone_last_token_t_ms`` (phone monotonic clock; None in
    one-shot mode), ``host_start_t_ms`` / ``host_first_token_t_ms`` (host ``time.monotonic()``).

    However it ends, the generation is recorded once: in ``metrics`` (when a phone started it) and
    on the request's log line (:func:`server.logs.note_generation`). ``Outcome.cached_tokens`` (also
    ``reused`` on the log line and ``qhx:prefix_cache_hits``) is the phone's ``Started.cached_tokens``,
    bounded by the prompt.
    """
    gen = _Generation(params, tokenizer, stop)
    run = _BackendRun(backend, phone_params(params))
    ended = "error"  # the finish reason recorded when no Outcome was reached
    try:
        while True:
            batch = await run.next_batch()
            if not batch:
                raise ProtocolViolation(f"request {params.request_id}: the phone ended without `done`")
            texts = gen.on_events(batch)
            if gen.admit():
                yield TextDelta("", 0)
            delta = gen.on_texts(texts)
            if delta is not None:
                yield delta
            if gen.ending:
                if gen.matched is not None or gen.eos_hit:
                    await run.close()  # the phone stops now and is free when the client hears "stop"
                yield gen.settle()
                return
    except (GeneratorExit, asyncio.CancelledError):
        ended = "abort"  # the consumer went away (client disconnect)
        raise
    finally:
        await run.close()
        gen.record(metrics, ended)


def phone_params(params: GenerationParams) -> GenerationParams:
    """What the phone is asked: with ``ignore_eos`` or ``min_tokens``, no stop ids at all (the session
    protocol has no way to say "not before N tokens", and a runtime cannot unsay a token it sampled),
    so that the host can apply them (:class:`_Generation`)."""
    if params.ignore_eos or params.min_tokens:
        return dataclasses.replace(params, stop_ids=[])
    return params


class _Generation:
    """One generation, from the backend's first event to its :class:`Outcome`.

    ``ignore_eos`` / ``min_tokens`` (vLLM's extensions) are applied here, the phone having been sent
    no stop ids (:func:`phone_params`): a stop id before ``min_tokens`` tokens (any, with
    ``ignore_eos``) is a token like any other, counted but not shown (its text is a special token's,
    which vLLM does not show either); the first one from then on ends the generation with "stop" and
    the request is cancelled on the phone, as for a stop string. Stop strings, too, are looked for
    only from the ``min_tokens``-th token on (vLLM's rule).

    Per batch of events, top to bottom: :meth:`on_events` (timings, phone, the tokens' text),
    :meth:`admit` (the first batch only), :meth:`on_texts` (stop strings; the text safe to show);
    once :attr:`ending`, :meth:`settle` gives the outcome; :meth:`record` runs however it ended.
    """

    def __init__(self, params: GenerationParams, tokenizer: HostTokenizer, stop: list[str]) -> None:
        self.params = params
        self._detok = tokenizer.detokenizer()
        self._scan = TokenStops(stop, min_tokens=params.min_tokens)
        host_eos = params.ignore_eos or params.min_tokens > 0
        self._eos = frozenset(params.stop_ids) if host_eos else frozenset()
        self._eos_from = None if params.ignore_eos else params.min_tokens  # None: never ends on one
        self.eos_hit = False  # a stop id ended the generation (host-side, see the class docstring)
        self._taken = 0  # generated tokens taken so far (the batch's events come one by one)
        self.timings: dict[str, float | None] = {
            "host_start_t_ms": _now_ms(), "queue_ms": None, "prefill_ms": None, "decode_ms": None,
            "host_first_token_t_ms": None, "phone_first_token_t_ms": None, "phone_last_token_t_ms": None,
        }
        self.phone: str | None = None
        self.cached_tokens: int | None = None  # from ``Started`` (None: no phone started it)
        self._admitted = False
        self._gaps = _TokenGaps()
        self.finished: Finished | None = None  # the phone's `done`
        self.matched: str | None = None  # the stop string that matched
        self.outcome: Outcome | None = None

    # -- events -------------------------------------------------------------------------------

    def on_events(self, batch: list[Event]) -> list[str]:
        """Take in one batch of events; the tokens' text, one piece per token."""
        texts: list[str] = []
        for ev in batch:
            if isinstance(ev, Tokens):
                texts.extend(self.on_tokens(ev))
            elif isinstance(ev, Started):
                self.on_started(ev)
            elif isinstance(ev, Finished):
                self.finished = ev
        return texts

    def on_started(self, ev: Started) -> None:
        self.phone = ev.phone
        # never more than the prompt, never negative, whatever the phone says
        self.cached_tokens = max(0, min(ev.cached_tokens, len(self.params.prompt_ids)))
        self.timings["queue_ms"] = _now_ms() - (self.timings["host_start_t_ms"] or 0.0)

    def on_tokens(self, ev: Tokens) -> list[str]:
        timings = self.timings
        if timings["host_first_token_t_ms"] is None:
            timings["host_first_token_t_ms"] = _now_ms()
            timings["phone_first_token_t_ms"] = ev.t_ms
        timings["phone_last_token_t_ms"] = ev.t_ms
        self._gaps.tokens(max(1, len(ev.ids)), ev.t_ms if ev.t_ms is not None else _now_ms())
        if not self._eos:
            return [self._detok.feed((i,)) for i in ev.ids]
        texts: list[str] = []
        for i in ev.ids:
            if self.eos_hit:
                break  # what the phone sent before it heard the cancel
            if i not in self._eos:
                texts.append(self._detok.feed((i,)))
            elif self._eos_from is not None and self._taken >= self._eos_from:
                self.eos_hit = True  # not counted, as a stop id the phone stopped on is not
                break
            else:
                texts.append("")  # counted, not shown
            self._taken += 1
        return texts

    def admit(self) -> bool:
        """True once: after the first batch (the phone accepted the prompt)."""
        first, self._admitted = not self._admitted, True
        return first

    # -- text ---------------------------------------------------------------------------------

    def on_texts(self, texts: list[str]) -> TextDelta | None:
        """The text now safe to show, if any; at the end (a stop matched, or the phone finished)
        with the held-back text settled."""
        safe, self.matched = self._scan.feed(texts)
        if self.matched is None and (self.finished is not None or self.eos_hit):  # a stop may sit in the held-back text
            tail, self.matched = self._scan.flush(self._detok.flush())
            safe += tail
        return TextDelta(safe, self._scan.tokens) if safe else None

    @property
    def ending(self) -> bool:
        return self.matched is not None or self.finished is not None or self.eos_hit

    # -- the end ------------------------------------------------------------------------------

    def settle(self) -> Outcome:
        """The outcome, once :attr:`ending`; a phone-side cancellation is an error."""
        if self.finished is not None:
            self.timings["prefill_ms"] = self.finished.prefill_ms
            self.timings["decode_ms"] = self.finished.decode_ms
        reason: Literal["stop", "length"]
        count = self._counted()
        if self.matched is not None or self.eos_hit:
            reason = "stop"
        else:
            assert self.finished is not None
            if self.finished.reason == "cancelled":
                raise BackendError(f"request {self.params.request_id} was cancelled on phone {self.phone}")
            reason = self.finished.reason
        self.outcome = outcome = Outcome(reason, len(self.params.prompt_ids), count, self.matched, self.phone,
                                         self.timings, self.cached_tokens or 0)
        _log_outcome(self.params.request_id, outcome)
        return outcome

    def _counted(self) -> int:
        return min(self._scan.tokens, self.params.max_new)  # never more than the phone may generate

    def record(self, metrics: ServingMetrics | None, ended: str) -> None:
        """Metrics and the request's log fields, once, however the generation ended (``ended``: the
        finish reason when no outcome was reached)."""
        o = self.outcome
        _record(metrics, self.params, self.phone, o.finish_reason if o else ended,
                o.completion_tokens if o else self._counted(), self.cached_tokens, self.timings,
                self._gaps.samples(self.timings["decode_ms"]))


def _record(
    metrics: ServingMetrics | None, params: GenerationParams, phone: str | None, reason: str,
    completion_tokens: int, cached_tokens: int | None, timings: dict[str, float | None], gaps_s: list[float],
) -> None:
    start, first, queue = timings["host_start_t_ms"] or 0.0, timings["host_first_token_t_ms"], timings["queue_ms"]
    ttft_ms = first - start if first is not None else None
    note_generation(
        id=params.request_id, model=params.model, phone=phone, prompt_tokens=len(params.prompt_ids),
        reused=cached_tokens, completion_tokens=completion_tokens, finish_reason=reason, queue_ms=_ms(queue),
        ttft_ms=_ms(ttft_ms), prefill_ms=_ms(timings["prefill_ms"]), decode_ms=_ms(timings["decode_ms"]),
    )
    if metrics is not None and phone is not None:  # only what a phone started (429/503 are not)
        metrics.record(
            model=params.model, phone=phone, finished_reason=reason, prompt_tokens=len(params.prompt_ids),
            cached_tokens=cached_tokens or 0, generation_tokens=completion_tokens,
            queue_s=queue / 1000.0 if queue is not None else None,
            ttft_s=ttft_ms / 1000.0 if ttft_ms is not None else None, e2e_s=(_now_ms() - start) / 1000.0,
            token_gaps_s=gaps_s,
        )


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


class _TokenGaps:
    """Seconds between consecutive tokens, one sample per token after the first.

    Times are the phone's (``Tokens.t_ms``; the host's in one-shot mode). Tokens that arrive in one
    event (the consumer fell behind and the session handed them over together) share the gap since
    the previous event; those that came with the very first token share what the phone's decode time
    leaves once the other gaps are counted (when it reports one)."""

    def __init__(self) -> None:
        self._gaps: list[float] = []
        self._last_t_ms: float | None = None
        self._first_event_tokens = 0

    def tokens(self, n: int, t_ms: float) -> None:
        if self._last_t_ms is None:
            self._first_event_tokens = n
        else:
            self._gaps.extend([(t_ms - self._last_t_ms) / n / 1000.0] * n)
        self._last_t_ms = t_ms

    def samples(self, decode_ms: float | None) -> list[float]:
        together = self._first_event_tokens
        if together <= 1 or decode_ms is None:
            return self._gaps
        share = max(0.0, decode_ms / 1000.0 - sum(self._gaps)) / together
        return [share] * (together - 1) + self._gaps


def _log_outcome(request_id: str, o: Outcome) -> None:
    t = o.timings
    decode = t.get("decode_ms")
    tps = (o.completion_tokens / decode * 1000.0) if decode else None
    logger.debug(  # the request's access line (server.api.access) carries the same at info
        "request %s: phone %s, %d prompt + %d completion tokens, finish %s%s, queue %s ms, "
        "prefill %s ms, decode %s ms (%s tok/s)",
        request_id, o.phone, o.prompt_tokens, o.completion_tokens, o.finish_reason,
        f" ({o.matched_stop!r})" if o.matched_stop is not None else "",
        _fmt(t.get("queue_ms")), _fmt(t.get("prefill_ms")), _fmt(decode), _fmt(tps, 1),
    )


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


_END = object()


class _BackendRun:
    """``backend.generate(params)`` pumped by its own task into a buffer.

    ``next_batch()`` returns every event already received (so a consumer that fell behind catches up
    in one step instead of one chunk per token), ``[]`` at the end, or raises the backend's error.
    ``close()`` cancels the pump task once and waits (shielded, bounded) for the phone to let go.
    """

    def __init__(self, backend: Backend, params: GenerationParams) -> None:
        self._request_id = params.request_id
        self._items: collections.deque[Event | BaseException | object] = collections.deque()
        self._ready = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._pump(backend, params), name=f"generate-{params.request_id}"
        )

    async def _pump(self, backend: Backend, params: GenerationParams) -> None:
        agen = backend.generate(params)
        try:
            async for event in agen:
                self._items.append(event)
                self._ready.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._items.append(exc)
        finally:
            self._items.append(_END)  # in every case the consumer stops waiting (extra ends are unread)
            self._ready.set()
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()

    async def next_batch(self) -> list[Event]:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        batch: list[Event] = []
        while self._items:
            item = self._items[0]
            if isinstance(item, BaseException) or item is _END:
                if batch:
                    break  # deliver the events first, the end or the error on the next call
                self._items.popleft()
                if isinstance(item, BaseException):
                    raise item
                return []
            batch.append(self._items.popleft())  # type: ignore[arg-type]
        return batch

    async def close(self) -> None:
        task = self._task
        if task.done():
            return
        task.cancel()
        # shielded: under an anyio cancel scope every await is re-cancelled, but the phone's
        # confirmation is worth waiting for (the phone is free when the response ends)
        with anyio.CancelScope(shield=True):
            done, _ = await asyncio.wait({task}, timeout=CLEANUP_TIMEOUT_S)
        if not done:
            logger.error("request %s: the backend did not let go within %.0f s", self._request_id,
                         CLEANUP_TIMEOUT_S)
        elif not task.cancelled() and task.exception() is not None:
            logger.error("request %s: error while cancelling on the phone: %r", self._request_id,
                         task.exception())
