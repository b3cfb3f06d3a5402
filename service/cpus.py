"""Pinning each server process to one CPU (``--cpus``, ``AFFINITY_CPUS``).

A worker is one Python interpreter: its request threads take turns holding the interpreter lock,
and gRPC's own threads hand every request and response to them. When the operating system
spreads those threads over several CPUs, each hand-over wakes a thread on another CPU whose
caches do not hold the request's data (the search's item factors, the interpreter's state).
Pinned to one CPU, the hand-overs stay local: on the 2-core benchmark machine a pinned worker
answered more requests per second than an unpinned one, with a lower p99 (``docs/benchmarks.md``,
"Where the time goes": pinning). Workers are pinned to different CPUs, so ``--workers N`` on N
CPUs still uses them all.

The spec is ``auto``, ``off`` (the OS schedules freely) or a list such as ``2-5,8``. Worker ``i``
gets the ``i``-th CPU counted from the end of the list, wrapping around when there are more
workers than CPUs (CPU 0 often takes more of the machine's interrupts, so a single worker avoids
it). ``auto`` pins, over the CPUs this process may run on, only when the workers cover all of
them (the default: one worker per CPU): a server with fewer workers than CPUs shares the machine
with something else, and several such servers pinning themselves would all pick the same CPU.
Give them a list each to pin them.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)

AUTO = "auto"
OFF = "off"


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8"`` -> ``[0, 1, 2, 3, 8]`` (sorted, no repeats); raises ValueError with a reason."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            raise ValueError(f"empty entry in CPU list {text!r}")
        low, dash, high = part.partition("-")
        try:
            first = int(low)
            last = int(high) if dash else first
        except ValueError:
            raise ValueError(f"{part!r} is not a CPU number or a range like 2-5") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def available_cpus() -> list[int] | None:
    """The CPUs this process may run on, or None where the platform cannot pin (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))


def cpu_quota(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> float | None:
    """CPUs' worth of time the cgroup quota allows (a container's or a systemd unit's CPU
    limit), or None if unlimited.

    Looks in this process's own cgroup (from ``/proc/self/cgroup``) and each of its parents, and
    returns the tightest limit: cgroup v2 ``cpu.max`` (``"200000 100000"``: 2 CPUs; ``"max
    100000"``: no limit) or cgroup v1 ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (quota -1:
    no limit). Anything unreadable counts as no limit.
    """
    folders: list[Path] = []
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "":  # v2: one hierarchy under root
            base = root
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            base = root / controllers if (root / controllers).is_dir() else root / "cpu"
        else:
            continue
        folder = base / path.strip().lstrip("/")
        folders += [folder, *[p for p in folder.parents if p.is_relative_to(base)]]
    folders += [root, root / "cpu"]  # no membership file: the mounted root (a container's own)
    limits = [q for q in map(_folder_quota, dict.fromkeys(folders)) if q is not None]
    return min(limits) if limits else None


def _folder_quota(folder: Path) -> float | None:
    try:
        v2 = folder / "cpu.max"
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100000)
        v1 = folder / "cpu.cfs_quota_us"
        if v1.is_file():
            quota_us = int(v1.read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return None


def default_workers() -> int:
    """One worker per CPU the server may use: its affinity mask, capped by a CPU quota."""
    count = len(available_cpus() or ()) or os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota - 1e-9)))
    return count


def validate_spec(spec: str) -> str:
    """Normalize a ``--cpus`` value; a list must name CPUs this process may run on."""
    value = spec.strip().lower()
    if value in (AUTO, OFF):
        return value
    cpus = parse_cpu_list(value)
    allowed = available_cpus()
    if allowed is not None:
        missing = sorted(set(cpus) - set(allowed))
        if missing:
            raise ValueError(
                f"CPU {', '.join(map(str, missing))} is not available to this process "
                f"(it may run on {format_cpu_list(allowed)})"
            )
    return ",".join(map(str, cpus))


def format_cpu_list(cpus: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def cpu_for_worker(spec: str, slot: int, workers: int) -> int | None:
    """The CPU worker ``slot`` of ``workers`` is pinned to under ``spec``, or None for none."""
    if spec == OFF:
        return None
    cpus = available_cpus() if spec == AUTO else parse_cpu_list(spec)
    if not cpus or (spec == AUTO and workers < len(cpus)):
        return None
    return cpus[len(cpus) - 1 - slot % len(cpus)]


def pin_process(cpu: int) -> None:
    """Pin every thread of this process, and the threads they start later, to ``cpu``.

    ``sched_setaffinity`` applies to one thread; threads that already exist (gRPC's, BLAS's)
    are pinned one by one from ``/proc/self/task``, and new threads inherit their creator's mask.
    """
    tasks = Path("/proc/self/task")
    tids = [int(p.name) for p in tasks.iterdir()] if tasks.is_dir() else [0]  # 0: this thread
    for tid in tids:
        try:
            os.sched_setaffinity(tid, {cpu})
        except ProcessLookupError:  # the thread ended meanwhile
            continue


def pin_worker(spec: str, slot: int, workers: int) -> int | None:
    """Pin this server process (worker ``slot`` of ``workers``) per ``spec``; returns the CPU, or
    None when not pinned."""
    cpu = cpu_for_worker(spec, slot, workers)
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        n_cpus = len(available_cpus() or ())
        if spec == AUTO and workers < n_cpus:
            logger.info(
                "not pinned to a CPU: %d worker(s) for %d CPUs (--cpus LIST pins anyway)",
                workers,
                n_cpus,
            )
        return None
    try:
        pin_process(cpu)
    except OSError as exc:  # a container may forbid it; serving unpinned still works
        logger.warning("could not pin the server to CPU %d: %s", cpu, exc)
        return None
    logger.info("pinned to CPU %d", cpu, extra={"cpu": cpu})
    return cpu
