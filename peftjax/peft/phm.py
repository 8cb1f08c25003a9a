"""PHM adapters and Compacter: bottleneck adapters whose projections are Kronecker sums.

A PHM layer (parameterized hypercomplex multiplication) maps `d_in → d_out` with

    W = Σ_{i<n} A_i ⊗ B_i,   A_i: `n x n` ("rule"),   B_i: `(d_in/n) x (d_out/n)`,

so it holds about `1/n` of a dense layer's parameters (Karimi Mahabadi et al. 2021, "Compacter";
reference code rabeehk/compacter, `seq2seq/hypercomplex/layers.py`). The adapter is the usual
bottleneck, `h ↦ h + s · (U act(D h + b_D) + b_U)`, with PHM layers for D and U:

  * `phm` (PHM-Adapter): full `B_i`, every PHM layer its own rule; Houlsby placement.
  * `compacter`: `B_i = s_i t_iᵀ` of rank `config.peft.phm_rank` (1 in the paper), ONE rule shared
    by every PHM layer of the model (down and up projections, all layers); Houlsby placement.
  * `compacter_pp` (Compacter++): as `compacter`, after the FFN only.

Choices, following the reference code where the paper is silent:
  * Biases: the reference adapters' PHM layers have biases (zero-initialised), so ours do too.
  * Factors (`B_i`, `s_i`, `t_i`): Glorot-uniform with gain √2 per summand, as the reference's
    `glorot-uniform` option that its configs use; rules N(0, 0.01²) per layer (the reference's
    PHMLinear) or N(0, 1e-4²) when shared (its `phm_init_range` for the model-level rule).
  * Identity at init: the reference's adapter is only nearly the identity (~1e-8 relative, through
    the tiny rule); ours zero-initialises the up projection's output-side factor (`t_i` of U, or
    U's `B_i`) so the adapted model starts exactly equal to the base, like LoRA's `B = 0`.
  * Trainable layer norms (the paper's configs also unfreeze them) are not part of this method;
    combine with `ln_tuning` for that.

Sharing: the first site creates the rule and keeps it in `site.shared`; later sites hold the same
Variable object. NNX graph mode keeps that identity through `nnx.split` (the rule is stored once in
the state) and `nnx.merge`, so its gradient is the sum over every PHM layer that reads it.
Per-task mode gives every parameter, rule included, a leading `tasks` axis; the (small) weights
are materialised per task and applied with `project_in` / `project_out`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context
from peftjax.models.layers import Hook, activation_fn
from peftjax.peft.config import PeftConfig
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.task_select import add_code_bias, project_in, project_out, task_axis, task_rows
from peftjax.peft.variables import Adapter

SHARED_RULE_STD = 1e-4  # reference `phm_init_range` of the model-level (shared) rule
LAYER_RULE_STD = 0.01  # reference PHMLinear's own rule


def kronecker_sum(rules_knn: jax.Array, factors_kio: jax.Array) -> jax.Array:
    """`Σ_k A_k ⊗ B_k`.

    Args:
      rules_knn: `[(T,) n, n, n]`, `A_k = rules[..., k, :, :]`.
      factors_kio: `[(T,) n, I, O]`, `B_k = factors[..., k, :, :]`.
    Returns:
      `[(T,) n·I, n·O]`, entry `[a·I + i, b·O + o] = Σ_k A_k[a, b] B_k[i, o]`.
    """
    n, i, o = factors_kio.shape[-3:]
    w = jnp.einsum("...kab,...kio->...aibo", rules_knn, factors_kio)
    return w.reshape(*w.shape[:-4], n * i, n * o)


def _glorot(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Glorot-uniform with gain √2 over the last two dims (torch `xavier_uniform_(gain=√2)`)."""
    bound = math.sqrt(2.0) * math.sqrt(6.0 / (shape[-2] + shape[-1]))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _zeros(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    del key
    return jnp.zeros(shape, jnp.float32)


def new_rule(phm_dim: int, *, std: float, num_tasks: int | None, rngs: nnx.Rngs) -> Adapter:
    """A rule tensor `[(tasks,) n, n, n]` ~ N(0, std²) (`A_k = rule[..., k, :, :]`)."""
    lead, lead_axes = task_axis(num_tasks)
    value = std * jax.random.normal(rngs.params(), (*lead, phm_dim, phm_dim, phm_dim), jnp.float32)
    return Adapter(value, axes=(*lead_axes, "phm", "phm", "phm"))


class PHMLinear(nnx.Module):
    """`x ↦ x W + b` with `W = Σ_k A_k ⊗ B_k` `[(tasks,) d_in, d_out]`.

    Parameters (leading `tasks` axis when per task):
      `rule` `[n, n, n]`: own, or a Variable shared with other PHM layers (passed in).
      `factors` `[n, d_in/n, d_out/n]` (full `B_k`, `rank=None`), or `s` `[n, d_in/n, rank]` and
      `t` `[n, rank, d_out/n]` (`B_k = s_k t_k`).
      `bias` `[d_out]`, zeros.
    `zero_out` zero-initialises the output-side factor (`t`, or `factors`), so `W = 0` at init.
    """

    def __init__(self, in_features: int, out_features: int, *, phm_dim: int, rank: int | None,
                 rule: Adapter | None, num_tasks: int | None, zero_out: bool,
                 axes: tuple[str, str], rngs: nnx.Rngs):
        n = phm_dim
        if in_features % n or out_features % n:
            raise ValueError(f"A PHM layer {in_features} -> {out_features} needs both widths "
                             f"divisible by config.peft.phm_dim={n}.")
        lead, lead_axes = task_axis(num_tasks)
        in_axis, out_axis = axes
        i, o = in_features // n, out_features // n
        self.rule = rule if rule is not None else new_rule(
            n, std=LAYER_RULE_STD, num_tasks=num_tasks, rngs=rngs)
        init_out = _zeros if zero_out else _glorot
        if rank is None:
            self.factors = Adapter(init_out(rngs.params(), (*lead, n, i, o)),
                                   axes=(*lead_axes, "phm", in_axis, out_axis))
        else:
            self.s = Adapter(_glorot(rngs.params(), (*lead, n, i, rank)),
                             axes=(*lead_axes, "phm", in_axis, "lora_rank"))
            self.t = Adapter(init_out(rngs.params(), (*lead, n, rank, o)),
                             axes=(*lead_axes, "phm", "lora_rank", out_axis))
        self.bias = Adapter(jnp.zeros((*lead, out_features), jnp.float32),
                            axes=(*lead_axes, out_axis))
        self.low_rank = rank is not None

    def weight(self) -> jax.Array:
        """The materialised `[(tasks,) d_in, d_out]` weight."""
        factors = (jnp.einsum("...kir,...kro->...kio", self.s.value, self.t.value)
                   if self.low_rank else self.factors.value)
        return kronecker_sum(self.rule.value, factors)


class PHMAdapter(nnx.Module):
    """Replaces a `Hook`: `h ↦ h + s · (U act(D h + b_D) + b_U)` with PHM layers `down`, `up`."""

    def __init__(self, features: int, bottleneck: int, *, phm_dim: int, rank: int | None,
                 rule: Adapter | None, activation: str = "relu", scale: float = 1.0,
                 num_tasks: int | None = None, rngs: nnx.Rngs):
        check_widths(features, bottleneck, phm_dim)
        kw = dict(phm_dim=phm_dim, rank=rank, rule=rule, num_tasks=num_tasks, rngs=rngs)
        self.down = PHMLinear(features, bottleneck, zero_out=False,
                              axes=("embed", "adapter_bottleneck"), **kw)
        self.up = PHMLinear(bottleneck, features, zero_out=True,
                            axes=("adapter_bottleneck", "embed"), **kw)
        self.act = activation_fn(activation)
        self.scale = scale
        self.per_task = bool(num_tasks)

    def delta(self, h_btd: jax.Array, ctx: Context) -> jax.Array:
        """`s · (U act(D h + b_D) + b_U)` `[b, t, d]`: what the adapter adds to the stream."""
        ids = ctx.task_ids
        code = project_in(h_btd, self.down.weight(), ids)
        code = self.act(add_code_bias(code, self.down.bias.value, ids))
        out = project_out(code, self.up.weight(), ids)
        bias = task_rows(self.up.bias.value, ids, out, per_task=self.per_task)
        return self.scale * (out + bias.astype(out.dtype))

    def __call__(self, h_btd: jax.Array, ctx: Context) -> jax.Array:
        return h_btd + self.delta(h_btd, ctx)


def check_widths(features: int, bottleneck: int, phm_dim: int) -> None:
    """Both PHM layers need their widths divisible by n; say which knob to change."""
    if bottleneck <= 0:
        raise ValueError(f"Adapter bottleneck width must be positive, got {bottleneck}; lower "
                         "config.peft.reduction_factor.")
    if features % phm_dim:
        divisors = [k for k in range(2, 17) if features % k == 0]
        raise ValueError(f"config.peft.phm_dim={phm_dim} does not divide d_model={features}; set "
                         f"config.peft.phm_dim to a divisor of {features} (e.g. {divisors}).")
    if bottleneck % phm_dim:
        raise ValueError(
            f"The bottleneck width d_model // config.peft.reduction_factor = {bottleneck} is not "
            f"divisible by config.peft.phm_dim={phm_dim}; choose config.peft.reduction_factor so "
            f"that the width is a multiple of {phm_dim}, or a config.peft.phm_dim dividing "
            f"{bottleneck}.")


def _builder(low_rank: bool, shared_rule: bool):
    def build(hook: Hook, site: Site, config: PeftConfig) -> PHMAdapter:
        d_model = site.model_config.d_model
        bottleneck = d_model // config.reduction_factor
        check_widths(d_model, bottleneck, config.phm_dim)  # before creating the shared rule
        rule = None
        if shared_rule:
            if "phm_rule" not in site.shared:
                site.shared["phm_rule"] = new_rule(config.phm_dim, std=SHARED_RULE_STD,
                                                   num_tasks=site.num_tasks, rngs=site.rngs)
            rule = site.shared["phm_rule"]
        return PHMAdapter(d_model, bottleneck, phm_dim=config.phm_dim,
                          rank=config.phm_rank if low_rank else None, rule=rule,
                          activation=config.adapter_activation, scale=config.adapter_scale,
                          num_tasks=site.num_tasks, rngs=site.rngs)

    return build


_WHERE = "residual hooks: post_attention, post_cross_attention, post_ffn"
_HOULSBY = r".*\.(post_attention|post_ffn)"
SPECS = {
    # PHM-Adapter: full Kronecker factors, a rule per PHM layer; after attention and FFN.
    "phm": MethodSpec((Hook,), _HOULSBY, _builder(low_rank=False, shared_rule=False), _WHERE),
    # Compacter: rank-`phm_rank` factors, one rule for the whole model; after attention and FFN.
    "compacter": MethodSpec((Hook,), _HOULSBY, _builder(low_rank=True, shared_rule=True), _WHERE),
    # Compacter++: as Compacter, after the FFN only.
    "compacter_pp": MethodSpec((Hook,), r".*\.post_ffn", _builder(low_rank=True, shared_rule=True),
                               _WHERE),
}
