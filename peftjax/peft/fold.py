"""Fold LoRA into the base weights and back out; task vectors; per-task LoRAs merged into one.

Model-level functions take an NNX model and return a NEW model (the input is not changed; arrays
are shared, not copied). For the `(graphdef, trainable, frozen)` split that training uses,
`fold_lora_split` / `unfold_lora_split` do the same on the split state.

  fold_lora(model, task=k)      -> plain base model, each adapted kernel `W0 + s A_k B_k`
                                   (DoRA: `m_k · (W0 + s A_k B_k) / ‖W0 + s A_k B_k‖_col`)
  unfold_lora(folded, lora)     -> the LoRA model again, `W0 = W' - s A_k B_k` (float tolerance)
  task_vectors(lora_model)      -> {"<site>.kernel": [T, in, out]} deltas of each task
  task_vectors(finetuned, base) -> {"<param path>": [T, ...]} fine-tuned minus base
  add_task_vector(plain, delta) -> plain model with `W0 + scale · delta` (task arithmetic)
  merge_lora_tasks(lora_model, rank=r, method=...) -> one shared rank-r LoRADense per site

Task-vector keys are the dotted paths of the weights in the PLAIN model (`...self_attention.q.
kernel`, not `...q.base.kernel`), so deltas from LoRA and from full fine-tuning line up.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.peft import merge as merging
from peftjax.peft.inject import module_paths, replace_submodule
from peftjax.peft.lora import LoRADense
from peftjax.peft.variables import TRAINABLE

# ---------------------------------------------------------------- array level (jit-friendly)


def lora_delta(a_ir: jax.Array, b_ro: jax.Array, scale: float) -> jax.Array:
    """`scale · A B` `[in, out]` in float32 (or wider) from `A [in, r]`, `B [r, out]`."""
    dtype = jnp.promote_types(jnp.result_type(a_ir, b_ro), jnp.float32)
    return scale * jnp.dot(a_ir.astype(dtype), b_ro.astype(dtype))


def column_norm(w_io: jax.Array) -> jax.Array:
    """‖w[:, j]‖₂ per output column, `[out]` (HF's DoRA weight norm, in our [in, out] layout)."""
    return jnp.sqrt(jnp.sum(jnp.square(w_io), axis=0))


def fold_kernel(w0_io: jax.Array, delta_io: jax.Array,
                magnitude_o: jax.Array | None = None) -> jax.Array:
    """The merged kernel `[in, out]`, in `w0`'s dtype: `W0 + delta`, or for DoRA
    `m · (W0 + delta) / ‖W0 + delta‖_col` with `magnitude_o [out]`."""
    v_io = w0_io.astype(delta_io.dtype) + delta_io
    if magnitude_o is not None:
        v_io = v_io * (magnitude_o.astype(v_io.dtype) / column_norm(v_io))
    return v_io.astype(w0_io.dtype)


def unfold_kernel(folded_io: jax.Array, delta_io: jax.Array) -> jax.Array:
    """`W' - delta` in `W'`'s dtype: `W0` up to the rounding of the fold (see `unfold_lora`)."""
    return (folded_io.astype(delta_io.dtype) - delta_io).astype(folded_io.dtype)


# ---------------------------------------------------------------- one LoRADense


def _value(x):
    return x.get_value() if isinstance(x, nnx.Variable) else x


def num_tasks_of(lora: LoRADense) -> int | None:
    """T for a per-task LoRADense (`lora_a [T, in, r]`), None for a shared one."""
    a = _value(lora.lora_a)
    return a.shape[0] if a.ndim == 3 else None


def _magnitude(lora: LoRADense) -> jax.Array | None:
    """DoRA magnitude `[(T,) out]`, or None for plain LoRA."""
    m = getattr(lora, "lora_magnitude", None)
    return None if m is None else _value(m)


def _pick(x: jax.Array, task: int | None, per_task: bool) -> jax.Array:
    return x[task] if per_task else x


def _check_task(lora: LoRADense, task: int | None, path: str = "this LoRADense") -> None:
    """A per-task LoRA needs a valid `task`; a shared one serves every task, so it ignores it."""
    tasks = num_tasks_of(lora)
    if tasks is None:
        return
    if task is None:
        raise ValueError(f"{path} has one LoRA per task ({tasks} tasks): pass task=k "
                         f"(0 <= k < {tasks}) to pick one, or merge them into one shared LoRA "
                         "first with merge_lora_tasks(model, rank=...).")
    if not 0 <= task < tasks:
        raise ValueError(f"task={task} is out of range for {path}, which has {tasks} tasks; "
                         f"pass 0 <= task < {tasks}.")


def site_delta(lora: LoRADense, task: int | None = None) -> jax.Array:
    """`s · A_task B_task` `[in, out]` of one LoRADense (`task` is ignored by a shared one)."""
    _check_task(lora, task)
    per_task = num_tasks_of(lora) is not None
    task = task if per_task else None
    return lora_delta(_pick(_value(lora.lora_a), task, per_task),
                      _pick(_value(lora.lora_b), task, per_task), lora.scale)


def folded_kernel(lora: LoRADense, task: int | None = None) -> jax.Array:
    """The kernel `[in, out]` a plain Dense needs to compute what this LoRADense computes."""
    magnitude = _magnitude(lora)
    if magnitude is not None:
        magnitude = _pick(magnitude, task, num_tasks_of(lora) is not None)
    return fold_kernel(_value(lora.base.kernel), site_delta(lora, task), magnitude)


# ---------------------------------------------------------------- models


def lora_sites(model: nnx.Module) -> dict[str, LoRADense]:
    """Every LoRADense by dotted path."""
    return {p: m for p, m in module_paths(model).items() if isinstance(m, LoRADense)}


def _require_sites(model: nnx.Module) -> dict[str, LoRADense]:
    sites = lora_sites(model)
    if not sites:
        raise ValueError("The model has no LoRADense modules to fold or merge; build it with "
                         "config.peft.method='lora' (apply_peft).")
    return sites


def fold_lora(model: nnx.Module, *, task: int | None = None) -> nnx.Module:
    """A copy of `model` with every LoRADense replaced by a plain Dense of kernel
    `W0 + s A B` (or DoRA's `m (W0 + s A B) / ‖·‖_col`), in the base kernel's dtype.

    Its logits equal the LoRA model's (dropout off) up to float rounding. For per-task LoRA,
    `task` picks which adapter to fold (shared sites ignore it); the result then takes no task
    ids (unless other per-task PEFT modules remain). The folded model has the parameter tree
    of the plain base model, so it loads and exports like one.
    """
    new = nnx.clone(model)
    for path, lora in _require_sites(new).items():
        _check_task(lora, task, path)
        kernel = folded_kernel(lora, task)
        lora.base.kernel.set_value(kernel)
        replace_submodule(new, path, lora.base)
    return new


def strip_lora(model: nnx.Module) -> nnx.Module:
    """A copy of `model` with every LoRADense replaced by its (unmodified) base Dense: W0."""
    new = nnx.clone(model)
    for path, lora in _require_sites(new).items():
        replace_submodule(new, path, lora.base)
    return new


def _variable(model: nnx.Module, path: Sequence) -> nnx.Variable:
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _params(tree: nnx.Module | nnx.State) -> dict[tuple, jax.Array]:
    """Flat `{path tuple: array}` of a model's nnx.Param leaves (or of a State, all leaves)."""
    state = nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree
    return {tuple(k): _value(v) for k, v in nnx.to_flat_state(state)}


def unfold_lora(folded: nnx.Module, lora_model: nnx.Module, *,
                task: int | None = None) -> nnx.Module:
    """Undo `fold_lora(lora_model, task=task)`: a copy of `lora_model` whose base kernels are
    `W' - s A B` and whose other parameters come from `folded`.

    Only the structure, LoRA factors and scales of `lora_model` are used (its base weights are
    overwritten), so it may be a freshly built LoRA model with the trained adapters loaded.

    Not bit-exact: `W' = fl(W0 + D)` rounds away the low bits of W0 wherever |D| is comparable
    to or larger than |W0| (e.g. W0 = 1e-9, D = 1 gives W' = 1 and W' - D = 0). With D the same
    rounded array in both directions (it is: both call `site_delta`), each entry obeys
        |unfold - W0| <= eps · (|W0| + |W'|),   eps = jnp.finfo(kernel dtype).eps
    (one rounding in the add, one in the subtraction, each <= eps/2 relative; the bound also
    covers a fused multiply-add in the fold). DoRA cannot be unfolded: every per-column rescaling
    `c · W' / m - D` (c > 0) of the base folds to the same W', so the column norms are lost;
    keep the LoRA model (or its frozen state) instead.
    """
    new = nnx.clone(lora_model)
    sites = _require_sites(new)
    folded_params = _params(folded)
    for path, lora in sites.items():
        _check_task(lora, task, path)
        if _magnitude(lora) is not None:
            raise ValueError(f"{path} is a DoRA module, whose fold is not invertible (the "
                             "column norms of W0 + sAB are lost); keep the unfolded model, or "
                             "build it with config.peft.dora=False.")
        key = (*_split_path(path), "kernel")
        if key not in folded_params:
            raise ValueError(f"The folded model has no kernel at {'.'.join(map(str, key))}; "
                             "pass the model fold_lora returned for this LoRA model.")
        lora.base.kernel.set_value(unfold_kernel(folded_params.pop(key), site_delta(lora, task)))
    for key, value in folded_params.items():
        try:
            _variable(new, key).set_value(value)
        except (AttributeError, IndexError, KeyError, TypeError) as e:
            raise ValueError(f"The folded model has a parameter {'.'.join(map(str, key))} that "
                             "the LoRA model lacks; pass the model fold_lora returned for this "
                             "LoRA model.") from e
    return new


def _split_path(dotted: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def fold_lora_split(graphdef: nnx.GraphDef, *states: nnx.State,
                    task: int | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """`fold_lora` on a split model, e.g. training's `(graphdef, trainable, frozen)`.

    Returns `(graphdef, state)` of the plain base model (`nnx.merge` them to get the model).
    """
    return nnx.split(fold_lora(nnx.merge(graphdef, *states), task=task))


def unfold_lora_split(folded: tuple[nnx.GraphDef, nnx.State],
                      lora: tuple[nnx.GraphDef, nnx.State, nnx.State], *,
                      task: int | None = None,
                      trainable=TRAINABLE) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`unfold_lora` on split models: `folded = (graphdef, state)` from `fold_lora_split`, `lora`
    = training's `(graphdef, trainable, frozen)`. Returns `(graphdef, trainable, frozen)` split
    by `trainable` (default: the PEFT parameters, as LoRA training splits)."""
    model = unfold_lora(nnx.merge(*folded), nnx.merge(*lora), task=task)
    return nnx.split(model, trainable, ...)


# ---------------------------------------------------------------- task vectors


def _effective_delta(lora: LoRADense, task: int | None) -> jax.Array:
    """The change a task makes to the base kernel: `s A B`, or for DoRA `fold - W0` (full rank)."""
    if _magnitude(lora) is None:
        return site_delta(lora, task)
    w0 = _value(lora.base.kernel)
    return folded_kernel(lora, task).astype(jnp.float32) - w0.astype(jnp.float32)


def lora_task_vectors(model: nnx.Module) -> dict[str, jax.Array]:
    """`{"<site>.kernel": [T, in, out]}`: each task's delta to the base kernel (T = 1 when the
    LoRA is shared). For DoRA the delta is the folded kernel minus W0."""
    vectors = {}
    for path, lora in _require_sites(model).items():
        tasks = num_tasks_of(lora)
        picks = [None] if tasks is None else range(tasks)
        vectors[f"{path}.kernel"] = jnp.stack([_effective_delta(lora, t) for t in picks])
    return vectors


def full_task_vectors(base: nnx.Module | nnx.State,
                      finetuned: nnx.Module | nnx.State | Sequence[nnx.Module | nnx.State]
                      ) -> dict[str, jax.Array]:
    """`{"<param path>": [T, ...]}`: fine-tuned minus base for each of T fine-tuned models.

    Models contribute their nnx.Param leaves; States (e.g. training's `trainable` for
    method='full') all their leaves. Every fine-tuned tree must have the base's paths and shapes.
    """
    runs = list(finetuned) if isinstance(finetuned, (list, tuple)) else [finetuned]
    base_params = _params(base)
    per_run = [_params(run) for run in runs]
    vectors = {}
    for key, w0 in base_params.items():
        if not jnp.issubdtype(w0.dtype, jnp.inexact):
            continue
        deltas = []
        for i, params in enumerate(per_run):
            if key not in params or params[key].shape != w0.shape:
                raise ValueError(f"Fine-tuned model {i} has no parameter "
                                 f"{'.'.join(map(str, key))} of shape {w0.shape}; task vectors "
                                 "need fine-tuned and base models of the same architecture.")
            deltas.append(params[key].astype(jnp.float32) - w0.astype(jnp.float32))
        vectors[".".join(map(str, key))] = jnp.stack(deltas)
    return vectors


def task_vectors(model: nnx.Module | nnx.State | Sequence,
                 base: nnx.Module | nnx.State | None = None) -> dict[str, jax.Array]:
    """Per-task deltas, stacked `[T, ...]` per weight, keyed by plain-model dotted paths.

    `task_vectors(lora_model)`: `s A_t B_t` of every LoRADense (see `lora_task_vectors`).
    `task_vectors(finetuned, base)`: fine-tuned minus base (see `full_task_vectors`); `finetuned`
    may be a list of models / states, one per task.
    Merge them with `peftjax.peft.merge.merge_tree` and apply with `add_task_vector`.
    """
    if base is None:
        if not isinstance(model, nnx.Module):
            raise ValueError("task_vectors(x) without base needs a model with LoRADense "
                             "modules; for full fine-tuning pass task_vectors(finetuned, base).")
        return lora_task_vectors(model)
    return full_task_vectors(base, model)


def concat_task_vectors(*vectors: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Join task vectors of several runs along the task axis (same keys): `[T1 + T2 + ..., ...]`."""
    keys = set(vectors[0])
    for v in vectors[1:]:
        if set(v) != keys:
            raise ValueError(f"Task vectors cover different weights: {sorted(keys ^ set(v))[:4]}"
                             "; concatenate runs adapted at the same sites (config.peft.targets).")
    return {k: jnp.concatenate([v[k] for v in vectors]) for k in vectors[0]}


def add_task_vector(model: nnx.Module, delta: dict[str, jax.Array], *,
                    scale: float = 1.0) -> nnx.Module:
    """A copy of a plain model with `W + scale · delta[path]` for every path in `delta` (merged
    deltas `[...]`, e.g. `merge_tree(task_vectors(...), "ties", ...)`). Task arithmetic is
    `add_task_vector(base, merge_tree(tv, "linear", weights), scale=lambda)`. For a LoRA model,
    apply it to `strip_lora(model)` (the keys name plain-model weights)."""
    new = nnx.clone(model)
    params = _params(new)
    for dotted, d in delta.items():
        key = _split_path(dotted)
        if key not in params:
            raise ValueError(f"The model has no parameter {dotted}; task-vector keys name "
                             "plain-model weights (use strip_lora / fold_lora on a LoRA model).")
        w = params[key]
        if d.shape != w.shape:
            raise ValueError(f"Delta for {dotted} has shape {d.shape}, the weight {w.shape}; "
                             "merge the stacked [T, ...] task vectors first (merge_tree).")
        _variable(new, key).set_value(
            (w.astype(jnp.float32) + scale * d.astype(jnp.float32)).astype(w.dtype))
    return new


# ---------------------------------------------------------------- per-task -> shared LoRA


def merge_lora_tasks(model: nnx.Module, *, rank: int, method: str = "linear",
                     weights: jax.Array | None = None, density: float = 1.0,
                     key: jax.Array | None = None, majority_sign_method: str = "total",
                     scale: float | None = None) -> nnx.Module:
    """A copy of `model` in which every LoRADense holds one shared rank-`rank` LoRA
    (`A [in, rank]`, `B [rank, out]`, no tasks axis): the best rank-`rank` approximation of the
    merged delta `merge(tau [T, in, out], method, weights, ...)` of its tasks' deltas.

    `weights [T]` default to `merge.default_weights(method, T)` (the mean delta for linear,
    lambda = 1 for TIES); `method` is one of `merge.MERGES` (peft's `svd`, `ties_svd`, ...
    combinations). `scale` is the new modules' LoRA scale (default: each site keeps its own), so
    further training behaves like the source LoRA. The merge is exact when `rank` >= the rank of
    the merged delta (for linear: rank >= T · r always suffices). DoRA sites merge their
    effective deltas and become plain LoRA. The new A is a trainable `Adapter` even where the
    source froze A (`freeze_a`): it is no longer the seeded init that a rebuild re-creates. For
    dare_*, site i draws from `fold_in(key, i)`.
    """
    new = nnx.clone(model)
    for i, (path, lora) in enumerate(_require_sites(new).items()):
        tasks = num_tasks_of(lora) or 1
        w = merging.default_weights(method, tasks) if weights is None else jnp.asarray(weights)
        if w.shape != (tasks,):
            raise ValueError(f"weights must have one entry per task ({tasks} at {path}), got "
                             f"shape {w.shape}.")
        new_scale = lora.scale if scale is None else scale
        if method == "linear" and _magnitude(lora) is None:
            # Never form [in, out]: a weighted sum of LoRAs is one [in, T r] x [T r, out] product.
            a_tir = _value(lora.lora_a).reshape(tasks, *_value(lora.lora_a).shape[-2:])
            b_tro = _value(lora.lora_b).reshape(tasks, *_value(lora.lora_b).shape[-2:])
            left, right = merging.stack_loras(a_tir.astype(jnp.float32),
                                              b_tro.astype(jnp.float32), w * lora.scale)
            a_ir, b_ro = merging.lowrank_compress(left, right, rank, scale=new_scale)
        else:
            tau = jnp.stack([_effective_delta(lora, t) for t in
                             ([None] if num_tasks_of(lora) is None else range(tasks))])
            site_key = None if key is None else jax.random.fold_in(key, i)
            delta = merging.merge(tau, method, w, density=density, key=site_key,
                                  majority_sign_method=majority_sign_method)
            a_ir, b_ro = merging.svd_compress(delta, rank, scale=new_scale)
        shared = _shared_lora(lora, a_ir, b_ro, new_scale)
        replace_submodule(new, path, shared)
    return new


def _shared_lora(source: LoRADense, a_ir: jax.Array, b_ro: jax.Array,
                 scale: float) -> LoRADense:
    """A shared plain LoRADense on `source`'s base with factors `a_ir`, `b_ro` and `scale`."""
    rank = a_ir.shape[1]
    shared = LoRADense(source.base, rank=rank, alpha=scale * rank,
                       dropout_rate=source.dropout_rate, salt=source.salt, rngs=nnx.Rngs(0))
    shared.scale = scale
    a_dtype, b_dtype = _value(source.lora_a).dtype, _value(source.lora_b).dtype
    shared.lora_a.set_value(a_ir.astype(a_dtype))
    shared.lora_b.set_value(b_ro.astype(b_dtype))
    return shared
