"""Bottleneck adapters on the residual stream: `h ↦ h + s · U act(D h)` (Houlsby, Pfeiffer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context
from peftjax.models.layers import Hook, activation_fn
from peftjax.peft.config import PeftConfig
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.task_select import project_in, project_out
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
        lead, lead_axes = ((num_tasks,), ("tasks",)) if num_tasks else ((), ())
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

def _build(hook: Hook, site: Site, config: PeftConfig) -> BottleneckAdapter:
    d_model = site.model_config.d_model
    return BottleneckAdapter(d_model, d_model // config.reduction_factor,
                             activation=config.adapter_activation, scale=config.adapter_scale,
                             num_tasks=site.num_tasks, rngs=site.rngs)


_WHERE = "residual hooks: post_attention, post_cross_attention, post_ffn"
SPECS = {
    # Houlsby et al.: after attention and after the FFN, before each residual add.
    "houlsby": MethodSpec((Hook,), r".*\.(post_attention|post_ffn)", _build, _WHERE),
    # Pfeiffer et al.: after the FFN only.
    "pfeiffer": MethodSpec((Hook,), r".*\.post_ffn", _build, _WHERE),
}
