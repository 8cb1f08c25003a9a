"""Variable types that mark what training updates.

The base model's weights are plain `nnx.Param`. Every PEFT parameter is a `PeftParam` subclass, so
`nnx.split(model, PeftParam, ...)` separates what is trained from the frozen base in one filter,
and later kinds (routers, hypernetworks) add their own subclasses.
"""

import jax
import jax.numpy as jnp
from flax import nnx

# Storage dtype of everything trained (master weights), whatever `config.model.dtype` computes
# in: each use casts to the compute dtype, so gradients and optimizer state are float32 too.
MASTER_DTYPE = jnp.float32


class PeftParam(nnx.Param):
    """Base class of every trainable PEFT parameter."""


class Adapter(PeftParam):
    """Weights of an adapter module (LoRA factors, bottleneck projections, ...)."""


class Router(PeftParam):
    """Routing parameters: Poly/MHR task-skill logits, token gates, fusion attention. A separate
    type so a run can train the routing alone (MHR-z) and analysis can find every router."""


class HyperParam(PeftParam):
    """Weights of a hypernetwork that generates adapters, and the task / language / layer
    embeddings it reads (`peftjax.hyper`)."""


class Conditioning(nnx.Variable):
    """Fixed inputs of a hypernetwork: the frozen encoder's embeddings of task descriptions.
    Recomputed from the base and the descriptions at every build (so new descriptions can be
    evaluated zero-shot), never trained and never checkpointed."""


class FrozenAdapter(nnx.Variable):
    """Adapter state that is part of the PEFT model but not trained: a frozen LoRA A, a sparse
    fine-tuning mask, the weights of frozen source adapters under a composition. It stays with
    the frozen part of the split state, so it gets no gradient and no optimizer state."""


TRAINABLE = PeftParam


def trainable_filter(method: str):
    """What a run differentiates: every parameter for full fine-tuning, else the PEFT ones."""
    return nnx.Param if method == "full" else TRAINABLE


def as_masters(state: nnx.State) -> nnx.State:
    """`state` (the trainable part of a split model) with every floating array in float32.

    Methods create their parameters in float32; this holds the rule for any that derive an init
    from a bfloat16 base (`config.model.param_dtype`) without casting."""
    def master(x):
        return x.astype(MASTER_DTYPE) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(master, state)
