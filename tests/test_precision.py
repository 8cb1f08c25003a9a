"""Mixed precision: bfloat16 compute (`config.model.dtype`) and a bfloat16 frozen base
(`config.model.param_dtype`) with float32 trainable masters, float32 gradients, optimizer
state, logits, norms, softmaxes and loss; a full fine-tune keeps a float32 base."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import first_batch, perturbed, tiny_config

from peftjax.config import ConfigError
from peftjax.models import T5, layers, preset, to_hf
from peftjax.train import build
from peftjax.train.loop import put_batch
from peftjax.train.optim import make_optimizer
from peftjax.train.step import init_train_state, make_train_step, model_inputs

BF16 = dict(model__dtype="bfloat16", model__param_dtype="bfloat16")
# Method -> config changes. Every case runs packed rows mixing tasks (poly routes by task id).
METHODS = {"lora": {}, "houlsby": {}, "prefix_tuning": {}, "poly": {}}


def token_mean_loss(exp, trainable, batch):
    """(token-mean cross entropy, logits) of the model on `batch`, deterministic."""
    model = nnx.merge(exp.graphdef, trainable, exp.frozen)
    logits = model(**model_inputs(batch, exp.packed))
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["decoder_target_tokens"])
    return jnp.sum(ce * weights) / jnp.sum(weights), logits


def floating_dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def jaxpr_eqns(jaxpr):
    """Every equation of a closed jaxpr, sub-jaxprs (jit, scan, custom_jvp, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from jaxpr_eqns(inner if hasattr(inner, "eqns") else inner.jaxpr)


@pytest.mark.parametrize("method", list(METHODS))
def test_bfloat16_run_keeps_float32_masters_and_tracks_the_float32_run(method):
    config16 = tiny_config(peft__method=method, **BF16, **METHODS[method])
    exp16 = build(config16)
    exp32 = build(tiny_config(peft__method=method, **METHODS[method]))
    # Storage: trainable masters float32, the frozen base bfloat16 (half the memory).
    assert floating_dtypes(exp16.trainable) == {"float32"}
    assert floating_dtypes(exp16.frozen) == {"bfloat16"}
    assert floating_dtypes(exp32.frozen) == {"float32"}
    batch = put_batch(first_batch(config16), exp16)
    trainable = perturbed(exp32.trainable)  # the same float32 values in both runs

    traced = jax.jit(lambda t: token_mean_loss(exp16, t, batch)).trace(trainable)
    loss16, logits16 = traced.lower().compile()(trainable)
    loss32, _ = jax.jit(lambda t: token_mean_loss(exp32, t, batch))(trainable)
    assert logits16.dtype == jnp.float32
    # bfloat16 rounds each activation to 2^-9 relative; measured ~5e-4 on this model.
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-2)
    assert float(loss16) != float(loss32)  # it did compute in bfloat16

    # Where it computes: every matmul over activations in bfloat16 (weight-space products of
    # small factors, e.g. Poly's skill mixing, may stay float32), while the numerically
    # sensitive pieces (softmax / log-softmax exponentials and logs, norms' rsqrt, sigmoid
    # routers) take float32 inputs.
    rows = (config16.data.batch_size, config16.data.targets_length)
    dots, sensitive = [], []
    for eqn in jaxpr_eqns(traced.jaxpr.jaxpr):
        dtypes = tuple(str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype"))
        if eqn.primitive.name == "dot_general":
            dots.append((dtypes, tuple(v.aval.shape for v in eqn.invars)))
        if eqn.primitive.name in ("exp", "log", "rsqrt", "logistic"):
            sensitive.append((eqn.primitive.name, dtypes))
    activation_dots = [d for d in dots if any(s[:2] == rows for s in d[1])]
    assert activation_dots and all(set(d) == {"bfloat16"} for d, _ in activation_dots), \
        activation_dots
    names = {name for name, _ in sensitive}
    assert {"exp", "log", "rsqrt"} <= names
    assert all(d == ("float32",) for _, d in sensitive), sensitive


def test_bfloat16_training_lowers_loss_with_float32_optimizer_state():
    config = tiny_config(peft__mode="per_task", optim__learning_rate=1e-2, optim__warmup_steps=0,
                         **BF16)
    exp = build(config)
    optimizer = make_optimizer(config.optim, 10)
    state = init_train_state(exp.trainable, optimizer)
    step = make_train_step(exp.graphdef, optimizer, packed=True, num_task_ids=exp.num_task_ids)
    batch = put_batch(first_batch(config), exp)  # one batch, fitted: a few steps must tell
    # Gradients are float32 (shapes and dtypes only: nothing is compiled).
    grads = jax.eval_shape(jax.grad(lambda t: token_mean_loss(exp, t, batch)[0]), exp.trainable)
    assert floating_dtypes(grads) == {"float32"}
    losses = []
    for _ in range(8):
        state, metrics = step(state, exp.frozen, batch, jax.random.key(0))
        losses.append(float(metrics["loss_sum"] / metrics["tokens"]))
    assert losses[-1] < 0.6 * losses[0], losses  # measured: 6.21 -> 2.26
    assert floating_dtypes(state.trainable) == {"float32"}
    # Adam's moments (mu, nu) are float32 like the masters they follow.
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(moments) == 2 * len(jax.tree.leaves(state.trainable))
    assert floating_dtypes(moments) == {"float32"}
    assert floating_dtypes(exp.frozen) == {"bfloat16"}


def test_full_fine_tuning_keeps_a_float32_base_and_refuses_a_bfloat16_one():
    exp = build(tiny_config(peft__method="full", model__dtype="bfloat16"))
    assert floating_dtypes(exp.trainable) == {"float32"}
    assert not jax.tree.leaves(exp.frozen)  # the whole base trains
    with pytest.raises(ConfigError, match=r"method='full'.*config\.model\.param_dtype='float32'"):
        build(tiny_config(peft__method="full", model__param_dtype="bfloat16"))


@pytest.mark.parametrize("key", ["dtype", "param_dtype"])
def test_unknown_dtype_is_refused(key):
    with pytest.raises(ConfigError, match=f"config.model.{key}='float16'"):
        build(tiny_config(**{f"model__{key}": "float16"}))


def assert_rounded_copy(frozen16, frozen32):
    """Every leaf of the bfloat16 base is the float32 base's leaf rounded to bfloat16."""
    flat16, flat32 = dict(nnx.to_flat_state(frozen16)), dict(nnx.to_flat_state(frozen32))
    assert flat16.keys() == flat32.keys()
    for path, variable in flat32.items():
        expected = np.asarray(jnp.asarray(variable.value).astype(jnp.bfloat16), np.float32)
        np.testing.assert_array_equal(np.asarray(flat16[path].value, np.float32), expected,
                                      err_msg=str(path))


def test_a_bfloat16_base_is_the_float32_base_rounded(tmp_path):
    # A seeded random base: drawn in float32 and rounded, so runs that differ only in
    # param_dtype share one base (and their adapters fit each other, see peftjax.peft.runs).
    assert_rounded_copy(build(tiny_config(**BF16)).frozen, build(tiny_config()).frozen)
    # A Hugging Face checkpoint (float32 on disk) loads rounded into a bfloat16 base.
    base = T5(preset("tiny"), rngs=nnx.Rngs(3))
    to_hf(base, str(tmp_path))
    exp = build(tiny_config(model__hf_path=str(tmp_path), peft__method="none", **BF16))
    assert floating_dtypes(exp.frozen) == {"bfloat16"}
    assert_rounded_copy(exp.frozen, nnx.state(base, nnx.Param))


def test_bfloat16_products_and_their_gradients_accumulate_in_float32():
    """`layers.matmul` on bfloat16 operands (CPU): the product and both gradients are bfloat16
    x bfloat16 -> float32 dots rounded once, within bfloat16 rounding of a float64
    recomputation; a frozen kernel's gradient is dropped by XLA; remat changes nothing."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 7, 96)), jnp.bfloat16)
    w_io = jnp.asarray(rng.normal(size=(96, 40)) / 10, jnp.bfloat16)
    c = jnp.asarray(rng.normal(size=(2, 7, 40)), jnp.float32)  # cotangent of the output

    def loss(x, w_io):
        return jnp.sum(layers.matmul(x, w_io).astype(jnp.float32) * c)

    x64, w64 = (np.asarray(a, np.float64) for a in (x, w_io))
    g64 = np.asarray(c.astype(jnp.bfloat16), np.float64)  # the cotangent the gradient sees
    y = layers.matmul(x, w_io)
    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w_io)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    for got, want in [(y, x64 @ w64), (dx, g64 @ w64.T),
                      (dw, np.einsum("bti,bto->io", x64, g64))]:
        # One rounding to bfloat16 (2^-9 relative) of a float32 accumulation.
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 ** -8,
                                   atol=1e-3 * np.abs(want).max())

    # Every product, forward and backward, multiplies bfloat16s into float32.
    dots = [eqn for eqn in jaxpr_eqns(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w_io).jaxpr)
            if eqn.primitive.name == "dot_general"]
    assert len(dots) == 3
    for eqn in dots:
        assert [str(v.aval.dtype) for v in eqn.invars] == ["bfloat16", "bfloat16"], eqn
        assert eqn.params["preferred_element_type"] == jnp.float32, eqn

    # The input gradient alone is one product: dx (the loss is linear in the output, so the
    # forward product goes too); the kernel's gradient would be a second.
    flops_one = 2 * (2 * 7) * 96 * 40
    cost = jax.jit(jax.grad(loss)).lower(x, w_io).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert flops_one <= cost["flops"] < 1.5 * flops_one, cost["flops"]

    remat = jax.checkpoint(loss, policy=jax.checkpoint_policies.checkpoint_dots)
    for a, b in zip(jax.grad(remat, (0, 1))(x, w_io), (dx, dw), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

    # float32 operands take the plain product.
    x32, w32 = x.astype(jnp.float32), w_io.astype(jnp.float32)
    np.testing.assert_array_equal(layers.matmul(x32, w32), jnp.dot(x32, w32))
