"""Running on a shared CPU: how many threads torch may use, and OpenMP threads that sleep while they wait.

Two defaults of torch hurt a guard that runs beside other work (a web app, other workers, a test
suite):

- It starts one thread per core of the machine, whatever the process may really use: an affinity
  mask (``taskset``, a container's ``--cpuset-cpus``) or a cgroup CPU quota (``docker --cpus``,
  Kubernetes CPU limits). Each parallel step then waits for threads that are not running.
  :func:`fit_threads` lowers the count to :func:`available_cpus`; a backbone on the CPU calls it
  unless it was given ``num_threads``.
- OpenMP threads spin while they wait for work, taking the cores other processes need, which
  slows both. ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep instead, but OpenMP reads it only once,
  when torch is imported (and so when ``mlpm_guard`` is). It must therefore be in the environment
  before the process starts: the ``mlpm-guard`` command, ``make``, the Ray actors and Ray Serve
  replicas set it; an application that imports mlpm-guard sets it where it starts its process::

      OMP_WAIT_POLICY=PASSIVE python app.py

  :func:`passive_env` gives the variables for processes you start yourself (``subprocess``,
  ``multiprocessing``, a Ray ``runtime_env``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

#: The OpenMP variable that decides whether idle threads spin or sleep.
WAIT_POLICY = "OMP_WAIT_POLICY"
#: Variables through which a user names the thread count; :func:`fit_threads` then leaves it alone.
THREAD_COUNT_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def passive_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables that make a new process's OpenMP threads sleep while they wait.

    A value already in ``environ`` (default: this process's environment) is kept, so a user who
    chose another policy keeps it in the processes mlpm-guard starts.
    """
    environ = os.environ if environ is None else environ
    return {WAIT_POLICY: environ.get(WAIT_POLICY, "PASSIVE")}


def set_passive_wait(environ: dict[str, str] | None = None) -> None:
    """Put :func:`passive_env` into ``environ`` (default: ``os.environ``).

    It takes effect in this process only if torch has not been imported yet, and always in the
    processes started from it afterwards.
    """
    target = os.environ if environ is None else environ
    target.update(passive_env(target))


def affinity_cpus() -> int:
    """How many CPUs the scheduler lets this process run on (its affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``cpu.max`` of cgroup v2, ``cpu.cfs_quota_us``
    of v1): the smallest one on the way from its cgroup to the root, or ``None`` when there is none."""
    quotas = [q for folder, version in _cgroup_folders(root, proc_cgroup)
              if (q := _read_quota(folder, version)) is not None]
    return min(quotas) if quotas else None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs this process may really use: its affinity mask, capped by its cgroup quota.

    A fractional quota rounds down (at least 1): a thread more than the quota allows is throttled,
    and a parallel step waits for its slowest thread.
    """
    cpus = affinity_cpus()
    quota = cgroup_cpu_quota(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def fit_threads(environ: Mapping[str, str] | None = None) -> int:
    """Lower torch's CPU thread count to :func:`available_cpus`, and return the count in use.

    The count is left as it is when the environment names one (``OMP_NUM_THREADS`` or
    ``MKL_NUM_THREADS``, which Ray also sets for its workers) or is already small enough.
    """
    import torch

    environ = os.environ if environ is None else environ
    current = torch.get_num_threads()
    if any(environ.get(name) for name in THREAD_COUNT_VARS):
        return current
    cpus = available_cpus()
    if current > cpus:
        logger.debug("torch threads %d -> %d (the CPUs this process may use)", current, cpus)
        torch.set_num_threads(cpus)
    return torch.get_num_threads()


def _cgroup_folders(root: Path, proc_cgroup: Path) -> Iterator[tuple[Path, int]]:
    """The cgroup folders whose CPU quota binds this process, with their cgroup version.

    Each line of ``/proc/self/cgroup`` is ``id:controllers:path``; v2 has empty controllers. Inside a
    container the path may not exist under the mount (no cgroup namespace), and then the mount's
    own folder is the container's cgroup.
    """
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            mounts = [root, root / "unified"]
            version = 2
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            version = 1
        else:
            continue
        for mount in mounts:
            if mount.is_dir():
                yield from ((folder, version) for folder in _up_to(mount, path))
                break


def _up_to(mount: Path, path: str) -> list[Path]:
    """``mount/path`` and each of its parents up to ``mount`` (just ``mount`` if the path is not there)."""
    folder = mount / path.strip("/")
    if not folder.is_dir():
        return [mount]
    folders = [folder]
    while folder != mount:
        folder = folder.parent
        folders.append(folder)
    return folders


def _read_quota(folder: Path, version: int) -> float | None:
    """One folder's CPU quota in CPUs, or ``None`` when it has none (or it cannot be read)."""
    try:
        if version == 2:
            quota, _, period = (folder / "cpu.max").read_text(encoding="utf-8").strip().partition(" ")
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text(encoding="utf-8").strip()
            period = (folder / "cpu.cfs_period_us").read_text(encoding="utf-8").strip()
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period or 100_000)
    except (OSError, ValueError, ZeroDivisionError):
        return None
