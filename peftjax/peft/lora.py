"""LoRA: `y = W0 x + (alpha / r) · B A dropout(x)`, shared or one pair per task."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context, dropout, site_salt
from peftjax.models.layers import Dense
from peftjax.peft.config import PeftConfig
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.task_select import project_in, project_out
from peftjax.peft.variables import Adapter


class LoRADense(nnx.Module):
    """Wraps a frozen `Dense` with a low-rank update.

    `lora_a`: `[(tasks,) in, rank]`, Kaiming-uniform (a=sqrt 5, as in HF peft / torch Linear);
    `lora_b`: `[(tasks,) rank, out]`, zeros, so the wrapped layer starts equal to the base.
    Scale: alpha / rank (alpha / sqrt(rank) with `rslora`).
    """

    def __init__(self, base: Dense, *, rank: int, alpha: float, dropout_rate: float = 0.0,
                 num_tasks: int | None = None, rslora: bool = False, salt: int = 0,
                 rngs: nnx.Rngs):
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}; set "
                             "config.peft.rank to e.g. 8.")
        self.base = base
        in_axis, out_axis = base.kernel.get_metadata()["axes"]
        lead, lead_axes = ((num_tasks,), ("tasks",)) if num_tasks else ((), ())
        bound = 1.0 / math.sqrt(base.in_features)
        a = jax.random.uniform(rngs.params(), (*lead, base.in_features, rank), jnp.float32,
                               -bound, bound)
        self.lora_a = Adapter(a, axes=(*lead_axes, in_axis, "lora_rank"))
        self.lora_b = Adapter(jnp.zeros((*lead, rank, base.out_features), jnp.float32),
                              axes=(*lead_axes, "lora_rank", out_axis))
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout_rate, self.salt = dropout_rate, salt

    def delta(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        """The low-rank update alone, `s · B A dropout(x)` `[b, t, out]` (compositions add it)."""
        x_btd = dropout(x_btd, self.dropout_rate, ctx, self.salt).astype(self.base.dtype)
        code = project_in(x_btd, self.lora_a.value, ctx.task_ids)
        return self.scale * project_out(code, self.lora_b.value, ctx.task_ids)

    def __call__(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        return self.base(x_btd, ctx) + self.delta(x_btd, ctx)

def _build(base: Dense, site: Site, config: PeftConfig) -> LoRADense:
    return LoRADense(base, rank=config.rank, alpha=config.alpha, dropout_rate=config.dropout,
                     num_tasks=site.num_tasks, rslora=config.rslora,
                     salt=site_salt(site.path), rngs=site.rngs)


SPECS = {"lora": MethodSpec(
    kinds=(Dense,), targets=r".*attention\.(q|v)",  # HF peft's T5 default: q and v everywhere
    build=_build, where="Dense projections: q, k, v, o, wi_0, wi_1, wo, lm_head")}
