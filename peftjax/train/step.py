"""Pure, jitted train and eval steps over the trainable part of the model state.

The model state is split once into `trainable` (PEFT parameters) and `frozen` (the base). Only
`trainable` is differentiated, clipped, optimised and donated; the frozen base is an ordinary
argument, so XLA never builds base-weight gradients and the optimizer holds no state for them.
Both may be in the stacked layout of a scanned model (`peftjax.models.stacking`): one variable
per layer stack rather than per layer, so gradients and the optimizer's update do not grow with
depth.

Precision: `trainable` holds float32 masters (`peftjax.peft.variables.as_masters`) whatever the
model computes in (`T5Config.dtype`), so gradients, their accumulation over micro-batches
(`grad_accum_steps`) and the optimizer state are float32; logits come out float32 and the loss
and metric sums are computed from them in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from peftjax.models import stacking
from peftjax.routing.record import capture, mean_entropy

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    trainable: nnx.State
    opt_state: optax.OptState


    def as_dict(self) -> dict[str, Any]:
        """The checkpointed form."""
        return {"step": self.step, "trainable": self.trainable, "opt_state": self.opt_state}

    @classmethod
    def from_dict(cls, tree: dict[str, Any]) -> TrainState:
        return cls(tree["step"], tree["trainable"], tree["opt_state"])


def init_train_state(trainable: nnx.State, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))


def model_inputs(batch: Batch, packed: bool) -> dict[str, jax.Array]:
    """Model keyword arguments from converter features.

    Packed rows may mix tasks, so task ids go per token; unpacked rows hold one example, so one id
    per row selects its adapter with a cheaper gather.
    """
    kwargs = dict(encoder_input_tokens=batch["encoder_input_tokens"],
                  decoder_input_tokens=batch["decoder_input_tokens"])
    if packed:
        kwargs.update({k: batch[k] for k in ("encoder_segment_ids", "decoder_segment_ids",
                                             "encoder_task_ids", "decoder_task_ids")})
        kwargs.update({k: batch[k] for k in ("encoder_language_ids", "decoder_language_ids")
                       if k in batch})
    else:
        kwargs["task_ids"] = batch["encoder_task_ids"][:, 0]
        if "encoder_language_ids" in batch:
            kwargs["language_ids"] = batch["encoder_language_ids"][:, 0]
    return kwargs


def loss_and_metrics(logits_btv: jax.Array, batch: Batch,
                     num_task_ids: int) -> tuple[jax.Array, Metrics]:
    """Token-mean cross entropy, and per-task sums (loss, correct tokens, tokens) for logging.

    Sums, not means, so metrics accumulate exactly across steps and devices.
    """
    targets = batch["decoder_target_tokens"]
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets)
    # "Target is the argmax" as target logit >= max logit: XLA shares the max with the softmax
    # instead of a second pass over the vocabulary (ties, measure zero, count as correct).
    target_logit_bt = jnp.take_along_axis(logits_btv, targets[..., None], axis=-1)[..., 0]
    correct_bt = (target_logit_bt >= jnp.max(logits_btv, axis=-1)).astype(jnp.float32)
    tokens = jnp.sum(weights)
    loss = jnp.sum(ce_bt * weights) / jnp.maximum(tokens, 1.0)
    per_task_btk = jax.nn.one_hot(batch["decoder_task_ids"], num_task_ids) * weights[..., None]
    metrics = {
        "loss_sum": jnp.sum(ce_bt * weights), "correct_sum": jnp.sum(correct_bt * weights),
        "tokens": tokens,
        "task_loss_sum": jnp.einsum("bt,btk->k", ce_bt, per_task_btk),
        "task_correct_sum": jnp.einsum("bt,btk->k", correct_bt, per_task_btk),
        "task_tokens": jnp.sum(per_task_btk, axis=(0, 1)),
    }
    return loss, metrics


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                    packed: bool, num_task_ids: int, donate: bool = True,
                    grad_accum_steps: int = 1):
    """`train_step(state, frozen, batch, rng) -> (state, metrics)`, jitted, state donated.

    One optimizer update per call. With `grad_accum_steps=k > 1` (`config.train.
    grad_accum_steps`) the batch is split into k micro-batches (`micro_batches`) run one after
    another under `jax.lax.scan`, so activations are those of one micro-batch. Each micro-batch
    contributes the gradient of its token-SUM loss divided by the whole batch's token count, so
    the accumulated float32 gradient, hence the update, equals the one-big-batch update (not a
    mean of micro-batch means, which would weigh a token by its micro-batch's length). Metric
    sums add up. Router aux losses (MoLoRA balance, ...) are means over one call, so they and
    the routing entropy are averaged over the micro-batches (a balance loss of the whole batch
    is not a mean of micro-batch ones: routers see k smaller batches, as they would on k
    devices). Each micro-batch draws its own dropout key.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be at least 1, got {grad_accum_steps} "
                         "(config.train.grad_accum_steps).")

    def micro_step(trainable: nnx.State, frozen: nnx.State, batch: Batch, dropout_key: jax.Array,
                   total_tokens: jax.Array) -> tuple[nnx.State, Metrics]:
        """Gradient of `loss_sum / total_tokens + aux_loss / k` on one micro-batch, and its
        metric sums."""

        def loss_fn(trainable):
            # Either layout (`peftjax.models.stacking`): stacked states feed the scans directly.
            model = stacking.merge(graphdef, trainable, frozen)
            logits, routing, aux_loss = capture(_call)(
                model, **model_inputs(batch, packed), dropout_key=dropout_key,
                **_layer_states(trainable, frozen))
            _, metrics = loss_and_metrics(logits, batch, num_task_ids)
            if routing:  # a model with routers: their extra loss, and how sharply they route
                metrics.update(router_steps=jnp.ones((), jnp.float32), aux_loss=aux_loss,
                               routing_entropy=mean_entropy(routing))
            return metrics["loss_sum"] / total_tokens + aux_loss / grad_accum_steps, metrics

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return grads, metrics

    def train_step(state: TrainState, frozen: nnx.State, batch: Batch,
                   rng: jax.Array) -> tuple[TrainState, Metrics]:
        dropout_key = jax.random.fold_in(rng, state.step)
        # The whole batch's token count, known before any micro-batch runs.
        total_tokens = jnp.maximum(jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)),
                                   1.0)
        if grad_accum_steps == 1:
            grads, metrics = micro_step(state.trainable, frozen, batch, dropout_key, total_tokens)
        else:
            grads, metrics = _accumulate(
                functools.partial(micro_step, state.trainable, frozen, total_tokens=total_tokens),
                micro_batches(batch, grad_accum_steps), dropout_key, state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics["grad_norm"] = optax.global_norm(grads)  # trainable gradients only
        return TrainState(state.step + 1, trainable, opt_state), metrics

    return jax.jit(train_step, donate_argnums=(0,) if donate else ())


# Per-call means (see `make_train_step`): averaged over micro-batches, not summed.
_PER_CALL_MEANS = ("router_steps", "aux_loss", "routing_entropy")


def _accumulate(micro_step, micro: Batch, dropout_key: jax.Array,
                trainable: nnx.State) -> tuple[nnx.State, Metrics]:
    """Sum `micro_step(batch_i, key_i)`'s gradients and metrics over the leading axis of
    `micro` (a `jax.lax.scan`); per-call means are averaged instead."""
    k = jax.tree.leaves(micro)[0].shape[0]
    first = jax.tree.map(lambda x: x[0], micro)
    _, metrics_shape = jax.eval_shape(micro_step, first, dropout_key)
    zeros = (jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable),
             jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), metrics_shape))

    def body(carry, xs):
        index, batch = xs
        grads, metrics = micro_step(batch, jax.random.fold_in(dropout_key, index))
        return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    for name in _PER_CALL_MEANS:
        if name in metrics:
            metrics[name] = metrics[name] / k
    return grads, metrics


