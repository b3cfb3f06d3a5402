"""The compiled search is ready before a request arrives and runs under the server's BLAS limit.

Two ways it went wrong while it was written: a read-only filter mask is a different numba type
from a writable one, so the first filtered request would have paid a compile of seconds; and the
BLAS that numba calls (SciPy's OpenBLAS) loaded lazily at the first compile, after the server had
pinned BLAS to one thread, so it ran two spinning threads per request.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from models.kernels import search_one, warm_up
from models.search import NormOrderedIndex, Query


def test_warm_up_compiles_every_signature_a_server_calls() -> None:
    warm_up()
    compiled = len(search_one.signatures)
    rng = np.random.default_rng(3)
    factors = rng.standard_normal((3000, 16)).astype(np.float32)
    index = NormOrderedIndex(factors, first_block=256)
    frozen = np.zeros(3000, dtype=bool)
    frozen[::7] = True
    frozen.setflags(write=False)  # what RankingPipeline._disallowed hands out
    for disallowed in (None, frozen):
        for vector in (rng.standard_normal(16), rng.standard_normal(16).astype(np.float32)):
            blocked = index.positions(np.array([3, 5, 5, 2999]))
            (hits,) = index.search([Query(vector, 10, blocked, disallowed)])
            assert len(hits.ids) == 10
    assert len(search_one.signatures) == compiled


def test_kernel_blas_is_pinned_by_a_limit_taken_after_import() -> None:
    # A fresh interpreter: what `affinity serve` does (import, limit BLAS, then load and warm up).
    script = textwrap.dedent(
        """
        import models.kernels
        from threadpoolctl import threadpool_info, threadpool_limits
        threadpool_limits(1)
        models.kernels.warm_up()
        pools = {info["filepath"]: info["num_threads"] for info in threadpool_info()}
        assert any("scipy_openblas" in path for path in pools), pools
        assert all(n == 1 for n in pools.values()), pools
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
