"""T5 v1.1 / Flan-T5 (and original T5) encoder-decoder in Flax NNX.

Named PEFT insertion points, as dotted module paths (see `peftjax.peft.inject`):

    encoder.layers.{i}.self_attention.{q,k,v,o}     decoder.layers.{i}.self_attention.{q,k,v,o}
    encoder.layers.{i}.mlp.{wi_0,wi_1,wo} (wi)      decoder.layers.{i}.cross_attention.{q,k,v,o}
    encoder.layers.{i}.{post_attention,post_ffn}    decoder.layers.{i}.mlp.{wi_0,wi_1,wo}
                                                    decoder.layers.{i}.{post_attention,
                                                      post_cross_attention,post_ffn}

    encoder.prompt (input embeddings)               {encoder,decoder}.layers.{i}.*_attention.prefix
    *.{attention_norm,mlp_norm,...}, *.final_norm   (keys/values)

Projections are `Dense` modules, residual hooks `Hook`, the prompt point an `EmbeddingHook` and
the prefix points `KeyValueHook`s; PEFT methods replace or wrap them.
Inputs use seqio feature names; token 0 is padding and the decoder start token.

Layer stacks keep one module per layer (the paths above, for PEFT injection, checkpoints and HF
weights). With `T5Config.scan_layers` a stack still runs as one `jax.lax.scan`: the one layer
structure its layers share is applied to each slice of their states stacked along a new leading
axis, so compile time does not grow with depth. The stacked states come from the call
(`layer_states`: training keeps them stacked, see `peftjax.models.stacking`) or, failing that,
from stacking the layers' own variables (a copy per call). `T5Config.remat` wraps each layer
call (scanned or not) in `jax.checkpoint`. Layers hold no per-layer static data: dropout differs
between layers through the layer index folded into the key (`layer_context`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.attention import Attention, RelativePositionBias, mask_to_bias
from peftjax.models.config import T5Config
from peftjax.models.context import Context, dropout, layer_context, site_salt, split_generated
from peftjax.models.layers import Dense, Embed, EmbeddingHook, Hook, RMSNorm, activation_fn

KVCache = tuple[jax.Array, jax.Array]  # keys, values: [batch, max_length, heads, d_kv]


def _norm(cfg: T5Config) -> RMSNorm:
    return RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=jnp.dtype(cfg.dtype),
                   param_dtype=jnp.dtype(cfg.param_dtype))


class MLP(nnx.Module):
    """Gated (`act(x wi_0) * (x wi_1)`, v1.1) or plain (`act(x wi)`, original T5) feed-forward."""

    def __init__(self, cfg: T5Config, *, salt: int, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        d, f = cfg.d_model, cfg.d_ff
        self.is_gated = cfg.is_gated
        if cfg.is_gated:
            self.wi_0 = Dense(d, f, axes=("embed", "mlp"), std=d ** -0.5, **kw)
            self.wi_1 = Dense(d, f, axes=("embed", "mlp"), std=d ** -0.5, **kw)
        else:
            self.wi = Dense(d, f, axes=("embed", "mlp"), std=d ** -0.5, **kw)
        self.wo = Dense(f, d, axes=("mlp", "embed"), std=f ** -0.5, **kw)
        self.act = activation_fn(cfg.activation)
        self.dropout_rate, self.salt = cfg.dropout_rate, salt

    def __call__(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        if self.is_gated:
            h_btf = self.act(self.wi_0(x_btd, ctx)) * self.wi_1(x_btd, ctx)
        else:
            h_btf = self.act(self.wi(x_btd, ctx))
        h_btf = dropout(h_btf, self.dropout_rate, ctx, self.salt)
        return self.wo(h_btf, ctx)


class _Layer(nnx.Module):
    """Shared residual wiring: `x + hook(dropout(sublayer(norm(x))))`."""

    def _residual(self, x, y, hook: nnx.Module, ctx: Context, salt: int) -> jax.Array:
        return x + hook(dropout(y, self.dropout_rate, ctx, salt), ctx)


class EncoderLayer(_Layer):
    def __init__(self, cfg: T5Config, index: int, *, rngs: nnx.Rngs):
        del index  # every layer is built alike (scan_layers); the key tells layers apart
        name = "encoder.layer"
        self.attention_norm = _norm(cfg)
        self.self_attention = Attention(cfg, salt=site_salt(name + ".attn"), rngs=rngs)
        self.post_attention = Hook()
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg, salt=site_salt(name + ".mlp"), rngs=rngs)
        self.post_ffn = Hook()
        self.dropout_rate = cfg.dropout_rate
        self.salts = (site_salt(name + ".res_attn"), site_salt(name + ".res_ffn"))

    def __call__(self, x_btd: jax.Array, bias: jax.Array, ctx: Context) -> jax.Array:
        h = self.attention_norm(x_btd, ctx)
        x_btd = self._residual(x_btd, self.self_attention(h, h, bias, ctx), self.post_attention,
                               ctx, self.salts[0])
        y = self.mlp(self.mlp_norm(x_btd, ctx), ctx)
        return self._residual(x_btd, y, self.post_ffn, ctx, self.salts[1])


class DecoderLayer(_Layer):
    def __init__(self, cfg: T5Config, index: int, *, rngs: nnx.Rngs):
        del index  # every layer is built alike (scan_layers); the key tells layers apart
        name = "decoder.layer"
        self.attention_norm = _norm(cfg)
        self.self_attention = Attention(cfg, salt=site_salt(name + ".attn"), rngs=rngs)
        self.post_attention = Hook()
        self.cross_attention_norm = _norm(cfg)
        self.cross_attention = Attention(cfg, salt=site_salt(name + ".cross"), rngs=rngs)
        self.post_cross_attention = Hook()
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg, salt=site_salt(name + ".mlp"), rngs=rngs)
        self.post_ffn = Hook()
        self.dropout_rate = cfg.dropout_rate
        self.salts = tuple(site_salt(name + s) for s in (".res_attn", ".res_cross", ".res_ffn"))

    def __call__(self, x_btd: jax.Array, cross_kv: KVCache, self_bias: jax.Array,
                 cross_bias: jax.Array, ctx: Context, cache: KVCache | None = None,
                 index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """One layer; with `cache`, writes this step's keys/values at `index` and attends to all."""
        h = self.attention_norm(x_btd, ctx)
        k, v = self.self_attention.key_values(h, ctx)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, 1)
            cache = (k, v)
        y = self.self_attention.attend(h, k, v, self_bias, ctx)
        x_btd = self._residual(x_btd, y, self.post_attention, ctx, self.salts[0])
        y = self.cross_attention.attend(self.cross_attention_norm(x_btd, ctx), *cross_kv,
                                        cross_bias, ctx)
        x_btd = self._residual(x_btd, y, self.post_cross_attention, ctx, self.salts[1])
        y = self.mlp(self.mlp_norm(x_btd, ctx), ctx)
        return self._residual(x_btd, y, self.post_ffn, ctx, self.salts[2]), cache


