"""Gradient accumulation (`config.train.grad_accum_steps`): k micro-batches per optimizer step
give the one-big-batch update and metric sums, on one device and on the 4-device mesh; router
aux losses are averaged over micro-batches; bad batch sizes are refused."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import first_batch, host, perturbed, tiny_config

from peftjax.config import ConfigError
from peftjax.routing.record import capture, mean_entropy
from peftjax.train import build
from peftjax.train import loop as train_loop
from peftjax.train.loop import put_batch
from peftjax.train.step import (
    _accumulate,
    init_train_state,
    loss_and_metrics,
    make_train_step,
    micro_batches,
    model_inputs,
)

SUMS = ("loss_sum", "correct_sum", "tokens", "task_loss_sum", "task_correct_sum", "task_tokens")


@functools.cache
def setup(mode: str, pack: bool):
    """The built run, perturbed trainables and a batch of 16 rows (host copy); packed rows are
    long enough to hold examples of several tasks."""
    lengths = dict(data__inputs_length=64, data__targets_length=32) if pack else {}
    config = tiny_config(peft__mode=mode, data__pack=pack, data__batch_size=16, **lengths)
    exp = build(config)
    return exp, perturbed(exp.trainable), first_batch(config)


def one_step(case, k: int):
    """(updated trainables, metrics) of one SGD step with `grad_accum_steps=k`, on one device
    or on the run's 4-device data-parallel mesh."""
    exp, trainable, batch = setup(*case[:2])
    # SGD: the update is the gradient itself, so a gradient error shows up unamplified (Adam's
    # first step is ~lr * sign(g), which turns last-bit noise where g ~ 0 into a full step).
    optimizer = optax.sgd(1.0)
    step = make_train_step(exp.graphdef, optimizer, packed=exp.packed,
                           num_task_ids=exp.num_task_ids, donate=False, grad_accum_steps=k)
    state, frozen = init_train_state(trainable, optimizer), exp.frozen
    if case[2]:
        placed = put_batch(batch, exp)
    else:
        one = jax.devices()[0]
        state, frozen, placed = jax.device_put((state, frozen, batch), one)
    state, metrics = step(state, frozen, placed, jax.random.key(0))
    return host(state.trainable), host(metrics)


def check_equal_to_one_big_batch(case, ks):
    """`case`: (peft mode, packed rows?, on the 4-device mesh?)."""
    _, trainable, batch = setup(*case[:2])
    reference, reference_metrics = one_step(case, 1)
    update = max(np.max(np.abs(a - b)) for a, b in zip(
        jax.tree.leaves(reference), jax.tree.leaves(host(trainable)), strict=True))
    assert update > 0.05  # a real step, so agreement below is not agreement of zeros
    for k in ks:
        # Micro-batches hold different token counts, so a mean of their means would differ.
        counts = np.asarray(micro_batches(batch, k)["decoder_loss_weights"]).sum(axis=(1, 2))
        assert len(set(counts.tolist())) > 1, counts
        trained, metrics = one_step(case, k)
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for name in SUMS:
            np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=1e-6,
                                       err_msg=name)
        np.testing.assert_array_equal(metrics["tokens"], reference_metrics["tokens"])
        np.testing.assert_allclose(metrics["grad_norm"], reference_metrics["grad_norm"],
                                   rtol=1e-5)


# One k per case (each k is a compile of its own): 2 micro-batches here, 4 on the mesh.
def test_accumulated_step_equals_one_big_batch_step_shared_unpacked():
    check_equal_to_one_big_batch(("shared", False, False), ks=(2,))


@pytest.mark.slow  # two compiles of the train step on the mesh: ~10 s of CPU
def test_accumulated_step_equals_one_big_batch_step_per_task_packed_on_the_mesh():
    assert jax.device_count() == 4
    exp, _, batch = setup("per_task", True)
    assert exp.mesh.shape["data"] * exp.mesh.shape["fsdp"] == 4
    assert any(len(set(row[row > 0])) > 1 for row in batch["encoder_task_ids"])  # mixed rows
    check_equal_to_one_big_batch(("per_task", True, True), ks=(4,))


