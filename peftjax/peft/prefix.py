"""Prefix tuning (Li & Liang, 2021): learned keys and values prepended at each targeted attention.

Every targeted `Attention` gets its own `p` prefix keys and values `[p, heads, d_kv]` (per task:
`[tasks, p, heads, d_kv]`), prepended to the keys/values it attends to, in the encoder's and the
decoder's self-attention and the decoder's cross-attention.

Prefix columns get score bias 0: no relative position bias (they are not tokens of the sequence,
so they have no distance to a query) and no mask (every query sees them, padding and causal masks
apply only to real keys). With per-token task ids (packed rows that mix tasks) every task's
prefix block is appended and each query is masked to its own task's block, so one packed row
serves several tasks.

`config.peft.prefix_projection` trains the prefixes through Li & Liang's MLP
reparameterisation (`PrefixProjection`); `fold_prefix_projection` replaces it with the plain
prefixes it produces, for export and serving.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.attention import Attention, mask_to_bias
from peftjax.models.context import Context
from peftjax.peft.config import PeftConfig
from peftjax.peft.prompt import PROMPT_INITS, initial_prompt
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.variables import Adapter

# Logical axis of the per-head key/value width. Not in the rules table: replicated.
KV_AXIS = "kv"


class _PrefixHook(nnx.Module):
    """The `KeyValueHook` behaviour shared by plain and MLP-parameterised prefixes."""

    per_task: bool

    def prefixes(self) -> tuple[jax.Array, jax.Array]:
        """Prefix keys and values, each `[(tasks,) p, heads, d_kv]`."""
        raise NotImplementedError

    def __call__(self, k_bshk: jax.Array, v_bshk: jax.Array, bias: jax.Array,
                 ctx: Context | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Prepend the prefixes: keys/values `[b, p' + s, h, d_kv]`, bias `[.., p' + s]`.

        `p' = p`, except with per-token task ids, where `p' = tasks · p` (all tasks' blocks).
        """
        keys, values = self.prefixes()
        keys, values = keys.astype(k_bshk.dtype), values.astype(v_bshk.dtype)
        batch = k_bshk.shape[0]
        ids = None if ctx is None else ctx.task_ids
        if not self.per_task:
            pk_bphk, pv_bphk = (jnp.broadcast_to(x, (batch, *x.shape)) for x in (keys, values))
            prefix_bias = jnp.zeros((*bias.shape[:-1], keys.shape[0]), bias.dtype)
        elif _check_ids(ids, batch).ndim == 1:
            pk_bphk, pv_bphk = jnp.take(keys, ids, axis=0), jnp.take(values, ids, axis=0)
            prefix_bias = jnp.zeros((*bias.shape[:-1], keys.shape[1]), bias.dtype)
        else:
            return _per_token(keys, values, k_bshk, v_bshk, bias, ids)
        return (jnp.concatenate([pk_bphk, k_bshk], axis=1),
                jnp.concatenate([pv_bphk, v_bshk], axis=1),
                jnp.concatenate([prefix_bias, bias], axis=-1))


def _check_ids(ids: jax.Array | None, batch: int) -> jax.Array:
    if ids is None:
        raise ValueError("This model has per-task prefixes, so every call needs task ids: pass "
                         "task_ids=[batch] (or encoder_task_ids/decoder_task_ids per token).")
    if ids.ndim not in (1, 2) or ids.shape[0] != batch:
        raise ValueError(f"task ids of shape {ids.shape} do not align with a batch of {batch}; "
                         "expected [batch] or [batch, length].")
    return ids


