"""``--cpus``: parsing, validation, which CPU each worker gets, and pinning every thread."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from models.errors import InvalidInputError
from service import cpus
from service.config import load_settings
from service.cpus import (
    cpu_for_worker,
    cpu_quota,
    format_cpu_list,
    parse_cpu_list,
    validate_spec,
)

LINUX = hasattr(os, "sched_getaffinity")


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", [0]), ("0-3,8", [0, 1, 2, 3, 8]), (" 5, 1 ,1-2", [1, 2, 5]), ("7-7", [7])],
)
def test_cpu_lists_parse_and_format_back(text: str, cpus: list[int]) -> None:
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus
    assert format_cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty entry"),
        ("1,,2", "empty entry"),
        ("one", "not a CPU number"),
        ("3-1", "bad CPU range"),
        ("-1", "not a CPU number"),
        ("1-2-3", "not a CPU number"),
    ],
)
def test_bad_cpu_lists_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_cpu_list(text)


def test_workers_take_cpus_from_the_end_of_the_list_and_wrap() -> None:
    assert [cpu_for_worker("2,5,7", slot, 4) for slot in range(4)] == [7, 5, 2, 7]
    assert cpu_for_worker("3", 0, 1) == 3  # a list pins whatever the worker count
    assert cpu_for_worker("off", 0, 1) is None
    if LINUX:
        allowed = sorted(os.sched_getaffinity(0))
        n = len(allowed)
        assert cpu_for_worker("auto", 0, n) == allowed[-1]
        assert cpu_for_worker("auto", n, n + 1) == allowed[-1]
        # Fewer workers than CPUs: the machine is shared, auto leaves scheduling to the OS.
        assert n == 1 or cpu_for_worker("auto", 0, n - 1) is None


def test_default_workers_follow_the_cpus_this_process_may_use() -> None:
    expected = len(os.sched_getaffinity(0)) if LINUX else (os.cpu_count() or 1)
    quota = cpu_quota()
    if quota is not None:
        expected = min(expected, math.ceil(quota - 1e-9))
    assert load_settings().workers == expected


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "garbage"}, None),
        ({"cpu.max": "100000 0"}, None),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),
        ({}, None),
    ],
)
def test_a_container_cpu_limit_is_read_from_cgroup_v2_or_v1(
    tmp_path: Path, files: dict[str, str], quota: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path, tmp_path / "no-membership-file") == quota


@pytest.mark.parametrize(
    ("membership", "files", "quota"),
    [
        # v2, a systemd unit with CPUQuota=250% under a slice limited to 4 CPUs.
        (
            "0::/system.slice/affinity.service\n",
            {
                "system.slice/affinity.service/cpu.max": "250000 100000",
                "system.slice/cpu.max": "400000 100000",
                "cpu.max": "max 100000",
            },
            2.5,
        ),
        # v2, the tighter limit on the parent.
        ("0::/a/b\n", {"a/b/cpu.max": "max 100000", "a/cpu.max": "100000 100000"}, 1.0),
        # v1 with cpu and cpuacct mounted together, a docker-like path.
        (
            "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n",
            {
                "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
            },
            3.0,
        ),
        # Memberships in other controllers only: no limit.
        ("4:memory:/x\n", {"memory/x/memory.limit_in_bytes": "1"}, None),
    ],
)
def test_the_limit_of_the_process_own_cgroup_and_its_parents_counts(
    tmp_path: Path, membership: str, files: dict[str, str], quota: float | None
) -> None:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "membership").write_text(membership)
    assert cpu_quota(root, tmp_path / "membership") == quota


def test_default_workers_are_capped_by_the_cpu_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "available_cpus", lambda: list(range(64)))
    monkeypatch.setattr(cpus, "cpu_quota", lambda: 1.5)
    assert cpus.default_workers() == 2  # 1.5 CPUs of time: two workers keep it busy
    monkeypatch.setattr(cpus, "cpu_quota", lambda: None)
    assert cpus.default_workers() == 64
    # Two workers for 64 CPUs: auto leaves them unpinned (the host is shared).
    assert cpus.cpu_for_worker("auto", 0, 2) is None


def test_the_setting_accepts_auto_off_and_available_cpus_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings(workers=1).cpus == "auto"
    assert load_settings(workers=1, cpus=" OFF ").cpus == "off"
    if not LINUX:
        return
    first = min(os.sched_getaffinity(0))
    monkeypatch.setenv("AFFINITY_CPUS", f"{first}-{first}")
    assert load_settings(workers=1).cpus == str(first)
    with pytest.raises(InvalidInputError, match=r"cpus \(AFFINITY_CPUS\).*CPU 100000 is not"):
        load_settings(workers=1, cpus="100000")
    with pytest.raises(InvalidInputError, match="bad CPU range"):
        load_settings(workers=1, cpus="4-2")
    assert validate_spec(f"{first},{first}") == str(first)


@pytest.mark.skipif(not LINUX, reason="CPU affinity is a Linux feature")
def test_pinning_covers_existing_and_later_threads() -> None:
    # In a child process: pinning the test process itself would slow the rest of the suite.
    script = textwrap.dedent(
        """
        import os, threading, time
        from pathlib import Path
        from service.cpus import pin_worker, validate_spec
        stop = threading.Event()
        early = threading.Thread(target=stop.wait)
        early.start()
        cpu = pin_worker(validate_spec("auto"), 0, len(os.sched_getaffinity(0)))
        late = threading.Thread(target=stop.wait)
        late.start()
        masks = {
            tid.name: os.sched_getaffinity(int(tid.name))
            for tid in Path("/proc/self/task").iterdir()
        }
        stop.set()
        print(cpu, len(masks), sorted({c for m in masks.values() for c in m}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    cpu, threads, cpus = done.stdout.split(maxsplit=2)
    assert int(cpu) == sorted(os.sched_getaffinity(0))[-1]
    assert int(threads) >= 3  # main, the thread started before pinning and the one after
    assert cpus.strip() == f"[{cpu}]"
