"""service.memory gives freed heap memory back to the operating system."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.memory import malloc_trim, release_freed_memory, rss_bytes

# Run in a fresh interpreter, so that what the test allocates is the only thing on the heap
# that moves. Blocks of 2 kB are above Python's small-object allocator (512 bytes): glibc's
# malloc serves them. The block allocated last sits at the top of the heap, so that free() alone
# cannot shrink the heap, as with a swapped-out model whose blocks are interleaved with live ones.
PROGRAM = """
import json
from service.memory import release_freed_memory, rss_bytes
blocks = [bytes(2000) + bytes([i % 256]) for i in range(60_000)]
top = bytes(2000) + b"top"
del blocks
before = rss_bytes()
released = release_freed_memory()
print(json.dumps({"before": before, "after": rss_bytes(), "released": released}))
"""


@pytest.mark.skipif(malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_freed_blocks_go_back_to_the_os() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(out.stdout.splitlines()[-1])
    # 120 MB were freed; at least half of it must leave the resident set.
    assert result["released"] > 60 * 2**20
    assert result["after"] < result["before"] - 60 * 2**20


def test_rss_is_read_and_release_never_fails() -> None:
    assert rss_bytes() > 10 * 2**20
    assert release_freed_memory() >= 0


HEAP = """
import gc, json
from service.memory import settle_heap
held = [[i] for i in range(50_000)]  # a model's long-lived objects
cycle = [[]]; cycle[0].append(cycle); del cycle  # garbage in a reference cycle
settle_heap()
first = {"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}
more = [[i] for i in range(20_000)]  # the next model's
settle_heap()
print(json.dumps({"first": first, "frozen": gc.get_freeze_count(),
                  "tracked": len(gc.get_objects()), "collected": gc.collect()}))
"""


def test_a_settled_heap_keeps_the_collector_off_what_the_process_holds() -> None:
    # Fresh interpreter: freezing is process-wide, and this test process must keep its own.
    out = subprocess.run(
        [sys.executable, "-c", HEAP], capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["first"]["frozen"] >= 50_000  # everything alive is out of the passes ...
    assert result["first"]["tracked"] < 1_000  # ... and a collection walks almost nothing
    assert result["frozen"] >= 70_000  # the next model's objects joined them
    assert result["tracked"] < 1_000
