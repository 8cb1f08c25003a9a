"""Sparse fine-tuning (LT-SFT, Ansell et al. 2022): `θ = θ0 + φ` with φ zero outside a mask.

Two passes, as in the paper's "lottery ticket" procedure:

  1. full fine-tuning (`method="full"`) moves every weight from θ0 to θ1;
  2. per targeted weight, the `sparse_density` fraction of entries that moved most, top-k of
     |θ1 − θ0| (`choose_mask`), become the mask; training restarts from θ0 and updates only them.

    peftjax train --config configs/full.py   --workdir runs/full      # pass 1
    peftjax train --config configs/sparse.py --workdir runs/sparse    # pass 2, mask from runs/full

Only `Dense` projections are wrapped (q, k, v, o, wi*, wo, lm_head); embeddings, norms and the
relative position biases stay at θ0 (LT-SFT masks every weight; these are a small share of T5).
The mask is not checkpointed: a restore recomputes it from the first pass, deterministically.

Sparse differences compose by addition (`add_sparse_diffs`, `apply_sparse_diffs`): φ of runs
trained from the same θ0 on different tasks sum into one model, as in the paper's
language + task composition. Under `config.peft.compose="parallel"` sparse runs are also
sources like any adapter (each adds `x (mask ⊙ φ)`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models.context import Context
from peftjax.models.layers import Dense, matmul
from peftjax.peft.config import PeftConfig
from peftjax.peft.inject import module_paths
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.runs import check_fits, load_trained, read_config
from peftjax.peft.task_select import project_in, task_axis
from peftjax.peft.variables import Adapter, FrozenAdapter

KEY = "sparse_mask_from"
FIRST_PASS_HELP = (
    "config.peft.method='sparse' (LT-SFT) keeps the entries that a first pass of full "
    "fine-tuning moved most, so it needs that run: set config.peft.sparse_mask_from to its "
    "workdir. Run the first pass, then the sparse one:\n"
    "  peftjax train --config configs/full.py --workdir runs/full\n"
    "  peftjax train --config configs/sparse.py --workdir runs/sparse "
    "--config.peft.sparse_mask_from=runs/full")


def kept_count(size: int, density: float) -> int:
    """How many entries of a weight with `size` entries stay trainable (at least one)."""
    return max(1, min(size, round(density * size)))


def choose_mask(theta0: np.ndarray, theta1: np.ndarray, density: float) -> np.ndarray:
    """Boolean mask of the `kept_count(size, density)` entries with the largest |θ1 − θ0|.

    Exactly that many entries are True; ties are broken towards the lower flat index (a stable
    sort), so the mask is a deterministic function of the two weights.
    """
    theta0, theta1 = np.asarray(theta0), np.asarray(theta1)
    if theta0.shape != theta1.shape:
        raise ValueError(f"choose_mask: θ0 {theta0.shape} and θ1 {theta1.shape} differ in shape.")
    moved = np.abs(theta1.astype(np.float64) - theta0.astype(np.float64)).ravel()
    keep = np.argsort(-moved, kind="stable")[:kept_count(moved.size, density)]
    mask = np.zeros(moved.size, dtype=bool)
    mask[keep] = True
    return mask.reshape(theta0.shape)


class SparseDense(nnx.Module):
    """Wraps a frozen `Dense`: `y = x (W0 + mask ⊙ φ)`.

    `phi` (the paper's φ): `[(tasks,) in, out]`, zeros, trainable; entries outside the mask get
    no gradient, so they stay exactly zero under Adam(W). `mask`: a `FrozenAdapter` of the same
    shape, boolean (0/1). `delta(x, ctx) = x (mask ⊙ φ)` is what compositions add.
    """

    def __init__(self, base: Dense, mask_io, *, num_tasks: int | None = None):
        self.base = base
        in_axis, out_axis = base.kernel.get_metadata()["axes"]
        lead, lead_axes = task_axis(num_tasks)
        shape = (*lead, base.in_features, base.out_features)
        axes = (*lead_axes, in_axis, out_axis)
        self.phi = Adapter(jnp.zeros(shape, jnp.float32), axes=axes)
        self.mask = FrozenAdapter(jnp.broadcast_to(jnp.asarray(mask_io, bool), shape), axes=axes)
        self.per_task = bool(num_tasks)

    def diff(self) -> jax.Array:
        """`mask ⊙ φ`, `[(tasks,) in, out]`: the run's change of the base weight."""
        return jnp.where(self.mask.value, self.phi.value, 0.0)

    def delta(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        """`x (mask ⊙ φ)` `[b, t, out]`: what the sparse difference adds to the base output."""
        x_btd = x_btd.astype(self.base.dtype)
        y = project_in(x_btd, self.diff(), ctx.task_ids)
        return y.sum(axis=-2) if y.ndim > x_btd.ndim else y  # per-token ids: one-hot masked

    def __call__(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        if self.per_task:
            return self.base(x_btd, ctx) + self.delta(x_btd, ctx)
        # Shared: one matmul with the updated kernel (what a merged model computes).
        kernel = (self.base.kernel.value + self.diff()).astype(self.base.dtype)
        return matmul(x_btd.astype(self.base.dtype), kernel)


def load_first_pass(workdir: str, model_config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{Dense path: (θ0, θ1)}` of a `method="full"` run: its starting and trained kernels."""
    if not workdir:
        raise ValueError(FIRST_PASS_HELP)
    run_config = read_config(workdir, KEY)
    if run_config.peft.method != "full":
        raise ValueError(
            f"config.peft.{KEY}={workdir!r} is a method={run_config.peft.method!r} run; the "
            f"mask comes from full fine-tuning. Train the first pass with method=full:\n"
            + FIRST_PASS_HELP.split(":\n", 1)[1])
    check_fits(workdir, run_config, model_config, key=KEY, base=None)
    exp, trained = load_trained(workdir, run_config)
    start = nnx.merge(exp.graphdef, exp.trainable, exp.frozen)
    before, after = module_paths(start), module_paths(trained)
    return {path: (np.asarray(jax.device_get(m.kernel.value)),
                   np.asarray(jax.device_get(after[path].kernel.value)))
            for path, m in before.items() if isinstance(m, Dense)}


def _build(base: Dense, site: Site, config: PeftConfig) -> SparseDense:
    kernel = base.kernel.value
    if isinstance(kernel, jax.core.Tracer):  # shapes only (parameter accounting): no mask to read
        return SparseDense(base, jnp.zeros(kernel.shape, bool), num_tasks=site.num_tasks)
    if "sparse_first_pass" not in site.shared:  # read once per model, at the first site
        site.shared["sparse_first_pass"] = load_first_pass(config.sparse_mask_from,
                                                           site.model_config)
    theta0, theta1 = site.shared["sparse_first_pass"][site.path]
    if not np.array_equal(theta0, np.asarray(jax.device_get(kernel))):
        raise ValueError(
            f"config.peft.{KEY}: {config.sparse_mask_from!r} holds a run that does not fit the "
            f"base: it started from other weights at {site.path} (another checkpoint or seed). "
            "Run the first pass on this run's base (same config.model and config.seed).")
    return SparseDense(base, choose_mask(theta0, theta1, config.sparse_density),
                       num_tasks=site.num_tasks)


def sparse_diffs(workdir: str) -> dict[str, np.ndarray]:
    """`{Dense path: mask ⊙ φ}` of the trained sparse run in `workdir` (`[in, out]`, or
    `[tasks, in, out]` for a per-task run)."""
    run_config = read_config(workdir)
    if run_config.peft.method != "sparse":
        raise ValueError(f"{workdir!r} is a method={run_config.peft.method!r} run, not sparse.")
    _, model = load_trained(workdir, run_config)
    return {path: np.asarray(jax.device_get(m.diff()))
            for path, m in module_paths(model).items() if isinstance(m, SparseDense)}


def add_sparse_diffs(diffs: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The sum of several runs' sparse differences (θ = θ0 + Σ φ_i), path by path.

    The runs must share θ0 (same base); a path missing from a run contributes zero there.
    """
    total: dict[str, np.ndarray] = {}
    for diff in diffs:
        for path, value in diff.items():
            if path in total and total[path].shape != value.shape:
                raise ValueError(f"Sparse differences at {path} have shapes {total[path].shape} "
                                 f"and {value.shape}; add runs of the same model and mode.")
            total[path] = total[path] + value if path in total else np.array(value)
    return total


def apply_sparse_diffs(model: nnx.Module, diffs: dict[str, np.ndarray]) -> nnx.Module:
    """Add sparse differences to a base model's `Dense` kernels in place (W0 ← W0 + φ).

    Per-task differences (`[tasks, in, out]`) have one row per task: pick one first, e.g.
    `{path: d[task_id] for path, d in diffs.items()}`. Returns `model`.
    """
    paths = module_paths(model)
    for path, diff in diffs.items():
        module = paths.get(path)
        if not isinstance(module, Dense):
            raise ValueError(f"apply_sparse_diffs: {path!r} is not a Dense of this base model "
                             f"(found {type(module).__name__}); apply them to a plain base.")
        if diff.shape != module.kernel.value.shape:
            raise ValueError(f"apply_sparse_diffs: difference {diff.shape} at {path} does not "
                             f"fit the kernel {module.kernel.value.shape}; per-task "
                             "differences need one task's row, diff[task_id].")
        module.kernel.value = module.kernel.value + jnp.asarray(diff, module.kernel.value.dtype)
    return model


SPECS = {"sparse": MethodSpec(
    kinds=(Dense,), targets=r".*(attention\.(q|k|v|o)|mlp\.(wi|wi_0|wi_1|wo)|lm_head)",
    build=_build, where="Dense projections: q, k, v, o, wi_0, wi_1, wo, lm_head")}
