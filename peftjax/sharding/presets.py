"""Mesh presets: `config.mesh.preset` picks the mesh shape; the rules table stays the same.

    preset    mesh (N devices)                       what shards
    ""        config.mesh.shape as given             (default: data = N, as "dp")
    dp        data = N                               the batch; every weight replicated
    fsdp      fsdp = N                               the batch, and every weight's `embed` dim
    fsdp_tp   fsdp = N / tp, model = tp              as fsdp, plus heads / MLP / vocabulary
              (tp = config.mesh.tensor_parallel)     over `model` (tensor parallelism)

One rules table (`config.mesh.rules`, default `DEFAULT_RULES`) serves every preset, as in
MaxText: a mesh axis of size 1 drops out of every PartitionSpec, so the presets differ only in
the shape. `mesh_from_config` is the one place a run's mesh is resolved (`peftjax.train.build`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from peftjax.sharding.mesh import MESH_AXES, check_rules, make_mesh

PRESETS: dict[str, str] = {
    "dp": "pure data parallel: every device on `data`, weights replicated",
    "fsdp": "FSDP: every device on `fsdp`; weights' embed dim sharded, batch over data x fsdp",
    "fsdp_tp": "FSDP + tensor parallel: `model` of size config.mesh.tensor_parallel, the rest "
               "on `fsdp`",
}

# What `config.mesh.shape` is unless a user sets it: a preset may only be combined with it.
DEFAULT_SHAPE = {"data": -1, "fsdp": 1, "model": 1}
DEFAULT_TENSOR_PARALLEL = 2  # divides the head count of every T5 size (6 in small, 64 in xxl)


def _config_error_type() -> type[ValueError]:
    # peftjax.config imports the rules table from this package, so import its error lazily.
    from peftjax.config import ConfigError

    return ConfigError


def _config_error(message: str) -> ValueError:
    return _config_error_type()(message)


def _normalised(shape) -> dict[str, int]:
    return {axis: int(dict(shape).get(axis, 1)) for axis in MESH_AXES}


def preset_shape(preset: str, num_devices: int,
                 tensor_parallel: int = DEFAULT_TENSOR_PARALLEL) -> dict[str, int]:
    """The mesh shape `{data, fsdp, model}` of a preset on `num_devices` devices."""
    if preset not in PRESETS:
        raise _config_error(
            f"config.mesh.preset={preset!r} is not a mesh preset; use one of "
            f"{sorted(PRESETS)}, or '' to use config.mesh.shape as given.")
    if preset == "dp":
        return {"data": num_devices, "fsdp": 1, "model": 1}
    if preset == "fsdp":
        return {"data": 1, "fsdp": num_devices, "model": 1}
    if tensor_parallel < 1 or num_devices % tensor_parallel:
        raise _config_error(
            f"config.mesh.tensor_parallel={tensor_parallel} does not divide the {num_devices} "
            f"device(s) of preset 'fsdp_tp'; set it to a divisor of {num_devices} (e.g. "
            f"{math.gcd(num_devices, DEFAULT_TENSOR_PARALLEL)}).")
    return {"data": 1, "fsdp": num_devices // tensor_parallel, "model": tensor_parallel}


def mesh_shape(mesh_config: ConfigDict, num_devices: int) -> dict[str, int]:
    """`config.mesh`'s shape: the preset's, or `config.mesh.shape` when no preset is set.

    A preset together with a changed `config.mesh.shape` (or `tensor_parallel` without
    `fsdp_tp`) is an error rather than a silent precedence: one of the two would be ignored.
    """
    preset = mesh_config.get("preset", "")
    tensor_parallel = int(mesh_config.get("tensor_parallel", DEFAULT_TENSOR_PARALLEL))
    if preset != "fsdp_tp" and tensor_parallel != DEFAULT_TENSOR_PARALLEL:
        raise _config_error(
            f"config.mesh.tensor_parallel={tensor_parallel} is read by "
            f"config.mesh.preset='fsdp_tp' only (the preset is {preset!r}); set the preset to "
            "'fsdp_tp', or size the `model` axis in config.mesh.shape with preset=''.")
    if not preset:
        return dict(mesh_config.shape)
    if _normalised(mesh_config.shape) != _normalised(DEFAULT_SHAPE):
        raise _config_error(
            f"config.mesh.preset={preset!r} sets the mesh shape, but config.mesh.shape was also "
            f"set ({dict(mesh_config.shape)}); keep one: set config.mesh.preset='' to use the "
            "shape, or leave config.mesh.shape at its default to use the preset.")
    return preset_shape(preset, num_devices, tensor_parallel)


def check_batch_sizes(mesh: Mesh, data_config: ConfigDict,
                      keys: Sequence[str] = ("batch_size", "eval_batch_size")) -> None:
    """Raise ConfigError unless each global batch size splits evenly over the mesh's
    data-parallel shards (`data` x `fsdp`) and over the processes that feed them."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    # Each process loads batch_size / processes rows and places them on its own devices.
    step = math.lcm(shards, jax.process_count())
    for key in keys:
        if data_config[key] % step:
            raise _config_error(
                f"config.data.{key}={data_config[key]} does not split evenly over {shards} "
                f"data-parallel shard(s) (mesh data={mesh.shape['data']} x "
                f"fsdp={mesh.shape['fsdp']}) fed by {jax.process_count()} process(es); use a "
                f"multiple of {step} (or another config.mesh.preset / config.mesh.shape).")


def mesh_from_config(config: ConfigDict,
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The run's mesh from `config.mesh` (preset or shape) over `devices` (default: all),
    after checking the rules table and that the batch sizes split over it."""
    count = jax.device_count() if devices is None else len(devices)
    config_error = _config_error_type()
    try:
        check_rules(config.mesh.rules)
        mesh = make_mesh(mesh_shape(config.mesh, count), devices)
    except config_error:
        raise
    except ValueError as e:  # make_mesh / check_rules: the message names the key already
        raise config_error(str(e)) from e
    check_batch_sizes(mesh, config.data)
    return mesh