def test_micro_batches_are_strided_and_keep_every_device_busy():
    batch = {"x": np.arange(16 * 3).reshape(16, 3)}
    micro = np.asarray(micro_batches(batch, 4)["x"])
    assert micro.shape == (4, 4, 3)
    np.testing.assert_array_equal(micro[1, :, 0], [3, 15, 27, 39])  # rows 1, 5, 9, 13
    # On the 4-device mesh, each micro-batch stays split over all devices (no data moves).
    exp = build(tiny_config(data__batch_size=16))
    placed = put_batch(batch, exp)
    split = jax.jit(lambda b: micro_batches(b, 4))(placed)["x"]
    assert split.sharding.shard_shape(split.shape) == (4, 1, 3)
    np.testing.assert_array_equal(np.asarray(split), micro)


def test_each_micro_batch_draws_its_own_dropout_key():
    k = 4
    trainable = {"w": jnp.zeros((2,), jnp.float32)}

    def micro_step(batch, key):  # reports its key's draw in its own slot
        draw = jax.random.uniform(key) * jax.nn.one_hot(batch["index"][0], k)
        return {"w": jnp.ones((2,), jnp.float32)}, {"draws": draw, "aux_loss": batch["aux"][0]}

    batch = {"index": jnp.arange(k), "aux": jnp.arange(k, dtype=jnp.float32)}
    grads, metrics = _accumulate(micro_step, micro_batches(batch, k), jax.random.key(0),
                                 trainable)
    draws = np.asarray(metrics["draws"])
    assert len(set(draws.tolist())) == k and np.all(draws > 0)
    np.testing.assert_array_equal(grads["w"], [k, k])  # summed
    assert float(metrics["aux_loss"]) == pytest.approx(np.mean(np.arange(k)))  # averaged


def test_router_aux_loss_and_entropy_are_averaged_over_micro_batches():
    # Two routed sites (a small graph), one device; batch 8 in 2 micro-batches.
    config = tiny_config(peft__method="molora", data__pack=False,
                         peft__targets=r".*layers\.0\.self_attention\.q")
    exp = build(config)
    optimizer = optax.sgd(1.0)
    one = jax.devices()[0]
    trainable, frozen = jax.device_put((perturbed(exp.trainable), exp.frozen), one)
    batch = first_batch(config)
    step = make_train_step(exp.graphdef, optimizer, packed=False, num_task_ids=exp.num_task_ids,
                           donate=False, grad_accum_steps=2)
    whole = host(step(init_train_state(trainable, optimizer), frozen, jax.device_put(batch, one),
                      jax.random.key(0))[1])

    @jax.jit
    def forward(rows):  # what the routers report on one micro-batch, straight from the model
        model = nnx.merge(exp.graphdef, trainable, frozen)
        logits, routing, aux_loss = capture(lambda m, **kw: m(**kw))(
            model, **model_inputs(rows, False))
        sums = loss_and_metrics(logits, rows, exp.num_task_ids)[1]
        return aux_loss, mean_entropy(routing), sums

    halves = [host(forward(jax.tree.map(lambda x, i=i: x[i], micro_batches(batch, 2))))
              for i in (0, 1)]
    assert float(whole["router_steps"]) == 1.0  # one optimizer step
    for name, index in (("aux_loss", 0), ("routing_entropy", 1)):
        values = [h[index] for h in halves]
        assert values[0] != values[1]  # so their mean is no coincidence
        assert float(whole[name]) == pytest.approx(np.mean(values), rel=1e-5), name
    for name in SUMS:
        np.testing.assert_allclose(whole[name], halves[0][2][name] + halves[1][2][name],
                                   rtol=1e-5)


@pytest.mark.parametrize("steps, message", [
    (3, r"batch_size=8 does not split into config\.train\.grad_accum_steps=3 micro-batches "
        r"over 4 data-parallel shards.*multiple of 3 x 4 = 12"),
    (4, r"grad_accum_steps=4 micro-batches over 4 .* 4 x 4 = 16"),  # 8 % 4 == 0 is not enough
    (0, r"config\.train\.grad_accum_steps=0 must be at least 1"),
])
def test_batch_that_does_not_split_is_refused(steps, message):
    with pytest.raises(ConfigError, match=message):
        build(tiny_config(train__grad_accum_steps=steps))


def test_train_loop_passes_grad_accum_steps(tmp_path, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_make_train_step(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(train_loop, "make_train_step", fake_make_train_step)
    with pytest.raises(Stop):
        train_loop.train(tiny_config(train__grad_accum_steps=2), str(tmp_path))
    assert seen["grad_accum_steps"] == 2
