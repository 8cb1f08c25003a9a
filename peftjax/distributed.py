"""Multi-process JAX: joining the processes of one run, and which batch rows each one feeds.

One run may span several processes (one per TPU VM host, one per GPU under SLURM, or several on
one machine for tests), joined by `jax.distributed` before anything touches a JAX device:

    peftjax train ... --coordinator 10.0.0.2:8476 --num_processes 2 --process_id 0
    PEFTJAX_COORDINATOR=10.0.0.2:8476 PEFTJAX_NUM_PROCESSES=2 PEFTJAX_PROCESS_ID=0 peftjax train ...
    peftjax train ... --distributed=auto     # TPU pods, SLURM: JAX finds the rest itself

Nothing given: one process, as without this module. On CPU the processes exchange collectives
over gloo (`jax_cpu_collectives_implementation`, JAX's default once `jax.distributed` is up; no
setting needed). Each process's CPU device count comes from its own environment:
`--xla_force_host_platform_device_count=M` in XLA_FLAGS, or JAX_NUM_CPU_DEVICES
(`jax_num_cpu_devices`, which wins when set); `launch/local.py --devices M` sets both.

Every process reads the same global batch and keeps its own rows of it (`batch_shard`), so the
data a step sees does not depend on how many processes there are.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

ENV_COORDINATOR = "PEFTJAX_COORDINATOR"
ENV_NUM_PROCESSES = "PEFTJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "PEFTJAX_PROCESS_ID"
AUTO = "auto"


class DistributedError(ValueError):
    """Inconsistent multi-process settings (flags / environment)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to join the run; `coordinator is None and not auto` means a single process."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @property
    def single_process(self) -> bool:
        return not self.auto and self.coordinator is None


