"""One-shot mode: one ``qhx_generate`` process per request (device-protocol.md section 2).

For runtimes without session protocol v1; a :class:`~server.backends.adb.runtime.Runtime` like the
session, so the contract stays token ids in, token ids out. The CLI takes the prompt as *text* and
prints text, so this runtime converts below the contract with the bundle's tokenizer (retokenize.py):

* The prompt text is ``prompt_ids`` decoded; it goes on the command line, shell-quoted (quoting.py).
* stdout is streamed through an incremental UTF-8 decoder (a character split across packets is never
  mangled), and the text is turned into token ids as it comes (the end of the text is held back until
  its ids are settled): the ids emitted decode to exactly the text the CLI printed, and are as many
  as tokenizing that text gives. ``t_ms`` is None (the CLI gives no timestamps).
* ``Finished.completion_tokens`` is the number of ids emitted. The CLI exits 0 whether it reached
  ``max_new`` or its own stop id (its stats line has no format in the contract), so the reason is
  inferred: fewer tokens than ``max_new`` means the runtime stopped by itself, which the session
  protocol would call ``stop`` (``max_new`` never reaches past the context: the services clamp it);
  else ``length``. Stop strings are the serving layer's (closing this generator early kills the
  process).
* The CLI decodes greedily and takes no sampling parameters; GenerationParams' temperature, top_p,
  top_k, seed and repetition_penalty do not reach it: :func:`ignored_params` names those a request
  loses, logged per request here, and said to clients by server/serving/oneshot.py.
* Every request pays the model load; ``prefill_ms`` is the time to the first output byte (load
  included), ``decode_ms`` the rest.

Cancel = close the adb stream: the adb server closes the phone side and adbd kills the process.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from server.backends.adb.retokenize import Retokenizer, decode
from server.backends.adb.runtime import Runtime
from server.backends.adb.transport import STDERR, STDOUT, AdbServerClient, LineBuffer, ShellStream, open_shell
from server.backends.base import Event, Finished, FinishReason, GenerationParams, Started, Tokens
from server.errors import BackendError, PhoneLost, PhoneRequestError, PhoneStalled
from server.settings import Settings

logger = logging.getLogger(__name__)
stderr_log = logging.getLogger("server.backends.adb.stderr")

# the adb host protocol sends a service request with a 4-hex-digit length
MAX_COMMAND_BYTES = 0xFFFF - len("shell,v2,raw:")


def ignored_params(params: GenerationParams) -> list[str]:
    """The request's parameters a greedy one-shot run does not honour, by their API names.

    With temperature 0 the request asks for greedy decoding: the sampling parameters mean nothing
    then, on any phone, so only repetition_penalty (which changes greedy output too) is ignored."""
    ignored = []
    if params.temperature > 0:
        ignored.append("temperature")
        if params.top_p < 1:
            ignored.append("top_p")
        if params.top_k > 0:
            ignored.append("top_k")
        if params.seed is not None:
            ignored.append("seed")
    if params.repetition_penalty != 1:
        ignored.append("repetition_penalty")
    if params.ignore_eos:  # the CLI ends at its own end-of-sequence token
        ignored.append("ignore_eos")
    if params.min_tokens:
        ignored.append("min_tokens")
    return ignored


@dataclass(eq=False)
class _Run:
    """One request's process: its stream and what its output told so far."""

    id: str
    stream: ShellStream
    first_wait: float  # seconds the first stdout data may take (model load and prompt included)
    deadline: float  # loop time by which the next stdout data must come
    t0: float
    retokenizer: Retokenizer
    first_at: float | None = None  # time.monotonic() of the first stdout data
    cancelled: bool = False
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    err: LineBuffer = field(default_factory=LineBuffer)
    last_err: str = ""


