"""AdapterFusion (Pfeiffer et al., 2021): learned attention over the outputs of frozen adapters.

`config.peft.compose = "fusion"` over `config.peft.sources` (see `peftjax.peft.compose`). At a
residual hook with input h (the sub-layer's output) and children a_1..a_n, each child's output
a_i = `child.delta(h)` (the adapter's output before its residual add):

    q    = h W_Q + b_Q                  k_i = a_i W_K            v_i = a_i W_V
    α    = softmax_i(q · k_i)           (recorded, `[b, t, children]`)
    h'   = h + Σ_i α_i v_i

This is AdapterHub's default "dynamic" fusion (`DynamicAdapterFusionConfig` + `BertFusion`,
called from `BottleneckLayer.compose_fuse`): the query is the hidden state the adapters read
(query_before_ln=False), keys and values are each adapter's up-projection output (its scaled
`bottleneck_up`, without the residual), W_V is applied to every value before the weighted sum
(value_before_softmax=True; the same thing, by linearity, as after it), the residual is added
after the fusion (residual_before=False), the softmax temperature is 1 (temperature=False), and
training adds `REG_COEF · ‖W_V - I‖²_F` per fusion layer (regularization=True;
`get_fusion_regularization_loss`), here through `add_aux_loss`.

At a Dense projection with frozen f there is no residual stream: each child's output is the
whole projection a_i = f(x) + Δ_i(x), the query reads the projection's input x (so W_Q is
`[in, out]`), and y = Σ_i α_i a_i W_V (f's share of the keys is the same for every child, so it
cancels in the softmax; that is AdapterHub's residual_before=True arrangement, with f(x) as the
residual that goes through W_V).

Initialisation as AdapterHub's: W_Q, W_K ~ N(0, 0.02²) (BERT init), b_Q = 0, W_V = the identity
with 1e-6 off the diagonal (value_initialized=True). At init the scores are small, so α is near
uniform and the output is near compose="average" of the children (exactly: h + Σ α_i a_i up to
the 1e-6 off-diagonal terms of W_V, with α = softmax(q · k) of the small random W_Q, W_K).

Departures: W_K has no bias (AdapterHub's key bias adds q·b_K to every child's score alike, which
the softmax removes, so it never gets a gradient); no dropout on the scores (AdapterHub uses the
model config's `attention_probs_dropout_prob`, which a T5 config does not have, so its T5 fusion
has none either). The fusion parameters are `Router` variables, one set per site, shared by all
tasks: AdapterFusion trains one fusion per target task, i.e. one run per task here
(`config.data.mixture=<task>`); `mode="per_task"` only shapes a new adapter (method != "none").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context
from peftjax.models.layers import Dense
from peftjax.peft.compose import Composition
from peftjax.peft.config import PeftConfig
from peftjax.peft.variables import Router
from peftjax.routing.record import add_aux_loss, record_weights

INIT_STD = 0.02  # AdapterHub `Adapter.init_bert_weights`: N(0, 0.02²) for W_Q and W_K
VALUE_OFF_DIAGONAL = 1e-6  # AdapterHub's W_V init: zeros + 1e-6, then 1 on the diagonal
REG_COEF = 0.01  # AdapterHub `get_fusion_regularization_loss`: 0.01 · ‖I - W_V‖²_F per layer


def value_init(width: int) -> jax.Array:
    """AdapterHub's W_V init `[width, width]`: 1 on the diagonal, 1e-6 everywhere else."""
    off = jnp.full((width, width), VALUE_OFF_DIAGONAL, jnp.float32)
    return off + (1.0 - VALUE_OFF_DIAGONAL) * jnp.eye(width, dtype=jnp.float32)


class Fusion(Composition):
    """AdapterFusion over the children `adapters` at one site (see the module docstring).

    `query` `[in, width]`, `query_bias` `[width]`, `key` `[width, width]`, `value`
    `[width, width]`: `Router` variables. `base`: the frozen Dense at a projection site, None at a
    residual hook (then in = width = d_model).
    """

    def __init__(self, children: list[nnx.Module], *, base: Dense | None, query: Router,
                 query_bias: Router, key: Router, value: Router):
        super().__init__(children, rule="fusion", base=base)
        self.query, self.query_bias, self.key, self.value = query, query_bias, key, value

    def attention(self, x_btd: jax.Array, values_btnw: jax.Array) -> jax.Array:
        """α `[b, t, children]` (float32): softmax over the children of q · (a_i W_K)."""
        f32 = jnp.float32
        q_btw = x_btd.astype(f32) @ self.query.value.astype(f32) + self.query_bias.value
        # q · (a_i W_K) = (q W_Kᵀ) · a_i: one matmul instead of one per child.
        scores = jnp.einsum("btw,btnw->btn", q_btw @ self.key.value.astype(f32).T,
                            values_btnw.astype(f32))
        return jax.nn.softmax(scores, axis=-1)

    def __call__(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        deltas = jnp.stack([a.delta(x_btd, ctx) for a in self.adapters], axis=-2)  # [b,t,n,w]
        outputs = deltas if self.base is None else self.base(x_btd, ctx)[..., None, :] + deltas
        alpha = self.attention(x_btd, outputs)
        record_weights(self, alpha)
        value = self.value.value
        add_aux_loss(self, REG_COEF * jnp.sum(jnp.square(
            value.astype(jnp.float32) - jnp.eye(value.shape[0], dtype=jnp.float32))))
        # Σ_i α_i (a_i W_V) = (Σ_i α_i a_i) W_V: the value projection once, after the sum.
        mixed = jnp.einsum("btn,btnw->btw", alpha.astype(outputs.dtype), outputs)
        fused = mixed @ value.astype(mixed.dtype)
        return fused if self.base is not None else x_btd + fused


def fusion_block(children: list[nnx.Module], index: list[int], *, path: str,
                 base: Dense | None, width: int, out_axis: str, config: PeftConfig,
                 num_children: int, num_tasks: int | None, tables: dict,
                 rngs: nnx.Rngs) -> Fusion:
    """The AdapterFusion module of one site: fresh W_Q, b_Q, W_K, W_V over its children.

    `width`/`out_axis`: the site's output width and logical axis. Nothing is shared across sites
    or tasks, so `index`, `num_children`, `num_tasks` and `tables` are unused.
    """
    del index, num_children, num_tasks, tables
    if config.mode == "per_task" and config.method == "none":
        raise ValueError(
            f"compose='fusion' at {path}: config.peft.mode='per_task' with method='none' would "
            "train nothing per task, since one fusion serves every task of a run. Set "
            "config.peft.mode='shared' (AdapterFusion trains one fusion per target task: one run "
            "per task, config.data.mixture=<task>), or add a new per-task adapter "
            "(config.peft.method).")
    in_width, in_axis = ((width, out_axis) if base is None else
                         (base.in_features, base.kernel.get_metadata()["axes"][0]))
    normal = jax.nn.initializers.normal(INIT_STD)
    return Fusion(
        children, base=base,
        query=Router(normal(rngs.params(), (in_width, width), jnp.float32),
                     axes=(in_axis, out_axis)),
        query_bias=Router(jnp.zeros((width,), jnp.float32), axes=(out_axis,)),
        key=Router(normal(rngs.params(), (width, width), jnp.float32), axes=(out_axis, out_axis)),
        value=Router(value_init(width), axes=(out_axis, out_axis)))
