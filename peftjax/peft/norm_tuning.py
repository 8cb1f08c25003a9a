"""Layer-norm tuning: train (a copy of) every norm's scale, the rest stays frozen.

T5 has no biases, so this stands in for BitFit. As HF peft's LN_TUNING, the trainable scale is a
copy of the frozen one, used in its place; per task, each task gets its own copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context
from peftjax.models.layers import RMSNorm
from peftjax.peft.config import PeftConfig
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.task_select import task_rows
from peftjax.peft.variables import Adapter


class TunedRMSNorm(nnx.Module):
    """Wraps a frozen `RMSNorm`; `scale` `[(tasks,) d]` (the base scale, copied) replaces its scale.

    The base keeps its own (unused, frozen) scale so the base weights stay intact for export.
    """

    def __init__(self, base: RMSNorm, *, num_tasks: int | None = None):
        self.base = base
        scale_d = jnp.asarray(base.scale.value, jnp.float32)
        axes = base.scale.get_metadata()["axes"]
        if num_tasks:
            scale_d = jnp.broadcast_to(scale_d, (num_tasks, *scale_d.shape))
            axes = ("tasks", *axes)
        self.scale = Adapter(jnp.array(scale_d), axes=axes)
        self.per_task = bool(num_tasks)

    def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:
        """Same computation as `RMSNorm` (statistics in float32), with the task's scale."""
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(variance + self.base.eps)
        scale = task_rows(self.scale.value, ctx.task_ids, x, per_task=self.per_task)
        return (y * scale.astype(jnp.float32)).astype(self.base.dtype)


def _build(base: RMSNorm, site: Site, config: PeftConfig) -> TunedRMSNorm:
    del config  # no knobs
    return TunedRMSNorm(base, num_tasks=site.num_tasks)


SPECS = {"ln_tuning": MethodSpec(
    # HF peft's T5 default: every layer norm and the final norms.
    kinds=(RMSNorm,), targets=r".*norm", build=_build,
    where="RMSNorm layers: *.attention_norm, *.cross_attention_norm, *.mlp_norm, *.final_norm")}
