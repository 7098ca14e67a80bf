"""Children that do not outlive their parent, even a SIGKILLed one (OOM killer, ``docker kill``).

Linux's ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` has the kernel kill a process when the *thread* that
forked it ends (for a process whose only thread is the main one: when it exits, however). The
simulated phones use it at every level, so that nothing a ``qhx-server serve --sim`` (or a SimLab)
started survives it:

* the private adb server (server/sim/harness.py): started in its own session so that a Ctrl-C in
  the terminal does not reach it before teardown, it was left running when the server was killed.
  It is forked from the lab's event-loop thread, which lives as long as the lab (not from whichever
  thread restarts it);
* every ``sh -c`` the simulated adbd runs (server/sim/adbd.py), forked from the lab's loop thread;
* the simulated runtime (server/sim/runtime.py), whose parent is that ``sh``: a session runtime
  exits anyway when its stdin (the adb stream) closes, but a one-shot one stuck by the ``hang``
  knob does not.

Elsewhere (not Linux) these are no-ops: children are still reaped at an orderly teardown.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1

_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent (thread) ends; True if it will.

    A parent that died before the call leaves us with another one: we exit at once then."""
    if _prctl is None:
        return False
    parent = os.getppid()
    if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # it died between getppid and prctl
        os._exit(1)
    return True


def dying_with(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child is SIGKILLed when the thread forking it ends (``parent_pid``:
    ``os.getpid()`` before the fork; the child exits at once if that process is gone already). Only
    a prctl and a getppid between fork and exec; use it from a thread that lives as long as the
    children should (the simulated adbd's loop thread)."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent_pid:
                os._exit(1)

    return preexec


_EXEC_CHILD = (
    "import ctypes, ctypes.util, os, signal, sys\n"
    "libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True)\n"
    f"libc.prctl({PR_SET_PDEATHSIG}, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def dying_with_us(argv: list[str]) -> list[str]:
    """``argv`` run so that the kernel SIGKILLs it when the thread that starts it ends (or at once
    if that happened before it was set up): a small Python that sets the signal and ``exec``s
    ``argv`` (the same process, so its pid is the one ``Popen`` gives), rather than a ``preexec_fn``,
    which is not safe in a process with threads. ``argv[0]`` is a path."""
    if _prctl is None:
        return list(argv)
    return [sys.executable, "-I", "-c", _EXEC_CHILD, str(os.getpid()), *argv]
