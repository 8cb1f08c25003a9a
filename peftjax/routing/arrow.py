"""Arrow (Ostapenko et al., 2024, "Towards Modular LLMs by Building and Reusing a Library of
LoRAs"): zero-shot routing of each token over a library of frozen, trained LoRAs.

`config.peft.compose = "arrow"` over `config.peft.sources` (see `peftjax.peft.compose`): at every
projection where library LoRAs attach, with experts e = 1..E (`ΔW_e = s_e A_e B_e`, our kernels
`[in, out]`):

    v_e      = top left singular vector of A_e B_e           (torch: top RIGHT singular vector
                                                               of ΔW = s B A, `[out, in]`)
    score_e  = |<v_e, x>|                                    (sign-free: v_e is defined up to ±)
    g        = softmax(top-k scores / arrow_temperature)     (0 for the experts left out)
    y        = f(x) + Σ_e g_e · s_e B_e A_e x

as HF peft's `ArrowLoraLinearLayer` (peft 0.21, `tuners/lora/arrow.py`): the raw dot product
with unit-norm prototypes (not a cosine: the token is not normalised), its absolute value, top-k
(`config.peft.top_k`) then a softmax over the kept scores, and each expert's update is its LoRA
delta with its own scaling. Differences: the prototypes are exact (QR of the two small factors,
then the SVD of an r x r matrix) where peft runs 15 power iterations from a random vector, and
peft's optional GenKnowSub (subtracting the average of general-knowledge LoRAs) is not
implemented. peft applies its router's LoRA dropout to the mixed update; here each expert's own
dropout rate applies to its input, which only matters when training, and Arrow never trains.

Nothing here trains: the prototypes are computed once, at build, and stored as `FrozenAdapter`
`[experts, in]`; the experts are the sources' frozen LoRAs. A run is a zero-step run
(`configs/arrow.py`, `config.train.steps = 0`): build, checkpoint the (empty) trainable state,
evaluate. A `mode="per_task"` LoRA source counts as one expert per task it trained on
(`peftjax.peft.compose.load_source`), so the natural library is one per-task LoRA run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context
from peftjax.models.layers import Dense
from peftjax.peft.compose import Composition
from peftjax.peft.config import PeftConfig
from peftjax.peft.lora import LoRADense
from peftjax.peft.variables import FrozenAdapter, PeftParam
from peftjax.routing.moe import top_k_gate
from peftjax.routing.record import record_weights


def top_singular_vector(a_ir: jax.Array, b_ro: jax.Array) -> jax.Array:
    """Top left singular vector `[in]` of `A B` (`a_ir` `[in, r]`, `b_ro` `[r, out]`), float32.

    Never forms the `[in, out]` product: `A = Q_a R_a`, `Bᵀ = Q_b R_b` (reduced QR), so
    `A B = Q_a (R_a R_bᵀ) Q_bᵀ`; with `R_a R_bᵀ = U S Vᵀ` (r x r), `A B = (Q_a U) S (Q_b V)ᵀ`,
    and the answer is `Q_a U[:, 0]`. Its sign is fixed so that the largest-magnitude entry is
    positive (routing uses |<v, x>|, so either sign routes the same; this makes builds
    repeatable).
    A zero update (B = 0, an expert that never trained) has no direction: any unit vector.
    """
    a, b = a_ir.astype(jnp.float32), b_ro.astype(jnp.float32)
    q_a, r_a = jnp.linalg.qr(a)  # [in, r'], [r', r]  (r' = min(in, r))
    q_b, r_b = jnp.linalg.qr(b.T)  # [out, r''], [r'', r]
    u, _, _ = jnp.linalg.svd(r_a @ r_b.T)  # singular values in descending order
    v = q_a @ u[:, 0]
    return v * jnp.sign(v[jnp.argmax(jnp.abs(v))])


# `[experts, in, r], [experts, r, out] -> [experts, in]`: one compiled call per site shape (eager,
# the QR / SVD ops of every expert at every site dispatch one by one: seconds per build).
_prototypes = jax.jit(jax.vmap(top_singular_vector))


def arrow_gates(x_btd: jax.Array, prototypes_ed: jax.Array, *, top_k: int,
                temperature: float) -> jax.Array:
    """Mixing weights `[b, t, experts]` (float32): softmax over each token's top-k |<v_e, x>|
    (divided by `temperature`), zeros elsewhere; rows sum to 1."""
    scores = jnp.abs(jnp.einsum("btd,ed->bte", x_btd.astype(jnp.float32),
                                prototypes_ed.astype(jnp.float32)))
    # A softmax over the top-k scores = the full softmax kept at the top k and renormalised.
    return top_k_gate(scores / temperature, top_k)[0]


class Arrow(Composition):
    """`f(x) + Σ_e g_e(x) Δ_e(x)` over the frozen library LoRAs `adapters` of one projection.

    `prototypes`: `FrozenAdapter` `[experts, in]`, row e the top singular vector of expert e.
    Records the gates `[b, t, experts]` (`peftjax.routing.record`).
    """

    def __init__(self, children: list[LoRADense], *, base: Dense, prototypes: FrozenAdapter,
                 top_k: int, temperature: float):
        super().__init__(children, rule="arrow", base=base)
        self.prototypes = prototypes
        self.top_k, self.temperature = int(top_k), float(temperature)

    def gates(self, x_btd: jax.Array) -> jax.Array:
        return arrow_gates(x_btd, self.prototypes.value, top_k=self.top_k,
                           temperature=self.temperature)

    def mix(self, deltas: list[jax.Array], x_btd: jax.Array, ctx: Context) -> jax.Array:
        del ctx
        gates = self.gates(x_btd)
        record_weights(self, gates)
        stacked = jnp.stack(deltas, axis=-2)  # [b, t, experts, out]
        return jnp.einsum("bte,bteo->bto", gates.astype(stacked.dtype), stacked)


def check_expert(child: nnx.Module, path: str) -> LoRADense:
    """`child` if Arrow can route to it (a frozen, shared, plain LoRA), else a ValueError."""
    where = f"compose='arrow' at {path}"
    if not isinstance(child, LoRADense):
        raise ValueError(
            f"{where}: a {type(child).__name__} is in the library, but Arrow routes over LoRA "
            "experts only (its prototypes are the top singular vectors of each expert's B A). "
            "List LoRA runs (method='lora') in config.peft.sources, or compose these adapters "
            "with config.peft.compose='fusion' / 'average'.")
    if child.lora_magnitude is not None:
        raise ValueError(f"{where}: a DoRA expert (dora=True) is not a plain low-rank update "
                         "s·B A, which Arrow's prototypes and mixing assume; use sources trained "
                         "with config.peft.dora=False.")
    if child.lora_a.value.ndim != 2:
        raise ValueError(f"{where}: a per-task LoRA (lora_a {child.lora_a.value.shape}) must be "
                         "split into one expert per task first; list its run in "
                         "config.peft.sources and `load_source` does that.")
    if any(isinstance(v, PeftParam) for v in (child.lora_a, child.lora_b)):
        raise ValueError(
            f"{where}: a trainable LoRA is among the experts, but Arrow routes over a frozen "
            "library with prototypes fixed at build, and trains nothing: set "
            "config.peft.method='none' (and config.train.steps=0).")
    return child


def arrow_block(children: list[nnx.Module], index: list[int], *, path: str, base: Dense | None,
                width: int, out_axis: str, config: PeftConfig, num_children: int,
                num_tasks: int | None, tables: dict, rngs: nnx.Rngs) -> Arrow:
    """The Arrow module of one projection: its library experts' prototypes, computed here.

    Task-free (one router for every task, no parameter at all), so `index`, `num_tasks`,
    `tables` and `rngs` are unused; `mode` does not apply.
    """
    del index, width, out_axis, num_children, num_tasks, tables, rngs
    experts = [check_expert(child, path) for child in children]
    if config.top_k > len(experts):
        raise ValueError(
            f"config.peft.top_k={config.top_k} but only {len(experts)} library LoRA(s) attach "
            f"at {path}: a token cannot mix more experts than there are. Lower "
            "config.peft.top_k (<= the number of experts) or add sources (config.peft.sources).")
    if base is None:  # unreachable with LoRA children, which always wrap a Dense
        raise ValueError(f"compose='arrow' at {path}: Arrow routes at Dense projections only.")
    in_axis = base.kernel.get_metadata()["axes"][0]
    prototypes = _prototypes(jnp.stack([e.lora_a.value for e in experts]),
                             jnp.stack([e.lora_b.value for e in experts]))
    return Arrow(experts, base=base, prototypes=FrozenAdapter(prototypes,
                                                              axes=("experts", in_axis)),
                 top_k=config.top_k, temperature=config.arrow_temperature)
