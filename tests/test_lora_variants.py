"""The LoRA family: DoRA against HF peft's DoRA layer (forward, dropout, gradients) and a float64
recomputation per task; asymmetric (frozen-A) LoRA; LoRA+'s learning rate ratio."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model

from configs import tiny
from peftjax.models import T5, Context, preset
from peftjax.models.context import dropout
from peftjax.models.layers import Dense
from peftjax.peft import TRAINABLE, FrozenAdapter, PeftConfig, apply_peft
from peftjax.peft.lora import LoRADense, dora_column_norms
from peftjax.train import build, restore_trained, train
from peftjax.train.optim import make_optimizer

RNG = np.random.default_rng(0)
IN, OUT, RANK, ALPHA = 12, 10, 4, 8.0
ALL_PROJECTIONS = r".*(attention\.(q|k|v|o)|mlp\.(wi_0|wi_1|wo))"


def f64(x):
    return np.asarray(x, dtype=np.float64)


def normal(*shape, std=1.0):
    return (std * RNG.normal(size=shape)).astype(np.float32)


def dora_layer(*, rslora=False, num_tasks=None, dropout_rate=0.0):
    """A DoRA layer with random (non-initial) A, B and magnitude."""
    base = Dense(IN, OUT, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0))
    layer = LoRADense(base, rank=RANK, alpha=ALPHA, rslora=rslora, dora=True,
                      num_tasks=num_tasks, dropout_rate=dropout_rate, salt=7, rngs=nnx.Rngs(1))
    for v in (layer.lora_a, layer.lora_b):
        v.value = jnp.asarray(normal(*v.value.shape, std=0.5))
    layer.lora_magnitude.value = jnp.asarray(RNG.uniform(0.5, 2.0, layer.lora_magnitude.shape),
                                             jnp.float32)
    return layer


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(IN, OUT, bias=False)

    def forward(self, x):
        return self.q(x)


class _FixedDropout(torch.nn.Module):
    """Stands in for HF's `nn.Dropout` with our mask, so the two dropouts draw the same."""

    def __init__(self, dropped):
        super().__init__()
        self.dropped = dropped

    def forward(self, x):
        return self.dropped


def hf_dora(layer: LoRADense, *, rslora: bool, dropout_rate: float = 0.0):
    """HF peft's DoRA layer holding our layer's weights (torch layout: transposed)."""
    torch.manual_seed(0)
    model = get_peft_model(_Net(), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q"],
                                              use_dora=True, use_rslora=rslora,
                                              lora_dropout=dropout_rate))
    q = model.base_model.model.q
    t = lambda v: torch.tensor(np.asarray(v).T.copy())  # noqa: E731
    with torch.no_grad():
        q.base_layer.weight.copy_(t(layer.base.kernel.value))
        q.lora_A["default"].weight.copy_(t(layer.lora_a.value))
        q.lora_B["default"].weight.copy_(t(layer.lora_b.value))
        q.lora_magnitude_vector["default"].weight.copy_(
            torch.tensor(np.asarray(layer.lora_magnitude.value)))
    assert q.scaling["default"] == pytest.approx(layer.scale)
    return model, q


@pytest.mark.parametrize("rslora", [False, True])
def test_dora_forward_and_gradients_match_hf_peft(rslora):
    layer = dora_layer(rslora=rslora)
    model, q = hf_dora(layer, rslora=rslora)
    x, cot = normal(2, 5, IN), normal(2, 5, OUT)
    model.eval()
    x_t = torch.tensor(x)
    y_t = model(x_t)
    (y_t * torch.tensor(cot)).sum().backward()

    graphdef, params, rest = nnx.split(layer, TRAINABLE, ...)

    def objective(p):
        y = nnx.merge(graphdef, p, rest)(jnp.asarray(x), Context())
        return jnp.sum(y * cot), y

    grads, y = jax.grad(objective, has_aux=True)(params)
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-5, atol=1e-5)
    # The composition view: base + delta is the same layer.
    np.testing.assert_allclose(layer.base(x) + layer.delta(jnp.asarray(x), Context()), y,
                               rtol=1e-5, atol=1e-5)
    # Gradients through the detached norm, as torch autograd computes them.
    np.testing.assert_allclose(grads["lora_magnitude"].value,
                               q.lora_magnitude_vector["default"].weight.grad.numpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["lora_b"].value, q.lora_B["default"].weight.grad.numpy().T,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["lora_a"].value, q.lora_A["default"].weight.grad.numpy().T,
                               rtol=1e-4, atol=1e-5)


