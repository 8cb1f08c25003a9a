"""Hypernetworks: conditioning vectors in, every adapted site's weights out, in one pass.

A `SiteGroup` generates the weights of sites that share weight heads:

    I_rs   = LN(MLP(concat[c_r, e_layer(s), e_position(s)]))      (site embeddings: ++, T2L)
    I_r    = LN(MLP(c_r))                                         (per-site heads: HyperFormer)
    w_rs   = W I_rs + b        (one head per generated array, shared by the group's sites)
    w_rs   = W_s I_r + b_s     (per-site heads)

for every conditioning row r and site s at once. `HyperNetwork` holds the conditioner and the
groups, and is the model's `hypernet` insertion point: called with the encoder's and decoder's
contexts, it returns them carrying the generated weights (`Context.generated`) and each example's
or token's row (`Context.generated_ids`); the adapted sites read their weights from there.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.hyper.condition import Conditioner
from peftjax.models.context import Context
from peftjax.peft.variables import HyperParam

REFERENCE_STD = 1e-2  # HyperFormer's init of every hypernetwork layer: N(0, 0.01²), zero bias
_LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Output:
    """One generated array per site: its shape and its head's init (`std` of the head's weight,
    0 = zeros; the head's bias starts at `bias`)."""

    shape: tuple[int, ...]
    std: float = REFERENCE_STD
    bias: float = 0.0
    axes: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """An adapted site, as the generator sees it: its path, layer index and position type
    (the path with the layer index starred, e.g. `encoder.layers.*.post_ffn`)."""

    path: str
    layer: int
    position: str

    @staticmethod
    def of(path: str) -> SiteInfo:
        parts = path.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is None:
            return SiteInfo(path, 0, path)
        return SiteInfo(path, int(parts[index]), ".".join([*parts[:index], "*",
                                                           *parts[index + 1:]]))


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    if std == 0.0:
        return jnp.zeros(shape, jnp.float32)
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Head(nnx.Module):
    """A linear map from the projection to one generated array (flattened): `w` `[(sites,)
    proj, size]`, `b` `[(sites,) size]`."""

    def __init__(self, proj_dim: int, out: Output, lead: tuple[int, ...],
                 lead_axes: tuple[str, ...], rngs: nnx.Rngs):
        self.w = HyperParam(_normal(rngs, (*lead, proj_dim, out.size), out.std),
                            axes=(*lead_axes, "hyper_proj", "hyper_out"))
        self.b = HyperParam(jnp.full((*lead, out.size), out.bias, jnp.float32),
                            axes=(*lead_axes, "hyper_out"))


class SiteGroup(nnx.Module):
    """Generates `outputs` for each of `sites`: `[rows, c]` → `{path: {name: [rows, *shape]}}`.

    `site_embeddings`: the projector also reads learned layer-id and position embeddings, so
    one set of heads serves every site (HyperFormer++, Text-to-LoRA). Otherwise each site has
    its own heads on the projected conditioning (HyperFormer: a hypernetwork per layer).
    """

    def __init__(self, sites: list[SiteInfo], outputs: dict[str, Output], *, cond_dim: int,
                 site_embeddings: bool, embed_dim: int, hidden: int, proj_dim: int,
                 rngs: nnx.Rngs):
        self.paths = tuple(s.path for s in sites)
        self.outputs = tuple(outputs.items())  # static and hashable: part of the graphdef
        self.site_embeddings = site_embeddings
        positions = sorted({s.position for s in sites})
        self.layer_index = tuple(s.layer for s in sites)
        self.position_index = tuple(positions.index(s.position) for s in sites)
        self.layer_embed = HyperParam(
            jax.random.normal(rngs.params(), (max(self.layer_index) + 1, embed_dim), jnp.float32),
            axes=("hyper_layers", "hyper_embed")) if site_embeddings else None
        self.position_embed = HyperParam(
            jax.random.normal(rngs.params(), (len(positions), embed_dim), jnp.float32),
            axes=("hyper_positions", "hyper_embed")) if site_embeddings else None
        in_dim = cond_dim + (2 * embed_dim if site_embeddings else 0)
        self.w1 = HyperParam(_normal(rngs, (in_dim, hidden), REFERENCE_STD),
                             axes=("hyper_in", "hyper_hidden"))
        self.b1 = HyperParam(jnp.zeros((hidden,), jnp.float32), axes=("hyper_hidden",))
        self.w2 = HyperParam(_normal(rngs, (hidden, proj_dim), REFERENCE_STD),
                             axes=("hyper_hidden", "hyper_proj"))
        self.b2 = HyperParam(jnp.zeros((proj_dim,), jnp.float32), axes=("hyper_proj",))
        self.norm_scale = HyperParam(jnp.ones((proj_dim,), jnp.float32), axes=("hyper_proj",))
        self.norm_bias = HyperParam(jnp.zeros((proj_dim,), jnp.float32), axes=("hyper_proj",))
        lead, lead_axes = ((), ()) if site_embeddings else ((len(sites),), ("hyper_sites",))
        # An nnx.List in `self.outputs` order (an nnx.Dict's items come back as tuples when
        # the module runs under nnx.capture, as the train step runs it).
        self.heads = nnx.List([Head(proj_dim, out, lead, lead_axes, rngs)
                               for out in outputs.values()])

    def project(self, cond_rc: jax.Array) -> jax.Array:
        """`[rows, sites or 1, proj]`: the layer-normed projection of the conditioning (with
        each site's embeddings when the group has them)."""
        c = cond_rc.shape[-1]
        w1 = self.w1.value
        h = (cond_rc @ w1[:c])[:, None, :]
        if self.site_embeddings:
            site_se = jnp.concatenate(
                [self.layer_embed.value[np.array(self.layer_index)],
                 self.position_embed.value[np.array(self.position_index)]], axis=-1)
            h = h + (site_se @ w1[c:])[None]
        h = jax.nn.relu(h + self.b1.value) @ self.w2.value + self.b2.value
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        return (h - mean) * jax.lax.rsqrt(var + _LN_EPS) * self.norm_scale.value \
            + self.norm_bias.value

    def __call__(self, cond_rc: jax.Array) -> dict[str, dict[str, jax.Array]]:
        i_rsp = self.project(cond_rc.astype(jnp.float32))
        rows = cond_rc.shape[0]
        flat = {}
        for (name, _), head in zip(self.outputs, self.heads, strict=True):
            w, b = head.w.value, head.b.value
            if self.site_embeddings:
                flat[name] = i_rsp @ w + b  # [rows, sites, out]
            else:
                flat[name] = jnp.einsum("rp,spo->rso", i_rsp[:, 0], w) + b
        # One split per output, not a slice per site: the gradient is then one concatenate
        # instead of a zero-pad and an add per site.
        per_site = {name: jnp.split(flat[name], len(self.paths), axis=1)
                    for name, _ in self.outputs}
        return {path: {name: per_site[name][s].reshape(rows, *out.shape)
                       for name, out in self.outputs}
                for s, path in enumerate(self.paths)}


