"""How routers report what they chose, without changing what the model computes.

During a forward pass a router `sow`s into two collections:

  RoutingWeights  the mixing weights it applied, last axis over skills / experts / adapters
                  (rows sum to 1, zeros for experts a top-k router left out). Shapes per router:
                  Poly/MHR `[batch, (length,) splits, skills]`, token routers `[batch, length,
                  experts]`.
  AuxLoss         scalar terms to add to the training objective, already multiplied by their
                  coefficient (e.g. MoLoRA's load-balancing loss).

Nothing is recorded unless the call runs under `capture` (Flax's `nnx.capture`): a plain
`model(...)` stays a pure function and leaves the module tree as it was, so a model called
eagerly in a notebook can still be split and checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class RoutingWeights(nnx.Intermediate):
    """Mixing weights a router applied in one call (a tuple, one entry per call)."""


class AuxLoss(nnx.Intermediate):
    """Auxiliary losses a router adds to the objective (a tuple, one entry per call)."""


def _capturing(module: nnx.Module) -> bool:
    # `nnx.capture` marks every module it runs with `__captures__`; outside it `Module.sow`
    # would store the value as a new attribute (deprecated in Flax 0.12), changing the model.
    return bool(getattr(module, "__captures__", None))


def record_weights(module: nnx.Module, weights: jax.Array, name: str = "weights") -> None:
    """Record `weights` `[..., experts]` under `module` when a `capture` is running."""
    if _capturing(module):
        module.sow(RoutingWeights, name, weights)


def add_aux_loss(module: nnx.Module, loss: jax.Array, name: str = "aux_loss") -> None:
    """Add a scalar to the training objective (train steps sum every `AuxLoss`)."""
    if _capturing(module):
        module.sow(AuxLoss, name, loss)


def capture(fn: Callable[..., Any]) -> Callable[..., tuple[Any, dict[str, jax.Array],
                                                        jax.Array]]:
    """Wrap `fn(model, *args, **kwargs)` to also return what the routers recorded.

    Returns `(output, weights, aux_loss)`: `weights` maps `"<module path>/<name>"` (e.g.
    `"encoder.layers.0.self_attention.q/weights"`) to the recorded array, or to a tuple of them
    when the module ran several times (decoding steps); `aux_loss` is the sum of every `AuxLoss`
    (0.0 when there is none). Works under `jax.jit`.
    """
    wrapped = nnx.capture(fn, RoutingWeights, AuxLoss)

    def run(model: nnx.Module, *args, **kwargs):
        output, weights_state, aux_state = wrapped(model, *args, **kwargs)
        weights = {}
        for path, variable in nnx.to_flat_state(weights_state):
            values = variable.get_value()
            key = ".".join(map(str, path[:-1])) + "/" + str(path[-1])
            weights[key] = values[0] if len(values) == 1 else tuple(values)
        aux = [jnp.sum(v) for _, var in nnx.to_flat_state(aux_state) for v in var.get_value()]
        return output, weights, sum(aux, jnp.zeros((), jnp.float32))

    return run


def entropy(weights: jax.Array, axis: int = -1) -> jax.Array:
    """Shannon entropy (nats) of weights that sum to 1 along `axis`; 0·log 0 = 0."""
    w = weights.astype(jnp.float32)
    return -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0), axis=axis)


def mean_entropy(weights: dict[str, Any]) -> jax.Array:
    """Mean routing entropy over every recorded router (each router's rows averaged first)."""
    leaves = [jnp.mean(entropy(w)) for w in jax.tree.leaves(weights)]
    return jnp.mean(jnp.stack(leaves)) if leaves else jnp.zeros((), jnp.float32)
