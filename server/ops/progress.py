"""Progress of operator commands: the events, and live bars drawn with rich.

Two kinds of work report progress:

* batches of file transfers (``provision``: hashing local files, pushing to phones): the
  :class:`Progress` events, one stream of them per phone (:meth:`Progress.phone`), so phones
  provisioned in parallel each get their own bar;
* checks that take a while (``doctor``): :class:`Steps`, one line per phone naming the check that
  runs, with a bar when its length is known (the sustained decode run).

:class:`LiveProgress` draws both on stderr with `rich <https://rich.readthedocs.io>`_ (chosen over
tqdm: one live region holds any number of bars updated from several threads at once, permanent lines
print above it without tearing it, and when stderr is not a terminal it draws nothing at all, so logs
and CI get only the permanent lines). The plain :class:`Progress` and :class:`Steps` do nothing, so
tests subclass them to count or to act at a given byte.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType
from typing import Self, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text


class Progress:
    """Events of a batch: ``begin``, then per file ``start_file`` / ``advance``... / ``end_file``,
    with ``note`` lines in between, then ``end``. Called from the thread doing the transfer; a
    phone's events go to its own view, :meth:`phone`."""

    def phone(self, serial: str) -> Progress:
        """Where the events of one phone go (phones may run in parallel, one thread each)."""
        return self

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


class Steps:
    """Progress of checks per phone (doctor): which check runs, and how far a long one got."""

    def step(self, serial: str, text: str, total: float | None = None) -> None:
        """``serial`` now runs ``text``; ``total``: its length in units of :meth:`advance`."""

    def advance_step(self, serial: str, amount: float) -> None:
        """The current step of ``serial`` got ``amount`` further."""

    def done(self, serial: str, summary: str) -> None:
        """``serial`` is finished; ``summary`` is worth a permanent line."""


