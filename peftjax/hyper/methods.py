"""Hypernetwork PEFT methods: the sites that apply generated adapters, and how they attach.

  hyperformer     a hypernetwork per adapted site (layer x position) on the projected task
                  embedding: bottleneck adapters + conditional layer norms (HyperFormer).
  hyperformer_pp  ONE hypernetwork per stack (encoder, decoder), shared by its layers and
                  positions, reading task, layer-id and position embeddings (HyperFormer++;
                  with hyper_condition='task_language', Hyper-X).
  text_to_lora    LoRA A and B for every target projection from a task description (or task /
                  language) embedding with module-type and layer embeddings (Text-to-LoRA);
                  sites of one shape share heads.

Every site reads its weights from `Context.generated` (made once per call by the model's
`HyperNetwork`, see `generator.py`), so a site holds no parameters. A site inside a layer knows
itself by its `layer_path` (`encoder.layers.*.post_ffn`): its layer's context carries that
layer's weights under that name (`context.split_generated`), so every layer of a stack holds
the same static data and the stack can run as one scan.
Bottlenecks follow rabeehk/hyperformer: after self-attention and after the FFN, before the
residual add; `h + LN_cond(U act(D h + b_D) + b_U)`; projector MLP 128 -> 64 + LayerNorm;
every hypernetwork layer N(0, 0.01²) with zero biases.
"""

from __future__ import annotations

import math
from collections import defaultdict

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.hyper.condition import Conditioner
from peftjax.hyper.generator import HyperNetwork, Output, SiteGroup, SiteInfo
from peftjax.models.context import Context, dropout, layer_path, site_salt
from peftjax.models.layers import Dense, Hook, RMSNorm, activation_fn
from peftjax.peft.bottleneck import bottleneck_delta
from peftjax.peft.config import PeftConfig
from peftjax.peft.inject import module_paths, replace_submodule
from peftjax.peft.norm_tuning import TunedRMSNorm
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.task_select import project_in, project_out

_SITES = "hyper_sites"  # key of Site.shared: the SiteInfo (+ shapes) each build recorded


def generated(ctx: Context, path: str) -> tuple[dict[str, jax.Array], jax.Array]:
    """This site's generated weights `{name: [rows, ...]}` and the rows each example / token
    uses, from the context the model's hypernetwork filled in (for a site inside a layer,
    `path` is its `layer_path` and the context its layer's)."""
    if ctx.generated is None or path not in ctx.generated:
        raise ValueError(f"{path} applies adapter weights that the model's hypernetwork "
                         "generates per call: call the whole model (or greedy_decode), whose "
                         "contexts carry them, not this layer alone.")
    return ctx.generated[path], ctx.generated_ids


def nan_outside(y: jax.Array, rows_ids: jax.Array, num_rows: int) -> jax.Array:
    """`y` with NaN where the row id is outside the generated table: an id outside the task /
    language tables (made so under jit) gives NaN, never another task's adapter."""
    valid = rows_ids < num_rows
    return jnp.where(valid.reshape(*valid.shape, *(1,) * (y.ndim - valid.ndim)), y, jnp.nan)


class HyperBottleneck(nnx.Module):
    """Replaces a `Hook`: `h + s · LN_cond(U act(D h + b_D) + b_U)` with generated weights."""

    def __init__(self, path: str, *, activation: str, scale: float):
        self.path = path
        self.act = activation_fn(activation)
        self.scale = scale

    def delta(self, h_btd: jax.Array, ctx: Context) -> jax.Array:
        w, rows = generated(ctx, self.path)
        y = bottleneck_delta(h_btd, w, rows, act=self.act, scale=self.scale)
        return nan_outside(y, rows, w["down"].shape[0])

    def __call__(self, h_btd: jax.Array, ctx: Context) -> jax.Array:
        return h_btd + self.delta(h_btd, ctx)