def _int(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {value!r}.") from None


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, mode: str | None = None,
             environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from CLI flags, each falling back to its PEFTJAX_* environment variable.

    Args:
      coordinator: HOST:PORT of process 0's coordination service.
      num_processes, process_id: this run's process count and this process's index.
      mode: None, or "auto" for `jax.distributed.initialize()` to detect the cluster (Cloud TPU,
        SLURM, ...); values given explicitly are passed on and override what it detects.
    """
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    num = num_processes if num_processes is not None else _int(
        env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    if mode not in (None, "", AUTO):
        raise DistributedError(f"--distributed={mode!r} is unknown; use --distributed=auto (or "
                               "leave it out and give --coordinator, --num_processes, "
                               "--process_id).")
    result = Settings(coordinator, num, pid, auto=mode == AUTO)
    _check(result)
    return result


def _check(s: Settings) -> None:
    if s.coordinator is not None:
        host, _, port = s.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(f"--coordinator must be HOST:PORT (process 0's address), got "
                                   f"{s.coordinator!r}.")
    if s.num_processes is not None and s.num_processes < 1:
        raise DistributedError(f"--num_processes must be >= 1, got {s.num_processes}.")
    if s.process_id is not None and s.process_id < 0:
        raise DistributedError(f"--process_id must be >= 0, got {s.process_id}.")
    if (s.num_processes is not None and s.process_id is not None
            and s.process_id >= s.num_processes):
        raise DistributedError(f"--process_id {s.process_id} is not below --num_processes "
                               f"{s.num_processes}; process ids run 0 .. num_processes - 1.")
    if s.auto:
        return
    given = {"--coordinator": s.coordinator, "--num_processes": s.num_processes,
             "--process_id": s.process_id}
    missing = [name for name, value in given.items() if value is None]
    if s.coordinator is None and len(missing) < 3:
        raise DistributedError(
            f"{', '.join(n for n in given if n not in missing)} given without "
            f"{', '.join(missing)}: a multi-process run needs all three (or env "
            f"{ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}), or "
            "--distributed=auto on a TPU pod or under SLURM.")
    if s.coordinator is not None and missing:
        raise DistributedError(
            f"--coordinator given without {' and '.join(missing)}: every process needs the "
            f"process count and its own id (or env {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}); "
            "use --distributed=auto to let JAX detect them on a TPU pod or under SLURM.")


def initialize(s: Settings) -> bool:
    """Joins the run's processes (`jax.distributed.initialize`); call before any JAX device is
    used. Returns whether this is a multi-process run; a no-op for a single process and when
    already initialised (tests that call the CLI twice in one process)."""
    if s.single_process:
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {"coordinator_address": s.coordinator, "num_processes": s.num_processes,
              "process_id": s.process_id}
    try:
        jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    except ValueError as e:  # auto-detection found no cluster (JAX: "... should be defined")
        raise DistributedError(
            f"jax.distributed.initialize failed: {e} --distributed=auto detects Cloud TPU pods, "
            "SLURM, Open MPI and Kubernetes jobs; elsewhere give --coordinator HOST:PORT "
            "--num_processes N --process_id I (or launch with launch/local.py).") from e
    return True


def describe() -> str:
    """One line naming this process and its devices, e.g. for the launcher's prefixed logs."""
    return (f"Process {jax.process_index()} of {jax.process_count()}: "
            f"{jax.local_device_count()} local of {jax.device_count()} "
            f"{jax.devices()[0].platform} devices.")


def same_on_all_processes(value: bool) -> bool:
    """Process 0's `value` on every process (waits for all of them): for decisions every
    process must make alike, e.g. whether a checkpoint directory exists yet."""
    if jax.process_count() == 1:
        return value
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def batch_shard(sharding: Sharding, batch_size: int) -> tuple[int, int]:
    """`(shard_index, num_shards)`: this process feeds rows [i*B/n, (i+1)*B/n) of each global
    batch of `batch_size` rows placed with `sharding` (see `data.train_batches`).

    Processes whose devices hold the same rows (the batch replicated over a mesh axis that spans
    processes) get the same shard. (0, 1) for a single process.
    """
    if jax.process_count() == 1:
        return 0, 1
    try:
        indices = sharding.devices_indices_map((batch_size,))
    except ValueError as e:
        raise DistributedError(f"config.data.batch_size={batch_size} does not split over the "
                               f"batch axes of the mesh ({e}); make it a multiple of the "
                               "data x fsdp mesh size.") from e
    rows: dict[int, list[tuple[int, int]]] = {}
    for device, index in indices.items():
        start, stop, _ = index[0].indices(batch_size)
        rows.setdefault(device.process_index, []).append((start, stop))
    return shard_of(rows, batch_size, jax.process_index())


def shard_of(rows: Mapping[int, list[tuple[int, int]]], batch_size: int,
             process: int) -> tuple[int, int]:
    """`(shard_index, num_shards)` of `process`, given the (start, stop) row ranges of a batch
    that each process's devices hold. Raises DistributedError unless every process holds one
    contiguous block and the distinct blocks split the batch into equal parts."""
    blocks = {p: _contiguous(sorted(set(r))) for p, r in rows.items()}
    distinct = sorted({b for b in blocks.values() if b is not None})
    size = batch_size // max(len(distinct), 1)
    expected = [(i * size, (i + 1) * size) for i in range(len(distinct))]
    if None in blocks.values() or distinct != expected:
        raise DistributedError(
            f"The batch sharding gives the processes rows {dict(sorted(rows.items()))} of each "
            f"batch of {batch_size}, not one equal contiguous block each; keep the mesh's "
            "devices in jax.devices() order (as peftjax.sharding.make_mesh does), so that each "
            "process's devices hold neighbouring rows.")
    return distinct.index(blocks[process]), len(distinct)


def _contiguous(ranges: list[tuple[int, int]]) -> tuple[int, int] | None:
    """One (start, stop) covering sorted ranges that touch or overlap; None if there is a gap."""
    start, stop = ranges[0]
    for a, b in ranges[1:]:
        if a > stop:
            return None
        stop = max(stop, b)
    return start, stop
