"""Merging task deltas: task arithmetic, TIES, DARE, and SVD re-compression to a LoRA pair.

Every merge takes the deltas ("task vectors") of T tasks stacked on a leading axis,
`tau [T, ...]`, with per-task weights `[T]`, and returns one merged delta `[...]`; the merged
weight is then `W0 + merged` (see `peftjax.peft.fold.add_task_vector`). The definitions and the
order of operations are HF peft's (`peft/utils/merge_utils.py`), so results match it:

  * `task_arithmetic`: `sum_t w_t tau_t`.
  * `magnitude_prune`: trim each tau_t to its top `density` fraction by |value|, then weighted sum.
  * `ties`: trim as above; elect a sign per entry from the UNWEIGHTED trimmed deltas ("total":
    sign of their sum, "frequency": sign of the sum of signs; 0 counts as +); keep the entries
    whose sign equals the elected one, weight them, and divide their sum by HOW MANY tasks kept
    the entry (a count, not a sum of weights; at least 1).
  * `dare_linear` / `dare_ties`: keep each entry with probability `density` (drop with
    p = 1 - density) and rescale the kept ones by 1 / density; then as task arithmetic / TIES.
  * `density >= 1` disables trimming and dropping (no rescale), as in peft.

All functions are pure and jit-compatible with `density`, `method` and `rank` static (top-k and
SVD truncation need Python ints). `merge_tree` applies a merge to every leaf of a pytree of
stacked deltas, e.g. the `{weight path: [T, in, out]}` dict of `fold.task_vectors`.

SVD re-compression (`svd_compress`, `lowrank_compress`) returns the best rank-r LoRA pair
`(A [in, r], B [r, out])` of a delta (Eckart-Young), with the singular values split evenly
(`A = U sqrt(S)`, `B = sqrt(S) V^T`; peft puts all of S in B and clamps outliers, we do neither).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

SignMethod = Literal["total", "frequency"]
MERGES = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
_SUM_LIKE = ("linear", "magnitude_prune", "dare_linear")


def default_weights(method: str, num_tasks: int) -> jax.Array:
    """Weights `[T]` that make each merge an average of the tasks "in its own sense".

    Sum-like merges (linear, magnitude_prune, dare_linear) get 1/T (the mean delta); TIES and
    DARE-TIES already divide by the number of agreeing tasks, so they get 1 (the TIES paper's
    lambda = 1). Pass explicit weights for task arithmetic with a lambda of your choice.
    """
    _check_method(method)
    return jnp.full((num_tasks,), 1.0 / num_tasks if method in _SUM_LIKE else 1.0, jnp.float32)


def _check_method(method: str) -> None:
    if method not in MERGES:
        raise ValueError(f"Unknown merge method {method!r}; choose from {MERGES}.")


def _check_density(density: float) -> None:
    if density < 0:
        raise ValueError(f"density must be in [0, 1] (the fraction of entries kept), got "
                         f"{density}.")


def _weighted(tau: jax.Array, weights: jax.Array | None, method: str) -> jax.Array:
    """`w_t tau_t`, weights `[T]` broadcast over the trailing dims of `tau [T, ...]`."""
    if weights is None:
        weights = default_weights(method, tau.shape[0])
    weights = jnp.asarray(weights, tau.dtype)
    if weights.shape != (tau.shape[0],):
        raise ValueError(f"weights must have one entry per task, shape ({tau.shape[0]},); got "
                         f"{weights.shape}.")
    return tau * weights.reshape((-1,) + (1,) * (tau.ndim - 1))


def magnitude_mask(tau: jax.Array, density: float) -> jax.Array:
    """Per task, True on the `int(density * size)` entries of largest |value|: bool `[T, ...]`.

    `size` is the number of entries of one task's delta (peft's `int(density * numel())`).
    """
    _check_density(density)
    if density >= 1:
        return jnp.ones(tau.shape, bool)
    flat_tn = jnp.abs(tau.reshape(tau.shape[0], -1))
    k = int(density * flat_tn.shape[1])
    if k == 0:
        return jnp.zeros(tau.shape, bool)
    _, top_tk = jax.lax.top_k(flat_tn, k)
    rows = jnp.arange(tau.shape[0])[:, None]
    return jnp.zeros(flat_tn.shape, bool).at[rows, top_tk].set(True).reshape(tau.shape)


def dare_mask(key: jax.Array, shape: tuple[int, ...], density: float) -> jax.Array:
    """DARE's random keep-mask: each entry kept (True) with probability `density`, bool `shape`."""
    _check_density(density)
    return jax.random.bernoulli(key, density, shape)


