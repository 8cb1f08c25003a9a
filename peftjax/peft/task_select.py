"""Per-task parameters applied to a batch that mixes tasks, without a loop over tasks.

A per-task weight has a leading `tasks` axis. Three regimes, chosen from the task-id shape:
  * shared weight (no task axis): plain matmul;
  * task ids `[batch]` (one task per example): gather the batch's weights, then a batched einsum;
  * task ids `[batch, length]` (packed rows mixing tasks): compute the low-rank code for every task,
    zero all but the token's task (one-hot), and contract over (task, rank) on the way out. Only the
    small `[..., tasks, rank]` code is materialised, never a per-token copy of a weight.
`project_in` and `project_out` bracket a low-rank path; what sits between them acts elementwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_ids(task_ids: jax.Array | None, x: jax.Array, *,
              needs: str = "This model has per-task PEFT parameters") -> jax.Array:
    """`task_ids` if they align with activations `x` (`[batch]` or `[batch, length]`), else a
    ValueError; `needs` says which part of the model asks for them."""
    if task_ids is None:
        raise ValueError(f"{needs}, so every call needs task ids: pass task_ids=[batch] (or "
                         "encoder_task_ids/decoder_task_ids per token).")
    if task_ids.ndim not in (1, 2) or task_ids.shape != x.shape[:task_ids.ndim]:
        raise ValueError(f"task ids of shape {task_ids.shape} do not align with activations "
                         f"{x.shape}; expected [batch] or [batch, length].")
    return task_ids


def project_in(x_btd: jax.Array, w: jax.Array, task_ids: jax.Array | None) -> jax.Array:
    """`x @ w` where w is `[d, r]` (shared) or `[tasks, d, r]` (per task).

    Returns `[b, t, r]`, or for per-token ids the one-hot-masked code `[b, t, tasks, r]`.
    """
    w = w.astype(x_btd.dtype)
    if w.ndim == 2:
        return x_btd @ w
    ids = check_ids(task_ids, x_btd)
    if ids.ndim == 1:
        return jnp.einsum("btd,bdr->btr", x_btd, w[ids])
    onehot = jax.nn.one_hot(ids, w.shape[0], dtype=x_btd.dtype)
    # Two steps, not one 3-operand einsum: a plain [bt, d] x [d, tasks*r] matmul, then the mask
    # (a single einsum let XLA pick a contraction order ~1.6x slower, fwd+bwd, measured).
    return jnp.einsum("btd,kdr->btkr", x_btd, w) * onehot[..., None]


def project_out(h: jax.Array, w: jax.Array, task_ids: jax.Array | None) -> jax.Array:
    """Inverse bracket of `project_in`: `h @ w` with w `[r, o]` or `[tasks, r, o]` → `[b, t, o]`."""
    w = w.astype(h.dtype)
    if w.ndim == 2:
        return h @ w
    task_ids = check_ids(task_ids, h)
    if task_ids.ndim == 1:
        return jnp.einsum("btr,bro->bto", h, w[task_ids])
    # Re-mask: an elementwise map between the brackets may have made zeros non-zero. Then one
    # [bt, tasks*r] x [tasks*r, o] matmul.
    onehot = jax.nn.one_hot(task_ids, w.shape[0], dtype=h.dtype)
    return jnp.einsum("btkr,kro->bto", h * onehot[..., None], w)


def task_axis(num_tasks: int | None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Leading shape and logical axes of a per-task table: `((T,), ("tasks",))`, or `((), ())`
    for a shared one. Prepend both to a parameter's own shape and axes."""
    return ((num_tasks,), ("tasks",)) if num_tasks else ((), ())


def task_rows(table: jax.Array, task_ids: jax.Array | None, x: jax.Array, *,
              per_task: bool) -> jax.Array:
    """Per-task rows of a small table, broadcastable against activations `x` `[b, t, ...]`.

    `table` is `[tasks, *row]` when `per_task` (else `[*row]`, returned as is). Returns
    `[b, 1, *row]` for `[batch]` ids and `[b, t, *row]` for per-token ids. For vectors (scales,
    gates, magnitudes) a plain gather is cheap, unlike for weight matrices (see above).
    """
    if not per_task:
        return table
    ids = check_ids(task_ids, x)
    rows = jnp.take(table, ids, axis=0)
    return rows[:, None] if ids.ndim == 1 else rows


def add_code_bias(code: jax.Array, bias: jax.Array, task_ids: jax.Array | None) -> jax.Array:
    """Add a bias between `project_in` and `project_out`: `bias` is `[r]` (shared) or
    `[tasks, r]`, `code` is what `project_in` returned for the same ids (`[b, t, r]`, or
    `[b, t, tasks, r]` for per-token ids, where every task's slot may take its own bias since
    `project_out` keeps only the token's own)."""
    bias = bias.astype(code.dtype)
    if bias.ndim == 1:
        return code + bias
    ids = check_ids(task_ids, code)
    return code + (bias if ids.ndim == 2 else bias[ids][:, None])
