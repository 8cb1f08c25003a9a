"""Run one command as N cooperating processes on this machine: a multi-host run in miniature.

    python launch/local.py --processes 2 --devices 2 -- \\
        peftjax train --config configs/tiny.py --workdir runs/tiny_2x2
    python launch/local.py --processes 2 --devices 2 -- \\
        peftjax eval --config configs/tiny.py --workdir runs/tiny_2x2

Each process gets PEFTJAX_COORDINATOR=127.0.0.1:<free port>, PEFTJAX_NUM_PROCESSES=N and its own
PEFTJAX_PROCESS_ID (read by `peftjax`, see peftjax/distributed.py) and, with `--devices M`, M
forced CPU devices (`--xla_force_host_platform_device_count=M` in XLA_FLAGS, JAX_NUM_CPU_DEVICES=M,
JAX_PLATFORMS=cpu). A leading `peftjax` runs as `<this python> -m peftjax.cli`, so the children
use the launcher's own environment. Every output line is prefixed with `[pI]`. If a process
fails, the others are killed and the launcher exits with the failure's code; SIGTERM / SIGINT
sent to the launcher are forwarded to every process (a preempted run can checkpoint).

From Python (tests, bench/multiprocess_check.py): `launch(command, processes=..., devices=...)`
returns a `Result`; `train_losses(...)` runs `peftjax train` that way and returns its per-step
losses read from the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

if __package__ in (None, ""):  # run as a script: make `launch` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import LaunchError, parse, positive  # noqa: E402

_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")
KILL_GRACE_SECONDS = 5.0
TIMEOUT_EXIT_CODE = 124


@dataclasses.dataclass
class Result:
    """How the processes ended: `returncode` 0 if all succeeded, else the first failure's code
    (negative: killed by that signal; 124: the launcher's timeout); `output` holds every
    process's lines, `[pI]`-prefixed, in arrival order."""

    returncode: int
    returncodes: list[int | None]
    output: str
    failed: int | None = None  # the process whose failure ended the run


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_command(command: Sequence[str]) -> list[str]:
    """A leading `peftjax` becomes `<this python> -m peftjax.cli` (this environment's peftjax)."""
    command = list(command)
    if command and command[0] == "peftjax":
        return [sys.executable, "-m", "peftjax.cli", *command[1:]]
    return command


def process_env(base: Mapping[str, str], *, process_id: int, processes: int, coordinator: str,
                devices: int | None) -> dict[str, str]:
    """The environment of process `process_id`: coordinator settings and forced CPU devices."""
    env = dict(base)
    env.update(PEFTJAX_COORDINATOR=coordinator, PEFTJAX_NUM_PROCESSES=str(processes),
               PEFTJAX_PROCESS_ID=str(process_id))
    if devices is not None:
        # Replace (not add to) any device count inherited from the caller, e.g. a test session.
        flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        env["JAX_NUM_CPU_DEVICES"] = str(devices)  # overrides the XLA flag when set: keep equal
        env["JAX_PLATFORMS"] = "cpu"
    return env


def launch(command: Sequence[str], *, processes: int, devices: int | None = None,
           env: Mapping[str, str] | None = None, cwd: str | None = None,
           echo: TextIO | None = None, timeout: float | None = None,
           forward_signals: bool = False) -> Result:
    """Run `command` as `processes` processes joined through a coordinator on 127.0.0.1.

    Args:
      devices: forced CPU devices per process (None: leave the platform alone).
      env: the base environment (default os.environ); the PEFTJAX_* variables are added.
      echo: where to print the prefixed lines as they come (e.g. sys.stdout); None: only collect.
      timeout: seconds before every process is killed (Result.returncode 124).
      forward_signals: forward SIGTERM / SIGINT to the processes while waiting (main thread only).
    """
    if processes < 1:
        raise LaunchError(f"--processes must be >= 1, got {processes}.")
    if devices is not None and devices < 1:
        raise LaunchError(f"--devices must be >= 1, got {devices}.")
    if not command:
        raise LaunchError("No command to run.")
    argv = resolve_command(command)
    coordinator = f"127.0.0.1:{free_port()}"
    base = os.environ if env is None else env
    children: list[subprocess.Popen] = []
    collected = io.StringIO()
    lock = threading.Lock()

    def pump(index: int, stream: TextIO) -> None:
        for line in stream:
            text = f"[p{index}] {line.rstrip(chr(10))}\n"
            with lock:
                collected.write(text)
                if echo is not None:
                    echo.write(text)
                    echo.flush()

    readers = []
    previous = _forward(children) if forward_signals else {}
    try:
        for index in range(processes):
            child = subprocess.Popen(
                argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                bufsize=1, start_new_session=True,  # own group: signals reach only what we send
                env=process_env(base, process_id=index, processes=processes,
                                coordinator=coordinator, devices=devices))
            children.append(child)
            reader = threading.Thread(target=pump, args=(index, child.stdout), daemon=True)
            reader.start()
            readers.append(reader)
        returncode, failed = _wait(children, timeout)
    finally:
        _kill(children)
        for reader in readers:
            reader.join(timeout=KILL_GRACE_SECONDS)
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    return Result(returncode, [c.returncode for c in children], collected.getvalue(), failed)


def _wait(children: list[subprocess.Popen], timeout: float | None) -> tuple[int, int | None]:
    """Wait for all; at the first failure (or the timeout) kill the rest.

    Returns (exit code, index of the failed process or None)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [c.poll() for c in children]
        failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None:
            _kill(children)
            return codes[failed], failed
        if all(code == 0 for code in codes):
            return 0, None
        if deadline is not None and time.monotonic() > deadline:
            _kill(children)
            return TIMEOUT_EXIT_CODE, None
        time.sleep(0.05)


def _kill(children: list[subprocess.Popen]) -> None:
    """SIGTERM every running process group, SIGKILL what is left after a grace period."""
    running = [c for c in children if c.poll() is None]
    for child in running:
        _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    for child in running:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child, signal.SIGKILL)
            child.wait()


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(child.pid, signum)  # the child's own session: it and what it started


def _forward(children: list[subprocess.Popen]) -> dict:
    """Forward SIGTERM / SIGINT to the children (those started so far and later ones)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, _frame):
        for child in children:
            if child.poll() is None:
                _signal_group(child, signum)

    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