def _segment_mask(q_segments: jax.Array, k_segments: jax.Array) -> jax.Array:
    """`[batch, 1, q, k]`: attend only within the same packed segment."""
    return (q_segments[:, None, :, None] == k_segments[:, None, None, :])


# ---- running a layer stack: unrolled, or one scan; each layer call optionally rematerialised

# `call(layer, carry, x, ctx, index) -> (carry, y)`: one layer's step; `x` is the layer's slice of
# the per-layer inputs, `ctx` its context (`layer_context`), `index` its position in the stack.
LayerCall = Callable[[nnx.Module, Any, Any, Context, Any], tuple[Any, Any]]

_REMAT = {"full": jax.checkpoint_policies.nothing_saveable,
          "dots": jax.checkpoint_policies.dots_saveable,
          "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def run_layers(layers: Sequence[nnx.Module], call: LayerCall, carry: Any, per_layer: Any,
               ctx: Context, *, cfg: T5Config, name: str) -> tuple[Any, Any]:
    """Thread `carry` through `layers` in order: `(carry, ys)`.

    Unrolled (`cfg.scan_layers` False), `per_layer` is a list with one entry per layer (or None)
    and `ys` a list. Scanned, `per_layer` is a pytree stacked on a leading layer axis (or None)
    and so is `ys`. Layer `i` sees `layer_context(ctx, i)` either way, so both give the same
    values, dropout included. What routers record (`peftjax.routing.capture`) inside a scanned
    or rematerialised layer comes back as outputs and is written to that layer's modules, as an
    unrolled call would have recorded it.
    """
    ctx, generated = split_generated(ctx, name, len(layers))  # hypernetwork weights, by layer
    if not cfg.scan_layers and cfg.remat == "none":
        ys = []
        for i, layer in enumerate(layers):
            x = None if per_layer is None else per_layer[i]
            carry, y = call(layer, carry, x, layer_context(ctx, i, generated[i]), i)
            ys.append(y)
        return carry, ys
    # The recorded intermediates (a `capture` in progress) are per call, not stacked.
    parts = [nnx.split(layer, nnx.Intermediate, ...) for layer in layers]
    if not cfg.scan_layers:
        ys = []
        for i, (layer, (graphdef, recorded, state)) in enumerate(zip(layers, parts, strict=True)):
            body = _layer_body(graphdef, recorded, call, ctx, cfg)
            x = None if per_layer is None else per_layer[i]
            carry, (y, recorded_now) = body(carry, (state, x, generated[i], jnp.int32(i)))
            _write_recorded(layer, recorded_now)
            ys.append(y)
        return carry, ys
    graphdef, recorded, _ = parts[0]
    _check_alike(layers, [g for g, _, _ in parts], name)
    stacked = (ctx.layer_states or {}).get(name)
    if stacked is None:  # per-layer state: stack it (a copy per call; see models.stacking)
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(s for _, _, s in parts))
    # Alike layers have the same sites: one stack per generated weight.
    generated = jax.tree.map(lambda *leaves: jnp.stack(leaves), *generated)
    body = _layer_body(graphdef, recorded, call, ctx, cfg)
    carry, (ys, recorded_all) = jax.lax.scan(
        body, carry,
        (stacked, per_layer, generated, jnp.arange(len(layers), dtype=jnp.int32)))
    for i, layer in enumerate(layers):
        _write_recorded(layer, jax.tree.map(lambda a, i=i: a[i], recorded_all))
    return carry, ys


