"""Small building blocks with logical axis names on every parameter.

Every `nnx.Param` carries `axes`, a tuple of logical axis names (one per array dimension) that
`peftjax.sharding` maps to mesh axes through the config's rules table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context


def normal(std: float):
    return nnx.initializers.normal(stddev=std)


def init_normal(key: jax.Array, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    """N(0, std²) drawn in float32, then stored in `dtype`: a seeded base stored in bfloat16
    (`T5Config.param_dtype`) is the float32 one rounded, the same model, not another draw."""
    return normal(std)(key, shape, jnp.float32).astype(dtype)


def matmul(x: jax.Array, w_io: jax.Array) -> jax.Array:
    """`x[..., i] @ w_io[i, o]` in x's dtype, for operands already cast to the compute dtype.

    Below float32 on CPU, the product and both of its gradients accumulate in float32 and round
    once: XLA:CPU multiplies bf16 x bf16 -> bf16 at 0.8x its float32 rate but bf16 x bf16 ->
    float32 at 1.9x (2048^3 on 2 cores: 170 and 386 vs 206 GFLOP/s). A bare
    `preferred_element_type` would not do: the gradient's products would see a float32
    cotangent and run in float32. GPUs and TPUs accumulate bf16 products in float32 anyway, so
    they (and float32 operands everywhere) take the plain product.
    """
    if jnp.dtype(x.dtype).itemsize >= 4 or jax.default_backend() != "cpu":
        return jnp.dot(x, w_io)
    return _matmul_f32_accumulation(x, w_io)


@jax.custom_vjp
def _matmul_f32_accumulation(x: jax.Array, w_io: jax.Array) -> jax.Array:
    return jnp.dot(x, w_io, preferred_element_type=jnp.float32).astype(x.dtype)


def _matmul_f32_accumulation_fwd(x, w_io):
    return _matmul_f32_accumulation(x, w_io), (x, w_io)


def _matmul_f32_accumulation_bwd(residuals, g):
    # A frozen kernel's gradient is computed here too, but nothing uses it: XLA drops it.
    x, w_io = residuals
    g = g.astype(x.dtype)
    dx = jnp.dot(g, w_io.T, preferred_element_type=jnp.float32).astype(x.dtype)
    batch = tuple(range(x.ndim - 1))
    dw_io = jnp.tensordot(x, g, axes=(batch, batch), preferred_element_type=jnp.float32)
    return dx, dw_io.astype(w_io.dtype)


_matmul_f32_accumulation.defvjp(_matmul_f32_accumulation_fwd, _matmul_f32_accumulation_bwd)


class Dense(nnx.Module):
    """`y = x @ kernel` (T5 has no biases). kernel: `[in, out]`.

    Every projection in the model is a Dense, so PEFT methods attach to any of them by path.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str],
                 std: float, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = nnx.Param(init_normal(rngs.params(), (in_features, out_features), std,
                                            param_dtype), axes=axes)

    def __call__(self, x: jax.Array, ctx: Context | None = None) -> jax.Array:
        del ctx  # a plain projection ignores the context; PEFT wrappers read it
        return matmul(x.astype(self.dtype), self.kernel.value.astype(self.dtype))


class Embed(nnx.Module):
    """Token embedding table `[vocab, embed]`; `attend` is the tied output projection."""

    def __init__(self, vocab_size: int, features: int, *, rngs: nnx.Rngs, std: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.dtype = dtype
        self.embedding = nnx.Param(init_normal(rngs.params(), (vocab_size, features), std,
                                               param_dtype), axes=("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding.value, tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return matmul(x.astype(self.dtype), self.embedding.value.astype(self.dtype).T)


class RMSNorm(nnx.Module):
    """T5 layer norm: scale only, no mean subtraction, statistics in float32."""

    def __init__(self, features: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), axes=("embed",))

    def __call__(self, x: jax.Array, ctx: Context | None = None) -> jax.Array:
        del ctx  # PEFT wrappers (layer-norm tuning) read it
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(variance + self.eps)
        return (y * self.scale.value.astype(jnp.float32)).astype(self.dtype)


class Hook(nnx.Module):
    """A named insertion point on the residual stream: identity until a PEFT method replaces it.

    Called on a sub-layer's output before the residual add: `x + hook(sublayer(norm(x)), ctx)`.
    """

    def __call__(self, h: jax.Array, ctx: Context | None = None) -> jax.Array:
        del ctx
        return h


class EmbeddingHook(nnx.Module):
    """Insertion point on the encoder's input embeddings (prompt tuning prepends vectors here).

    Maps `(x_bsd, key_mask_bs, segment_ids_bs | None, ctx)` to the same triple, possibly longer.
    """

    def __call__(self, x_bsd: jax.Array, key_mask_bs: jax.Array, segment_ids: jax.Array | None,
                 ctx: Context | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        del ctx
        return x_bsd, key_mask_bs, segment_ids


class KeyValueHook(nnx.Module):
    """Insertion point on an attention's keys and values (prefix tuning appends prefixes here).

    Maps `(k_bshk, v_bshk, bias, ctx)` to the same triple; `bias` is the additive score bias
    broadcastable to `[batch, heads, queries, keys]`, and `ctx` is the queries' context.
    """

    def __call__(self, k_bshk: jax.Array, v_bshk: jax.Array, bias: jax.Array,
                 ctx: Context | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        del ctx
        return k_bshk, v_bshk, bias


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; choose from {tuple(ACTIVATIONS)}.")
    return ACTIVATIONS[name]
