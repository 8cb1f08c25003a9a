"""Helpers shared by the benchmarks: CPU pinning, step timing on a shared machine, memory, machine.

Nothing here imports JAX or torch, so a parent process can orchestrate workers without paying for
(or perturbing) either runtime.

Timing on a shared machine: other processes may run during a benchmark. Every timed step
therefore records, besides its wall time, this process's CPU time and the CPU time that *other*
processes used meanwhile (system busy time from `/proc/stat`, including hypervisor steal, minus our
own). A step is reported as contended when others used more than `CONTENDED_CORES` of a core on
average during it (beyond the 10 ms clock-tick resolution of those counters).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

CONTENDED_CORES = 0.1  # others' average CPU use (in cores) above which a step counts as contended


def pin_to_cpus(cpus: Sequence[int]) -> None:
    """Restrict this process (and the threads it will create) to `cpus`.

    XLA:CPU sizes its thread pools from the CPU affinity mask, and torch/OpenMP respect it too, so
    this is what actually limits the thread count of both frameworks.
    """
    os.sched_setaffinity(0, set(cpus))


def first_cpus(n: int) -> list[int]:
    """The first `n` CPUs this process may run on."""
    allowed = sorted(os.sched_getaffinity(0))
    if n > len(allowed):
        raise SystemExit(f"--threads {n} exceeds the {len(allowed)} CPUs available ({allowed}).")
    return allowed[:n]


def _system_busy_s() -> float:
    """CPU seconds all processes have spent busy (incl. steal) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclasses.dataclass(frozen=True)
class Window:
    """Wall time, own CPU time, and other processes' CPU time over one interval."""

    wall_s: float
    own_cpu_s: float
    others_cpu_s: float

    @property
    def others_cores(self) -> float:
        return self.others_cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def contended(self) -> bool:
        """Others used > CONTENDED_CORES, beyond the 2-tick resolution of /proc/stat."""
        tick_s = 1 / os.sysconf("SC_CLK_TCK")
        return self.others_cpu_s > CONTENDED_CORES * self.wall_s + 2 * tick_s


class CpuClock:
    """Measures a `Window` between `start()` and `stop()`."""

    def start(self) -> None:
        self._t, self._own, self._busy = time.perf_counter(), _own_cpu_s(), _system_busy_s()

    def stop(self) -> Window:
        wall = time.perf_counter() - self._t
        own = _own_cpu_s() - self._own
        others = max(_system_busy_s() - self._busy - own, 0.0)
        return Window(wall, own, others)


def wait_for_quiet(max_wait_s: float, *, sample_s: float = 1.0) -> float:
    """Wait (up to `max_wait_s`) until other processes use < CONTENDED_CORES; returns their use.

    Returns the last sample's CPU use of other processes, in cores.
    """
    clock, deadline = CpuClock(), time.monotonic() + max_wait_s
    while True:
        clock.start()
        time.sleep(sample_s)
        window = clock.stop()
        if not window.contended or time.monotonic() >= deadline:
            return window.others_cores


def time_steps(step: Callable[[], Any], steps: int, *, quiet_wait_s: float = 0.0) -> dict[str, Any]:
    """Run `step` (which must block until its work is done) `steps` times; timing summary.

    First waits up to `quiet_wait_s` for other processes to go idle. Keys: median/min/max step
    seconds, per-step seconds, `cpu_util` (own CPU seconds per wall second, i.e. the threads
    actually busy), `others_cores` (other processes' mean CPU use during the timed steps),
    `contended_steps`, and `others_cores_before` (during the last second before timing).
    """
    others_before = wait_for_quiet(quiet_wait_s) if quiet_wait_s > 0 else None
    clock, windows = CpuClock(), []
    for _ in range(steps):
        clock.start()
        step()
        windows.append(clock.stop())
    return _summary(windows, others_before)


def time_interleaved(steps_by_name: dict[str, Callable[[], Any]], steps: int, *,
                     quiet_wait_s: float = 0.0) -> dict[str, dict[str, Any]]:
    """`time_steps` for several step functions at once, run round-robin (a, b, a, b, ...).

    Interleaving spreads any change in background load over every variant alike, which is what
    a ratio between them needs on a shared machine. Returns one `time_steps` summary per name.
    """
    others_before = wait_for_quiet(quiet_wait_s) if quiet_wait_s > 0 else None
    clock = CpuClock()
    windows: dict[str, list[Window]] = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            clock.start()
            step()
            windows[name].append(clock.stop())
    return {name: _summary(ws, others_before) for name, ws in windows.items()}


def _summary(windows: list[Window], others_before: float | None) -> dict[str, Any]:
    walls = [w.wall_s for w in windows]
    total_wall = sum(walls)
    return {
        "step_s": statistics.median(walls),
        "step_min_s": min(walls),
        "step_max_s": max(walls),
        "steps_s": [round(w, 4) for w in walls],
        "cpu_util": sum(w.own_cpu_s for w in windows) / total_wall,
        "others_cores": sum(w.others_cpu_s for w in windows) / total_wall,
        "contended_steps": sum(w.contended for w in windows),
        "others_cores_before": others_before,
    }


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (`ru_maxrss` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def machine() -> dict[str, Any]:
    """nproc, CPU model, total memory, as reported by the OS."""
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model(),
            "mem_gib": round(mem_kb / 2 ** 20, 1)}


RESULT_PREFIX = "BENCH_RESULT "
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_env(threads: int) -> dict[str, str]:
    """Environment of a pinned worker: `threads` OpenMP/MKL threads, the repository importable,
    TensorFlow's import chatter off."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                TF_CPP_MIN_LOG_LEVEL="2",
                PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def run_worker(args: Sequence[str], cpus: Sequence[int], env: dict[str, str],
               timeout_s: float) -> str:
    """Run `python <args>` pinned to `cpus`; return the payload of its `RESULT_PREFIX` line.

    Worker output is captured (JAX/TF import chatter) and shown only when the worker fails.
    """
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, preexec_fn=lambda: pin_to_cpus(cpus))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"worker {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return lines[-1][len(RESULT_PREFIX):]


def add_step_timing_args(parser: argparse.ArgumentParser, *, per: str) -> None:
    """The options every step-timing benchmark shares (`per`: what one worker times, e.g.
    "variant"): --steps, --warmup, --threads, --quiet-wait, --timeout, --json, --quick."""
    parser.add_argument("--steps", type=int, default=10, help=f"timed steps per {per}")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--threads", type=int, default=2, help=f"CPUs (threads) per {per}")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="max seconds each worker waits for other processes to go idle")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-worker timeout (s)")
    parser.add_argument("--json", action="store_true", help="print a JSON object as last line")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, to check the plumbing (the numbers mean nothing)")


def check_step_timing_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
