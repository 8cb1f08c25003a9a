"""Optimizer from `config.optim`: AdamW with warmup + cosine decay, gradient clipping."""

from __future__ import annotations

import optax
from ml_collections import ConfigDict


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


def make_optimizer(optim: ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Applied to the trainable state only, so clipping never reads frozen-base gradients."""
    parts = []
    if optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    parts.append(optax.adamw(learning_rate_schedule(optim, total_steps), b1=optim.b1,
                             b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))
    return optax.chain(*parts)
