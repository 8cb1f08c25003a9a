"""The stacked layout of a scanned model's state: how a run with `scan_layers` trains.

With `T5Config.scan_layers` each layer stack runs as one `jax.lax.scan` over its layers' states
stacked on a leading axis. Were the state kept one entry per layer (`encoder.layers.{i}.<rest>`,
the layout of checkpoints, exports and HF weights), every step would stack each weight of the
stack again (a copy of the frozen base per step) and split the gradient back into one leaf per
layer, and the optimizer would run one update per layer and leaf: the compiled step would grow
with depth. So a scanned run trains in the *stacked layout*: `stack_layers` turns every
`<stack>.{i}.<rest>` of an `nnx.State` into one `<stack>.stacked.<rest>` variable with a leading
`layers` axis, `unstack_layers` turns it back, and

    model = merge(graphdef, trainable, frozen)                # either layout
    logits = model(..., layer_states=layer_states(trainable, frozen))

runs the scans directly on the stacked variables (`T5.__call__(layer_states=...)`), so
gradients come back stacked and the optimizer state is stacked with them. Checkpoints keep the
per-layer layout (a run resumes whatever `scan_layers` is): the train loop converts at save and
restore (`stack_placed`, `unstack_placed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from peftjax.models.config import T5Config

STACKED = "stacked"  # the key that replaces the layer index in a stacked path
LAYERS_AXIS = "layers"  # logical axis name of the leading (layer) dimension: never sharded
SCANNED_STACKS = ("encoder.layers", "decoder.layers")


def scanned_stacks(cfg: T5Config) -> tuple[str, ...]:
    """The layer stacks that run as a scan under `cfg` (none unless `cfg.scan_layers`)."""
    return SCANNED_STACKS if cfg.scan_layers else ()


def _is_state(x: Any) -> bool:
    return isinstance(x, nnx.State)


def _stack_of(path: tuple, stacks: Sequence[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The stack (as a path prefix) whose layer `path` lies in, if any."""
    for stack in stacks:
        n = len(stack)
        if tuple(map(str, path[:n])) == stack and len(path) > n:
            return stack
    return None


def _combine(values: list) -> Any:
    """Per-layer values → one value with a leading layer axis (arrays, or abstract arrays
    whose sharding gains a replicated first dimension)."""
    first = values[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        sharding = first.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(values), *first.shape), first.dtype, sharding=sharding)
    return jnp.stack(values)


def _split(value: Any) -> list:
    """The inverse of `_combine`."""
    if isinstance(value, jax.ShapeDtypeStruct):
        sharding = value.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
        one = jax.ShapeDtypeStruct(value.shape[1:], value.dtype, sharding=sharding)
        return [one] * value.shape[0]
    return [value[i] for i in range(value.shape[0])]


def _stack_state(state: nnx.State, stacks: Sequence[str], combine=_combine) -> nnx.State:
    prefixes = [tuple(s.split(".")) for s in stacks]
    flat, by_rest = [], {}
    for path, variable in nnx.to_flat_state(state):
        stack = _stack_of(path, prefixes)
        if stack is None or path[len(stack)] == STACKED:
            flat.append((path, variable))
            continue
        index, rest = path[len(stack)], path[len(stack) + 1:]
        by_rest.setdefault((stack, rest), {})[int(index)] = variable
    for (stack, rest), layers in by_rest.items():
        if sorted(layers) != list(range(len(layers))):
            missing = sorted(set(range(max(layers) + 1)) - set(layers))
            raise ValueError(f"{'.'.join(stack)}.*.{'.'.join(map(str, rest))} is missing in "
                             f"layers {missing}: a scanned stack needs every layer alike "
                             "(config.peft.targets matching the same modules in each layer).")
        first = layers[0]
        axes = first.get_metadata().get("axes")
        stacked = first.replace(value=combine([layers[i].get_value() for i in range(len(layers))]),
                                **({} if axes is None else {"axes": (LAYERS_AXIS, *axes)}))
        flat.append(((*stack, STACKED, *rest), stacked))
    return nnx.from_flat_state(flat)


def _unstack_state(state: nnx.State) -> nnx.State:
    flat = []
    for path, variable in nnx.to_flat_state(state):
        if STACKED not in path:
            flat.append((path, variable))
            continue
        at = path.index(STACKED)
        axes = variable.get_metadata().get("axes")
        kw = {} if axes is None else {"axes": tuple(axes[1:])}
        for i, value in enumerate(_split(variable.get_value())):
            flat.append(((*path[:at], i, *path[at + 1:]), variable.replace(value=value, **kw)))
    return nnx.from_flat_state(flat)