def fmt_bytes(n: float) -> str:
    """Decimal units, as the model card sizes its files (961 MB)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class _BytesColumn(ProgressColumn):
    """Transferred/total and speed for byte tasks; nothing for step tasks."""

    def __init__(self) -> None:
        super().__init__()
        self._size, self._speed = DownloadColumn(), TransferSpeedColumn()

    def render(self, task: Task) -> Text:
        if not task.fields.get("bytes"):
            return Text("")
        return Text.assemble(self._size.render(task), " ", self._speed.render(task))


class LiveProgress(Progress, Steps):
    """Live bars on ``stream`` (stderr) and permanent lines above them; use it as a context manager.

    ``tty`` defaults to whether ``stream`` is a terminal; when it is not, only permanent lines are
    written (one per file pushed, notes, a summary per batch or phone)."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None) -> None:
        self.console = Console(file=stream, force_terminal=tty, highlight=False, soft_wrap=True,
                               emoji=False, markup=False)
        self._bars = RichProgress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
            _BytesColumn(), TimeRemainingColumn(), TimeElapsedColumn(),
            console=self.console, transient=True, refresh_per_second=8,
        )
        self._lock = threading.Lock()
        self._views: dict[str, _TransferView] = {}
        self._steps: dict[str, TaskID] = {}
        self._started = False

    # -- lifetime

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop drawing (the bars vanish; permanent lines stay)."""
        with self._lock:
            if self._started:
                self._bars.stop()
                self._started = False

    def _task(self, description: str, total: float | None, *, nbytes: bool) -> TaskID:
        with self._lock:
            if not self._started and self.console.is_terminal:  # elsewhere: permanent lines only
                self._bars.start()
                self._started = True
        return self._bars.add_task(description, total=total, bytes=nbytes)

    def _remove(self, task: TaskID) -> None:
        self._bars.remove_task(task)

    def line(self, text: str) -> None:
        """A permanent line (above the bars while they are drawn)."""
        self.console.print(text, markup=False, highlight=False, emoji=False)

    def log_handler(self) -> logging.Handler:
        """A logging handler whose records are permanent lines (a plain stream handler would tear the
        bars)."""
        owner = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                try:
                    owner.line(f"{record.levelname} {self.format(record)}")
                except Exception:  # noqa: BLE001 - logging must never raise into the caller
                    self.handleError(record)

        return Handler()

    # -- transfers (Progress): the events without a phone go to an unnamed view

    def phone(self, serial: str) -> Progress:
        with self._lock:
            view = self._views.get(serial)
            if view is None:
                view = self._views[serial] = _TransferView(self, serial)
            return view

    def begin(self, title: str, files: int, total_bytes: int, *, file_lines: bool = True) -> None:
        self.phone("").begin(title, files, total_bytes, file_lines=file_lines)

    def start_file(self, name: str, size: int) -> None:
        self.phone("").start_file(name, size)

    def advance(self, nbytes: int) -> None:
        self.phone("").advance(nbytes)

    def end_file(self, ok: bool, note: str = "") -> None:
        self.phone("").end_file(ok, note)

    def note(self, text: str) -> None:
        self.phone("").note(text)

    def end(self) -> None:
        self.phone("").end()

    # -- checks (Steps)

    def step(self, serial: str, text: str, total: float | None = None) -> None:
        description = f"{serial}  {text}"
        task = self._steps.get(serial)
        if task is None:
            self._steps[serial] = self._task(description, total, nbytes=False)
        else:
            self._bars.reset(task, total=total, description=description)

    def advance_step(self, serial: str, amount: float) -> None:
        task = self._steps.get(serial)
        if task is not None:
            self._bars.advance(task, amount)

    def done(self, serial: str, summary: str) -> None:
        task = self._steps.pop(serial, None)
        if task is not None:
            self._remove(task)
        self.line(summary)


class _TransferView(Progress):
    """The transfer events of one phone (or of the local side, ``serial`` ""): one bar per batch."""

    def __init__(self, owner: LiveProgress, serial: str) -> None:
        self._owner = owner
        self._prefix = f"{serial}: " if serial else ""
        self._title = ""
        self._files = self._done_files = self._done_bytes = 0
        self._file_lines = True
        self._task: TaskID | None = None
        self._started = self._file_started = 0.0
        self._name = ""
        self._file_bytes = 0

    def begin(self, title: str, files: int, total_bytes: int, *, file_lines: bool = True) -> None:
        self._title, self._files, self._file_lines = title, files, file_lines
        self._done_files = self._done_bytes = 0
        self._started = time.monotonic()
        if files:
            if file_lines:
                self._owner.line(f"{self._prefix}{title}: {files} file(s), {fmt_bytes(total_bytes)}")
            self._task = self._owner._task(f"{self._prefix}{title}", total_bytes, nbytes=True)

    def start_file(self, name: str, size: int) -> None:
        self._name, self._file_bytes = name, 0
        self._file_started = time.monotonic()
        if self._task is not None:
            short = name if len(name) <= 34 else "..." + name[-31:]
            self._owner._bars.update(self._task, description=f"{self._prefix}{self._title}: {short} "
                                     f"({self._done_files + 1}/{self._files})")

    def advance(self, nbytes: int) -> None:
        self._file_bytes += nbytes
        self._done_bytes += nbytes
        if self._task is not None:
            self._owner._bars.advance(self._task, nbytes)

    def end_file(self, ok: bool, note: str = "") -> None:
        elapsed = max(time.monotonic() - self._file_started, 1e-6)
        self._done_files += ok
        if not self._file_lines:
            return
        if ok:
            text = (f"ok   {self._name} {fmt_bytes(self._file_bytes)} in {elapsed:.1f} s "
                    f"({fmt_bytes(self._file_bytes / elapsed)}/s)")
        else:
            text = f"FAIL {self._name} after {fmt_bytes(self._file_bytes)}"
        self._owner.line(f"  {self._prefix}{text}" + (f"  {note}" if note else ""))

    def note(self, text: str) -> None:
        self._owner.line(f"  {self._prefix}{text}")

    def end(self) -> None:
        if self._task is not None:
            self._owner._remove(self._task)
            self._task = None
        if self._files and self._file_lines:
            elapsed = max(time.monotonic() - self._started, 1e-6)
            self._owner.line(f"{self._prefix}{self._title}: {self._done_files}/{self._files} file(s), "
                             f"{fmt_bytes(self._done_bytes)} in {elapsed:.1f} s")
        self._files = 0