class HyperNetwork(nnx.Module):
    """The model's hypernetwork: conditioning, and the site groups it generates weights for.

    `generate="per_task"`: one generation per task (x language) row per call, gathered per
    example or per token by `Context.generated_ids` (works with packed rows that mix tasks).
    `generate="per_example"`: one generation per example (`[batch]` task ids; unpacked rows).
    """

    def __init__(self, conditioner: Conditioner, groups: dict[str, SiteGroup], *,
                 generate: str):
        self.conditioner = conditioner
        self.groups = nnx.List(list(groups.values()))
        self.group_names = tuple(groups)  # each group's key: its stack or its weight shape
        self.generate_mode = generate

    def generate(self, cond_rc: jax.Array) -> dict[str, dict[str, jax.Array]]:
        """Every site's weights for each conditioning row: `{path: {name: [rows, ...]}}`."""
        out: dict[str, dict[str, jax.Array]] = {}
        for group in self.groups:
            out.update(group(cond_rc))
        return out

    def per_task(self) -> dict[str, dict[str, jax.Array]]:
        """The weights of every task (x language) row, row `t * languages + l`: what
        `export` turns into ordinary per-task adapters."""
        return self.generate(self.conditioner.all_rows())

    def __call__(self, enc_ctx: Context, dec_ctx: Context) -> tuple[Context, Context]:
        cond = self.conditioner
        cond.check(enc_ctx.task_ids, enc_ctx.language_ids)
        cond.check(dec_ctx.task_ids, dec_ctx.language_ids)
        if enc_ctx.task_ids is None or dec_ctx.task_ids is None:
            raise ValueError("This model's adapters are generated from the task (a "
                             "hypernetwork), so every call needs task ids: pass task_ids=[batch] "
                             "(or encoder_task_ids/decoder_task_ids per token).")
        if self.generate_mode == "per_example":
            ids = enc_ctx.task_ids
            if ids.ndim != 1:
                raise ValueError(
                    "config.peft.hyper_generate='per_example' generates one adapter per "
                    "example, but these rows are packed (per-token task ids); set "
                    "config.data.pack=False, or generate per task (hyper_generate='per_task').")
            weights = self.generate(cond.rows_for(ids, enc_ctx.language_ids))
            rows = jnp.arange(ids.shape[0], dtype=jnp.int32)
            enc_rows = dec_rows = rows
        else:
            weights = self.per_task()
            enc_rows = cond.row_ids(enc_ctx.task_ids, enc_ctx.language_ids)
            dec_rows = cond.row_ids(dec_ctx.task_ids, dec_ctx.language_ids)
        return (enc_ctx.replace(generated=weights, generated_ids=enc_rows),
                dec_ctx.replace(generated=weights, generated_ids=dec_rows))
