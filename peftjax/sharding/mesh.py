"""Device mesh and the logical-axis rules table: the one place that decides how arrays shard.

Every parameter names its dimensions with logical axes (`Param(..., axes=("embed", "mlp"))`);
`config.mesh.rules` maps each logical axis to a mesh axis (or None = replicated). The same model
code then runs on 1 device, N devices or N hosts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

# Logical axis → mesh axis. Data parallel over (data, fsdp); FSDP shards the embed dimension of
# weights; tensor parallelism splits heads / MLP / vocabulary over `model`. Adapter axes (tasks,
# rank, bottleneck) are small and replicated by default.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "model"),
    ("joined_kv", "model"),
    ("mlp", "model"),
    ("heads", None),
    ("relpos_buckets", None),
    ("tasks", None),
    ("lora_rank", None),
    ("adapter_bottleneck", None),
    ("adapter_hidden", None),  # hidden width of reparameterisation MLPs (prefix tuning)
    ("virtual_tokens", None),  # prompt / prefix positions
    ("kv", None),  # per-head key/value width of prefix tuning's prefixes
    ("phm", None),  # Kronecker summands of PHM / Compacter layers
    ("sources", None),  # frozen source adapters under a composition (ScaLearn, average)
    ("skills", None),  # Poly / MHR skill inventories
    ("splits", None),  # MHR heads (blocks of d_in / d_out)
    ("experts", None),  # MoLoRA experts, Arrow / fusion library entries
    ("languages", None),  # language embeddings of Hyper-X
    ("hyper_embed", None),  # hypernetwork inputs: task / language / layer / position embeddings
    ("hyper_layers", None),  # layer-id embedding rows
    ("hyper_positions", None),  # adapter-position / module-type embedding rows
    ("hyper_in", None),  # the projector MLP's input (concatenated embeddings)
    ("hyper_hidden", None),  # its hidden width
    ("hyper_proj", None),  # its output, read by the weight heads
    ("hyper_sites", None),  # per-site weight heads (HyperFormer: a hypernetwork per layer)
    ("hyper_out", None),  # flattened generated weights
)

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes `data, fsdp, model`; one -1 fills the rest.

    Axis types are Auto: XLA propagates shardings from the parameter and batch placements.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh.shape has unknown axes {sorted(unknown)}; use {MESH_AXES}.")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("At most one config.mesh.shape axis may be -1 (fill).")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(shape)}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs "
                         f"{int(np.prod(sizes))} devices but {len(devices)} are available; fix "
                         "config.mesh.shape (use -1 for the axis that takes the rest).")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axes(name: str | None, rules: Rules, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that the rules map logical axis `name` to."""
    target = dict(rules).get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    return tuple(t for t in targets if mesh.shape[t] > 1)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], rules: Rules,
                    mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of an array from its logical axes.

    A mesh axis is used at most once per array, and a dimension it does not divide stays
    replicated (so odd vocabulary or task counts never fail to place).
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        targets = tuple(t for t in _mesh_axes(name, rules, mesh) if t not in used)
        ways = int(np.prod([mesh.shape[t] for t in targets])) if targets else 1
        if not targets or size % ways:
            spec.append(None)
            continue
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, rules: Rules, mesh: Mesh):
    """NamedSharding for every Variable of an `nnx.State`, from its `axes` metadata."""

    def one(variable):
        axes = variable.get_metadata().get("axes") or (None,) * variable.value.ndim
        return NamedSharding(mesh, logical_to_spec(axes, variable.value.shape, rules, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of `[batch, length]` input arrays."""
    targets = _mesh_axes("batch", rules, mesh)
    return NamedSharding(mesh, PartitionSpec(targets if targets else None))


def replicate_unplaced(tree, mesh: Mesh):
    """Leaves not yet placed on `mesh` (step counters, optimizer counts) become replicated on it,
    so a jitted step never sees arguments committed to different device sets."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(place, tree)
