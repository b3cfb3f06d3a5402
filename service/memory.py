"""Giving a replaced model's memory back to the operating system.

A model swap frees the old model's arrays and its Python objects (the id vocabularies are dicts
of millions of strings). Large numpy arrays are separate memory maps and go back to the OS as
soon as they are freed, but glibc keeps the pages of smaller freed blocks in its arenas for
reuse, so a worker's resident size after a swap depended on which arena those blocks had landed
in: measured on the swaps campaign (docs/reliability.md, "Model swaps under load"), it settled on
one of two distinct levels. :func:`release_freed_memory` asks glibc to return every free page it
holds (``malloc_trim(0)``); the loader calls it once the requests still using the old model are
done.

A serving process also keeps its garbage collector off the objects it holds for good:
:func:`settle_heap`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import time
from collections.abc import Callable
from functools import cache

logger = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size (0 where ``/proc`` is not available)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


@cache
def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None under another C library (musl has no such call)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def release_freed_memory() -> int:
    """Return the C heap's free pages to the OS; the bytes of resident memory that went back
    (0 where the C library cannot do it). Logs what it did."""
    trim = malloc_trim()
    if trim is None:
        return 0
    before = rss_bytes()
    started = time.perf_counter()
    trim(0)
    released = max(0, before - rss_bytes())
    logger.info(
        "released %.1f MB of freed memory to the OS in %.1f ms",
        released / 2**20,
        (time.perf_counter() - started) * 1e3,
        extra={"released_bytes": released},
    )
    return released


def settle_heap(_: object = None) -> None:
    """Collect once, then keep every object alive now out of the cyclic garbage collector's
    passes (``gc.freeze``). A worker holds a few hundred thousand long-lived objects (the
    libraries, a model's vocabularies and caches); each full collection walked all of them while
    every request waited (about 100 ms on the benchmark catalog, ``python -m bench.gc_pauses``).
    The server runs this on each model put in place, so a swap's new objects join them; the
    previous model's cycles, if it left any, are collected at the next swap. Only in a serving
    process: a test process that builds many servers keeps its collector as it is."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