def trim(tau: jax.Array, density: float) -> jax.Array:
    """TIES' trim: keep each task's top `density` fraction of entries by magnitude, `[T, ...]`."""
    return jnp.where(magnitude_mask(tau, density), tau, 0)


def dare_drop(tau: jax.Array, density: float, key: jax.Array) -> jax.Array:
    """DARE: drop entries with probability 1 - density, rescale the kept ones by 1 / density."""
    if density >= 1:  # peft returns the deltas untouched (and does not rescale)
        return tau
    mask = dare_mask(key, tau.shape, density)
    return jnp.where(mask, tau, 0) / jnp.asarray(density, tau.dtype)


def elect_sign(tau: jax.Array, method: SignMethod = "total") -> jax.Array:
    """TIES' sign election per entry, `[...]` in {+1, -1} from `tau [T, ...]` (ties go to +1).

    "total": the sign of the summed mass; "frequency": the sign of the sum of signs.
    """
    if method == "total":
        mass = tau.sum(axis=0)
    elif method == "frequency":
        mass = jnp.sign(tau).sum(axis=0)
    else:
        raise ValueError(f"Unknown majority_sign_method {method!r}; choose 'total' or "
                         "'frequency'.")
    return jnp.where(mass >= 0, 1, -1).astype(tau.dtype)


def disjoint_mean(weighted_tau: jax.Array, agree: jax.Array) -> jax.Array:
    """Sum of the agreeing entries over tasks divided by how many tasks agree (at least 1).

    `weighted_tau [T, ...]`, `agree` bool `[T, ...]` -> `[...]`. A trimmed (zero) entry never
    agrees, since its sign 0 matches neither +1 nor -1.
    """
    total = jnp.where(agree, weighted_tau, 0).sum(axis=0)
    count = agree.sum(axis=0).astype(weighted_tau.dtype)
    return total / jnp.maximum(count, 1)