def _layer_body(graphdef: nnx.GraphDef, recorded: nnx.State, call: LayerCall, ctx: Context,
                cfg: T5Config):
    """`body(carry, (state, x, generated, index)) -> (carry, (y, recorded))`: one layer as a
    pure function of its state (and its hypernetwork weights), rematerialised by `cfg.remat`."""
    kinds = [(path, type(v)) for path, v in nnx.to_flat_state(recorded)]

    def body(carry, inputs):
        state, x, generated, index = inputs
        empty = nnx.from_flat_state([(path, kind({})) for path, kind in kinds])  # fresh records
        layer = nnx.merge(graphdef, empty, state)
        carry, y = call(layer, carry, x, layer_context(ctx, index, generated), index)
        return carry, (y, _recorded(layer))

    if cfg.remat == "none":
        return body
    # prevent_cse keeps XLA from merging an unrolled layer's recomputation back into its forward
    # pass; a scan body cannot be merged that way, and the guard would only slow it.
    return jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)


def _recorded(layer: nnx.Module) -> dict[str, tuple[dict, ...]]:
    """What `layer`'s modules recorded in this call, by relative module path (only modules that
    recorded something)."""
    out = {}
    for path, module in nnx.iter_modules(layer):
        captures = getattr(module, "__captures__", None)
        if captures and any(v.get_value() for v in captures):
            out[".".join(map(str, path))] = tuple(dict(v.get_value()) for v in captures)
    return out


