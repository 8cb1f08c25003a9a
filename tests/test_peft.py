"""LoRA and bottleneck adapters: float64 recomputation, identity at init, per-task selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax.models import T5, Context, preset
from peftjax.models.layers import Dense
from peftjax.peft import PeftConfig, apply_peft
from peftjax.peft.bottleneck import BottleneckAdapter
from peftjax.peft.lora import LoRADense

RNG = np.random.default_rng(0)


def f64(x):
    return np.asarray(x, dtype=np.float64)


def randomize(*variables):
    for v in variables:
        v.value = jnp.asarray(RNG.normal(size=v.value.shape), jnp.float32)


def lora_reference(x, w, a, b, scale):
    return f64(x) @ f64(w) + scale * (f64(x) @ f64(a)) @ f64(b)


def test_shared_lora_matches_float64():
    base = Dense(12, 10, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0))
    lora = LoRADense(base, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    randomize(lora.lora_b)
    x = RNG.normal(size=(2, 5, 12)).astype(np.float32)
    ours = lora(jnp.asarray(x), Context())
    ref = lora_reference(x, base.kernel.value, lora.lora_a.value, lora.lora_b.value, 2.0)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_rslora_scale():
    base = Dense(6, 6, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0))
    assert LoRADense(base, rank=16, alpha=8.0, rslora=True, rngs=nnx.Rngs(1)).scale == 2.0
    assert LoRADense(base, rank=16, alpha=8.0, rngs=nnx.Rngs(1)).scale == 0.5


@pytest.mark.parametrize("per_token", [False, True])
def test_per_task_lora_selects_each_examples_adapter(per_token):
    base = Dense(12, 10, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0))
    lora = LoRADense(base, rank=3, alpha=3.0, num_tasks=4, rngs=nnx.Rngs(1))
    randomize(lora.lora_a, lora.lora_b)
    x = RNG.normal(size=(3, 5, 12)).astype(np.float32)
    if per_token:  # packed rows: tasks change inside a row
        ids = np.array([[0, 0, 1, 1, 3], [2, 2, 2, 2, 2], [3, 1, 0, 2, 1]])
    else:
        ids = np.array([2, 0, 3])
    ours = np.asarray(lora(jnp.asarray(x), Context(task_ids=jnp.asarray(ids))))
    a, b, w = f64(lora.lora_a.value), f64(lora.lora_b.value), f64(base.kernel.value)
    token_ids = ids if per_token else np.repeat(ids[:, None], 5, axis=1)
    for i in range(3):
        for t in range(5):
            k = token_ids[i, t]
            ref = lora_reference(x[i, t], w, a[k], b[k], 1.0)
            np.testing.assert_allclose(ours[i, t], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ids", [None, np.array([1, 0]), np.array([[0, 1, 1, 0], [1, 1, 0, 0]])])
def test_bottleneck_matches_float64(ids):
    num_tasks = None if ids is None else 2
    adapter = BottleneckAdapter(8, 3, activation="relu", scale=0.5, num_tasks=num_tasks,
                                rngs=nnx.Rngs(0))
    randomize(adapter.down, adapter.up)
    h = RNG.normal(size=(2, 4, 8)).astype(np.float32)
    ctx = Context(task_ids=None if ids is None else jnp.asarray(ids))
    ours = np.asarray(adapter(jnp.asarray(h), ctx))
    down, up = f64(adapter.down.value), f64(adapter.up.value)
    for i in range(2):
        for t in range(4):
            if ids is None:
                d, u = down, up
            else:
                k = ids[i] if ids.ndim == 1 else ids[i, t]
                d, u = down[k], up[k]
            ref = f64(h[i, t]) + 0.5 * np.maximum(f64(h[i, t]) @ d, 0.0) @ u
            np.testing.assert_allclose(ours[i, t], ref, rtol=1e-5, atol=1e-5)


def batch():
    enc = jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])
    dec = jnp.array([[0, 5, 6], [0, 7, 8]])
    return enc, dec


@pytest.mark.parametrize("method", ["lora", "houlsby", "pfeiffer"])
@pytest.mark.parametrize("mode", ["shared", "per_task"])
def test_zero_initialised_adapters_leave_logits_unchanged(method, mode):
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    enc, dec = batch()
    before = model(enc, dec)
    paths = apply_peft(model, PeftConfig(method=method, mode=mode), num_tasks=3,
                       rngs=nnx.Rngs(1))
    assert paths
    after = model(enc, dec, task_ids=jnp.array([0, 2]))
    np.testing.assert_array_equal(before, after)


def test_per_token_ids_equal_per_example_ids_when_rows_are_single_task():
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    apply_peft(model, PeftConfig(method="lora", mode="per_task", targets=r".*"),
               num_tasks=3, rngs=nnx.Rngs(1))
    for variable in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda v:
                                    isinstance(v, nnx.Variable)):
        if variable.get_metadata().get("axes", ("",))[0] == "tasks":
            randomize(variable)
    enc, dec = batch()
    ids = jnp.array([2, 1])
    per_example = model(enc, dec, task_ids=ids)
    per_token = model(enc, dec, encoder_task_ids=jnp.repeat(ids[:, None], 5, 1),
                      decoder_task_ids=jnp.repeat(ids[:, None], 3, 1))
    # Two float32 contraction orders over adapters with N(0, 1) weights everywhere: compare at
    # the scale of the logits.
    scale = float(np.max(np.abs(per_example)))
    assert float(np.max(np.abs(per_example - per_token))) <= 1e-5 * scale, scale
    assert not np.allclose(per_example, model(enc, dec, task_ids=jnp.array([0, 0])), atol=1e-3)


def test_lora_targets_every_projection_named():
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    paths = apply_peft(model, PeftConfig(method="lora", targets=r"encoder\..*\.mlp\.wo"),
                       num_tasks=None, rngs=nnx.Rngs(1))
    assert paths == ["encoder.layers.0.mlp.wo", "encoder.layers.1.mlp.wo"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="lora", targets=r"nothing_here"), "matches no module"),
    (dict(method="houlsby", targets=r".*attention\.q"), "matches no module"),
    (dict(method="lora", targets=r"("), "not a valid regex"),
])
def test_targets_that_attach_nowhere_are_refused(kwargs, message):
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        apply_peft(model, PeftConfig(**kwargs), num_tasks=None, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=-3), "rank must be a positive integer"),
    (dict(method="lorra"), "Unknown config.peft.method"),
    (dict(mode="per-task"), "Unknown config.peft.mode"),
])
def test_bad_peft_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PeftConfig(**kwargs)


def test_per_task_model_without_task_ids_names_the_fix():
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    apply_peft(model, PeftConfig(mode="per_task"), num_tasks=2, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="needs task ids"):
        model(*batch())
