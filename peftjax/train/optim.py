"""Optimizer from `config.optim`: AdamW with warmup + cosine decay, gradient clipping, LoRA+."""

from __future__ import annotations

from typing import Any

import jax
import optax
from ml_collections import ConfigDict

LORA_B = "lora_b"  # the parameter name LoRA+ speeds up (peftjax.peft.lora.LoRADense.lora_b)


def learning_rate_schedule(optim: ConfigDict, total_steps: int) -> optax.Schedule:
    if optim.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, optim.learning_rate,
                                                           max(optim.warmup_steps, 1)),
                                     optax.constant_schedule(optim.learning_rate)],
                                    [optim.warmup_steps])
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, optim.learning_rate, warmup_steps=optim.warmup_steps,
            decay_steps=max(total_steps, optim.warmup_steps + 1),
            end_value=optim.learning_rate * optim.final_lr_fraction)
    raise ValueError(f"Unknown config.optim.schedule {optim.schedule!r}; use 'cosine' or "
                     "'constant'.")


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def is_lora_b(path: tuple) -> bool:
    """Whether a pytree path (from `jax.tree_util.tree_flatten_with_path`) is a LoRA B factor."""
    return any(_key_name(k) == LORA_B for k in path)


def scale_lora_b(ratio: float) -> optax.GradientTransformation:
    """Multiply the updates of every `lora_b` leaf by `ratio` (stateless).

    Placed after AdamW this is LoRA+'s per-group learning rate: AdamW's update
    `-lr_t · (m̂ / (√v̂ + eps) + wd · p)` is linear in `lr_t`, so scaling B's update by `ratio` is
    exactly `lr_B = ratio · lr_t` (same schedule shape, weight decay decoupled as in torch's
    AdamW param groups), while the optimizer state keeps one layout whatever the ratio.
    """

    def init(params):
        if not any(is_lora_b(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]):
            raise ValueError(f"config.peft.lora_plus_ratio={ratio} but nothing trainable is "
                             f"named {LORA_B!r}; LoRA+ needs config.peft.method='lora' (or set "
                             "config.peft.lora_plus_ratio=1.0).")
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda path, u: u * ratio if is_lora_b(path) else u, updates)
        return scaled, state

    return optax.GradientTransformation(init, update)


def make_optimizer(optim: ConfigDict, total_steps: int, *,
                   lora_plus_ratio: float = 1.0) -> optax.GradientTransformation:
    """Applied to the trainable state only, so clipping never reads frozen-base gradients.

    `lora_plus_ratio` (`config.peft.lora_plus_ratio`): LoRA+, every `lora_b` learns `ratio` x
    faster than the rest; 1.0 is plain AdamW. Clipping sees the raw gradients of everything
    trainable, before any per-group scaling.
    """
    if lora_plus_ratio <= 0:
        raise ValueError("config.peft.lora_plus_ratio must be positive (1 = plain LoRA), got "
                         f"{lora_plus_ratio}.")
    parts = []
    if optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    parts.append(optax.adamw(learning_rate_schedule(optim, total_steps), b1=optim.b1,
                             b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))
    if lora_plus_ratio != 1.0:
        parts.append(scale_lora_b(lora_plus_ratio))
    return optax.chain(*parts)