def test_dora_dropout_matches_hf_peft():
    """In training HF keeps the base path on the clean input and applies the DoRA correction and
    the low-rank path to the dropped-out input."""
    layer = dora_layer(dropout_rate=0.3)
    x = normal(2, 5, IN)
    ctx = Context(dropout_key=jax.random.key(3))
    dropped = np.asarray(dropout(jnp.asarray(x), 0.3, ctx, layer.salt))
    assert (dropped == 0).any() and not np.array_equal(dropped, x)
    model, q = hf_dora(layer, rslora=False, dropout_rate=0.3)
    q.lora_dropout["default"] = _FixedDropout(torch.tensor(dropped))
    model.train()
    with torch.no_grad():
        expected = model(torch.tensor(x)).numpy()
    np.testing.assert_allclose(layer(jnp.asarray(x), ctx), expected, rtol=1e-5, atol=1e-5)
    # Deterministic (eval) calls ignore the dropout rate.
    model.eval()
    with torch.no_grad():
        expected_eval = model(torch.tensor(x)).numpy()
    np.testing.assert_allclose(layer(jnp.asarray(x), Context()), expected_eval, rtol=1e-5,
                               atol=1e-5)


def dora_reference(x_d, w0, a, b, m, scale):
    """float64 DoRA on one token: `m ⊙ x (W0 + sAB) / ‖W0 + sAB‖_c`."""
    w = f64(w0) + scale * f64(a) @ f64(b)
    return f64(m) / np.linalg.norm(w, axis=0) * (f64(x_d) @ w)


@pytest.mark.parametrize("per_token", [False, True])
def test_per_task_dora_matches_float64(per_token):
    layer = dora_layer(num_tasks=4)
    x = normal(3, 5, IN)
    if per_token:  # packed rows: tasks change inside a row
        ids = np.array([[0, 0, 1, 1, 3], [2, 2, 2, 2, 2], [3, 1, 0, 2, 1]])
    else:
        ids = np.array([2, 0, 3])
    ours = np.asarray(layer(jnp.asarray(x), Context(task_ids=jnp.asarray(ids))))
    a, b = layer.lora_a.value, layer.lora_b.value
    m, w0 = layer.lora_magnitude.value, layer.base.kernel.value
    token_ids = ids if per_token else np.repeat(ids[:, None], 5, axis=1)
    for i in range(3):
        for t in range(5):
            k = token_ids[i, t]
            ref = dora_reference(x[i, t], w0, a[k], b[k], m[k], layer.scale)
            np.testing.assert_allclose(ours[i, t], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b_std", [0.01, 0.3])
def test_expanded_column_norms_are_accurate_in_float32(b_std):
    """T5-base-like scales: W0 [768, 512] ~ N(0, 0.05²), Kaiming A, trained B small or large."""
    w0, b = normal(768, 512, std=0.05), normal(3, 16, 512, std=b_std)
    a = RNG.uniform(-1, 1, size=(3, 768, 16)).astype(np.float32) / np.sqrt(768)
    ours = np.asarray(dora_column_norms(jnp.asarray(w0), jnp.asarray(a), jnp.asarray(b), 2.0))
    ref = np.linalg.norm(f64(w0) + 2.0 * np.einsum("kir,kro->kio", f64(a), f64(b)), axis=1)
    np.testing.assert_allclose(ours, ref, rtol=2e-6)


def tiny_batch():
    return jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]]), jnp.array([[0, 5, 6], [0, 7, 8]])


@pytest.mark.parametrize("knobs", [dict(dora=True), dict(freeze_a=True),
                                   dict(dora=True, freeze_a=True, rslora=True)])