def _per_token(keys_tphk: jax.Array, values_tphk: jax.Array, k_bshk: jax.Array,
               v_bshk: jax.Array, bias: jax.Array,
               ids_bq: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Append every task's prefix block; query `(b, q)` sees only block `ids_bq[b, q]`."""
    tasks, p = keys_tphk.shape[:2]
    batch, queries = ids_bq.shape
    if bias.shape[2] not in (1, queries):
        raise ValueError(f"per-token task ids {ids_bq.shape} do not align with "
                         f"{bias.shape[2]} queries.")
    flat = (tasks * p, *keys_tphk.shape[2:])
    pk_bjhk, pv_bjhk = (jnp.broadcast_to(x.reshape(flat), (batch, *flat))
                        for x in (keys_tphk, values_tphk))
    owner_j = jnp.arange(tasks * p) // p  # prefix column j belongs to task j // p
    prefix_bias = mask_to_bias(ids_bq[:, None, :, None] == owner_j)  # [b, 1, q, tasks·p]
    full = jnp.broadcast_shapes(bias.shape, (batch, 1, queries, 1))
    bias = jnp.broadcast_to(bias, full)
    prefix_bias = jnp.broadcast_to(prefix_bias, (*full[:-1], tasks * p)).astype(bias.dtype)
    return (jnp.concatenate([pk_bjhk, k_bshk], axis=1),
            jnp.concatenate([pv_bjhk, v_bshk], axis=1),
            jnp.concatenate([prefix_bias, bias], axis=-1))


class PrefixTuning(_PrefixHook):
    """Replaces an `Attention`'s `prefix` hook with trainable `prefix_keys`, `prefix_values`
    `[(tasks,) p, heads, d_kv]`."""

    def __init__(self, keys_phk: jax.Array, values_phk: jax.Array, *, per_task: bool):
        if keys_phk.shape != values_phk.shape or keys_phk.ndim != 3 + per_task:
            raise ValueError(f"prefix keys {keys_phk.shape} and values {values_phk.shape} must "
                             "both be [(tasks,) p, heads, d_kv].")
        axes = (*(("tasks",) if per_task else ()), "virtual_tokens", "heads", KV_AXIS)
        self.prefix_keys = Adapter(jnp.asarray(keys_phk, jnp.float32), axes=axes)
        self.prefix_values = Adapter(jnp.asarray(values_phk, jnp.float32), axes=axes)
        self.per_task = per_task

    def prefixes(self) -> tuple[jax.Array, jax.Array]:
        return self.prefix_keys.value, self.prefix_values.value


class PrefixProjection(_PrefixHook):
    """Prefixes through Li & Liang's reparameterisation, one MLP per attention:
    `[k | v] = tanh(E W1 + b1) W2 + b2`.

    `prefix_embedding` E: `[(tasks,) p, d]`; W1 `[d, hidden]`, W2 `[hidden, 2 · heads · d_kv]`
    and the biases are shared by the tasks (a reparameterisation for optimisation, not capacity:
    `fold` leaves per-task prefixes). Linear layers start like torch.nn.Linear, U(±1/sqrt(fan_in)),
    as in HF peft's `PrefixEncoder`.
    """

    def __init__(self, embedding_pd: jax.Array, *, hidden: int, num_heads: int, d_kv: int,
                 per_task: bool, rngs: nnx.Rngs):
        d = embedding_pd.shape[-1]
        out = 2 * num_heads * d_kv
        lead = ("tasks",) if per_task else ()
        self.prefix_embedding = Adapter(jnp.asarray(embedding_pd, jnp.float32),
                                        axes=(*lead, "virtual_tokens", "embed"))

        def uniform(shape, fan_in):
            bound = fan_in ** -0.5
            return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)

        self.prefix_mlp_in = Adapter(uniform((d, hidden), d), axes=("embed", "adapter_hidden"))
        self.prefix_mlp_in_bias = Adapter(uniform((hidden,), d), axes=("adapter_hidden",))
        self.prefix_mlp_out = Adapter(uniform((hidden, out), hidden),
                                      axes=("adapter_hidden", "joined_kv"))
        self.prefix_mlp_out_bias = Adapter(uniform((out,), hidden), axes=("joined_kv",))
        self.num_heads, self.d_kv, self.per_task = num_heads, d_kv, per_task

    def prefixes(self) -> tuple[jax.Array, jax.Array]:
        e_pd = self.prefix_embedding.value
        h_pf = jnp.tanh(e_pd @ self.prefix_mlp_in.value + self.prefix_mlp_in_bias.value)
        kv = h_pf @ self.prefix_mlp_out.value + self.prefix_mlp_out_bias.value
        kv = kv.reshape(*e_pd.shape[:-1], 2, self.num_heads, self.d_kv)
        return kv[..., 0, :, :], kv[..., 1, :, :]

    def fold(self) -> PrefixTuning:
        """The plain prefixes this MLP currently produces (same outputs, no MLP)."""
        keys, values = self.prefixes()
        return PrefixTuning(keys, values, per_task=self.per_task)


