"""How many CPU threads the engine runs: ``model.num_threads``, or by default the CPUs its container may use.

Why not the host's core count (torch's default): in a container with a CPU limit (Kubernetes'
``resources.limits.cpu``), the cgroup's quota caps the CPU time per period. Threads beyond the quota's CPUs
spend it early in each period, and then every thread of the process waits, throttled, for the next one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2's ``cpu.max`` ("200000 100000" = 2 CPUs; "max 100000" = no limit) as CPUs, None for no limit."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1's ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` as CPUs; a quota of -1 means no limit."""
    return _ratio(quota_text.strip(), period_text.strip())


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # a file we do not understand limits nothing
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The tightest CPU quota over this process's cgroups and their ancestors (v1 or v2), in CPUs; None if none.

    ``membership`` is the text of /proc/self/cgroup. Its paths are the host's where the container has no cgroup
    namespace, while the container's own cgroup is mounted at the root: walking up from the listed path to the
    mount's top reads both cases.
    """
    if membership is None:
        try:
            membership = PROC_CGROUP.read_text()
        except OSError:
            return None
    limits: list[float] = []
    for line in membership.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2: one unified hierarchy
            limits += [v for f in _up_from(root, path) if (v := _read_v2(f)) is not None]
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            for mount in (root / controllers, root / "cpu"):
                limits += [v for f in _up_from(mount, path) if (v := _read_v1(f)) is not None]
    return min(limits, default=None)


def _up_from(mount: Path, path: str) -> list[Path]:
    """mount/path and each of its parents up to mount itself."""
    folder = mount / path.strip("/")
    return [folder, *[p for p in folder.parents if p.is_relative_to(mount)]]


def _read_v2(folder: Path) -> float | None:
    try:
        return parse_cpu_max((folder / "cpu.max").read_text())
    except OSError:
        return None


def _read_v1(folder: Path) -> float | None:
    try:
        return parse_cfs((folder / "cpu.cfs_quota_us").read_text(), (folder / "cpu.cfs_period_us").read_text())
    except OSError:
        return None


def available_cpus() -> int:
    """The CPUs this process may be scheduled on (its affinity mask, which taskset and cpusets narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads(cpus: int, limit: float | None) -> int:
    """One thread per CPU the quota grants, rounded down (1.5 CPUs: 1 thread that is never throttled), at most
    ``cpus`` and at least 1."""
    if limit is None:
        return max(1, cpus)
    return max(1, min(cpus, int(limit)))


def set_threads(num_threads: int) -> int:
    """Give torch ``num_threads`` intra-op threads (0: the default above) for this thread; returns the count."""
    if num_threads == 0:
        cpus, limit = available_cpus(), cgroup_cpu_limit()
        num_threads = default_threads(cpus, limit)
        log.info("CPU threads: %d (%d CPUs available, cgroup quota %s)", num_threads, cpus, limit or "none")
    torch.set_num_threads(num_threads)
    return num_threads