def stack_layers(tree: Any, stacks: Sequence[str]) -> Any:
    """Every `nnx.State` in `tree` (a train state, an optimizer state, ...) in the stacked
    layout of `stacks` (e.g. `scanned_stacks(cfg)`); other leaves as they are. Pure: use under
    `jax.jit` or `jax.eval_shape`, or `stack_placed` for placed arrays."""
    if not stacks:
        return tree
    return jax.tree.map(lambda s: _stack_state(s, stacks) if _is_state(s) else s, tree,
                        is_leaf=_is_state)


def unstack_layers(tree: Any) -> Any:
    """The inverse of `stack_layers`: every stacked `nnx.State` in `tree` back to one entry per
    layer; per-layer states pass through unchanged."""
    return jax.tree.map(lambda s: _unstack_state(s) if _is_state(s) else s, tree,
                        is_leaf=_is_state)


def is_stacked(state: nnx.State) -> bool:
    return any(STACKED in path for path, _ in nnx.to_flat_state(state))


def merge(graphdef: nnx.GraphDef, *states: nnx.State) -> nnx.Module:
    """`nnx.merge` for states in either layout. Stacked states are sliced back into their
    layers (under `jax.jit` the slices cost nothing when `layer_states` feeds the scans)."""
    return nnx.merge(graphdef, *(unstack_layers(s) for s in states))


def layer_states(*states: nnx.State) -> dict[str, nnx.State] | None:
    """`{stack name: state of one layer, stacked}` from the stacked parts of `states` (say,
    trainable and frozen), for `T5.__call__(layer_states=...)`; None when none is stacked.

    Every state holding variables of a stacked stack must be stacked there too: a scan needs
    all of a layer's variables on the stacked axis.
    """
    parts: dict[tuple, list[nnx.State]] = {}
    per_layer: set[tuple] = set()
    for state in states:
        found: dict[tuple, list] = {}
        for path, variable in nnx.to_flat_state(state):
            if STACKED in path:
                at = path.index(STACKED)
                axes = variable.get_metadata().get("axes")
                one = variable if axes is None else variable.replace(axes=tuple(axes[1:]))
                found.setdefault(tuple(path[:at]), []).append((path[at + 1:], one))
            else:
                per_layer.update(path[:i] for i, key in enumerate(path) if isinstance(key, int))
        for stack, flat in found.items():
            parts.setdefault(stack, []).append(nnx.from_flat_state(flat))
    if not parts:
        return None
    mixed = sorted(".".join(map(str, s)) for s in parts if s in per_layer)
    if mixed:
        raise ValueError(f"{mixed[0]} is stacked in one state and per layer in another; convert "
                         "every state of the model with peftjax.models.stacking.stack_layers.")
    return {".".join(map(str, stack)): nnx.merge_state(*states_)
            for stack, states_ in parts.items()}


# ---- conversions of placed arrays (outside jit): the result placed like its source


def stack_placed(tree: Any, stacks: Sequence[str], *, consume: bool = False) -> Any:
    """`stack_layers` of concrete, placed arrays: each stacked array sharded like its layers
    with the layer axis replicated (other leaves are left as they are).

    With `consume`, each variable's per-layer arrays are deleted as soon as its stack is built,
    so converting a frozen base takes memory for one more variable stack, not a second base;
    the per-layer arrays (and any state holding them) must not be used afterwards.
    """
    if not stacks:
        return tree

    def combine(values: list[jax.Array]) -> jax.Array:
        first = values[0]
        like = jax.ShapeDtypeStruct(first.shape, first.dtype, sharding=first.sharding)
        stacked = jax.jit(_stack_arrays, out_shardings=_combine([like]).sharding)(*values)
        if consume:
            for value in values:
                value.delete()
        return stacked

    return jax.tree.map(lambda s: _stack_state(s, stacks, combine) if _is_state(s) else s,
                        tree, is_leaf=_is_state)


def _stack_arrays(*values: jax.Array) -> jax.Array:
    return jnp.stack(values)


def unstack_placed(tree: Any) -> Any:
    """`unstack_layers` of concrete, placed arrays: each layer's array sharded like the stack
    without its layer axis. Per-layer states are returned as they are (no copy)."""
    return _placed(_unstack_state, tree, only=is_stacked)


def _placed(convert, tree: Any, only=lambda state: True) -> Any:
    """`convert` applied, jitted, to every `nnx.State` in `tree` for which `only` holds, each
    output placed as `convert` maps its source's sharding."""

    def one(state: nnx.State) -> nnx.State:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        out_shardings = jax.tree.map(lambda x: x.sharding, convert(abstract))
        return jax.jit(convert, out_shardings=out_shardings)(state)

    return jax.tree.map(lambda s: one(s) if _is_state(s) and only(s) else s, tree,
                        is_leaf=_is_state)