class OneShot(Runtime):
    """Runs requests as one process each on one phone (one at a time; the Phone enforces that).

    Nothing long-lived runs: the runtime lives until it is closed, and a failed request does not end
    it (the Phone counts such failures itself)."""

    kind = "oneshot"

    def __init__(
        self,
        client: AdbServerClient,
        serial: str,
        settings: Settings,
        command: Callable[[str, int], str],
        tokenizer: Tokenizer,
    ) -> None:
        self.serial = serial
        self._client = client
        self._settings = settings
        self._command = command  # (prompt, max_new) -> the phone shell command (launcher.py renders it)
        self._tokenizer = tokenizer  # the bundle's, without normalizer (retokenize.load_tokenizer)
        self._run: _Run | None = None
        self._closed_reason: str | None = None
        self._closed = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    @property
    def alive(self) -> bool:
        return self._closed_reason is None

    async def wait_closed(self) -> str:
        await self._closed.wait()
        assert self._closed_reason is not None
        return self._closed_reason

    async def close(self) -> None:
        self.abort("closed")

    def abort(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
            self._closed.set()
        if self._run is not None:
            self._run.stream.abort()  # the request in flight fails with PhoneLost

    async def cancel(self, request_id: str) -> None:
        run = self._run
        if run is not None and run.id == request_id:
            run.cancelled = True
            run.stream.abort()

    # ------------------------------------------------------------------ one request

    async def generate(self, params: GenerationParams) -> AsyncIterator[Event]:
        command = self._checked_command(params)
        if ignored := ignored_params(params):
            logger.warning("request %s runs in one-shot mode on phone %s (greedy, no sampling parameters): "
                           "ignoring %s", params.request_id, self.serial, ", ".join(ignored))
        run = await self._open(params, command)
        try:
            yield Started(run.id, len(params.prompt_ids), 0, self.serial)
            async for ids in self._token_ids(run):
                yield Tokens(run.id, ids, None)
            finished = self._finished(run, params)
            self._release(run)  # idle before the consumer hears Finished
            yield finished
        finally:
            self._release(run)

    def _checked_command(self, params: GenerationParams) -> str:
        if not self.alive:
            raise PhoneLost(f"{self.serial}: {self._closed_reason}")
        prompt = decode(self._tokenizer, params.prompt_ids)
        if prompt == "-":
            raise PhoneRequestError(
                f"{self.serial}: a prompt of exactly '-' makes qhx_generate start the session protocol; "
                "it cannot be sent in one-shot mode"
            )
        command = self._command(prompt, params.max_new)
        if len(command.encode()) > MAX_COMMAND_BYTES:
            raise PhoneRequestError(
                f"{self.serial}: prompt too long for a one-shot command line "
                f"({len(command.encode())} bytes > {MAX_COMMAND_BYTES})"
            )
        return command

    async def _open(self, params: GenerationParams, command: str) -> _Run:
        t0 = time.monotonic()
        stream = await open_shell(self._client, self.serial, command)
        stream.close_stdin()
        # the first byte waits for the model load and the whole prompt; then the stall timeout runs
        # from the last stdout data (stderr chatter does not count as progress)
        first_wait = (
            self._settings.ready_timeout_s
            + len(params.prompt_ids) * self._settings.prefill_ms_per_token / 1000
            + self._settings.stall_timeout_s
        )
        deadline = asyncio.get_running_loop().time() + first_wait
        run = _Run(params.request_id, stream, first_wait, deadline, t0, Retokenizer(self._tokenizer))
        self._run = run
        return run

    async def _token_ids(self, run: _Run) -> AsyncIterator[list[int]]:
        """The ids of the process's output, as they settle; the rest at the end (or at a failure: what
        the phone printed before it failed reaches the client)."""
        try:
            async for text in self._output(run):
                if ids := run.retokenizer.feed(text):
                    yield ids
        except BackendError:
            if ids := run.retokenizer.flush():
                yield ids
            raise
        if ids := run.retokenizer.flush():
            yield ids

    async def _output(self, run: _Run) -> AsyncIterator[str]:
        """The process's stdout as text (whole UTF-8 characters), until it ends or is cancelled."""
        while packets := await self._read(run):
            for kind, data in packets:
                if kind == STDOUT:
                    if run.first_at is None:
                        run.first_at = time.monotonic()
                    run.deadline = asyncio.get_running_loop().time() + self._settings.stall_timeout_s
                    if text := run.decoder.decode(data):
                        yield text
                elif kind == STDERR:
                    self._log_stderr(run, data)
        if tail := run.decoder.decode(b"", final=True):
            yield tail

    async def _read(self, run: _Run) -> list[tuple[int, bytes]]:
        """The next packets; [] at the end (or when cancelled); PhoneStalled / PhoneLost."""
        try:
            async with asyncio.timeout_at(run.deadline):
                return await run.stream.read_packets()
        except TimeoutError:
            waited = run.first_wait if run.first_at is None else self._settings.stall_timeout_s
            raise PhoneStalled(f"{self.serial}: one-shot request {run.id}: no output for {waited:g} s") from None
        except (ConnectionError, OSError) as e:
            if run.cancelled:
                return []
            raise PhoneLost(f"{self.serial}: adb stream failed during request {run.id}: {e!r}") from e

    def _log_stderr(self, run: _Run, data: bytes) -> None:
        for raw in run.err.feed(data):
            run.last_err = raw.decode("utf-8", errors="replace").rstrip()
            stderr_log.info("[%s] %s", self.serial, run.last_err)

    def _finished(self, run: _Run, params: GenerationParams) -> Finished:
        """How the process ended, as Finished; PhoneLost when it died or its stream dropped."""
        end = time.monotonic()
        first = run.first_at or end
        prefill_ms, decode_ms = (first - run.t0) * 1000, (end - first) * 1000
        exit_code, generated = run.stream.exit_code, run.retokenizer.count
        if run.cancelled:
            return Finished(run.id, "cancelled", len(params.prompt_ids), generated, prefill_ms, decode_ms)
        if exit_code == 0:
            reason: FinishReason = "stop" if generated < params.max_new else "length"
            return Finished(run.id, reason, len(params.prompt_ids), generated, prefill_ms, decode_ms)
        if exit_code is None:
            raise PhoneLost(f"{self.serial}: adb stream dropped during one-shot request {run.id}")
        last = run.err.flush().decode("utf-8", errors="replace").strip() or run.last_err
        raise PhoneLost(
            f"{self.serial}: qhx_generate exited with code {exit_code} during request {run.id}"
            + (f" ({last[:200]})" if last else "")
        )

    def _release(self, run: _Run) -> None:
        run.stream.abort()
        if self._run is run:
            self._run = None
