"""Giving memory back to the operating system once a big answer is built or sent.

What a query frees stays with the process unless something hands it back (after
three queries of 100,000 rows with quantile sketches, one by one, a server
stayed 262 MB above idle; now 36 MB):

* glibc's allocator keeps freed pages in the heap of the thread that allocated
  them (rows are read in one worker thread, answers built in another; sketches
  are C++ objects): ``malloc_trim(0)`` returns the free pages of every heap.
* CPython's allocator returns one of its 1 MiB arenas only once nothing in it is
  alive. A query allocates millions of objects, so the collector's young
  collections run all through it and promote the garbage cycles other tasks make
  meanwhile (the event loop's heartbeat, trio's cancellations: a few dozen
  objects) to the oldest generation, which :mod:`trioagg.service.loopwatch`'s thresholds
  collect only 700,000 allocations later. Each, allocated among the rows, keeps
  an arena: ~70 MB of them after a query of 250,000 rows. A full collection frees
  them: 2-5 ms once no other query holds rows (it walks them all: 40-150 ms while
  four do), so only the last query out runs one.

Both run in a worker thread: ``malloc_trim`` without the GIL (ctypes releases it),
the collection with it. On a C library without ``malloc_trim`` (musl, macOS,
Windows) only the collection runs.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Callable
from typing import Final


def _find_trim() -> Callable[[int], int] | None:
    try:
        library = ctypes.CDLL(None)  # the process's own symbols: its C library's among them
    except (OSError, TypeError):  # TypeError: Windows needs a name
        return None
    trim = getattr(library, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_TRIM: Final = _find_trim()
#: Whether the C library's free pages can be given back here.
AVAILABLE: Final = _TRIM is not None


#: One give-back at a time: a query that ends while one runs skips its own (the one
#: under way returns what both freed), so concurrent big queries cost one, not many.
_GIVING_BACK: Final = threading.Lock()


def give_back(collect: bool) -> None:
    """Return the C allocator's free pages to the system, with ``collect`` after a full
    collection (see the module); nothing if another call is under way. Call it from a
    worker thread."""
    if not _GIVING_BACK.acquire(blocking=False):
        return
    try:
        if collect:
            gc.collect()
        if _TRIM is not None:
            _TRIM(0)
    finally:
        _GIVING_BACK.release()