def micro_batches(batch: Batch, k: int) -> Batch:
    """`[B, ...]` features → `[k, B/k, ...]`, micro-batch `i` holding rows `i, i+k, i+2k, ...`.

    Strided, not contiguous: the batch is sharded over devices by contiguous row blocks, and
    every block (a multiple of k rows, see `peftjax.train.experiment.check_grad_accum`) holds
    rows of every micro-batch, so each micro-batch stays spread over all data-parallel devices
    and the split moves no data between them (`[B/k, k]` keeps the row blocks on axis 0).
    """
    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % k:
            raise ValueError(f"A batch of {x.shape[0]} rows does not split into "
                             f"grad_accum_steps={k} micro-batches; make config.data.batch_size "
                             "a multiple of config.train.grad_accum_steps.")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _call(model: nnx.Module, **inputs) -> jax.Array:
    return model(**inputs)


def _layer_states(*states: nnx.State) -> dict[str, Any]:
    """`{"layer_states": ...}` for a model call when `states` are in the stacked layout."""
    layer_states = stacking.layer_states(*states)
    return {} if layer_states is None else {"layer_states": layer_states}


def make_eval_step(graphdef: nnx.GraphDef, *, packed: bool, num_task_ids: int):
    """`eval_step(trainable, frozen, batch) -> metrics` (teacher-forced, deterministic)."""

    def eval_step(trainable: nnx.State, frozen: nnx.State, batch: Batch) -> Metrics:
        model = stacking.merge(graphdef, trainable, frozen)
        logits = model(**model_inputs(batch, packed), **_layer_states(trainable, frozen))
        return loss_and_metrics(logits, batch, num_task_ids)[1]

    return jax.jit(eval_step)


def summarize(metrics: Metrics | dict[str, Any], task_names_by_id: dict[int, str]) -> dict:
    """Accumulated sums → means: loss, token accuracy, and per task."""
    tokens = max(float(metrics["tokens"]), 1.0)
    out = {"loss": float(metrics["loss_sum"]) / tokens,
           "token_accuracy": float(metrics["correct_sum"]) / tokens}
    for task_id, name in task_names_by_id.items():
        n = float(metrics["task_tokens"][task_id])
        if n > 0:
            out[f"loss/{name}"] = float(metrics["task_loss_sum"][task_id]) / n
            out[f"token_accuracy/{name}"] = float(metrics["task_correct_sum"][task_id]) / n
    if "router_steps" in metrics:  # per-step values, summed over the logging interval
        steps = float(metrics["router_steps"])
        out["aux_loss"] = float(metrics["aux_loss"]) / steps
        out["routing_entropy"] = float(metrics["routing_entropy"]) / steps
    return out
