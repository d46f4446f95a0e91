"""How many CPU threads a command computes on, chosen once at its start (before any model loads) and said in its
banner: ``--threads N``, else ``IGPT_THREADS``, else a config file's ``threads``, else ``OMP_NUM_THREADS`` (torch
reads it at start: its count is kept), else on a resume the count the checkpoint was written with, else
:func:`auto`: the CPUs this process may use (affinity, cgroup quota) less those other processes keep busy now.

Why not torch's default, one thread per core it sees: every parallel region (each matmul) waits for its slowest
thread, and on a box where another process keeps a core busy the thread that lands there is descheduled for
whole time slices; each region waits for it. On 2 cores beside one busy process, sampling ran 13-400x slower on
torch's 2 threads than on 1 (README, "On a shared box"). On a GPU the CPU threads matter less: all usable CPUs.

Everything read from the system goes through :class:`System`, so the tests give any machine (affinity, cgroup
files, /proc/stat). Imports no torch at load; :func:`apply` and :func:`settle` import it.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from .errors import BadInput

ENV = "IGPT_THREADS"
SAMPLE_S = 0.25  # how long /proc/stat is watched for other processes' load (seconds)
CGROUP_ROOT = Path("/sys/fs/cgroup")


class Choice(NamedTuple):
    """A thread count and why, as the banner says it: ``1 (2 usable CPUs, 1 busy with other processes; ...)``."""
    threads: int
    reason: str

    def __str__(self) -> str:
        return f"{self.threads} ({self.reason})"


# ---------------------------------------------------------------- reading the system (Linux; elsewhere less)


def affinity() -> set[int]:
    """The CPUs the scheduler may run this process on (``taskset``, a batch system's cpuset); every CPU where the
    platform cannot say (macOS)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, membership: str | None = None) -> int | None:
    """The CPUs the cgroup CPU quota allows this process, ``ceil(quota / period)``, or None without a quota.

    Read for this process's cgroup and each above it (the tightest wins; a container sees its own as the root):
    cgroup v2 ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD": none), cgroup v1 ``cpu.cfs_quota_us`` (-1: none) and
    ``cpu.cfs_period_us`` under the cpu controller's mount. ``membership`` is /proc/self/cgroup's text."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            membership = ""
    limits = []
    for line in membership.splitlines() or ["0::/"]:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "/")
        if controllers == "":  # v2: one hierarchy
            mounts, v2 = [root], True
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own mount (cpu, or cpu,cpuacct)
            mounts, v2 = [root / controllers, root / "cpu"], False
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for mount in mounts:
            for depth in range(len(parts), -1, -1):
                limit = _quota(mount.joinpath(*parts[:depth]), v2)
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


def _quota(folder: Path, v2: bool) -> int | None:
    try:
        if v2:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        else:
            quota, period = ((folder / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        if quota == "max" or int(quota) <= 0 or int(period) <= 0:
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no such file here (not this hierarchy's level), or unreadable
        return None


def cpu_jiffies(cpus: set[int]) -> int:
    """Non-idle time of ``cpus`` since boot, summed (jiffies), from /proc/stat's ``cpuN`` lines: user, nice,
    system, irq, softirq and steal (idle and iowait are idle; guest time is inside user and nice)."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (list(map(int, fields)) + [0] * 8)[:8]
            total += user + nice + system + irq + softirq + steal
    return total


def own_jiffies() -> int:
    """This process's CPU time, all its threads (utime + stime, jiffies), from /proc/self/stat."""
    fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()  # after the name, which may hold spaces
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5); the list starts at field 3


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100


@dataclass(frozen=True)
class System:
    """Where :func:`auto` reads the machine from; a test passes its own readers."""
    affinity: Callable[[], set[int]] = affinity
    cgroup_limit: Callable[[], int | None] = cgroup_cpu_limit
    cpu_jiffies: Callable[[set[int]], int] = cpu_jiffies
    own_jiffies: Callable[[], int] = own_jiffies
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    hz: int = _clock_ticks()  # jiffies per second


SYSTEM = System()


# ---------------------------------------------------------------- the choice


