"""Token-level mixtures of LoRA experts: MoLoRA, a gate over a frozen LoRA library, and SMoRA.

All three route every token on its own, from the site's input `x` alone (no task ids), so they
work on packed rows, mixed-task batches and while decoding. With `p = softmax(x W_g)` over the
E experts and `K = config.peft.top_k`:

    g = renormalised top-K of p:   g_e = p_e / Σ_{j∈top-K} p_j  for e in the token's top-K, else 0

* MoLoRA (`method="molora"`, Zadouri et al. 2023, "Pushing Mixture of Experts to the Limit"):
  E = `num_experts` LoRA experts trained here, `y = W0 x + s Σ_e g_e B_e A_e dropout(x)`. The
  paper's default is soft merging of ALL experts (`g = p`), which is `top_k = num_experts` here;
  it also reports top-k routing, which is what `top_k < num_experts` gives (top-k of the softmax
  renormalised over the kept experts, as Mixtral / MeteoRA do).
* Library (`compose="molora"` over `config.peft.sources`, MeteoRA-style: Xu et al. 2024,
  "MeteoRA: Multiple-tasks Embedded LoRA"): the experts are the frozen adapters of trained runs
  (plus the run's new adapter, if any); only the gate trains:
  `y = f(x) + Σ_e g_e d_e(x)` with `d_e` a child's `delta`. MeteoRA's top-k softmax over the kept
  logits equals the renormalised top-k of the full softmax used here. MeteoRA trains its gate
  with a cross-entropy against task labels on top of the LM loss; we use the task-free
  load-balancing loss below instead.
* SMoRA (`method="smora"`, Zhao et al. 2025, "Each Rank Could be an Expert"): one LoRA of rank
  r whose r ranks are the experts, `y = W0 x + s B (g ⊙ A dropout(x))`, `g` over the r ranks
  with K = `top_k` of them per token. The paper selects the ranks with a bias added to the gate
  scores that is updated outside gradient descent (DeepSeek-V3's auxiliary-loss-free balancing);
  this library's train step has no place for non-gradient state updates, so SMoRA here balances
  with the same Switch loss as MoLoRA. Scale: each rank is a rank-1 LoRA expert, scaled as
  MoLoRA scales its experts (alpha / expert rank), so `s = alpha`: SMoRA of rank r is exactly
  MoLoRA with r experts of rank 1 (A_e = column e of A, B_e = row e of B). With gates summing
  to 1 over K ranks each active rank gets about alpha / K, the per-rank scale of a LoRA of rank
  K and the same alpha. (We could not check the paper's own choice of scale.)

Load balancing (Switch Transformer, Fedus et al. 2021, eq. 4, generalised to top-K):
`aux = balance_coef · E · Σ_e f_e P_e` with `f_e` the fraction of the batch's (token, slot)
assignments that went to e (top-K counts / (K · tokens); no gradient) and `P_e` the mean router
probability of e. A uniform router gives `aux = balance_coef`. Statistics cover every position
of the batch, padding included (a layer does not see the padding mask).

Not implemented: router noise (Shazeer et al.'s noisy top-k); expert capacity / token dropping
(every token reaches its K experts); sparse dispatch (every expert's code is computed and the
unselected ones are zeroed: with LoRA-sized experts this is one small dense matmul, cheaper than
a gather). With `top_k = 1` the renormalised weight is exactly 1, so the gate then learns only
from the load-balancing loss (Switch keeps `p_e` un-normalised for that reason); use
`top_k >= 2` to train the gate on the task loss.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context, dropout, site_salt
from peftjax.models.layers import Dense
from peftjax.peft.compose import Composition
from peftjax.peft.config import PeftConfig
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.variables import Adapter, Router
from peftjax.routing.record import add_aux_loss, record_weights

# Every attention and feed-forward projection (MoLoRA's experts sit on every targeted layer).
ALL_PROJECTIONS = r".*(attention\.(q|k|v|o)|mlp\.(wi|wi_0|wi_1|wo))"


def router_init(rngs: nnx.Rngs, in_features: int, num_experts: int) -> jax.Array:
    """`W_g` `[in, experts]` ~ N(0, 0.1 / in): Switch Transformer's reduced init scale.

    The logits then have a standard deviation of about 0.3 · rms(x) whatever the width: the
    router starts close to uniform (every expert gets gradient, the balance loss starts near its
    minimum) yet different tokens already rank the experts differently, so top-K is not the
    same tie-broken set for every token. A zero gate would send every token to experts 0..K-1;
    a unit-variance one (MeteoRA's `normal_`) starts with nearly one-hot, saturated routing.
    """
    std = math.sqrt(0.1 / in_features)
    return std * jax.random.normal(rngs.params(), (in_features, num_experts), jnp.float32)


def top_k_gate(logits_bte: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax over the last axis, keep each row's top `k`, renormalise over them.

    Returns float32 `(gates, probs, chosen)`, each `[..., experts]`: `gates` the renormalised
    weights (zeros off the top-k, rows sum to 1), `probs` the full softmax, `chosen` the 0/1
    mask of the kept experts (exactly k per row; ties go to the lower index).
    """
    num_experts = logits_bte.shape[-1]
    if not 0 < k <= num_experts:
        raise ValueError(f"top-k routing needs 0 < top_k <= {num_experts} experts, got {k}; "
                         "set config.peft.top_k accordingly.")
    probs = jax.nn.softmax(logits_bte.astype(jnp.float32), axis=-1)
    if k == num_experts:  # soft merging of every expert (MoLoRA's default)
        return probs, probs, jnp.ones_like(probs)
    _, index = jax.lax.top_k(probs, k)
    chosen = jnp.sum(jax.nn.one_hot(index, num_experts, dtype=probs.dtype), axis=-2)
    kept = probs * chosen
    return kept / jnp.sum(kept, axis=-1, keepdims=True), probs, chosen


def balance_loss(probs: jax.Array, chosen: jax.Array, k: int, coef: float) -> jax.Array:
    """Switch Transformer's load-balancing loss over all tokens of `probs`/`chosen` `[..., E]`:
    `coef · E · Σ_e f_e P_e`, `f_e = Σ chosen_e / (k · tokens)` (no gradient), `P_e = mean p_e`.
    Minimal (= coef) when both are uniform; `E · coef` when every token goes to one expert."""
    num_experts = probs.shape[-1]
    fraction_e = jax.lax.stop_gradient(
        jnp.mean(chosen.reshape(-1, num_experts), axis=0) / k)
    mean_prob_e = jnp.mean(probs.reshape(-1, num_experts), axis=0)
    return coef * num_experts * jnp.sum(fraction_e * mean_prob_e)


def _route(module: nnx.Module, x_btd: jax.Array, k: int, coef: float) -> jax.Array:
    """Gate `[b, t, E]` (float32) of `module.router_kernel` on `x`, recorded with its aux loss.

    The gate reads the clean input (dropout acts on the experts' input only). A frozen gate (a
    library entry loaded under another composition) adds no loss: it cannot learn from it.
    """
    logits = x_btd.astype(jnp.float32) @ module.router_kernel.value.astype(jnp.float32)
    gates, probs, chosen = top_k_gate(logits, k)
    record_weights(module, gates)
    if coef > 0 and isinstance(module.router_kernel, Router):
        add_aux_loss(module, balance_loss(probs, chosen, k, coef))
    return gates


def _check_rank(rank: int) -> None:
    if rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}; set "
                         "config.peft.rank to e.g. 8.")


