"""T5 attention: bucketed relative position bias, unscaled dot products, additive masks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models.config import T5Config
from peftjax.models.context import Context, dropout
from peftjax.models.layers import Dense, KeyValueHook, init_normal

# Finite (not -inf) so a fully masked row gives a uniform softmax instead of NaN.
MASK_VALUE = -1e9


@functools.lru_cache(maxsize=64)
def relative_position_buckets(query_length: int, key_length: int, *, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> np.ndarray:
    """int32 `[query_length, key_length]` bucket of `key_pos - query_pos` (Mesh TF / HF scheme).

    Computed in numpy float32 at trace time (lengths are static), in the same operation order as
    transformers, so bucket boundaries agree exactly.
    """
    rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(rel.dtype) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        log_ratio = np.log(rel.astype(np.float32) / np.float32(max_exact))
    large = max_exact + (log_ratio / np.float32(np.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact))
    large = np.where(is_small, 0, large).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class RelativePositionBias(nnx.Module):
    """One learned scalar per (bucket, head), shared by every layer of a stack."""

    def __init__(self, cfg: T5Config, *, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.embedding = nnx.Param(
            init_normal(rngs.params(), (self.num_buckets, cfg.num_heads), cfg.d_model ** -0.5,
                        jnp.dtype(cfg.param_dtype)),
            axes=("relpos_buckets", "heads"))

    def __call__(self, query_length: int, key_length: int) -> jax.Array:
        """float32 `[1, heads, query_length, key_length]`."""
        buckets = relative_position_buckets(
            query_length, key_length, bidirectional=self.bidirectional,
            num_buckets=self.num_buckets, max_distance=self.max_distance)
        values_qkh = jnp.take(self.embedding.value.astype(jnp.float32), buckets, axis=0)
        return jnp.transpose(values_qkh, (2, 0, 1))[None]

    def row(self, query_position: jax.Array, key_length: int) -> jax.Array:
        """Bias of one (traced) query position against keys `0..key_length-1`: `[1,h,1,k]`."""
        full_hqk = self(key_length, key_length)[0]
        return jax.lax.dynamic_slice_in_dim(full_hqk, query_position, 1, axis=1)[None]


def mask_to_bias(mask: jax.Array) -> jax.Array:
    """Boolean mask (True = attend) → additive float32 bias."""
    return jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)


class Attention(nnx.Module):
    """Multi-head attention with projections `q, k, v, o` and a key/value `prefix` hook (PEFT
    insertion points).

    Kernels are `[embed, joined_kv]` / `[joined_kv, embed]`, joined_kv = heads * d_kv. T5 folds
    the 1/sqrt(d_kv) scale into the initialisation, so scores are unscaled.
    """

    def __init__(self, cfg: T5Config, *, salt: int, rngs: nnx.Rngs):
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, inner = cfg.d_model, cfg.inner_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdtype)
        self.q = Dense(d, inner, axes=("embed", "joined_kv"), std=(d * cfg.d_kv) ** -0.5, **kw)
        self.k = Dense(d, inner, axes=("embed", "joined_kv"), std=d ** -0.5, **kw)
        self.v = Dense(d, inner, axes=("embed", "joined_kv"), std=d ** -0.5, **kw)
        self.o = Dense(inner, d, axes=("joined_kv", "embed"), std=inner ** -0.5, **kw)
        self.prefix = KeyValueHook()
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.dropout_rate, self.salt = cfg.dropout_rate, salt

    def _heads(self, x_btf: jax.Array) -> jax.Array:
        return x_btf.reshape(*x_btf.shape[:-1], self.num_heads, self.d_kv)

    def key_values(self, x_bsd: jax.Array, ctx: Context) -> tuple[jax.Array, jax.Array]:
        """Keys and values `[batch, source, heads, d_kv]` of the attended-to sequence."""
        return self._heads(self.k(x_bsd, ctx)), self._heads(self.v(x_bsd, ctx))

    def attend(self, x_btd: jax.Array, k_bshk: jax.Array, v_bshk: jax.Array, bias: jax.Array,
               ctx: Context) -> jax.Array:
        """Queries from `x_btd` attend to the given keys/values → `[batch, target, embed]`."""
        q_bthk = self._heads(self.q(x_btd, ctx))
        k_bshk, v_bshk, bias = self.prefix(k_bshk, v_bshk, bias, ctx)
        scores = jnp.einsum("bthk,bshk->bhts", q_bthk, k_bshk,
                            preferred_element_type=jnp.float32) + bias
        probs = jax.nn.softmax(scores, axis=-1)
        probs = dropout(probs, self.dropout_rate, ctx, self.salt).astype(v_bshk.dtype)
        out_bthk = jnp.einsum("bhts,bshk->bthk", probs, v_bshk)
        return self.o(out_bthk.reshape(*out_bthk.shape[:2], -1), ctx)

    def __call__(self, x_btd: jax.Array, kv_bsd: jax.Array, bias: jax.Array, ctx: Context,
                 kv_ctx: Context | None = None) -> jax.Array:
        k, v = self.key_values(kv_bsd, ctx if kv_ctx is None else kv_ctx)
        return self.attend(x_btd, k, v, bias, ctx)
