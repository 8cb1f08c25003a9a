"""RoAd (Liao et al. 2024): scaled 2D rotations of pairs of a projection's outputs.

`y = W0 x` is cut into groups of `g = config.peft.road_group_size` outputs; inside a group,
element i pairs with element j = i + g/2, rotated and scaled (for i in the first half):

    y'_i = c1_i · y_i - c2_i · y_j,        y'_j = c1_j · y_j + c2_j · y_i

with c1 = α cos θ and c2 = α sin θ per output element, shared or not by variant (below).

All element-wise, so a mixed-task batch only gathers per-task vectors (`task_rows`), never a
per-task matrix. Parameter layout and initialisation (θ = 0, α = 1: the identity) are HF peft's,
so `road_theta` / `road_alpha` map 1:1 onto peft's tensors (with a leading tasks axis per task):

  * road_1: `[out/2]`, one (θ, α) per pair, shared by both elements of the pair;
  * road_2: `[out]`, one (θ, α) per element;
  * road_4: `[2·out]`, per group `[2, g]`: row 0 drives the cos term, row 1 the sin term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context
from peftjax.models.layers import Dense
from peftjax.peft.config import PeftConfig
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.task_select import task_axis, task_rows
from peftjax.peft.variables import Adapter

VARIANTS = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # parameters per output element


def check_group_size(out_features: int, group_size: int, where: str = "") -> None:
    """Raise, naming config.peft.road_group_size and a value that fits, unless it tiles `out`."""
    if group_size > 0 and group_size % 2 == 0 and out_features % group_size == 0:
        return
    fits = [g for g in range(min(group_size, out_features), 1, -1)
            if g % 2 == 0 and out_features % g == 0]
    hint = (f"set config.peft.road_group_size to an even divisor of {out_features}, e.g. "
            f"{fits[0]}" if fits else f"the width {out_features} has no even divisor; leave this "
            "module out of config.peft.targets")
    raise ValueError(f"RoAd needs an even config.peft.road_group_size that divides the output "
                     f"width {out_features}{where}, got {group_size}: {hint}.")


def rotation_cols(theta: jax.Array, alpha: jax.Array, variant: str,
                  group_size: int) -> tuple[jax.Array, jax.Array]:
    """The (cos, sin) columns `[..., out]` of the block rotation, from peft-layout parameters.

    `theta`, `alpha`: `[..., size]` with size out/2, out or 2·out by variant (see module doc).
    """
    half = group_size // 2
    if variant == "road_1":
        # Each group's g/2 values serve both halves of the group.
        def widen(v):
            v_gh = v.reshape(*v.shape[:-1], -1, 1, half)
            return jnp.broadcast_to(v_gh, (*v_gh.shape[:-2], 2, half)).reshape(
                *v.shape[:-1], 2 * v.shape[-1])

        return widen(alpha * jnp.cos(theta)), widen(alpha * jnp.sin(theta))
    if variant == "road_2":
        return alpha * jnp.cos(theta), alpha * jnp.sin(theta)
    if variant == "road_4":
        lead = theta.shape[:-1]
        theta_g2g = theta.reshape(*lead, -1, 2, group_size)
        alpha_g2g = alpha.reshape(*lead, -1, 2, group_size)
        first = alpha_g2g[..., 0, :] * jnp.cos(theta_g2g[..., 0, :])
        second = alpha_g2g[..., 1, :] * jnp.sin(theta_g2g[..., 1, :])
        return first.reshape(*lead, -1), second.reshape(*lead, -1)
    raise ValueError(f"Unknown config.peft.road_variant {variant!r}; choose from "
                     f"{tuple(VARIANTS)}.")


def rotate_half(y: jax.Array, group_size: int) -> jax.Array:
    """Per group of g: `[y_a, y_b] -> [-y_b, y_a]` with y_a, y_b its halves. `[..., out]`."""
    y_g2h = y.reshape(*y.shape[:-1], -1, 2, group_size // 2)
    return jnp.stack([-y_g2h[..., 1, :], y_g2h[..., 0, :]], axis=-2).reshape(y.shape)


class RoadDense(nnx.Module):
    """Wraps a frozen `Dense`: `y' = y ⊙ c1 + rotate_half(y) ⊙ c2`, y = W0 x, (c1, c2) from θ, α.

    `road_theta` (zeros) and `road_alpha` (ones): `[(tasks,) size]`, size by variant.
    """

    def __init__(self, base: Dense, *, variant: str = "road_1", group_size: int = 64,
                 num_tasks: int | None = None, where: str = ""):
        if variant not in VARIANTS:
            raise ValueError(f"Unknown config.peft.road_variant {variant!r}; choose from "
                             f"{tuple(VARIANTS)}.")
        check_group_size(base.out_features, group_size, where)
        self.base = base
        self.variant, self.group_size = variant, group_size
        _, out_axis = base.kernel.get_metadata()["axes"]
        lead, lead_axes = task_axis(num_tasks)
        shape = (*lead, int(base.out_features * VARIANTS[variant]))
        # Named after the output axis they act on (sizes differ by variant; a dimension the mesh
        # does not divide stays replicated).
        self.road_theta = Adapter(jnp.zeros(shape, jnp.float32), axes=(*lead_axes, out_axis))
        self.road_alpha = Adapter(jnp.ones(shape, jnp.float32), axes=(*lead_axes, out_axis))
        self.per_task = bool(num_tasks)

    def __call__(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        y = self.base(x_btd, ctx)
        # cos/sin on the small [(tasks,) out] tables, then a gather per example / token.
        first, second = rotation_cols(self.road_theta.value, self.road_alpha.value,
                                      self.variant, self.group_size)
        first = task_rows(first, ctx.task_ids, y, per_task=self.per_task)
        second = task_rows(second, ctx.task_ids, y, per_task=self.per_task)
        y32 = y.astype(first.dtype)  # in the parameters' dtype, as peft
        return (y32 * first + rotate_half(y32, self.group_size) * second).astype(y.dtype)


def _build(base: Dense, site: Site, config: PeftConfig) -> RoadDense:
    return RoadDense(base, variant=config.road_variant, group_size=config.road_group_size,
                     num_tasks=site.num_tasks, where=f" of {site.path}")


SPECS = {"road": MethodSpec(
    # HF peft's T5 default (its LoRA mapping): q and v everywhere.
    kinds=(Dense,), targets=r".*attention\.(q|v)", build=_build,
    where="Dense projections: q, k, v, o, wi_0, wi_1, wo, lm_head")}
