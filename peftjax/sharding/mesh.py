"""Device mesh and the logical-axis rules table: the one place that decides how arrays shard.

Every parameter names its dimensions with logical axes (`Param(..., axes=("embed", "mlp"))`);
`config.mesh.rules` maps each logical axis to a mesh axis (or None = replicated). The same model
code then runs on 1 device, N devices or N hosts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

log = logging.getLogger(__name__)

# Logical axis → mesh axis: the one table for every mesh preset (`peftjax.sharding.presets`
# picks the mesh shape, never the rules), as in MaxText. A mesh axis of size 1 drops out, so on a
# pure data-parallel mesh everything but the batch is replicated.
#
# What is big in PEFT is the frozen base, so the base's weights carry the sharding: FSDP splits
# their `embed` dimension over `fsdp`, tensor parallelism splits heads x head width (`joined_kv`),
# the MLP width and the vocabulary over `model`. Adapters are small and mostly replicated, except
# along the dimensions they share with the weight they adapt: a LoRA's A `[embed, rank]` and B
# `[rank, joined_kv]` (a bottleneck's down / up, IA3's vectors, a sparse run's phi, ...) inherit
# the base kernel's axis names, so they split with it and the adapter's matmuls stay local to the
# shards of the base's.
#
# Adapter-only axes stay replicated:
#   - `tasks`: per-task tables are read by a gather on each example's task id; splitting their
#     rows would all-gather them every step, and their other dims already split with the base
#     (a per-task LoRA A is `[tasks, embed, rank]` → (None, fsdp, None)). With hundreds of tasks
#     and a large base, `("tasks", "fsdp")` is the override to try: rows then take `fsdp` and
#     `embed` replicates (a mesh axis is used once per array).
#   - `skills` / `experts`: Poly / MHR inventories and MoLoRA experts are a few LoRAs per site;
#     `("experts", "model")` (expert parallelism) is tested in tests/test_routing.py.
#   - hypernetwork axes: a weight head is `[hyper_proj, hyper_out]`, `hyper_out` being every
#     weight of one generated adapter (~74k at T5-base, so ~5M per head at proj 64: tens of MB,
#     replicated). When heads grow large, `("hyper_out", "model")` splits them (tested in
#     tests/test_hyper.py).
# A variable must name every dimension with a logical axis listed here (`state_shardings` refuses
# anything else); add a new name with None (replicated) when a method needs one.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),  # inputs: data parallel over data x fsdp
    ("length", None),
    ("embed", "fsdp"),  # d_model of every weight (FSDP); the adapters' too
    ("vocab", "model"),
    ("joined_kv", "model"),  # heads x d_kv of q / k / v / o
    ("mlp", "model"),  # d_ff
    ("heads", None),  # relative position bias tables (tiny)
    ("relpos_buckets", None),
    ("tasks", None),  # per-task tables, gathered by task id (see above)
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
    All devices are arranged by `device_grid`; explicit `devices` keep their order.
    """
    arrange = devices is None
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
    grid = device_grid(sizes, devices) if arrange else np.asarray(devices).reshape(sizes)
    if (spread := model_axis_spread(grid)) > 1:
        log.warning("config.mesh.shape puts each 'model' (tensor-parallel) group of %d devices "
                    "on %d processes: its collectives, every layer, would cross hosts. Make "
                    "mesh model divide the devices per process (%d).", sizes[-1], spread,
                    jax.local_device_count())
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_grid(sizes: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
    """`devices` arranged as a `[data, fsdp, model]` array.

    TPUs: by the physical topology (`mesh_utils.create_device_mesh`), so neighbouring mesh
    positions are ICI neighbours. Elsewhere: by (process, id), so the innermost axes (`model`,
    then `fsdp`) fill one process's devices before the next: tensor-parallel traffic stays
    within a host, and data parallelism spans hosts.
    """
    if devices and devices[0].platform == "tpu" and len(devices) == jax.device_count():
        return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return np.asarray(ordered).reshape(sizes)


def model_axis_spread(grid: np.ndarray) -> int:
    """The most processes any one `model` group (a row along the last axis) spans."""
    rows = grid.reshape(-1, grid.shape[-1])
    return max(len({d.process_index for d in row}) for row in rows)


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


def check_rules(rules: Rules) -> None:
    """Raise ValueError unless every rule maps a logical axis to None, a mesh axis or a tuple of
    mesh axes (of `MESH_AXES`)."""
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"config.mesh.rules entry {rule!r} should be (logical axis name, "
                             f"mesh axis or None), e.g. ('embed', 'fsdp').")
        name, target = rule
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        unknown = [t for t in targets if t not in MESH_AXES]
        if unknown:
            raise ValueError(f"config.mesh.rules maps {name!r} to {target!r}: {unknown} is not a "
                             f"mesh axis; use one of {MESH_AXES} (or None to replicate).")


def axes_problem(variable: nnx.Variable, known: set[str]) -> str | None:
    """Why `variable` cannot be placed by a rules table naming `known` (None: it can).

    Every dimension needs a logical axis name that the table maps (a 0-d variable needs none).
    """
    shape = tuple(variable.get_value().shape)
    axes = variable.get_metadata().get("axes")
    kind = type(variable).__name__
    if axes is None:
        if not shape:
            return None
        return (f"{kind} of shape {shape} has no logical axes. Create it with one name per "
                f"dimension, e.g. {kind}(value, axes=('tasks', 'embed', 'lora_rank')) (a new "
                "name also goes into peftjax.sharding.DEFAULT_RULES)")
    if len(axes) != len(shape):
        return (f"{kind} of shape {shape} has axes {tuple(axes)}; give it one logical axis "
                "name per dimension where it is created")
    missing = [a for a in axes if a not in known]
    if missing:
        return (f"{kind} with axes {tuple(axes)}: {missing[0]!r} is not in config.mesh.rules. "
                f"Add ({missing[0]!r}, None) (replicated) or a mesh axis for it to "
                "config.mesh.rules (and to peftjax.sharding.DEFAULT_RULES if the name is new in "
                "the code)")
    return None


def check_axes(state: nnx.State, rules: Rules) -> None:
    """Raise ValueError naming the first variable of `state` that `rules` cannot place (and how
    many more there are): one without logical axes, with too few or too many, or with a name
    the table lacks. Silently replicating such a variable would hide a missed sharding."""
    known = {rule[0] for rule in rules}
    problems = []
    for path, variable in nnx.to_flat_state(state):
        problem = axes_problem(variable, known)
        if problem:
            problems.append(f"{'/'.join(map(str, path))}: {problem}.")
    if problems:
        more = f" ({len(problems) - 1} more variable(s) like it.)" if len(problems) > 1 else ""
        raise ValueError(f"Cannot shard {problems[0]}{more}")


def state_shardings(state: nnx.State, rules: Rules, mesh: Mesh):
    """NamedSharding for every Variable of an `nnx.State` (concrete or abstract), from its
    `axes` metadata. Raises ValueError (naming the variable and the fix) when a variable's
    dimensions are not all named by logical axes of `rules`, or a rule names no mesh axis."""
    check_rules(rules)
    check_axes(state, rules)

    def one(variable):
        axes = variable.get_metadata().get("axes") or ()
        return NamedSharding(mesh, logical_to_spec(axes, variable.get_value().shape, rules, mesh))

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
