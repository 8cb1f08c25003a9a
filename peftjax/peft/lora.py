"""The LoRA family on a frozen `Dense`, shared or one adapter per task.

* LoRA: `y = W0 x + s · B A dropout(x)`, `s = alpha / r` (rsLoRA: `alpha / sqrt r`).
* DoRA (`dora=True`): `y = m ⊙ (W0 + s A B) x / ‖W0 + s A B‖_c`, the column norm treated as a
  constant (no gradient through it), exactly as HF peft's `DoraLinearLayer`.
* Asymmetric LoRA (`freeze_a=True`): A stays at its random init (a `FrozenAdapter`); only B (and
  DoRA's magnitude) train.
* LoRA+ is optimizer-side: see `peftjax.train.optim.make_optimizer(lora_plus_ratio=...)`.

Kernels are `[in, out]` (torch's transpose), so HF's per-output-row norm is a per-column norm here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context, dropout, site_salt
from peftjax.models.layers import Dense
from peftjax.peft.config import PeftConfig
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.task_select import project_in, project_out, task_axis, task_rows
from peftjax.peft.variables import Adapter, FrozenAdapter


def dora_column_norms(w0_io: jax.Array, a_ir: jax.Array, b_ro: jax.Array,
                      scale: float) -> jax.Array:
    """`‖W0 + s·A B‖` per output column, float32, with no gradient (DoRA paper, section 4.3).

    Shapes: `w0_io` `[in, out]`; `a_ir` `[(tasks,) in, r]`; `b_ro` `[(tasks,) r, out]`; returns
    `[(tasks,) out]`. Expanded rather than materialised, so a per-task norm never builds a
    `[tasks, in, out]` weight (one copy of the base kernel per task: 13 tasks x T5-base `wi` is
    13x the layer, in memory and bandwidth, on every step):

        ‖w0_c + s(AB)_c‖² = ‖w0_c‖² + 2s Σ_r B_rc (Aᵀ W0)_rc + s² Σ_r B_rc ((AᵀA) B)_rc.

    The largest intermediate is `[(tasks,) r, out]`; the FLOPs (`Aᵀ W0`) equal those of `A B`.
    Float32 accuracy: each term is a sum of products of the same magnitudes as the direct form's
    `(w0 + sΔ)²`, so the relative error of the square is ~eps·(‖w0‖² + |cross| + s²‖Δ‖²)/n²: only
    an update that nearly cancels a whole column of W0 loses digits, and the direct form loses
    the same ones there. Checked against float64 in tests/test_lora_variants.py.
    """
    w0, a, b = (jax.lax.stop_gradient(v).astype(jnp.float32) for v in (w0_io, a_ir, b_ro))
    base_sq_o = jnp.sum(jnp.square(w0), axis=0)
    cross_o = jnp.sum(b * jnp.einsum("...ir,io->...ro", a, w0), axis=-2)
    gram_rr = jnp.einsum("...ir,...is->...rs", a, a)
    quad_o = jnp.sum(b * jnp.einsum("...rs,...so->...ro", gram_rr, b), axis=-2)
    norm_sq = base_sq_o + 2.0 * scale * cross_o + scale * scale * quad_o
    return jnp.sqrt(jnp.maximum(norm_sq, 0.0))


class LoRADense(nnx.Module):
    """Wraps a frozen `Dense` with a low-rank update (optionally DoRA's magnitude/direction split).

    `lora_a`: `[(tasks,) in, rank]`, Kaiming-uniform (a=sqrt 5, as in HF peft / torch Linear);
      an `Adapter`, or a `FrozenAdapter` with `freeze_a` (re-created from the seed on rebuild, so
      it is never checkpointed and a restore still matches).
    `lora_b`: `[(tasks,) rank, out]`, zeros, so the wrapped layer starts equal to the base.
    `lora_magnitude` (DoRA only, else None): `[(tasks,) out]`, initialised to the column norms
      of `W0 + s A B` (= ‖W0‖ per column, since B = 0), so DoRA also starts equal to the base.
    `scale`: alpha / rank (alpha / sqrt(rank) with `rslora`).
    """

    def __init__(self, base: Dense, *, rank: int, alpha: float, dropout_rate: float = 0.0,
                 num_tasks: int | None = None, rslora: bool = False, dora: bool = False,
                 freeze_a: bool = False, salt: int = 0, rngs: nnx.Rngs):
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}; set "
                             "config.peft.rank to e.g. 8.")
        self.base = base
        in_axis, out_axis = base.kernel.get_metadata()["axes"]
        lead, lead_axes = task_axis(num_tasks)
        bound = 1.0 / math.sqrt(base.in_features)
        a = jax.random.uniform(rngs.params(), (*lead, base.in_features, rank), jnp.float32,
                               -bound, bound)
        self.lora_a = (FrozenAdapter if freeze_a else Adapter)(
            a, axes=(*lead_axes, in_axis, "lora_rank"))
        self.lora_b = Adapter(jnp.zeros((*lead, rank, base.out_features), jnp.float32),
                              axes=(*lead_axes, "lora_rank", out_axis))
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        self.per_task = bool(num_tasks)
        self.lora_magnitude = Adapter(
            dora_column_norms(base.kernel.value, self.lora_a.value, self.lora_b.value, self.scale),
            axes=(*lead_axes, out_axis)) if dora else None
        self.dropout_rate, self.salt = dropout_rate, salt

    def _low_rank(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        """`s · B A x` `[b, t, out]` on an already dropped-out input."""
        code = project_in(x_btd, self.lora_a.value, ctx.task_ids)
        return self.scale * project_out(code, self.lora_b.value, ctx.task_ids)

    def _dora_factor(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        """`m / ‖W0 + sAB‖_c` in float32, broadcastable to `[b, t, out]` (per task: gathered by
        task id). Callers cast after forming `g - 1`, which bfloat16 would round to 2^-8 steps."""
        norms = dora_column_norms(self.base.kernel.value, self.lora_a.value, self.lora_b.value,
                                  self.scale)
        factor = self.lora_magnitude.value.astype(jnp.float32) / norms  # [(tasks,) out]
        return task_rows(factor, ctx.task_ids, x_btd, per_task=self.per_task)

    def _dropout_active(self, ctx: Context) -> bool:
        return self.dropout_rate > 0.0 and not ctx.deterministic

    def delta(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        """What the adapter adds to the base output, `[b, t, out]` (compositions add it).

        LoRA: `s · B A dropout(x)`. DoRA: the DoRA output minus `W0 x`, i.e. HF peft's
        `(g - 1) · W0 dropout(x) + g · s · B A dropout(x)` with `g = m / ‖W0 + sAB‖_c`, so
        `base(x) + delta(x)` is the DoRA layer (it costs one more base matmul than plain LoRA).
        """
        x_btd = dropout(x_btd, self.dropout_rate, ctx, self.salt).astype(self.base.dtype)
        low_rank = self._low_rank(x_btd, ctx)
        if self.lora_magnitude is None:
            return low_rank
        factor, dtype = self._dora_factor(x_btd, ctx), self.base.dtype
        return ((factor - 1).astype(dtype) * self.base(x_btd, ctx)
                + factor.astype(dtype) * low_rank)

    def __call__(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        if self.lora_magnitude is not None and not self._dropout_active(ctx):
            # No dropout: HF's `W0 x + (g - 1) W0 x + g sBAx` is `g (W0 x + sBAx)`, one base matmul.
            x_btd = x_btd.astype(self.base.dtype)
            factor = self._dora_factor(x_btd, ctx)  # float32: in bf16, |g - 1| < 2^-8 rounds to 0
            y = self.base(x_btd, ctx) + self._low_rank(x_btd, ctx)
            return (factor * y.astype(factor.dtype)).astype(self.base.dtype)
        # With dropout HF keeps the base path on the clean input and applies the DoRA correction
        # to the dropped-out one: `W0 x + (g - 1) W0 x' + g sBAx'`.
        return self.base(x_btd, ctx) + self.delta(x_btd, ctx)


def _build(base: Dense, site: Site, config: PeftConfig) -> LoRADense:
    module = LoRADense(base, rank=config.rank, alpha=config.alpha, dropout_rate=config.dropout,
                       num_tasks=site.num_tasks, rslora=config.rslora, dora=config.dora,
                       freeze_a=config.freeze_a, salt=site_salt(site.path), rngs=site.rngs)
    if config.skills_from:  # MHR-mu: start from a trained Poly/MHR inventory's average
        from peftjax.routing.poly import init_from_skills  # it imports this package

        init_from_skills(module, site, config)
    return module


SPECS = {"lora": MethodSpec(
    kinds=(Dense,), targets=r".*attention\.(q|v)",  # HF peft's T5 default: q and v everywhere
    build=_build, where="Dense projections: q, k, v, o, wi_0, wi_1, wo, lm_head")}
