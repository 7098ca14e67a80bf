"""The generation driver shared by /v1/completions and /v1/chat/completions.

``generate_text`` turns one backend request (token ids in, ``Started`` / ``Tokens`` / ``Finished``
out) into what an OpenAI endpoint needs: text that is safe to show (UTF-8 complete, stop strings
held back and cut), exact token counts, and a finish reason::

    async with contextlib.aclosing(generate_text(backend, params, tok, stop=["\\n\\n"])) as events:
        async for ev in events:
            if isinstance(ev, Delta):
                ...  # ev.text may be "" (the first item: the phone accepted the prompt)
            else:
                ...  # Outcome: always the last item

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
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import anyio

from server.backends.base import Backend, Event, Finished, GenerationParams, Started, Tokens
from server.errors import BackendError, ProtocolViolation
from server.logs import note_generation
from server.serving.oneshot import ignored_params
from server.serving.stops import TokenStops
from server.serving.tokens import HostTokenizer

if TYPE_CHECKING:
    from server.serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)

# Longest the consumer waits for the phone to confirm a cancellation (the phone bounds it too).
CLEANUP_TIMEOUT_S = 15.0


@dataclass(slots=True)
class Delta:
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

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _now_ms() -> float:
    return time.monotonic() * 1000.0


async def generate_text(
    backend: Backend, params: GenerationParams, tokenizer: HostTokenizer, *, stop: list[str],
    metrics: ServingMetrics | None = None,
) -> AsyncGenerator[Delta | Outcome, None]:
    """Run ``params`` on ``backend``; yield ``Delta``s then one ``Outcome``.

    The first item is ``Delta("", 0)`` as soon as the phone accepted the prompt (``Started``): a
    natural moment to send a role chunk; queueing or admission errors (429, 503) are raised before it.
    Backend failures propagate as :class:`server.errors.QhxError` subclasses. Timings (``Outcome
    .timings``, ms): ``queue_ms`` (host: request to ``Started``), ``prefill_ms`` and ``decode_ms``
    (phone), ``phone_first_token_t_ms`` / ``phone_last_token_t_ms`` (phone monotonic clock; None in
    one-shot mode), ``host_start_t_ms`` / ``host_first_token_t_ms`` (host ``time.monotonic()``).

    However it ends, the generation is recorded once: in ``metrics`` (when a phone started it) and
    on the request's log line (:func:`server.logs.note_generation`).
    """
    detok = tokenizer.detokenizer()
    scan = TokenStops(stop)
    timings: dict[str, float | None] = {
        "host_start_t_ms": _now_ms(), "queue_ms": None, "prefill_ms": None, "decode_ms": None,
        "host_first_token_t_ms": None, "phone_first_token_t_ms": None, "phone_last_token_t_ms": None,
    }
    oneshot = False  # the phone sends text instead of ids (one-shot mode): tokens are counted on it
    phone: str | None = None
    admitted = False
    gaps = _TokenGaps()
    outcome: Outcome | None = None
    ended = "error"  # the finish reason recorded when no Outcome was reached
    run = _BackendRun(backend, params)

    def counted() -> int:
        return _retokenized(tokenizer, scan, params.max_new) if oneshot else scan.tokens

    try:
        while True:
            batch = await run.next_batch()
            if not batch:
                raise ProtocolViolation(f"request {params.request_id}: the phone ended without `done`")
            texts: list[str] = []  # one per token (one per text piece in one-shot mode)
            finished: Finished | None = None
            for ev in batch:
                if isinstance(ev, Tokens):
                    if timings["host_first_token_t_ms"] is None:
                        timings["host_first_token_t_ms"] = _now_ms()
                        timings["phone_first_token_t_ms"] = ev.t_ms
                    timings["phone_last_token_t_ms"] = ev.t_ms
                    gaps.tokens(max(1, len(ev.ids)), ev.t_ms if ev.t_ms is not None else _now_ms())
                    if ev.ids:
                        texts.extend(detok.feed((i,)) for i in ev.ids)
                    elif ev.text is not None:
                        if not oneshot:
                            oneshot = True
                            _warn_ignored(params, ev.request_id, phone)
                        texts.append(detok.feed_text(ev.text))
                elif isinstance(ev, Started):
                    phone = ev.phone
                    timings["queue_ms"] = _now_ms() - (timings["host_start_t_ms"] or 0.0)
                elif isinstance(ev, Finished):
                    finished = ev
            if not admitted:
                admitted = True
                yield Delta("", 0)
            safe, matched = scan.feed(texts)
            if matched is None and finished is None:
                if safe:
                    yield Delta(safe, scan.tokens)
                continue
            if matched is None:  # finished: settle the held-back text (a stop may sit in it)
                tail, matched = scan.flush(detok.flush())
                safe += tail
            if safe:
                yield Delta(safe, scan.tokens)
            if finished is not None:
                timings["prefill_ms"], timings["decode_ms"] = finished.prefill_ms, finished.decode_ms
            reason: Literal["stop", "length"]
            count = counted()
            if matched is not None:
                await run.close()  # the phone stops now and is free when the client hears "stop"
                reason = "stop"
            else:
                assert finished is not None
                if finished.reason == "cancelled":
                    raise BackendError(f"request {params.request_id} was cancelled on phone {phone}")
                if oneshot:
                    reason, count = _oneshot_finish(finished, count, params.max_new)
                else:
                    reason = finished.reason
            outcome = Outcome(reason, len(params.prompt_ids), count, matched, phone, timings)
            _log_outcome(params.request_id, outcome)
            yield outcome
            return
    except (GeneratorExit, asyncio.CancelledError):
        ended = "abort"  # the consumer went away (client disconnect)
        raise
    finally:
        await run.close()
        _record(metrics, params, phone, outcome.finish_reason if outcome else ended,
                outcome.completion_tokens if outcome else counted(), timings, gaps.samples(timings["decode_ms"]))


def _retokenized(tokenizer: HostTokenizer, scan: TokenStops, max_new: int) -> int:
    """One-shot mode's count: the text up to the end of the stop string (all of it without a match),
    tokenized on the host; never more than the phone was allowed to generate."""
    text = scan.text if scan.stop_end is None else scan.text[: scan.stop_end]
    return min(len(tokenizer.encode(text)), max_new)


def _oneshot_finish(finished: Finished, retokenized: int, max_new: int) -> tuple[Literal["stop", "length"], int]:
    """Why a one-shot run ended by itself, and its token count.

    The count is the backend's when it knows one (``Finished.completion_tokens`` > 0; the one-shot
    backend sends 0, as the CLI's stats line has no format in the contract), else the host's
    ``retokenized`` count. Fewer tokens than
    ``max_new`` means the runtime stopped by itself (a stop id; ``max_new`` never reaches past the
    context: the services clamp it), which the session protocol would have called ``stop``."""
    generated = finished.completion_tokens or retokenized
    return ("stop" if generated < max_new else "length"), min(generated, max_new)


def _warn_ignored(params: GenerationParams, request_id: str, phone: str | None) -> None:
    ignored = ignored_params(params)
    if ignored:
        logger.warning("request %s runs in one-shot mode on phone %s (greedy, no sampling parameters): "
                       "ignoring %s", request_id, phone, ", ".join(ignored))


def _record(
    metrics: ServingMetrics | None, params: GenerationParams, phone: str | None, reason: str,
    completion_tokens: int, timings: dict[str, float | None], gaps_s: list[float],
) -> None:
    start, first, queue = timings["host_start_t_ms"] or 0.0, timings["host_first_token_t_ms"], timings["queue_ms"]
    ttft_ms = first - start if first is not None else None
    note_generation(
        id=params.request_id, model=params.model, phone=phone, prompt_tokens=len(params.prompt_ids),
        completion_tokens=completion_tokens, finish_reason=reason, queue_ms=_ms(queue), ttft_ms=_ms(ttft_ms),
        prefill_ms=_ms(timings["prefill_ms"]), decode_ms=_ms(timings["decode_ms"]),
    )
    if metrics is not None and phone is not None:  # only what a phone started (429/503 are not)
        metrics.record(
            model=params.model, phone=phone, finished_reason=reason, prompt_tokens=len(params.prompt_ids),
            generation_tokens=completion_tokens, queue_s=queue / 1000.0 if queue is not None else None,
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