def task_arithmetic(tau: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """`sum_t w_t tau_t`: `tau [T, ...]`, `weights [T]` (default 1/T, the mean) -> `[...]`."""
    return _weighted(tau, weights, "linear").sum(axis=0)


def magnitude_prune(tau: jax.Array, weights: jax.Array | None = None, *,
                    density: float) -> jax.Array:
    """Trim each task to its top-`density` magnitudes, then the weighted sum. -> `[...]`."""
    return _weighted(trim(tau, density), weights, "magnitude_prune").sum(axis=0)


def _ties_core(trimmed: jax.Array, weights: jax.Array | None, method: str,
               majority_sign_method: SignMethod) -> jax.Array:
    sign = elect_sign(trimmed, majority_sign_method)
    agree = jnp.sign(trimmed) == sign  # sign elected on unweighted deltas (as peft)
    return disjoint_mean(_weighted(trimmed, weights, method), agree)


def ties(tau: jax.Array, weights: jax.Array | None = None, *, density: float,
         majority_sign_method: SignMethod = "total") -> jax.Array:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean. `[T, ...]` -> `[...]`.

    Default weights are 1 (lambda = 1).
    """
    return _ties_core(trim(tau, density), weights, "ties", majority_sign_method)


def dare_linear(tau: jax.Array, weights: jax.Array | None = None, *, density: float,
                key: jax.Array) -> jax.Array:
    """DARE (Yu et al. 2023) then weighted sum. Drop probability p = 1 - density."""
    return _weighted(dare_drop(tau, density, key), weights, "dare_linear").sum(axis=0)


def dare_ties(tau: jax.Array, weights: jax.Array | None = None, *, density: float,
              key: jax.Array, majority_sign_method: SignMethod = "total") -> jax.Array:
    """DARE's random drop + rescale instead of TIES' trim, then TIES' sign election and mean."""
    return _ties_core(dare_drop(tau, density, key), weights, "dare_ties", majority_sign_method)


def merge(tau: jax.Array, method: str = "linear", weights: jax.Array | None = None, *,
          density: float = 1.0, key: jax.Array | None = None,
          majority_sign_method: SignMethod = "total") -> jax.Array:
    """One of `MERGES` by name on stacked deltas `tau [T, ...]` -> `[...]`.

    `weights [T]` default to `default_weights(method, T)`; `density` is the kept fraction (trim
    for magnitude_prune / ties, keep probability for dare_*); `key` is needed by dare_*.
    """
    _check_method(method)
    if method.startswith("dare") and key is None and density < 1:
        raise ValueError(f"merge method {method!r} drops entries at random: pass key="
                         "jax.random.key(seed).")
    if method == "linear":
        return task_arithmetic(tau, weights)
    if method == "magnitude_prune":
        return magnitude_prune(tau, weights, density=density)
    if method == "ties":
        return ties(tau, weights, density=density, majority_sign_method=majority_sign_method)
    if method == "dare_linear":
        return dare_linear(tau, weights, density=density, key=key)
    return dare_ties(tau, weights, density=density, key=key,
                     majority_sign_method=majority_sign_method)


def merge_tree(task_vectors: Any, method: str = "linear", weights: jax.Array | None = None, *,
               density: float = 1.0, key: jax.Array | None = None,
               majority_sign_method: SignMethod = "total") -> Any:
    """`merge` on every leaf of a pytree of stacked deltas (each leaf `[T, ...]`, same T).

    Trimming is per leaf (per weight matrix), as peft does per module. For dare_*, leaf i draws
    its mask from `jax.random.fold_in(key, i)` (leaves in `jax.tree` order).
    """
    leaves, treedef = jax.tree.flatten(task_vectors)
    merged = []
    for i, tau in enumerate(leaves):
        leaf_key = None if key is None else jax.random.fold_in(key, i)
        merged.append(merge(tau, method, weights, density=density, key=leaf_key,
                            majority_sign_method=majority_sign_method))
    return jax.tree.unflatten(treedef, merged)


# ---------------------------------------------------------------- SVD re-compression


def _check_rank(rank: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"The rank of the re-compressed LoRA must be a positive integer, got "
                         f"{rank!r}.")


def _balanced_pair(u_ik: jax.Array, s_k: jax.Array, vt_ko: jax.Array, rank: int,
                   scale: float) -> tuple[jax.Array, jax.Array]:
    """The leading `rank` triplets as `(A [in, rank], B [rank, out])` with `scale A B = U S V^T`.

    Fewer than `rank` triplets (a delta smaller than the rank) are padded with zero columns/rows.
    """
    k = min(rank, s_k.shape[0])
    root_k = jnp.sqrt(s_k[:k] / scale)
    a_ir = u_ik[:, :k] * root_k
    b_ro = root_k[:, None] * vt_ko[:k]
    pad = rank - k
    return jnp.pad(a_ir, ((0, 0), (0, pad))), jnp.pad(b_ro, ((0, pad), (0, 0)))


def svd_compress(delta_io: jax.Array, rank: int, *,
                 scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Best rank-`rank` LoRA pair of a dense delta: `(A [in, r], B [r, out])`.

    `scale · A B` is the truncated SVD of `delta_io [in, out]`, so `‖delta - scale·A B‖_F² =
    sum of the dropped singular values²` (Eckart-Young) and it is exact when rank(delta) <= r.
    `scale` is the LoRA scale of the module that will hold the pair (alpha / r).
    """
    _check_rank(rank)
    u_ik, s_k, vt_ko = jnp.linalg.svd(delta_io, full_matrices=False)
    return _balanced_pair(u_ik, s_k, vt_ko, rank, scale)


def lowrank_compress(left_ik: jax.Array, right_ko: jax.Array, rank: int, *,
                     scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """`svd_compress(left @ right, rank)` without forming the `[in, out]` product.

    For a sum of LoRAs `sum_t c_t A_t B_t`, `left = [c_1 A_1, ..., c_T A_T]` `[in, T r]` and
    `right = [B_1; ...; B_T]` `[T r, out]` (see `stack_loras`). With `left = Q_l R_l` and
    `right^T = Q_r R_r` (thin QR), the product is `Q_l (R_l R_r^T) Q_r^T`, so only the small
    `[k, k]` core needs an SVD (k = T r): O((in + out) k²) instead of O(in · out · min(in, out)).
    """
    _check_rank(rank)
    q_l, r_l = jnp.linalg.qr(left_ik)
    q_r, r_r = jnp.linalg.qr(right_ko.T)
    u_kk, s_k, vt_kk = jnp.linalg.svd(r_l @ r_r.T, full_matrices=False)
    return _balanced_pair(q_l @ u_kk, s_k, vt_kk @ q_r.T, rank, scale)


def stack_loras(a_tir: jax.Array, b_tro: jax.Array, coef_t: jax.Array) -> tuple[jax.Array,
                                                                               jax.Array]:
    """Factors of `sum_t coef_t A_t B_t` as one product `left [in, T r] @ right [T r, out]`."""
    t, d_in, r = a_tir.shape
    left = jnp.moveaxis(a_tir * jnp.asarray(coef_t, a_tir.dtype)[:, None, None], 0, 1)
    return left.reshape(d_in, t * r), b_tro.reshape(t * r, -1)