def fold_prefix_projection(model: nnx.Module) -> list[str]:
    """Replace every `PrefixProjection` in `model` by its folded `PrefixTuning`, in place.

    For export and serving: the model computes the same outputs without the MLP. Returns the
    dotted paths of the folded attentions, sorted.
    """
    found = [(".".join(map(str, path)), module) for path, module in nnx.iter_modules(model)
             if isinstance(module, Attention) and isinstance(module.prefix, PrefixProjection)]
    for _, attention in found:
        attention.prefix = attention.prefix.fold()
    return sorted(path for path, _ in found)


def _rms_normalise(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


def initial_prefixes(attention: Attention, key: jax.Array, shape: tuple[int, ...], init: str,
                     embedding_vd: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Initial prefix keys and values, each `shape` = `[(tasks,) p, heads, d_kv]`.

    "vocab": this attention's own key/value projections of RMS-normalised embeddings of tokens
    drawn from the vocabulary (Li & Liang initialise from real words' activations; this is the
    cheap version that needs no forward pass), so prefixes start on the scale of real keys.
    "random": N(0, 1), HF peft's prefix init.
    """
    if init == "random":
        k_key, v_key = jax.random.split(key)
        return (jax.random.normal(k_key, shape, jnp.float32),
                jax.random.normal(v_key, shape, jnp.float32))
    if init != "vocab":
        raise ValueError(f"Unknown config.peft.prompt_init {init!r}; choose from "
                         f"{PROMPT_INITS}.")
    tokens = jax.random.randint(key, shape[:-2], 0, embedding_vd.shape[0])
    x = _rms_normalise(jnp.take(embedding_vd, tokens, axis=0).astype(jnp.float32))
    k, v = attention.key_values(x, Context())
    return k.astype(jnp.float32), v.astype(jnp.float32)


def _build(attention: Attention, site: Site, config: PeftConfig) -> Attention:
    cfg = site.model_config
    lead = (site.num_tasks,) if site.num_tasks else ()
    per_task = bool(site.num_tasks)
    embedding_vd = site.model.shared.embedding.value  # frozen token embeddings (read only)
    if config.prefix_projection:
        shape = (*lead, config.num_virtual_tokens, cfg.d_model)
        embedding = initial_prompt(site.rngs.params(), shape, config.prompt_init, embedding_vd)
        attention.prefix = PrefixProjection(
            embedding, hidden=config.prefix_hidden or cfg.d_model, num_heads=cfg.num_heads,
            d_kv=cfg.d_kv, per_task=per_task, rngs=site.rngs)
    else:
        shape = (*lead, config.num_virtual_tokens, cfg.num_heads, cfg.d_kv)
        keys, values = initial_prefixes(attention, site.rngs.params(), shape, config.prompt_init,
                                        embedding_vd)
        attention.prefix = PrefixTuning(keys, values, per_task=per_task)
    return attention


SPECS = {"prefix_tuning": MethodSpec(
    kinds=(Attention,), targets=r".*\.(self|cross)_attention", build=_build,
    where=("Attention modules themselves, not their q/k/v/o or .prefix: "
           "encoder.layers.{i}.self_attention, decoder.layers.{i}.{self,cross}_attention; all "
           r"of them: targets=r'.*\.(self|cross)_attention'"))}