def _write_recorded(layer: nnx.Module, recorded: dict[str, tuple[dict, ...]]) -> None:
    """Append what a split copy of `layer` recorded to `layer`'s own records (as `sow` does)."""
    if not recorded:  # no router in the layer: skip the walk over its modules
        return
    for path, module in nnx.iter_modules(layer):
        got = recorded.get(".".join(map(str, path)))
        for variable, values in zip(module.__captures__ if got else (), got or (), strict=True):
            for key, value in values.items():
                variable[key] = variable[key] + value if key in variable else value


def _check_alike(layers: Sequence[nnx.Module], graphdefs: list[nnx.GraphDef], name: str) -> None:
    """Raise ValueError, naming the first layer that differs from layer 0 and how, unless every
    layer has the same structure (a scan applies one structure to every layer's parameters)."""
    for i, graphdef in enumerate(graphdefs[1:], start=1):
        if graphdef == graphdefs[0]:
            continue
        first = {".".join(map(str, p)): type(m).__name__ for p, m in nnx.iter_modules(layers[0])}
        this = {".".join(map(str, p)): type(m).__name__ for p, m in nnx.iter_modules(layers[i])}
        diffs = [p for p in sorted(first.keys() | this.keys()) if first.get(p) != this.get(p)]
        detail = (f"at {diffs[0] or 'the layer'}: {first.get(diffs[0], 'nothing')} in layer 0, "
                  f"{this.get(diffs[0], 'nothing')} here" if diffs else
                  "the same modules, but with different static settings, e.g. a per-layer name "
                  "or size")
        raise ValueError(
            f"config.model.scan_layers=True runs {name} as one scan, which needs every layer "
            f"alike, but {name}.{i} differs from {name}.0 ({detail}). Set "
            "config.model.scan_layers=False, or attach PEFT modules alike to every layer "
            "(config.peft.targets matching the same modules in each layer).")


def _stacked(per_layer: list | Any) -> Any:
    """Per-layer values (a list, the unrolled form) stacked on a leading layer axis."""
    if isinstance(per_layer, list):
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)
    return per_layer


def _unstacked(per_layer: list | Any, n: int) -> list:
    """Stacked per-layer values as a list (the unrolled form)."""
    if isinstance(per_layer, list):
        return per_layer
    return [jax.tree.map(lambda a, i=i: a[i], per_layer) for i in range(n)]


