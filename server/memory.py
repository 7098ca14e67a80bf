"""The heap after a large one-off load: freed memory back to the system, long-lived objects out of the
garbage collector's way.

Loading a tokenizer.json (a Qwen3.5 one is 11 MB of JSON, ~250k tokens) peaks at about twice what the
loaded tokenizer keeps: the parse's temporary allocations are freed, but glibc's allocator keeps the
pages (in the loading worker thread's arena) and the process's RSS stays at the peak. Two loads (the
serving tokenizer and the phones' normalizer-less one) left the server 160 MB larger than it needed
to be (docs/reliability.md, "1,000 streams"). :func:`trim_heap` returns those pages to the system.

The objects alive once the server has started (modules, the app and its services: ~80,000) live as
long as the process; every full collection of the garbage collector walked them all again, and with
1,000 streams open one such pause was measured at ~950 ms of event-loop lag. :func:`freeze_heap`, run
once at start-up, before the first request, moves them to the collector's permanent generation
(``gc.freeze``), so that full collections only walk what requests create; and it makes full collections
rarer (after 100 collections of the middle generation instead of 10: about 700,000 net allocations),
since each one still walks every object of every open request: ~450,000 objects and a ~1 s pause with
1,000 streams open.

Only at start-up: a tokenizer is also loaded while requests run (a phone plugged in with another
bundle), and freezing then froze every object of every request in flight, whose reference cycles (frames,
tasks, futures) were then never collected: memory lost for good at each such load; the collection
before the freeze stopped the event loop for as long as a full collection of those objects takes. A
tokenizer load makes a dozen objects the collector tracks: nothing worth freezing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging

logger = logging.getLogger(__name__)

FULL_COLLECTION_AFTER = 100  # middle-generation collections between two full ones (CPython's default: 10)


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Give the free pages of every malloc arena back to the system (glibc ``malloc_trim(0)``); whether
    anything was released. A no-op returning False where there is no ``malloc_trim``. Takes a few ms:
    call it after a large, one-off allocation spike, not per request."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


def settle_heap() -> None:
    """After a large one-off load (a tokenizer), at any time: :func:`trim_heap`. No collection and no
    freeze (see the module docstring: requests may be in flight)."""
    trim_heap()


def freeze_heap() -> None:
    """Once the server has started, before it serves anything: collect the garbage, freeze what
    survives (long-lived: out of later full collections) and make full collections rare
    (``FULL_COLLECTION_AFTER``). Costs one full collection (tens of ms). Never while requests are in
    flight: their objects would never be collected."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)