class HyperLoRADense(nnx.Module):
    """Wraps a frozen `Dense`: `W0 x + s · B A dropout(x)` with generated `a` `[rows, in, r]`
    and `b` `[rows, r, out]`; `s = alpha / r`."""

    def __init__(self, base: Dense, path: str, *, scale: float, dropout_rate: float):
        self.base = base
        self.path = path
        self.scale = scale
        self.dropout_rate = dropout_rate
        self.salt = site_salt(path + ".hyper_lora")

    def delta(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        w, rows = generated(ctx, self.path)
        x_btd = dropout(x_btd.astype(self.base.dtype), self.dropout_rate, ctx, self.salt)
        y = self.scale * project_out(project_in(x_btd, w["a"], rows), w["b"], rows)
        return nan_outside(y, rows, w["a"].shape[0])

    def __call__(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        return self.base(x_btd, ctx) + self.delta(x_btd, ctx)


def bottleneck_outputs(d: int, m: int, *, norm: bool) -> dict[str, Output]:
    """What HyperFormer generates per site: both projections with biases, and the adapter's
    layer norm (`norm`)."""
    outputs = {"down": Output((d, m)), "down_bias": Output((m,)), "up": Output((m, d)),
               "up_bias": Output((d,))}
    if norm:
        outputs.update(norm_scale=Output((d,)), norm_bias=Output((d,)))
    return outputs


def lora_outputs(d_in: int, d_out: int, rank: int, proj_dim: int) -> dict[str, Output]:
    """LoRA factors with LoRA's start: `a` entries ~ the scale of Kaiming-uniform(1/sqrt(in))
    (the projection is layer-normed: unit variance per entry), `b` = 0 exactly, so the adapted
    model starts as the base and B's head still gets gradients."""
    std_a = 1.0 / math.sqrt(3.0 * d_in * proj_dim)
    return {"a": Output((d_in, rank), std=std_a), "b": Output((rank, d_out), std=0.0)}


def _record(site: Site, info: SiteInfo, key: str, outputs: dict[str, Output]) -> None:
    site.shared.setdefault(_SITES, []).append((info, key, outputs))


def _build_bottleneck(hook: Hook, site: Site, config: PeftConfig) -> HyperBottleneck:
    d = site.model_config.d_model
    m = d // config.reduction_factor
    if m <= 0:
        raise ValueError(f"Adapter bottleneck width must be positive, got {m}; lower "
                         "config.peft.reduction_factor.")
    info = SiteInfo.of(site.path)
    # HyperFormer(++) keeps one hypernetwork per stack, as the reference (encoder / decoder).
    _record(site, info, site.path.split(".")[0], bottleneck_outputs(d, m, norm=config.hyper_norm))
    return HyperBottleneck(layer_path(site.path), activation=config.adapter_activation,
                           scale=config.adapter_scale)


def _build_lora(dense: Dense, site: Site, config: PeftConfig) -> HyperLoRADense:
    outputs = lora_outputs(dense.in_features, dense.out_features, config.rank,
                           config.hyper_proj_dim)
    # Sites of one shape share heads; module type and layer tell them apart.
    _record(site, SiteInfo.of(site.path), f"{dense.in_features}x{dense.out_features}", outputs)
    return HyperLoRADense(dense, layer_path(site.path), scale=config.alpha / config.rank,
                          dropout_rate=config.dropout)


def _finish(model: nnx.Module, site: Site, config: PeftConfig) -> None:
    """Build the conditioner and the site groups from what the builds recorded; attach the
    hypernetwork as `model.hypernet`. With `hyper_train_norms`, the base's layer norms train
    too (HyperFormer's `unfreeze_layer_norms`)."""
    if site.conditioning is None:
        raise ValueError(f"config.peft.method={config.method!r} generates adapters from the "
                         "task, so it needs the run's conditioning data (peftjax.hyper."
                         "ConditionData): build it through peftjax.train.build.")
    conditioner = Conditioner(config.hyper_condition, site.conditioning,
                              embed_dim=config.hyper_embed_dim, rngs=site.rngs)
    grouped: dict[str, list] = defaultdict(list)
    for info, key, outputs in site.shared[_SITES]:
        grouped[key].append((info, outputs))
    groups = {}
    for key, members in grouped.items():
        groups[key.replace(".", "_")] = SiteGroup(
            [info for info, _ in members], members[0][1], cond_dim=conditioner.dim,
            site_embeddings=config.method != "hyperformer", embed_dim=config.hyper_embed_dim,
            hidden=config.hyper_hidden, proj_dim=config.hyper_proj_dim, rngs=site.rngs)
    model.hypernet = HyperNetwork(conditioner, groups, generate=config.hyper_generate)
    if config.hyper_train_norms:
        for path, module in module_paths(model).items():
            if isinstance(module, RMSNorm):
                replace_submodule(model, path, TunedRMSNorm(module))


_BOTTLENECK_WHERE = "residual hooks: post_attention, post_cross_attention, post_ffn"
SPECS = {
    "hyperformer": MethodSpec((Hook,), r".*\.(post_attention|post_ffn)", _build_bottleneck,
                              _BOTTLENECK_WHERE, finish=_finish),
    "hyperformer_pp": MethodSpec((Hook,), r".*\.(post_attention|post_ffn)", _build_bottleneck,
                                 _BOTTLENECK_WHERE, finish=_finish),
    "text_to_lora": MethodSpec((Dense,), r".*attention\.(q|v)", _build_lora,
                               "projections (Dense): *_attention.{q,k,v,o}, mlp.{wi_0,wi_1,wo}, "
                               "lm_head", finish=_finish),
}