class Encoder(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.prompt = EmbeddingHook()
        self.relative_attention_bias = RelativePositionBias(cfg, bidirectional=True, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(cfg, i, rngs=rngs)
                                for i in range(cfg.num_encoder_layers)])
        self.final_norm = _norm(cfg)
        self.dropout_rate = cfg.dropout_rate
        self.salts = (site_salt("encoder.embed"), site_salt("encoder.final"))

    def __call__(self, x_bsd: jax.Array, key_mask_bs: jax.Array, ctx: Context,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Embedded inputs → (encoded `[batch, source', embed]`, key mask `[batch, source']`).

        `source'` is longer than `source` when the `prompt` hook prepends vectors.
        """
        x_bsd, key_mask_bs, segment_ids = self.prompt(x_bsd, key_mask_bs, segment_ids, ctx)
        length = x_bsd.shape[1]
        mask = key_mask_bs[:, None, None, :]
        if segment_ids is not None:
            mask = mask & _segment_mask(segment_ids, segment_ids)
        bias = self.relative_attention_bias(length, length) + mask_to_bias(mask)
        x_bsd = dropout(x_bsd, self.dropout_rate, ctx, self.salts[0])

        def call(layer, x, _, layer_ctx, __):
            return layer(x, bias, layer_ctx), None

        x_bsd, _ = run_layers(self.layers, call, x_bsd, None, ctx, cfg=self.config,
                              name="encoder.layers")
        return (dropout(self.final_norm(x_bsd, ctx), self.dropout_rate, ctx, self.salts[1]),
                key_mask_bs)


class Decoder(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.relative_attention_bias = RelativePositionBias(cfg, bidirectional=False, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs)
                                for i in range(cfg.num_decoder_layers)])
        self.final_norm = _norm(cfg)
        self.dropout_rate = cfg.dropout_rate
        self.salts = (site_salt("decoder.embed"), site_salt("decoder.final"))

    def cross_key_values(self, encoded_bsd: jax.Array, enc_ctx: Context) -> list[KVCache] | KVCache:
        """Every layer's cross-attention keys and values of the encoded input: a list of
        `(keys, values)`, or with `scan_layers` one pair `[layers, batch, source, heads, d_kv]`."""

        def call(layer, _, __, layer_ctx, ___):
            return None, layer.cross_attention.key_values(encoded_bsd, layer_ctx)

        return run_layers(self.layers, call, None, None, enc_ctx, cfg=self.config,
                          name="decoder.layers")[1]

    def init_caches(self, batch: int, max_length: int) -> list[KVCache] | KVCache:
        """Empty self-attention caches for `step`: a list of `(keys, values)` `[batch,
        max_length, heads, d_kv]`, or with `scan_layers` one pair with a leading layer axis."""
        cfg = self.config
        shape = (batch, max_length, cfg.num_heads, cfg.d_kv)
        if cfg.scan_layers:
            shape = (cfg.num_decoder_layers, *shape)
            return jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)
        return [(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
                for _ in range(cfg.num_decoder_layers)]

    def __call__(self, y_btd: jax.Array, cross_kv: list[KVCache] | KVCache,
                 cross_bias: jax.Array, ctx: Context,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Teacher-forced decoding of a whole target sequence (`cross_kv` from
        `cross_key_values`)."""
        length = y_btd.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if segment_ids is not None:
            causal = causal & _segment_mask(segment_ids, segment_ids)
        self_bias = self.relative_attention_bias(length, length) + mask_to_bias(causal)
        y_btd = dropout(y_btd, self.dropout_rate, ctx, self.salts[0])

        def call(layer, y, kv, layer_ctx, _):
            return layer(y, kv, self_bias, cross_bias, layer_ctx)[0], None

        n = len(self.layers)
        kv = _stacked(cross_kv) if self.config.scan_layers else _unstacked(cross_kv, n)
        y_btd, _ = run_layers(self.layers, call, y_btd, kv, ctx, cfg=self.config,
                              name="decoder.layers")
        return dropout(self.final_norm(y_btd, ctx), self.dropout_rate, ctx, self.salts[1])

    def step(self, y_b1d: jax.Array, index: jax.Array, caches: list[KVCache] | KVCache,
             cross_kv: list[KVCache] | KVCache, cross_bias: jax.Array,
             ctx: Context) -> tuple[jax.Array, list[KVCache] | KVCache]:
        """Decode position `index` given cached keys/values of positions before it (`caches`
        from `init_caches`, `cross_kv` from `cross_key_values`)."""
        if self.config.scan_layers:
            return self._scanned_step(y_b1d, index, caches, cross_kv, cross_bias, ctx)
        max_length = caches[0][0].shape[1]
        causal = (jnp.arange(max_length) <= index)[None, None, None, :]
        self_bias = self.relative_attention_bias.row(index, max_length) + mask_to_bias(causal)
        new_caches = []
        cross_kv = _unstacked(cross_kv, len(self.layers))
        ctx, generated = split_generated(ctx, "decoder.layers", len(self.layers))
        for i, (layer, kv, cache) in enumerate(zip(self.layers, cross_kv, caches, strict=True)):
            y_b1d, cache = layer(y_b1d, kv, self_bias, cross_bias,
                                 layer_context(ctx, i, generated[i]), cache=cache, index=index)
            new_caches.append(cache)
        return self.final_norm(y_b1d, ctx), new_caches

    def _scanned_step(self, y_b1d, index, caches, cross_kv, cross_bias, ctx):
        """`step` as one scan over the layers. The stacked caches ride in the carry and only
        the new position's row is written back, so XLA updates them in place."""
        max_length = caches[0].shape[2]
        causal = (jnp.arange(max_length) <= index)[None, None, None, :]
        self_bias = self.relative_attention_bias.row(index, max_length) + mask_to_bias(causal)

        def call(layer, carry, kv, layer_ctx, i):
            y, (keys, values) = carry
            cache = (keys[i], values[i])
            y, (k_i, v_i) = layer(y, kv, self_bias, cross_bias, layer_ctx, cache=cache,
                                  index=index)
            rows = [jax.lax.dynamic_slice_in_dim(c, index, 1, axis=1)[None] for c in (k_i, v_i)]
            start = (i, 0, index, 0, 0)
            keys = jax.lax.dynamic_update_slice(keys, rows[0], start)
            values = jax.lax.dynamic_update_slice(values, rows[1], start)
            return (y, (keys, values)), None

        (y_b1d, caches), _ = run_layers(self.layers, call, (y_b1d, tuple(caches)),
                                        _stacked(cross_kv), ctx, cfg=self.config,
                                        name="decoder.layers")
        return self.final_norm(y_b1d, ctx), caches


class T5(nnx.Module):
    """T5 encoder-decoder: `model(encoder_input_tokens=..., decoder_input_tokens=...)` → logits."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.shared = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dtype, param_dtype=pdtype)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Dense(
            cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), std=cfg.d_model ** -0.5,
            rngs=rngs, dtype=dtype,
            param_dtype=pdtype)
        # Insertion point for a hypernetwork (`peftjax.hyper`): it maps the call's contexts to
        # contexts carrying the adapter weights it generated for them, once per call.
        self.hypernet: nnx.Module | None = nnx.data(None)

    def contexts(self, *, task_ids: jax.Array | None = None,
                 encoder_task_ids: jax.Array | None = None,
                 decoder_task_ids: jax.Array | None = None,
                 language_ids: jax.Array | None = None,
                 encoder_language_ids: jax.Array | None = None,
                 decoder_language_ids: jax.Array | None = None,
                 dropout_key: jax.Array | None = None,
                 layer_states: dict | None = None) -> tuple[Context, Context]:
        """The encoder's and the decoder's `Context` for one call (see `__call__` for the ids),
        with the hypernetwork's adapter weights when the model has one."""
        enc_ctx, dec_ctx = task_contexts(task_ids, encoder_task_ids, decoder_task_ids,
                                         dropout_key, language_ids=language_ids,
                                         encoder_language_ids=encoder_language_ids,
                                         decoder_language_ids=decoder_language_ids)
        if layer_states is not None:
            if not self.config.scan_layers:
                raise ValueError("layer_states (stacked layer variables) feed scanned stacks; "
                                 "this model has scan_layers=False. Pass the per-layer state "
                                 "(peftjax.models.stacking.unstack_layers) instead.")
            enc_ctx, dec_ctx = (c.replace(layer_states=layer_states) for c in (enc_ctx, dec_ctx))
        if self.hypernet is not None:
            enc_ctx, dec_ctx = self.hypernet(enc_ctx, dec_ctx)
        return enc_ctx, dec_ctx

    def encode(self, encoder_input_tokens: jax.Array, ctx: Context,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """`[batch, source]` tokens → (`[batch, source', embed]` states, `[batch, source']` mask).

        `source' = source` unless a prompt is prepended (`encoder.prompt`); the mask is what the
        decoder's cross-attention may attend to.
        """
        return self.encoder(self.shared(encoder_input_tokens), encoder_input_tokens > 0, ctx,
                            segment_ids)

    def logits(self, y_btd: jax.Array, ctx: Context) -> jax.Array:
        """Decoder states → float32 logits over the vocabulary (`lm_head` is an insertion point)."""
        if self.config.scale_decoder_outputs:
            y_btd = y_btd * (self.config.d_model ** -0.5)
        out = self.shared.attend(y_btd) if self.lm_head is None else self.lm_head(y_btd, ctx)
        return out.astype(jnp.float32)

    def __call__(self, encoder_input_tokens: jax.Array, decoder_input_tokens: jax.Array, *,
                 encoder_segment_ids: jax.Array | None = None,
                 decoder_segment_ids: jax.Array | None = None,
                 task_ids: jax.Array | None = None,
                 encoder_task_ids: jax.Array | None = None,
                 decoder_task_ids: jax.Array | None = None,
                 language_ids: jax.Array | None = None,
                 encoder_language_ids: jax.Array | None = None,
                 decoder_language_ids: jax.Array | None = None,
                 dropout_key: jax.Array | None = None,
                 layer_states: dict | None = None) -> jax.Array:
        """float32 logits `[batch, target, vocab]`.

        Args:
          encoder_input_tokens: int `[batch, source]`, 0 = padding.
          decoder_input_tokens: int `[batch, target]`, targets shifted right (starts with 0).
          encoder_segment_ids / decoder_segment_ids: packed-segment ids `[batch, length]`.
          task_ids: `[batch]`, one task per example; or per token for packed rows through
            `encoder_task_ids` `[batch, source]` and `decoder_task_ids` `[batch, target]`.
          language_ids / encoder_language_ids / decoder_language_ids: the same for language ids
            (read by generators conditioned on task and language).
          dropout_key: enables dropout (training); None = deterministic.
          layer_states: with `scan_layers`, the scanned stacks' variables already stacked
            (`peftjax.models.stacking.layer_states`, the stacked layout a scanned run trains
            in); the scans read these instead of the layers' own variables.
        """
        enc_ctx, dec_ctx = self.contexts(
            task_ids=task_ids, encoder_task_ids=encoder_task_ids,
            decoder_task_ids=decoder_task_ids, language_ids=language_ids,
            encoder_language_ids=encoder_language_ids,
            decoder_language_ids=decoder_language_ids, dropout_key=dropout_key,
            layer_states=layer_states)
        encoded, key_mask = self.encode(encoder_input_tokens, enc_ctx, encoder_segment_ids)
        cross_mask = key_mask[:, None, None, :]
        if encoder_segment_ids is not None and decoder_segment_ids is not None:
            cross_mask = cross_mask & _segment_mask(decoder_segment_ids, encoder_segment_ids)
        cross_kv = self.decoder.cross_key_values(encoded, enc_ctx)
        y = self.decoder(self.shared(decoder_input_tokens), cross_kv, mask_to_bias(cross_mask),
                         dec_ctx, decoder_segment_ids)
        return self.logits(y, dec_ctx)


def task_contexts(task_ids, encoder_task_ids, decoder_task_ids, dropout_key, *,
                  language_ids=None, encoder_language_ids=None,
                  decoder_language_ids=None) -> tuple[Context, Context]:
    """Encoder-side and decoder-side contexts from per-example or per-token task (and language)
    ids."""
    enc_ids, dec_ids = _paired("task_ids", task_ids, encoder_task_ids, decoder_task_ids)
    enc_lang, dec_lang = _paired("language_ids", language_ids, encoder_language_ids,
                                 decoder_language_ids)
    enc_key = dec_key = dropout_key
    if dropout_key is not None:
        enc_key, dec_key = jax.random.split(dropout_key)
    return (Context(enc_ids, enc_key, language_ids=enc_lang),
            Context(dec_ids, dec_key, language_ids=dec_lang))


def _paired(name: str, both, encoder, decoder) -> tuple:
    """(encoder-side, decoder-side) ids from per-example `both` or per-token `encoder`/`decoder`."""
    if both is not None and (encoder is not None or decoder is not None):
        raise ValueError(f"Pass either {name} ([batch]) or encoder_{name}/decoder_{name} "
                         "(per token), not both.")
    return (both, both) if both is not None else (encoder, decoder)