# ------------------------------------------------------------- runs and their losses --


def read_losses(workdir: str) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl (the train records; eval records carry no loss)."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def train_losses(args: Sequence[str], workdir: str, *, processes: int, devices: int,
                 env: Mapping[str, str] | None = None, cwd: str | None = None,
                 timeout: float | None = 600) -> tuple[dict[int, float], Result]:
    """`peftjax train ARGS --workdir WORKDIR` on `processes` x `devices` CPU devices.

    Returns the run's {step: loss} (every step logged so far in the workdir, resumed runs
    included) and the launch Result. Raises RuntimeError with the output's tail if it failed.
    """
    result = launch(["peftjax", "train", *args, "--workdir", workdir], processes=processes,
                    devices=devices, env=env, cwd=cwd, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"peftjax train on {processes} process(es) x {devices} devices "
                           f"failed with code {result.returncode}:\n{result.output[-4000:]}")
    return read_losses(workdir), result


# ------------------------------------------------------------------------------ CLI --


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/local.py", usage="%(prog)s --processes N [--devices M] -- COMMAND ...",
        description="Run COMMAND as N processes of one multi-process JAX run on this machine.")
    parser.add_argument("--processes", type=positive, required=True,
                        help="number of processes (each one a JAX process)")
    parser.add_argument("--devices", type=positive, default=None,
                        help="forced CPU devices per process (default: the platform's own)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after which every process is killed (exit code 124)")
    options, command = parse(parser, sys.argv[1:] if argv is None else argv)
    result = launch(command, processes=options.processes, devices=options.devices,
                    echo=sys.stdout, timeout=options.timeout, forward_signals=True)
    if result.returncode != 0:
        why = "timed out" if result.failed is None else f"p{result.failed} failed"
        print(f"launch/local.py: {why} (exit code {result.returncode}); the other processes "
              "were stopped.", file=sys.stderr)
    return result.returncode if result.returncode >= 0 else 128 - result.returncode


if __name__ == "__main__":
    sys.exit(main())
