"""One-shot mode: one ``qhx_generate`` process per request (device-protocol.md section 2).

For runtimes without session protocol v1. The prompt *text* goes on the command line, shell-quoted
(quoting.py); stdout is the generated text, streamed through an incremental UTF-8 decoder so that a
character split across packets is never mangled. What the phone does not tell us, we do not invent:

* ``Tokens.ids`` is empty and ``Tokens.text`` carries the text; ``t_ms`` is None.
* ``Finished.completion_tokens`` is 0 (unknown) and the reason is ``length`` (a placeholder): the CLI
  exits 0 whether it reached ``max_new`` or its own stop id, and its stats line has no format in the
  contract. The serving layer counts completion tokens by tokenizing the text, infers the reason from
  that count (fewer than ``max_new``: ``stop``; server/serving/engine.py) and applies stop strings
  itself (closing this generator early, which kills the process).
* The CLI decodes greedily and takes no sampling parameters; GenerationParams' temperature, top_p,
  top_k, seed and repetition_penalty do not reach it (server/serving/oneshot.py says so to clients).
* Every request pays the model load; ``prefill_ms`` is the time to the first output byte (load
  included), ``decode_ms`` the rest.

Cancel = close the adb stream: the adb server closes the phone side and adbd kills the process.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
from collections.abc import AsyncIterator

from server.backends.adb.discovery import Bundle
from server.backends.adb.quoting import render_launch
from server.backends.adb.transport import STDERR, STDOUT, AdbServerClient, LineBuffer, ShellStream, open_shell
from server.backends.base import Event, Finished, GenerationParams, Started, Tokens
from server.errors import PhoneLost, PhoneRequestError, PhoneStalled
from server.settings import Settings

logger = logging.getLogger(__name__)
stderr_log = logging.getLogger("server.backends.adb.stderr")

# the adb host protocol sends a service request with a 4-hex-digit length
MAX_COMMAND_BYTES = 0xFFFF - len("shell,v2,raw:")


class OneShot:
    """Runs requests as one process each on one phone (one at a time; the Phone enforces that)."""

    def __init__(self, client: AdbServerClient, serial: str, settings: Settings, bundle: Bundle) -> None:
        self.serial = serial
        self._client = client
        self._settings = settings
        self._bundle = bundle
        self._stream: ShellStream | None = None
        self._request_id: str | None = None
        self._cancelled = False

    def command(self, prompt: str, max_new: int) -> str:
        return render_launch(
            self._settings.launch_command,
            root=self._settings.device_root,
            manifest=self._bundle.manifest_path,
            artifacts=self._bundle.name,
            max_new=max_new,
            prompt=prompt,
        )

    async def cancel(self, request_id: str) -> None:
        if self._request_id == request_id and self._stream is not None:
            self._cancelled = True
            self._stream.abort()

    async def generate(self, params: GenerationParams) -> AsyncIterator[Event]:
        if params.prompt_text is None:
            raise PhoneRequestError(
                f"{self.serial}: one-shot mode needs the prompt text (prompt_text is None)"
            )
        if params.prompt_text == "-":
            raise PhoneRequestError(
                f"{self.serial}: a prompt of exactly '-' makes qhx_generate start the session protocol; "
                "it cannot be sent in one-shot mode"
            )
        command = self.command(params.prompt_text, params.max_new)
        if len(command.encode()) > MAX_COMMAND_BYTES:
            raise PhoneRequestError(
                f"{self.serial}: prompt too long for a one-shot command line "
                f"({len(command.encode())} bytes > {MAX_COMMAND_BYTES})"
            )
        rid = params.request_id
        t0 = time.monotonic()
        stream = await open_shell(self._client, self.serial, command)
        self._stream, self._request_id, self._cancelled = stream, rid, False
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        err = LineBuffer()
        last_err = ""
        first_at: float | None = None
        # the first byte waits for the model load and the whole prompt; then the stall timeout runs
        # from the last stdout data (stderr chatter does not count as progress)
        loop = asyncio.get_running_loop()
        first_wait = (
            self._settings.ready_timeout_s
            + len(params.prompt_ids) * self._settings.prefill_ms_per_token / 1000
            + self._settings.stall_timeout_s
        )
        deadline = loop.time() + first_wait
        try:
            stream.close_stdin()
            yield Started(rid, len(params.prompt_ids), 0, self.serial)
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        packets = await stream.read_packets()
                except TimeoutError:
                    waited = first_wait if first_at is None else self._settings.stall_timeout_s
                    raise PhoneStalled(
                        f"{self.serial}: one-shot request {rid}: no output for {waited:g} s"
                    ) from None
                except (ConnectionError, OSError) as e:
                    if self._cancelled:
                        break
                    raise PhoneLost(f"{self.serial}: adb stream failed during request {rid}: {e!r}") from e
                if not packets:
                    break
                for kind, data in packets:
                    if kind == STDOUT:
                        if first_at is None:
                            first_at = time.monotonic()
                        deadline = loop.time() + self._settings.stall_timeout_s
                        text = decoder.decode(data)
                        if text:
                            yield Tokens(rid, [], None, text)
                    elif kind == STDERR:
                        for raw in err.feed(data):
                            last_err = raw.decode("utf-8", errors="replace").rstrip()
                            stderr_log.info("[%s] %s", self.serial, last_err)
            tail = decoder.decode(b"", final=True)
            if tail:
                yield Tokens(rid, [], None, tail)
            end = time.monotonic()
            prefill_ms = ((first_at or end) - t0) * 1000
            decode_ms = (end - (first_at or end)) * 1000
            if self._cancelled:
                yield Finished(rid, "cancelled", len(params.prompt_ids), 0, prefill_ms, decode_ms)
            elif stream.exit_code == 0:
                yield Finished(rid, "length", len(params.prompt_ids), 0, prefill_ms, decode_ms)
            elif stream.exit_code is None:
                raise PhoneLost(f"{self.serial}: adb stream dropped during one-shot request {rid}")
            else:
                last = err.flush().decode("utf-8", errors="replace").strip() or last_err
                raise PhoneLost(
                    f"{self.serial}: qhx_generate exited with code {stream.exit_code} during request {rid}"
                    + (f" ({last[:200]})" if last else "")
                )
        finally:
            stream.abort()
            self._stream, self._request_id = None, None