def local_processes() -> int:
    """Processes of this run on this machine: a launcher's LOCAL_WORLD_SIZE (torchrun, accelerate launch), else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def usable(system: System = SYSTEM) -> tuple[int, str]:
    """The CPUs this process may use: its affinity, capped by the cgroup quota, shared among the run's processes
    on this machine; and the words for it."""
    cpus, quota = len(system.affinity()), system.cgroup_limit()
    n = min(cpus, quota) if quota else cpus
    words = f"{n} usable CPU{'s' * (n != 1)}" + (f" (the cgroup quota; {cpus} in affinity)" if quota and quota < cpus
                                                 else "")
    local = local_processes()
    if local > 1:
        share = max(1, n // local)
        return share, f"{share} of {words} for each of {local} processes on this machine"
    return n, words


def busy(cpus: set[int], system: System = SYSTEM, seconds: float = SAMPLE_S) -> int:
    """How many of ``cpus`` other processes keep busy now: their non-idle time over ``seconds`` less this
    process's own, in CPUs (rounded to the nearest), at most ``len(cpus)``. OSError where /proc cannot say."""
    t0, all0, own0 = system.clock(), system.cpu_jiffies(cpus), system.own_jiffies()
    system.sleep(seconds)
    t1, all1, own1 = system.clock(), system.cpu_jiffies(cpus), system.own_jiffies()
    elapsed = (t1 - t0) * system.hz
    if elapsed <= 0:
        return 0
    others = max(0, (all1 - all0) - (own1 - own0)) / elapsed
    return min(len(cpus), int(others + 0.5))


def auto(gpu: bool = False, system: System = SYSTEM) -> Choice:
    """The default: the usable CPUs (:func:`usable`) less the CPUs other processes keep busy now (:func:`busy`,
    counted on the CPUs of this process's affinity, so a quota in a container on a busy host still gets its
    share), at least 1. On a GPU, or with several processes of the run on this machine (they would count each
    other, busy loading), the usable CPUs alone."""
    n, words = usable(system)
    hint = "; --threads to choose"
    if gpu or local_processes() > 1:
        return Choice(n, words + (", device cuda" if gpu else "") + hint)
    cpus = system.affinity()
    try:
        taken = busy(cpus, system)
    except (OSError, ValueError, IndexError):  # no /proc (macOS), or a format it does not know
        return Choice(n, f"{words}, their load not measurable here{hint}")
    free = max(1, min(n, len(cpus) - taken))
    return Choice(free, f"{words}, {taken} busy with other processes{hint}")


def env_threads() -> int | None:
    """``IGPT_THREADS`` as a count, None when unset or empty; any other value than a whole number >= 1 is
    BadInput naming the variable (exit 2, before any work)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise BadInput([f"{ENV}={raw}: must be a whole number of threads >= 1 (unset it for the automatic choice)"])
    return n


def choose(flag: int | None = None, configured: int = 0, gpu: bool = False, resumed: tuple[str, int] | None = None,
           system: System = SYSTEM) -> Choice:
    """The thread count, first of: ``--threads`` (``flag``), IGPT_THREADS, the config file's ``threads``
    (``configured``; 0 = auto), OMP_NUM_THREADS (torch's count, which read it, kept), the count checkpoint
    ``resumed`` = (name, threads) was written with if the usable CPUs allow it (a resume on the same threads is
    bit-identical to an uninterrupted run; on a CPU only), else :func:`auto`."""
    if flag:
        return Choice(flag, "--threads")
    env = env_threads()
    if env:
        return Choice(env, f"{ENV}={env}")
    if configured:
        return Choice(configured, "threads in the config file")
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp:  # torch's count as it stands (it read the variable when it started), not the variable read again
        import torch

        return Choice(torch.get_num_threads(), f"torch's, from OMP_NUM_THREADS={omp}; --threads to choose")
    if resumed and not gpu:
        n, words = usable(system)
        if resumed[1] <= n:
            return Choice(resumed[1], f"as {resumed[0]} was written, so the resume is bit-identical; {words}; "
                                      "--threads to choose")
    return auto(gpu, system)


def apply(threads: int) -> None:
    """torch's intra-op threads (each matmul's), and its inter-op pool where it has not started yet (torch
    refuses to resize it once it has)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # "cannot set number of interop threads after parallel work has started or set"
        pass


_CHOSEN: Choice | None = None


def settle(flag: int | None, configured: int, device: str, resumed: tuple[str, int] | None = None) -> Choice:
    """Choose (:func:`choose`) and apply the threads of this command, once, at its start; kept for the banner
    (:func:`banner_row`) and the manifest (:func:`current`). ``device`` is the ``--device`` setting: cuda, or
    auto on a machine with a CUDA GPU, takes the GPU rule (a device that does not exist fails later, checked)."""
    global _CHOSEN
    import torch

    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    _CHOSEN = choose(flag, configured, gpu, resumed)
    apply(_CHOSEN.threads)
    return _CHOSEN


def current() -> int:
    """The threads this command runs on (torch's count: the settled one, or whatever a caller from Python set)."""
    import torch

    return torch.get_num_threads()


def banner_row() -> dict[str, str]:
    """``{"threads": "1 (2 usable CPUs, 1 busy with other processes; --threads to choose)"}``, or nothing before
    :func:`settle` (a stage run from Python, not the command line)."""
    return {"threads": str(_CHOSEN)} if _CHOSEN is not None else {}
