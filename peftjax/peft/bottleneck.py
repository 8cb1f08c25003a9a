"""Bottleneck adapters: `h ↦ h + s · U act(D h)` on the residual stream (Houlsby, Pfeiffer), or
beside the feed-forward block, `x ↦ mlp(x) + s · U act(D x)` (parallel adapter)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context
from peftjax.models.layers import Hook, activation_fn
from peftjax.models.t5 import MLP
from peftjax.peft.config import PeftConfig
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.task_select import project_in, project_out, task_axis
from peftjax.peft.variables import Adapter


class BottleneckAdapter(nnx.Module):
    """Replaces a `Hook`: applied to a sub-layer's output before the residual add.

    `down`: `[(tasks,) d, m]` ~ N(0, 0.01²) as in Houlsby et al.; `up`: `[(tasks,) m, d]` zeros, so
    the adapter starts as the identity.
    """

    def __init__(self, features: int, bottleneck: int, *, activation: str = "relu",
                 scale: float = 1.0, num_tasks: int | None = None, rngs: nnx.Rngs):
        if bottleneck <= 0:
            raise ValueError(f"Adapter bottleneck width must be positive, got {bottleneck}; "
                             "lower config.peft.reduction_factor.")
        lead, lead_axes = task_axis(num_tasks)
        self.down = Adapter(0.01 * jax.random.normal(rngs.params(), (*lead, features, bottleneck)),
                            axes=(*lead_axes, "embed", "adapter_bottleneck"))
        self.up = Adapter(jnp.zeros((*lead, bottleneck, features)),
                          axes=(*lead_axes, "adapter_bottleneck", "embed"))
        self.act = activation_fn(activation)
        self.scale = scale

    def delta(self, h_btd: jax.Array, ctx: Context) -> jax.Array:
        """`s · U act(D h)` `[b, t, d]`: what the adapter adds to the residual stream."""
        code = self.act(project_in(h_btd, self.down.value, ctx.task_ids))
        return self.scale * project_out(code, self.up.value, ctx.task_ids)

    def __call__(self, h_btd: jax.Array, ctx: Context) -> jax.Array:
        return h_btd + self.delta(h_btd, ctx)


class ParallelAdapter(nnx.Module):
    """Wraps a frozen `MLP` with a bottleneck beside it: `mlp(x) + s · U act(D x)`.

    He et al. 2022 ("Towards a unified view of PETL"), AdapterHub's `par_bn`: the adapter reads
    the FFN's input `x` (after its layer norm) rather than the FFN's output. (AdapterHub's T5
    integration feeds it the residual stream before the layer norm instead.) The bottleneck is a
    `BottleneckAdapter` (`adapter.down`, `adapter.up`; `up` zero-initialised, so the wrapped FFN
    starts unchanged).
    """

    def __init__(self, base: MLP, adapter: BottleneckAdapter):
        self.base = base
        self.adapter = adapter

    def delta(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        """`s · U act(D x)` `[b, t, d]`: what the adapter adds to the FFN's output."""
        return self.adapter.delta(x_btd, ctx)

    def __call__(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        return self.base(x_btd, ctx) + self.delta(x_btd, ctx)


def _bottleneck(site: Site, config: PeftConfig) -> BottleneckAdapter:
    d_model = site.model_config.d_model
    return BottleneckAdapter(d_model, d_model // config.reduction_factor,
                             activation=config.adapter_activation, scale=config.adapter_scale,
                             num_tasks=site.num_tasks, rngs=site.rngs)


def _build(hook: Hook, site: Site, config: PeftConfig) -> BottleneckAdapter:
    return _bottleneck(site, config)


def _build_parallel(mlp: MLP, site: Site, config: PeftConfig) -> ParallelAdapter:
    return ParallelAdapter(mlp, _bottleneck(site, config))


_WHERE = "residual hooks: post_attention, post_cross_attention, post_ffn"
SPECS = {
    # Houlsby et al.: after attention and after the FFN, before each residual add.
    "houlsby": MethodSpec((Hook,), r".*\.(post_attention|post_ffn)", _build, _WHERE),
    # Pfeiffer et al.: after the FFN only.
    "pfeiffer": MethodSpec((Hook,), r".*\.post_ffn", _build, _WHERE),
    # He et al. 2022: beside every FFN (scale: config.peft.adapter_scale; AdapterHub uses 4).
    "parallel": MethodSpec((MLP,), r".*\.mlp", _build_parallel,
                           "feed-forward blocks: encoder/decoder.layers.{i}.mlp"),
}
