"""Greedy decoding with a key/value cache (the evaluation path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from peftjax.models.attention import mask_to_bias
from peftjax.models.t5 import T5

EOS_ID = 1


def greedy_decode(model: T5, encoder_input_tokens: jax.Array, *, max_length: int,
                  task_ids: jax.Array | None = None, language_ids: jax.Array | None = None,
                  eos_id: int = EOS_ID) -> jax.Array:
    """Greedy decode `[batch, max_length]` int32 tokens; positions after EOS are 0.

    Encodes once, precomputes every layer's cross-attention keys/values, then runs one decoder
    step per position over a fixed-size self-attention cache inside a `lax.while_loop` that stops
    when every row has emitted EOS. Call under `jax.jit` (static `max_length`). A hypernetwork
    generates its adapters once, before the loop (`T5.contexts`).
    """
    batch = encoder_input_tokens.shape[0]
    enc_ctx, dec_ctx = model.contexts(task_ids=task_ids, language_ids=language_ids)
    encoded, key_mask = model.encode(encoder_input_tokens, enc_ctx)
    cross_kv = model.decoder.cross_key_values(encoded, enc_ctx)
    cross_bias = mask_to_bias(key_mask[:, None, None, :])
    caches = model.decoder.init_caches(batch, max_length)  # stacked with config.scan_layers

    def body(state):
        index, token_b, caches, out_bt, done_b = state
        y, caches = model.decoder.step(model.shared(token_b[:, None]), index, caches, cross_kv,
                                       cross_bias, dec_ctx)
        next_b = jnp.argmax(model.logits(y, dec_ctx)[:, 0], axis=-1).astype(jnp.int32)
        next_b = jnp.where(done_b, 0, next_b)
        out_bt = jax.lax.dynamic_update_slice_in_dim(out_bt, next_b[:, None], index, axis=1)
        return index + 1, next_b, caches, out_bt, done_b | (next_b == eos_id)

    def cond(state):
        index, *_, done_b = state
        return (index < max_length) & ~jnp.all(done_b)

    init = (jnp.int32(0), jnp.zeros((batch,), jnp.int32), caches,
            jnp.zeros((batch, max_length), jnp.int32), jnp.zeros((batch,), bool))
    return jax.lax.while_loop(cond, body, init)[3]
