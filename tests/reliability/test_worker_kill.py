"""A worker killed with SIGKILL under load: the other workers keep answering and the supervisor
starts a replacement on the same port."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from bench.reliability import request_loop, serving

pytestmark = pytest.mark.slow


def test_sigkilled_worker_is_replaced_while_the_others_answer(
    artifact_dir: Path, tmp_path: Path
) -> None:
    users = [f"u{u:02d}" for u in range(60)]
    with serving(str(artifact_dir), tmp_path, workers=2) as server:
        before = server.workers()
        assert len(before) == 2
        with request_loop(server.target, 6.0, users, processes=2) as results:
            time.sleep(1.5)
            killed_at = time.time()
            os.kill(before[0], signal.SIGKILL)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                now = server.workers()
                if len(now) == 2 and before[0] not in now:
                    break
                time.sleep(0.05)
            replaced_at = time.time()
        assert before[0] not in server.workers() and before[1] in server.workers()
        assert replaced_at - killed_at < 5
        server.wait_serving(30)
        assert "restarting" in server.log_text()
    calls = [c for r in results for c in r.calls]
    ok_after_kill = [c for c in calls if c[0] > killed_at and not c[2].isupper()]
    # Answers keep coming during the outage: every half second after the kill has some.
    windows = {int((c[1] - killed_at) * 2) for c in ok_after_kill}
    last = int((max(c[1] for c in calls) - killed_at) * 2)
    assert set(range(last)) <= windows
    failed = [c for c in calls if c[2].isupper()]
    # Only requests on the killed worker's connection fail, and only until it reconnects.
    assert all(c[2] == "UNAVAILABLE" for c in failed)
    assert all(c[0] >= killed_at - 0.1 for c in failed)