@pytest.mark.parametrize("mode", ["shared", "per_task"])
def test_variants_leave_logits_unchanged_at_init(knobs, mode):
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    enc, dec = tiny_batch()
    before = model(enc, dec)
    config = PeftConfig(method="lora", mode=mode, targets=ALL_PROJECTIONS, **knobs)
    assert apply_peft(model, config, num_tasks=3, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(before, model(enc, dec, task_ids=jnp.array([0, 2])))


def test_dora_magnitude_starts_at_base_column_norms_with_named_axes():
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    apply_peft(model, PeftConfig(mode="per_task", dora=True), num_tasks=3, rngs=nnx.Rngs(1))
    q = model.encoder.layers[0].self_attention.q
    out_axis = q.base.kernel.get_metadata()["axes"][1]
    assert q.lora_magnitude.get_metadata()["axes"] == ("tasks", out_axis)
    expected = np.linalg.norm(f64(q.base.kernel.value), axis=0)
    np.testing.assert_allclose(q.lora_magnitude.value, np.tile(expected, (3, 1)), rtol=1e-6)


def frozen_a_config():
    config = tiny.get_config()
    config.peft.freeze_a = True
    config.peft.mode = "per_task"
    config.train.steps = 3
    config.data.mixture = "synthetic_reverse_shift"  # one task: a short final eval
    config.data.eval_examples = 2
    config.optim.warmup_steps = 0
    config.optim.learning_rate = 1e-2
    return config


def lora_leaves(state, name):
    return {path: v.value for path, v in nnx.to_flat_state(state) if path[-1] == name}


@pytest.mark.slow  # a real (3-step) run through `train`, checkpoints and restore
def test_frozen_a_is_not_trained_and_survives_training_and_restore(tmp_path):
    config = frozen_a_config()
    exp = build(config)
    assert not lora_leaves(exp.trainable, "lora_a") and lora_leaves(exp.trainable, "lora_b")
    a_before = jax.device_get(lora_leaves(exp.frozen, "lora_a"))
    assert a_before
    assert all(isinstance(v, FrozenAdapter) for p, v in nnx.to_flat_state(exp.frozen)
               if p[-1] == "lora_a")
    train(config, str(tmp_path))
    restored, state = restore_trained(config, str(tmp_path))
    assert not lora_leaves(state.trainable, "lora_a")
    assert any(np.abs(b).max() > 0 for b in lora_leaves(state.trainable, "lora_b").values())
    a_after = jax.device_get(lora_leaves(restored.frozen, "lora_a"))
    assert a_after.keys() == a_before.keys()
    for path, a in a_before.items():
        np.testing.assert_array_equal(a, a_after[path])  # bit-identical, re-created from the seed


def one_adamw_update(ratio):
    config = tiny.get_config()
    config.optim.warmup_steps = 0
    layer = LoRADense(Dense(IN, OUT, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0)),
                      rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)  # the same B and inputs for every ratio
    layer.lora_b.value = jnp.asarray(rng.normal(size=(RANK, OUT)), jnp.float32)  # else A's
    graphdef, params, rest = nnx.split(layer, TRAINABLE, ...)  # first gradient is zero
    x = jnp.asarray(rng.normal(size=(2, 5, IN)), jnp.float32)
    optimizer = make_optimizer(config.optim, 10, lora_plus_ratio=ratio)

    @jax.jit  # one compilation instead of one per eager op
    def first_update(p):
        grads = jax.grad(lambda q: jnp.sum(nnx.merge(graphdef, q, rest)(x, Context()) ** 2))(p)
        return optimizer.update(grads, optimizer.init(p), p)[0]

    return first_update(params)


def test_lora_plus_scales_only_b_updates():
    plain, plus = one_adamw_update(1.0), one_adamw_update(16.0)
    assert np.abs(plain["lora_b"].value).max() > 0 and np.abs(plain["lora_a"].value).max() > 0
    np.testing.assert_array_equal(plus["lora_a"].value, plain["lora_a"].value)
    np.testing.assert_array_equal(plus["lora_b"].value, 16.0 * plain["lora_b"].value)


def test_lora_plus_without_lora_b_names_the_fix():
    optimizer = make_optimizer(tiny.get_config().optim, 10, lora_plus_ratio=16.0)
    with pytest.raises(ValueError, match="lora_plus_ratio"):
        optimizer.init({"up": jnp.zeros(3)})