class MoLoRADense(nnx.Module):
    """A frozen `Dense` plus E token-routed LoRA experts (MoLoRA).

    `lora_a`: `[experts, in, rank]`, Kaiming-uniform (bound 1/sqrt(in)) as `LoRADense`.
    `lora_b`: `[experts, rank, out]`, zeros: the layer starts equal to the base.
    `router_kernel`: `[in, experts]` (`Router`), see `router_init`.
    `scale`: alpha / rank.
    """

    def __init__(self, base: Dense, *, num_experts: int, top_k: int, rank: int, alpha: float,
                 balance_coef: float = 0.0, dropout_rate: float = 0.0, salt: int = 0,
                 rngs: nnx.Rngs):
        _check_rank(rank)
        if not 0 < top_k <= num_experts:
            raise ValueError(f"config.peft.top_k={top_k} must be in [1, config.peft.num_experts"
                             f"={num_experts}].")
        self.base = base
        in_axis, out_axis = base.kernel.get_metadata()["axes"]
        bound = 1.0 / math.sqrt(base.in_features)
        a = jax.random.uniform(rngs.params(), (num_experts, base.in_features, rank), jnp.float32,
                               -bound, bound)
        self.lora_a = Adapter(a, axes=("experts", in_axis, "lora_rank"))
        self.lora_b = Adapter(jnp.zeros((num_experts, rank, base.out_features), jnp.float32),
                              axes=("experts", "lora_rank", out_axis))
        self.router_kernel = Router(router_init(rngs, base.in_features, num_experts),
                                    axes=(in_axis, "experts"))
        self.scale = alpha / rank
        self.top_k, self.balance_coef = top_k, balance_coef
        self.dropout_rate, self.salt = dropout_rate, salt

    def delta(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        """`s Σ_e g_e B_e A_e dropout(x)` `[b, t, out]`.

        Two contractions, no per-token weights: the experts' codes `[b, t, E, r]` (one
        `[bt, d] x [d, E·r]` matmul), weighted by the gate, then one `[bt, E·r] x [E·r, out]`.
        """
        gates_bte = _route(self, x_btd, self.top_k, self.balance_coef)
        dtype = self.base.dtype
        x_btd = dropout(x_btd, self.dropout_rate, ctx, self.salt).astype(dtype)
        code_bter = jnp.einsum("btd,edr->bter", x_btd, self.lora_a.value.astype(dtype))
        code_bter = code_bter * gates_bte.astype(dtype)[..., None]
        return self.scale * jnp.einsum("bter,ero->bto", code_bter,
                                       self.lora_b.value.astype(dtype))

    def __call__(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        return self.base(x_btd, ctx) + self.delta(x_btd, ctx)


class SMoRADense(nnx.Module):
    """A frozen `Dense` plus one LoRA whose ranks are token-routed experts (SMoRA).

    `lora_a` `[in, rank]` (Kaiming-uniform), `lora_b` `[rank, out]` (zeros), `router_kernel`
    `[in, rank]` (`Router`, see `router_init`), `scale` alpha (alpha / 1: each expert is one
    rank; see the module docstring).
    """

    def __init__(self, base: Dense, *, top_k: int, rank: int, alpha: float,
                 balance_coef: float = 0.0, dropout_rate: float = 0.0, salt: int = 0,
                 rngs: nnx.Rngs):
        _check_rank(rank)
        if not 0 < top_k <= rank:
            raise ValueError(f"config.peft.top_k={top_k} must be in [1, config.peft.rank={rank}]: "
                             "SMoRA's experts are the ranks.")
        self.base = base
        in_axis, out_axis = base.kernel.get_metadata()["axes"]
        bound = 1.0 / math.sqrt(base.in_features)
        a = jax.random.uniform(rngs.params(), (base.in_features, rank), jnp.float32, -bound,
                               bound)
        self.lora_a = Adapter(a, axes=(in_axis, "lora_rank"))
        self.lora_b = Adapter(jnp.zeros((rank, base.out_features), jnp.float32),
                              axes=("lora_rank", out_axis))
        self.router_kernel = Router(router_init(rngs, base.in_features, rank),
                                    axes=(in_axis, "lora_rank"))
        self.scale = float(alpha)
        self.top_k, self.balance_coef = top_k, balance_coef
        self.dropout_rate, self.salt = dropout_rate, salt

    def delta(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        """`s B (g ⊙ A dropout(x))` `[b, t, out]`, `g` `[b, t, rank]` over the ranks."""
        gates_btr = _route(self, x_btd, self.top_k, self.balance_coef)
        dtype = self.base.dtype
        x_btd = dropout(x_btd, self.dropout_rate, ctx, self.salt).astype(dtype)
        code_btr = (x_btd @ self.lora_a.value.astype(dtype)) * gates_btr.astype(dtype)
        return self.scale * (code_btr @ self.lora_b.value.astype(dtype))

    def __call__(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        return self.base(x_btd, ctx) + self.delta(x_btd, ctx)


class LoRALibrary(Composition):
    """`f(x) + Σ_e g_e(x) d_e(x)` over frozen children `adapters`, `g` a trained top-k gate.

    `router_kernel`: `[in, children]` (`Router`), `in` the site's input width (`base.in_features`
    at a projection, d_model at a residual hook). Every child's update is computed (the children
    are arbitrary adapters, so there is no batched form); unselected ones get weight 0.
    """

    def __init__(self, children: list[nnx.Module], *, base: Dense | None, router: Router,
                 top_k: int, balance_coef: float):
        super().__init__(children, rule="molora", base=base)
        self.router_kernel = router
        self.top_k, self.balance_coef = top_k, balance_coef

    def mix(self, deltas: list[jax.Array], x_btd: jax.Array, ctx: Context) -> jax.Array:
        del ctx
        gates_bte = _route(self, x_btd, self.top_k, self.balance_coef)
        stacked = jnp.stack(deltas, axis=-2)  # [b, t, children, out]
        return jnp.einsum("bte,bteo->bto", gates_bte.astype(stacked.dtype), stacked)


def library_block(children: list[nnx.Module], index: list[int], *, path: str,
                  base: Dense | None, width: int, out_axis: str, config: PeftConfig,
                  num_children: int, num_tasks: int | None, tables: dict,
                  rngs: nnx.Rngs) -> LoRALibrary:
    """The `compose="molora"` module of one site: a token gate over its children (the sources
    present there, then the run's new adapter if it attaches there too).

    The gate is task-free and one per site (`mode` only shapes the new adapter, if any).
    `index`, `num_tasks`, `tables`, `out_axis` are unused: nothing is shared across sites.
    """
    del index, num_tasks, tables, out_axis, num_children
    if config.top_k > len(children):
        raise ValueError(
            f"config.peft.top_k={config.top_k} but only {len(children)} adapter(s) attach at "
            f"{path} ({len(config.sources)} source(s) in config.peft.sources): a token cannot "
            "use more experts than there are. Lower config.peft.top_k or add sources that "
            "attach there.")
    in_width, in_axis = ((width, "embed") if base is None else
                         (base.in_features, base.kernel.get_metadata()["axes"][0]))
    router = Router(router_init(rngs, in_width, len(children)), axes=(in_axis, "experts"))
    return LoRALibrary(children, base=base, router=router, top_k=config.top_k,
                       balance_coef=config.balance_coef)


def _task_free(config: PeftConfig) -> None:
    if config.mode == "per_task":
        raise ValueError(
            f"config.peft.method={config.method!r} routes each token with a learned gate over "
            "experts shared by all tasks; it has no per-task copy. Set config.peft.mode="
            "'shared' (or use method='lora' with mode='per_task' for one adapter per task).")


def _build_molora(base: Dense, site: Site, config: PeftConfig) -> MoLoRADense:
    _task_free(config)
    return MoLoRADense(base, num_experts=config.num_experts, top_k=config.top_k,
                       rank=config.rank, alpha=config.alpha, balance_coef=config.balance_coef,
                       dropout_rate=config.dropout, salt=site_salt(site.path), rngs=site.rngs)


def _build_smora(base: Dense, site: Site, config: PeftConfig) -> SMoRADense:
    _task_free(config)
    return SMoRADense(base, top_k=config.top_k, rank=config.rank, alpha=config.alpha,
                      balance_coef=config.balance_coef, dropout_rate=config.dropout,
                      salt=site_salt(site.path), rngs=site.rngs)


_WHERE = "Dense projections: q, k, v, o, wi_0, wi_1, wo, lm_head"
SPECS = {
    "molora": MethodSpec(kinds=(Dense,), targets=ALL_PROJECTIONS, build=_build_molora,
                         where=_WHERE),
    "smora": MethodSpec(kinds=(Dense,), targets=ALL_PROJECTIONS, build=_build_smora,
                        where=_WHERE),
}
