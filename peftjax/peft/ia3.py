"""(IA)^3: learned vectors rescale a projection's output (`l ⊙ W0 x`) or, in the FFN, its input.

Liu et al. 2022, as in HF peft: feed-forward modules scale their INPUT, `W0 (l ⊙ x)` (for `wo`
that is the FFN's hidden activations), every other target its OUTPUT. Vectors start at ones, so
the model starts equal to the base.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context
from peftjax.models.layers import Dense
from peftjax.peft.config import PeftConfig
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.task_select import task_axis, task_rows
from peftjax.peft.variables import Adapter


class IA3Dense(nnx.Module):
    """Wraps a frozen `Dense` with a learned rescaling vector.

    `ia3_l`: `[(tasks,) in]` when `feedforward` (scales the input), else `[(tasks,) out]` (scales
    the output); ones at init. HF peft stores the same vector as `[1, in]` / `[out, 1]`.
    """

    def __init__(self, base: Dense, *, feedforward: bool, num_tasks: int | None = None):
        self.base = base
        self.feedforward = feedforward
        in_axis, out_axis = base.kernel.get_metadata()["axes"]
        features, axis = ((base.in_features, in_axis) if feedforward
                          else (base.out_features, out_axis))
        lead, lead_axes = task_axis(num_tasks)
        self.ia3_l = Adapter(jnp.ones((*lead, features), jnp.float32), axes=(*lead_axes, axis))
        self.per_task = bool(num_tasks)

    def _scale(self, h: jax.Array, ctx: Context) -> jax.Array:
        """`l ⊙ h` for h `[b, t, features]`, in the vector's dtype (as peft), cast back to h's."""
        l_row = task_rows(self.ia3_l.value, ctx.task_ids, h, per_task=self.per_task)
        return (h.astype(l_row.dtype) * l_row).astype(h.dtype)

    def __call__(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        if self.feedforward:
            return self.base(self._scale(x_btd, ctx), ctx)
        return self._scale(self.base(x_btd, ctx), ctx)


def _build(base: Dense, site: Site, config: PeftConfig) -> IA3Dense:
    try:
        feedforward = re.fullmatch(config.ia3_feedforward, site.path) is not None
    except re.error as e:
        raise ValueError(f"config.peft.ia3_feedforward={config.ia3_feedforward!r} is not a valid "
                         f"regex: {e}") from e
    return IA3Dense(base, feedforward=feedforward, num_tasks=site.num_tasks)


SPECS = {"ia3": MethodSpec(
    # HF peft's T5 default: k, v (output scaled) and wo (feed-forward, input scaled).
    kinds=(Dense,), targets=r".*(attention\.(k|v)|mlp\.wo)", build=_build,
    where="Dense projections: q, k, v, o, wi_0, wi_1, wo, lm_head")}
