"""ScaLearn (Frohmann et al., 2023): learn to scale the outputs of frozen source adapters.

At a composition site (see `peftjax.peft.compose`) with children a_1..a_S, the frozen sources
and then the run's new adapter if any:

    h' = h + Σ_i ω_i ⊙ a_i(h)          (at a Dense site: y = W0 x + Σ_i ω_i ⊙ a_i(x))

`a_i(h)` is child i's `delta`: for a bottleneck adapter its output before the residual add. The
residual `h` stays, as in the reference code (CPJKU/ScaLearn `ScaLearn.forward` with
`residual=True`: the ω-weighted sum of the adapters' outputs, plus the residual).

`config.peft.scalearn_form`:
  vector         ω ∈ R^{S×d} per site                     (ScaLearn)
  scalar         ω ∈ R^{S} per site                       (ScaLearnUniform)
  vector_shared  one ω ∈ R^{S×d} for all sites            (ScaLearn++); one table per output
                 axis (residual hooks and o/wo: embed; q/k/v: joined_kv; wi: mlp)
  scalar_shared  one ω ∈ R^{S} for all sites              (ScaLearnUniform++: S "transfer
                 parameters" per target task, 8 with 8 source tasks)
where d is the site's output width. `mode="per_task"` adds a leading tasks axis: one table per
target task, picked by each example's (or token's) task id. Shared tables index the children
present at a site (a source absent there uses no row).

Initialisation as the reference's "avg": ω ~ N(1/S, 0.001²), i.e. the model starts as the
average of the sources (`compose="average"`) up to that noise. The reference's optional dropout
on ω is not implemented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context
from peftjax.models.layers import Dense
from peftjax.peft.compose import Composition
from peftjax.peft.config import PeftConfig
from peftjax.peft.task_select import task_axis, task_rows
from peftjax.peft.variables import Adapter

INIT_STD = 1e-3  # the reference's torch.normal(init, 0.001)


def omega_table(num_sources: int, *, width: int | None, out_axis: str, num_tasks: int | None,
                rngs: nnx.Rngs) -> Adapter:
    """ω: `[(tasks,) sources]` (scalar forms, `width=None`) or `[(tasks,) sources, width]`."""
    lead, lead_axes = task_axis(num_tasks)
    row, row_axes = ((), ()) if width is None else ((width,), (out_axis,))
    shape = (*lead, num_sources, *row)
    value = 1.0 / num_sources + INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    return Adapter(value, axes=(*lead_axes, "sources", *row_axes))


class ScaLearn(Composition):
    """`f(x) + Σ_i ω_i ⊙ a_i(x)` over the children `adapters`.

    `omega`: this site's table or a table shared across sites; `rows`: which of its rows (along
    the `sources` axis) belong to this site's children, in order.
    """

    def __init__(self, children: list[nnx.Module], *, base: Dense | None, omega: Adapter,
                 rows: tuple[int, ...], per_task: bool, scalar: bool):
        super().__init__(children, rule="scalearn", base=base)
        self.omega = omega
        self.rows = tuple(rows)
        self.per_task, self.scalar = per_task, scalar

    def scales(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        """This site's ω, broadcastable to the stacked updates `[b, t, children, out]`."""
        table = task_rows(self.omega.value, ctx.task_ids, x_btd, per_task=self.per_task)
        axis = -1 if self.scalar else -2
        if self.rows != tuple(range(table.shape[axis])):
            table = jnp.take(table, jnp.asarray(self.rows), axis=axis)
        return table[..., None] if self.scalar else table

    def mix(self, deltas: list[jax.Array], x_btd: jax.Array, ctx: Context) -> jax.Array:
        stacked = jnp.stack(deltas, axis=-2)  # [b, t, children, out]
        return jnp.sum(self.scales(x_btd, ctx).astype(stacked.dtype) * stacked, axis=-2)


def scalearn_block(children: list[nnx.Module], index: list[int], *, path: str,
                   base: Dense | None, width: int, out_axis: str, config: PeftConfig,
                   num_children: int, num_tasks: int | None, tables: dict,
                   rngs: nnx.Rngs) -> ScaLearn:
    """The ScaLearn module of one site (`path`, unused: every site is alike).

    `index`: the children's positions among all `num_children` (sources, then the new adapter);
    `width`/`out_axis`: the site's output width and its logical axis; `tables`: one dict per
    model, holding the shared forms' tables across sites.
    """
    del path
    form = config.scalearn_form
    scalar, shared = form.startswith("scalar"), form.endswith("_shared")
    per_task = config.mode == "per_task"
    if per_task and not num_tasks:
        raise ValueError("config.peft.mode='per_task' needs the number of tasks for ScaLearn's "
                         "tables; it comes from the data (or set config.peft.num_tasks).")
    kw = dict(width=None if scalar else width, out_axis=out_axis,
              num_tasks=num_tasks if per_task else None, rngs=rngs)
    if shared:
        key = "scalar" if scalar else (out_axis, width)
        if key not in tables:
            tables[key] = omega_table(num_children, **kw)
        omega, rows = tables[key], tuple(index)
    else:
        omega, rows = omega_table(len(children), **kw), tuple(range(len(children)))
    return ScaLearn(children, base=base, omega=omega, rows=rows, per_task=per_task, scalar=scalar)
