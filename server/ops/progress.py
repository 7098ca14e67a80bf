"""Progress of a batch of file transfers: the events, and a small renderer for a terminal.

Provisioning reports what it does through :class:`Progress` (every method a no-op, so tests can
subclass it to count or to act at a given byte); :class:`TerminalProgress` draws it on stderr: on a
terminal two bars redrawn in place (the current file, and the whole batch with speed and ETA), at
most ten times a second; elsewhere (logs, CI) one line per file, no bars.
"""

from __future__ import annotations

import os
import time
from typing import TextIO


class Progress:
    """Events of a batch: ``begin``, then per file ``start_file`` / ``advance``... / ``end_file``,
    with ``note`` lines in between, then ``end``. Called from the thread doing the transfer."""

    def begin(self, title: str, files: int, total_bytes: int, *, file_lines: bool = True) -> None:
        """A batch of ``files`` files, ``total_bytes`` in all, starts. ``file_lines``: each file is
        worth a line of its own (a push is; hashing local files is not)."""

    def start_file(self, name: str, size: int) -> None:
        """The transfer of one file starts."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more bytes of the current file went out."""

    def end_file(self, ok: bool, note: str = "") -> None:
        """The current file is done (``ok``) or failed."""

    def note(self, text: str) -> None:
        """A line worth keeping (a skipped file, a refusal)."""

    def end(self) -> None:
        """The batch is over (finished or not)."""


def fmt_bytes(n: float) -> str:
    """Decimal units, as the model card sizes its files (961 MB)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else (
        f"{seconds // 60}:{seconds % 60:02d}")


def bar(fraction: float, width: int) -> str:
    filled = int(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class TerminalProgress(Progress):
    """Renders progress to ``stream`` (stderr); ``tty`` defaults to ``stream.isatty()``."""

    REDRAW_S = 0.1

    def __init__(self, stream: TextIO, *, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._title = ""
        self._files = 0
        self._total = 0
        self._done_files = 0
        self._done_bytes = 0  # of the batch, current file included
        self._started = 0.0
        self._name = ""
        self._size = 0
        self._file_bytes = 0
        self._file_started = 0.0
        self._drawn = False
        self._last_draw = 0.0
        self._file_lines = True

    # -- events

    def begin(self, title: str, files: int, total_bytes: int, *, file_lines: bool = True) -> None:
        self._title, self._files, self._total = title, files, total_bytes
        self._file_lines = file_lines
        self._done_files = self._done_bytes = 0
        self._started = time.monotonic()
        if files:
            self._write_line(f"{title}: {files} file(s), {fmt_bytes(total_bytes)}")

    def start_file(self, name: str, size: int) -> None:
        self._name, self._size, self._file_bytes = name, size, 0
        self._file_started = time.monotonic()
        if self.tty:
            self._draw(force=True)
        elif self._file_lines:
            self._write_line(f"  {name} ({fmt_bytes(size)}) ...")

    def advance(self, nbytes: int) -> None:
        self._file_bytes += nbytes
        self._done_bytes += nbytes
        if self.tty:
            self._draw()

    def end_file(self, ok: bool, note: str = "") -> None:
        elapsed = max(time.monotonic() - self._file_started, 1e-6)
        self._done_files += ok
        if not self._file_lines:
            self._name = ""
            self._clear()
            return
        if ok:
            text = f"  ok   {self._name} {fmt_bytes(self._file_bytes)} in {elapsed:.1f} s " \
                   f"({fmt_bytes(self._file_bytes / elapsed)}/s)"
        else:
            text = f"  FAIL {self._name} after {fmt_bytes(self._file_bytes)}"
        self._name = ""  # no bars until the next file
        self._write_line(text + (f"  {note}" if note else ""))

    def note(self, text: str) -> None:
        self._write_line(f"  {text}")

    def end(self) -> None:
        if self._files:
            elapsed = max(time.monotonic() - self._started, 1e-6)
            self._write_line(f"{self._title}: {self._done_files}/{self._files} file(s), "
                             f"{fmt_bytes(self._done_bytes)} in {elapsed:.1f} s")
        self._files = 0

    # -- drawing

    def _write_line(self, text: str) -> None:
        """A permanent line: above the bars on a terminal (they are redrawn below it)."""
        self._clear()
        self.stream.write(text + "\n")
        if self.tty and self._name:
            self._draw(force=True)
        self.stream.flush()

    def _clear(self) -> None:
        if self._drawn:
            # erase the batch line, go up, erase the file line
            self.stream.write("\r\x1b[K\x1b[1A\r\x1b[K")
            self._drawn = False

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 100
        except (AttributeError, OSError, ValueError):
            return 100

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.REDRAW_S:
            return
        self._last_draw = now
        width = max(40, self._columns() - 1)
        bar_w = max(10, width - 68)
        file_frac = self._file_bytes / self._size if self._size else 1.0
        all_frac = self._done_bytes / self._total if self._total else 1.0
        rate = self._done_bytes / max(now - self._started, 1e-6)
        eta = (self._total - self._done_bytes) / rate if rate > 0 else 0.0
        name = self._name if len(self._name) <= 34 else "..." + self._name[-31:]
        file_line = (f"{name:<34} {bar(file_frac, bar_w)} {file_frac:4.0%} "
                     f"{fmt_bytes(self._file_bytes)}/{fmt_bytes(self._size)}")
        label = f"all {self._done_files + 1}/{self._files}"
        all_line = (f"{label:<34} {bar(all_frac, bar_w)} {all_frac:4.0%} {fmt_bytes(rate)}/s "
                    f"ETA {fmt_duration(eta)}")
        self._clear()
        self.stream.write(file_line[:width] + "\n" + all_line[:width])
        self._drawn = True
        self.stream.flush()
