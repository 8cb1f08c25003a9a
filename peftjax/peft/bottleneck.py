"""Bottleneck adapters: `h ↦ h + s · U act(D h)` on the residual stream (Houlsby, Pfeiffer), or
beside the feed-forward block, `x ↦ mlp(x) + s · U act(D x)` (parallel adapter).

Optionally with biases and a layer norm on the adapter's output (`adapter_bias`,
`adapter_norm`): `h + s · LN(U act(D h + b_D) + b_U)`, the adapter HyperFormer generates and its
"Adapters" baseline trains. `bottleneck_delta` is the one computation, for trained weights here
and for generated ones in `peftjax.hyper`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context
from peftjax.models.layers import Hook, activation_fn
from peftjax.models.t5 import MLP
from peftjax.peft.config import PeftConfig
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.task_select import add_code_bias, project_in, project_out, task_axis, task_rows
from peftjax.peft.variables import Adapter

LAYER_NORM_EPS = 1e-5  # torch.nn.functional.layer_norm's default, as HyperFormer uses it


def bottleneck_delta(h_btd: jax.Array, w: dict[str, jax.Array], ids: jax.Array | None, *,
                     act, scale: float) -> jax.Array:
    """`s · LN(U act(D h + b_D) + b_U)` `[b, t, d]`: what a bottleneck adds to the residual.

    `w` holds `down` `[(rows,) d, m]` and `up` `[(rows,) m, d]`, and optionally `down_bias`
    `[(rows,) m]`, `up_bias` `[(rows,) d]` and a layer norm's `norm_scale` / `norm_bias`
    `[(rows,) d]` (standard LayerNorm: mean and variance over d). With a leading rows axis,
    `ids` (`[batch]` or `[batch, length]`) picks each example's or token's row.
    """
    code = project_in(h_btd, w["down"], ids)
    if "down_bias" in w:
        code = add_code_bias(code, w["down_bias"], ids)
    y = project_out(act(code), w["up"], ids)
    per_row = w["up"].ndim == 3
    if "up_bias" in w:
        y = y + task_rows(w["up_bias"], ids, y, per_task=per_row).astype(y.dtype)
    if "norm_scale" in w:
        y32 = y.astype(jnp.float32)
        mean = jnp.mean(y32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(y32 - mean), axis=-1, keepdims=True)
        normed = (y32 - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)
        y = (normed * task_rows(w["norm_scale"], ids, y, per_task=per_row)
             + task_rows(w["norm_bias"], ids, y, per_task=per_row)).astype(y.dtype)
    return scale * y


class BottleneckAdapter(nnx.Module):
    """Replaces a `Hook`: applied to a sub-layer's output before the residual add.

    `down`: `[(tasks,) d, m]` ~ N(0, 0.01²) as in Houlsby et al.; `up`: `[(tasks,) m, d]` zeros, so
    the adapter starts as the identity. With `bias`: `down_bias` `[(tasks,) m]`, `up_bias`
    `[(tasks,) d]`, zeros. With `norm` (a LayerNorm on the adapter's output): `norm_scale` starts
    at 0 and `norm_bias` at 0 (identity at init), and `up` ~ N(0, 0.01²) instead of zeros, so the
    norm's input, hence the scale's gradient, is not zero.
    """

    def __init__(self, features: int, bottleneck: int, *, activation: str = "relu",
                 scale: float = 1.0, num_tasks: int | None = None, bias: bool = False,
                 norm: bool = False, rngs: nnx.Rngs):
        if bottleneck <= 0:
            raise ValueError(f"Adapter bottleneck width must be positive, got {bottleneck}; "
                             "lower config.peft.reduction_factor.")
        lead, lead_axes = task_axis(num_tasks)
        f32 = jnp.float32  # trainable masters (peftjax.peft.variables.MASTER_DTYPE)
        self.down = Adapter(0.01 * jax.random.normal(rngs.params(), (*lead, features, bottleneck),
                                                     f32),
                            axes=(*lead_axes, "embed", "adapter_bottleneck"))
        up = (0.01 * jax.random.normal(rngs.params(), (*lead, bottleneck, features), f32) if norm
              else jnp.zeros((*lead, bottleneck, features), f32))
        self.up = Adapter(up, axes=(*lead_axes, "adapter_bottleneck", "embed"))
        # Optional arrays are assigned once, as a Variable or None (NNX fixes each attribute's
        # kind, data or static, at its first assignment).
        self.down_bias = Adapter(jnp.zeros((*lead, bottleneck), f32),
                                 axes=(*lead_axes, "adapter_bottleneck")) if bias else None
        self.up_bias = Adapter(jnp.zeros((*lead, features), f32),
                               axes=(*lead_axes, "embed")) if bias else None
        self.norm_scale = Adapter(jnp.zeros((*lead, features), f32),
                                  axes=(*lead_axes, "embed")) if norm else None
        self.norm_bias = Adapter(jnp.zeros((*lead, features), f32),
                                 axes=(*lead_axes, "embed")) if norm else None
        self.act = activation_fn(activation)
        self.scale = scale

    def weights(self) -> dict[str, jax.Array]:
        """The adapter's arrays by `bottleneck_delta`'s names (absent options left out)."""
        names = ("down", "up", "down_bias", "up_bias", "norm_scale", "norm_bias")
        return {n: getattr(self, n).value for n in names if getattr(self, n) is not None}

    def delta(self, h_btd: jax.Array, ctx: Context) -> jax.Array:
        """`s · U act(D h)` `[b, t, d]` (with its biases / norm): what the adapter adds to the
        residual stream."""
        return bottleneck_delta(h_btd, self.weights(), ctx.task_ids, act=self.act,
                                scale=self.scale)

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
                             num_tasks=site.num_tasks, bias=config.adapter_bias,
                             norm=config.adapter_norm, rngs=site.rngs)


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
