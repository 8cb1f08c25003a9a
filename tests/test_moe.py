"""Token-level mixtures of LoRA experts: MoLoRA, SMoRA, and the top-k gate over a frozen library.

Every equation is recomputed in float64 numpy from random non-zero parameters; the gates and
load-balancing losses the layers record are checked against the same recomputation; a real
(sharded, jitted) train step shows that the aux loss is added and logged and that the gates
learn.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import molora as molora_config
from configs import smora as smora_config
from configs import tiny
from peftjax.models import T5, Context, preset
from peftjax.models.layers import Dense
from peftjax.peft import Adapter, FrozenAdapter, PeftConfig, apply_peft, module_paths
from peftjax.peft.bottleneck import BottleneckAdapter
from peftjax.peft.compose import Source, attach
from peftjax.peft.lora import LoRADense
from peftjax.peft.variables import PeftParam, Router
from peftjax.routing.moe import (
    LoRALibrary,
    MoLoRADense,
    SMoRADense,
    balance_loss,
    top_k_gate,
)
from peftjax.routing.record import capture
from peftjax.train import build
from peftjax.train.loop import put_batch
from peftjax.train.step import init_train_state, make_train_step, summarize

RNG = np.random.default_rng(0)


def f64(x):
    return np.asarray(x, dtype=np.float64)


def randomize(*variables, scale=1.0):
    for v in variables:
        v.value = jnp.asarray(scale * RNG.normal(size=v.value.shape), jnp.float32)


# ------------------------------------------------------------------ float64 references --


def ref_gate(x, w_g, k):
    """(gates, probs, chosen) `[tokens, E]` for tokens `x` `[tokens, d]`: softmax, the top k
    (ties to the lower index), renormalised over them."""
    logits = f64(x) @ f64(w_g)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.zeros_like(probs)
    for i, row in enumerate(probs):
        chosen[i, np.argsort(-row, kind="stable")[:k]] = 1.0
    gates = probs * chosen
    return gates / gates.sum(-1, keepdims=True), probs, chosen


def ref_balance(probs, chosen, k, coef):
    e = probs.shape[-1]
    return coef * e * np.sum(chosen.mean(0) / k * probs.mean(0))


def run_captured(module, x, ctx):
    """`module.delta(x, ctx)` under `capture`: (delta, the one recorded gate, aux loss)."""
    out, weights, aux = capture(lambda m, x, ctx: m.delta(x, ctx))(module, x, ctx)
    assert len(weights) == 1
    return np.asarray(out), np.asarray(next(iter(weights.values()))), float(aux)


# ---------------------------------------------------------------------- gate and loss --


def test_top_k_gate_keeps_k_renormalises_and_breaks_ties_low():
    logits = jnp.asarray(RNG.normal(size=(3, 5, 6)), jnp.float32)
    for k in (1, 2, 4, 6):
        gates, probs, chosen = (np.asarray(a) for a in top_k_gate(logits, k))
        ref_g, ref_p, ref_c = ref_gate(np.asarray(logits).reshape(-1, 6), np.eye(6), k)
        np.testing.assert_allclose(gates.reshape(-1, 6), ref_g, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(probs.reshape(-1, 6), ref_p, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(chosen.reshape(-1, 6), ref_c)
        assert np.all(chosen.sum(-1) == k) and np.all((gates > 0) == (chosen > 0))
        np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
    ties = np.asarray(top_k_gate(jnp.zeros((1, 4)), 2)[0])
    np.testing.assert_array_equal(ties, [[0.5, 0.5, 0.0, 0.0]])
    with pytest.raises(ValueError, match="top_k"):
        top_k_gate(logits, 7)


def test_balance_loss_by_hand():
    coef = 0.01
    # A uniform router: P_e = 1/E and (any top-k) Σ f_e = 1, so aux == coef.
    probs = jnp.full((2, 3, 4), 0.25)
    chosen = jnp.asarray(np.tile([1.0, 1.0, 0.0, 0.0], (2, 3, 1)))
    assert float(balance_loss(probs, chosen, 2, coef)) == pytest.approx(coef)
    # Everything to expert 0 with certainty: f = P = e_0, aux = coef * E.
    onehot = jnp.asarray(np.tile([1.0, 0.0, 0.0, 0.0], (5, 1)))
    assert float(balance_loss(onehot, onehot, 1, coef)) == pytest.approx(4 * coef)
    # Two tokens, E=2, top-1: token 0 p=(.9,.1) -> 0; token 1 p=(.6,.4) -> 0.
    # f = (1, 0), P = (.75, .25): aux = coef * 2 * .75.
    p = jnp.asarray([[0.9, 0.1], [0.6, 0.4]])
    c = jnp.asarray([[1.0, 0.0], [1.0, 0.0]])
    assert float(balance_loss(p, c, 1, coef)) == pytest.approx(coef * 1.5)
    # The counts carry no gradient; the mean probabilities do.
    grad = jax.grad(lambda p: balance_loss(p, c, 1, coef))(p)
    np.testing.assert_allclose(grad, [[coef, 0.0], [coef, 0.0]], rtol=1e-6)


# --------------------------------------------------------------------------- layers --


def dense(d_in=12, d_out=10):
    return Dense(d_in, d_out, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0))


IDS = [None, np.array([2, 0, 1]), np.array([[0, 1, 1, 2, 0], [2, 2, 2, 2, 2], [1, 0, 2, 1, 0]])]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_molora_matches_float64(k):
    base = dense()
    layer = MoLoRADense(base, num_experts=4, top_k=k, rank=3, alpha=6.0, balance_coef=0.01,
                        rngs=nnx.Rngs(1))
    assert layer.lora_a.value.shape == (4, 12, 3) and layer.lora_b.value.shape == (4, 3, 10)
    assert isinstance(layer.router_kernel, Router) and layer.router_kernel.value.shape == (12, 4)
    assert not np.any(np.asarray(layer.lora_b.value))  # starts as the base
    randomize(layer.lora_b, layer.router_kernel)
    randomize(layer.lora_a, scale=0.3)
    x = RNG.normal(size=(3, 5, 12)).astype(np.float32)
    delta, gates, aux = run_captured(layer, jnp.asarray(x), Context())
    a, b, s = f64(layer.lora_a.value), f64(layer.lora_b.value), layer.scale
    assert s == 2.0
    g, p, c = ref_gate(x.reshape(-1, 12), layer.router_kernel.value, k)
    ref = np.zeros((15, 10))
    for i, xi in enumerate(f64(x).reshape(-1, 12)):
        for e in range(4):
            ref[i] += g[i, e] * s * (xi @ a[e]) @ b[e]
    np.testing.assert_allclose(delta.reshape(-1, 10), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gates.reshape(-1, 4), g, rtol=1e-5, atol=1e-6)
    assert aux == pytest.approx(ref_balance(p, c, k, 0.01), rel=1e-5)
    out = np.asarray(layer(jnp.asarray(x), Context()))
    np.testing.assert_allclose(out.reshape(-1, 10), f64(x).reshape(-1, 12) @ f64(
        base.kernel.value) + ref, rtol=1e-5, atol=1e-5)
    # Task-free: task ids (per example or per token, as on packed rows) change nothing.
    for ids in IDS[1:]:
        np.testing.assert_array_equal(
            np.asarray(layer(jnp.asarray(x), Context(task_ids=jnp.asarray(ids)))), out)


def test_smora_matches_float64_and_equals_molora_of_rank_one_experts():
    base = dense()
    layer = SMoRADense(base, top_k=3, rank=6, alpha=4.0, balance_coef=0.02, rngs=nnx.Rngs(1))
    assert layer.lora_a.value.shape == (12, 6) and layer.router_kernel.value.shape == (12, 6)
    randomize(layer.lora_b, layer.router_kernel)
    x = RNG.normal(size=(3, 5, 12)).astype(np.float32)
    delta, gates, aux = run_captured(layer, jnp.asarray(x), Context())
    assert gates.shape == (3, 5, 6)
    g, p, c = ref_gate(x.reshape(-1, 12), layer.router_kernel.value, 3)
    a, b = f64(layer.lora_a.value), f64(layer.lora_b.value)
    ref = 4.0 * ((f64(x).reshape(-1, 12) @ a) * g) @ b  # s = alpha: each expert is one rank
    np.testing.assert_allclose(delta.reshape(-1, 10), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gates.reshape(-1, 6), g, rtol=1e-5, atol=1e-6)
    assert aux == pytest.approx(ref_balance(p, c, 3, 0.02), rel=1e-5)
    # The same function as MoLoRA with 6 experts of rank 1 (A_e = A[:, e], B_e = B[e]).
    moe = MoLoRADense(base, num_experts=6, top_k=3, rank=1, alpha=4.0, rngs=nnx.Rngs(2))
    moe.lora_a.value = jnp.transpose(layer.lora_a.value)[:, :, None]
    moe.lora_b.value = layer.lora_b.value[:, None, :]
    moe.router_kernel.value = layer.router_kernel.value
    np.testing.assert_allclose(np.asarray(moe.delta(jnp.asarray(x), Context())), delta,
                               rtol=1e-5, atol=1e-6)


def test_dropout_acts_on_the_experts_input_not_on_the_gate():
    layer = MoLoRADense(dense(), num_experts=4, top_k=2, rank=3, alpha=6.0, dropout_rate=0.5,
                        salt=7, rngs=nnx.Rngs(1))
    randomize(layer.lora_b, layer.router_kernel)
    x = jnp.asarray(RNG.normal(size=(2, 4, 12)), jnp.float32)
    clean, gates, _ = run_captured(layer, x, Context())
    noisy, noisy_gates, _ = run_captured(layer, x, Context(dropout_key=jax.random.key(3)))
    np.testing.assert_array_equal(gates, noisy_gates)
    assert not np.allclose(clean, noisy)


def test_zero_init_leaves_the_model_unchanged_and_gates_are_recorded_per_site():
    enc, dec = jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]]), jnp.array([[0, 5, 6], [0, 7, 8]])
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    ref = np.asarray(nnx.jit(lambda m: m(enc, dec))(model))
    # One model, both methods (one compile): MoLoRA on attention, SMoRA on the feed-forward.
    paths = []
    for method, targets in (("molora", r".*attention\.(q|k|v|o)"), ("smora", r".*mlp\..*")):
        paths += apply_peft(model, PeftConfig(method=method, targets=targets, top_k=2, rank=4),
                            num_tasks=None, rngs=nnx.Rngs(1))
    assert len(paths) == 36  # every q/k/v/o/wi_0/wi_1/wo of the tiny model
    out, weights, aux = nnx.jit(capture(lambda m: m(enc, dec)))(model)
    np.testing.assert_array_equal(np.asarray(out), ref)
    assert sorted(k.rsplit("/", 1)[0] for k in weights) == sorted(paths)
    assert weights["encoder.layers.0.self_attention.q/weights"].shape == (2, 5, 4)  # experts
    assert weights["decoder.layers.1.mlp.wo/weights"].shape == (2, 3, 4)  # ranks
    assert float(aux) >= 36 * 0.01 * (1 - 1e-6)  # >= balance_coef per site, roughly


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="top_k=5 is larger than config.peft.num_experts=4"):
        PeftConfig(method="molora", num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="top_k=9 is larger than config.peft.rank=8"):
        PeftConfig(method="smora", rank=8, top_k=9)
    for method in ("molora", "smora"):
        with pytest.raises(ValueError, match="mode='shared'"):
            apply_peft(T5(preset("tiny"), rngs=nnx.Rngs(0)),
                       PeftConfig(method=method, mode="per_task"), num_tasks=3,
                       rngs=nnx.Rngs(1))


# -------------------------------------------------------------------------- library --


Q = "decoder.layers.0.cross_attention.q"
FFN = "encoder.layers.1.post_ffn"


def lora_source(name, model, paths, seed):
    current = module_paths(model)
    modules = {}
    for path in paths:
        lora = LoRADense(getattr(current[path], "base", current[path]), rank=3, alpha=6.0,
                         rngs=nnx.Rngs(seed))
        randomize(lora.lora_b, scale=0.3)
        modules[path] = lora
    return Source(name, "lora", modules)


def bottleneck_source(name, model, paths, seed):
    modules = {}
    for path in paths:
        adapter = BottleneckAdapter(model.config.d_model, 8, activation="relu", scale=0.7,
                                    rngs=nnx.Rngs(seed))
        randomize(adapter.down, adapter.up, scale=0.3)
        modules[path] = adapter
    return Source(name, "houlsby", modules)


def library(sources_of, method="none", **peft):
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    config = PeftConfig(method=method, compose="molora", sources=("a", "b"), **peft)
    adapted = apply_peft(model, config, num_tasks=3, rngs=nnx.Rngs(1))
    for path in adapted:  # a new adapter that already learned something
        randomize(module_paths(model)[path].lora_b, scale=0.3)
    attach(model, config, sources_of(model), adapted, num_tasks=3, rngs=nnx.Rngs(2))
    return model


def lora_delta(lora, x):
    return lora.scale * (f64(x) @ f64(lora.lora_a.value)) @ f64(lora.lora_b.value)


def bottleneck_delta(adapter, h):
    return adapter.scale * np.maximum(f64(h) @ f64(adapter.down.value), 0.0) @ f64(
        adapter.up.value)


def test_library_over_frozen_loras_and_a_new_one_matches_float64():
    model = library(lambda m: [lora_source("a", m, [Q], 5), lora_source("b", m, [Q], 6)],
                    method="lora", targets=r".*cross_attention\.q", top_k=2)
    block = module_paths(model)[Q]
    assert isinstance(block, LoRALibrary) and len(block.adapters) == 3
    assert block.router_kernel.value.shape == (block.base.in_features, 3)
    assert all(c.base is block.base for c in block.adapters)
    assert isinstance(block.adapters[0].lora_b, FrozenAdapter)  # sources frozen ...
    assert isinstance(block.adapters[2].lora_b, Adapter)  # ... the new adapter trains
    randomize(block.router_kernel)
    x = RNG.normal(size=(2, 4, block.base.in_features)).astype(np.float32)
    out, weights, aux = capture(lambda m, x: m(x, Context()))(block, jnp.asarray(x))
    g, p, c = ref_gate(x.reshape(-1, x.shape[-1]), block.router_kernel.value, 2)
    deltas = [lora_delta(child, x).reshape(8, -1) for child in block.adapters]
    ref = f64(x).reshape(8, -1) @ f64(block.base.kernel.value) + sum(
        g[:, [e]] * d for e, d in enumerate(deltas))
    np.testing.assert_allclose(np.asarray(out).reshape(8, -1), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(weights["/weights"]).reshape(8, 3), g, rtol=1e-5,
                               atol=1e-6)
    assert float(aux) == pytest.approx(ref_balance(p, c, 2, 0.01), rel=1e-5)


def test_library_at_a_residual_hook_gates_on_d_model():
    model = library(lambda m: [bottleneck_source("a", m, [FFN], 5),
                               bottleneck_source("b", m, [FFN], 6)], top_k=1)
    block = module_paths(model)[FFN]
    assert isinstance(block, LoRALibrary) and block.base is None
    assert block.router_kernel.value.shape == (model.config.d_model, 2)
    randomize(block.router_kernel)
    h = RNG.normal(size=(2, 4, model.config.d_model)).astype(np.float32)
    out = np.asarray(block(jnp.asarray(h), Context())).reshape(8, -1)
    g, _, _ = ref_gate(h.reshape(8, -1), block.router_kernel.value, 1)
    ref = f64(h).reshape(8, -1) + sum(
        g[:, [e]] * bottleneck_delta(child, h).reshape(8, -1)
        for e, child in enumerate(block.adapters))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # The only trainable parameters of a library without a new adapter are its gates.
    trainable = nnx.to_flat_state(nnx.state(model, PeftParam))
    assert [type(v) for _, v in trainable] == [Router]


def test_library_refuses_more_experts_per_token_than_sources():
    with pytest.raises(ValueError, match=r"config.peft.top_k=3 but only 2 adapter\(s\) attach"):
        library(lambda m: [lora_source("a", m, [Q], 5), lora_source("b", m, [Q], 6)], top_k=3)


# ------------------------------------------------------- a real train step on the mesh --


def synthetic_batch(rng, batch=8, length=6, vocab=50):
    """Unpacked converter features: one example (one task) per row."""
    tokens = rng.integers(2, vocab, size=(batch, length)).astype(np.int32)
    targets = rng.integers(2, vocab, size=(batch, length)).astype(np.int32)
    ids = np.repeat(rng.integers(0, 3, size=(batch, 1)), length, axis=1).astype(np.int32)
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {"encoder_input_tokens": tokens, "decoder_input_tokens": dec_in,
            "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets),
            "encoder_task_ids": ids, "decoder_task_ids": ids}


TARGETS = r".*(self_attention\.q|mlp\.wo)"  # 8 sites: a short compile


def tiny_config(method, **peft):
    config = tiny.get_config()
    config.peft.method = method
    config.peft.targets = TARGETS
    config.data.pack = False
    config.optim.warmup_steps = 0
    config.mesh.shape = {"data": 1, "fsdp": 2, "model": 2}
    for key, value in peft.items():
        config.peft[key] = value
    return config


@pytest.mark.parametrize("kind", ["molora", "smora", "library"])
def test_gates_get_gradient_from_the_task_loss(kind):
    """Once the experts differ from zero, the task loss alone (no aux loss) moves every gate."""
    if kind == "library":
        model = library(lambda m: [lora_source("a", m, [Q], 5), lora_source("b", m, [Q], 6)],
                        top_k=2)
        layer = module_paths(model)[Q]
    else:
        cls, kw = ((MoLoRADense, dict(num_experts=4)) if kind == "molora" else
                   (SMoRADense, {}))
        layer = cls(dense(), top_k=2, rank=4, alpha=8.0, balance_coef=0.01,
                    rngs=nnx.Rngs(1), **kw)
        randomize(layer.lora_b)
    graphdef, router, rest = nnx.split(layer, Router, ...)
    x = jnp.asarray(RNG.normal(size=(2, 5, layer.base.in_features)), jnp.float32)
    target = jnp.asarray(RNG.normal(size=(2, 5, layer.base.out_features)), jnp.float32)

    def task_loss(router):
        out, weights, aux = capture(lambda m: m(x, Context()))(nnx.merge(graphdef, router, rest))
        assert len(weights) == 1 and aux.shape == ()
        return jnp.mean((out - target) ** 2)  # the aux loss left out on purpose

    grad = np.asarray(nnx.to_flat_state(jax.grad(task_loss)(router))[0][1].get_value())
    assert grad.shape == layer.router_kernel.value.shape
    assert np.all(np.abs(grad).max(axis=0) > 0)  # every expert's column


def test_sharded_train_step_adds_and_logs_the_aux_loss_and_trains_the_gates():
    assert jax.device_count() == 4
    config = tiny_config("molora", num_experts=4, top_k=2, rank=4, balance_coef=0.05)
    exp = build(config)
    specs = {str(v.sharding.spec) for v in jax.tree.leaves(exp.trainable)}
    assert any("fsdp" in s for s in specs) and any("model" in s for s in specs), specs
    optimizer = optax.adam(1e-2)
    step = make_train_step(exp.graphdef, optimizer, packed=False,
                           num_task_ids=exp.num_task_ids, donate=False)
    state = init_train_state(exp.trainable, optimizer)
    rng = np.random.default_rng(1)
    before = {"/".join(map(str, k)): np.asarray(v.get_value())
              for k, v in nnx.to_flat_state(exp.trainable)}
    # One step (a second would recompile for the new state's shardings; the loop avoids that
    # with `replicate_unplaced`, which this test does not need).
    state, metrics = step(state, exp.frozen, put_batch(synthetic_batch(rng), exp),
                          jax.random.key(0))
    logged = summarize(jax.device_get(metrics), {})
    # 8 routed sites, each >= balance_coef: the aux loss is in the objective and the log.
    assert logged["aux_loss"] >= 8 * 0.05 * (1 - 1e-4) and np.isfinite(logged["loss"])
    assert 0 < logged["routing_entropy"] <= np.log(2) + 1e-6  # top-2 rows
    after = {"/".join(map(str, k)): np.asarray(v.get_value())
             for k, v in nnx.to_flat_state(state.trainable)}
    moved = {k.rsplit("/", 1)[1] for k in after if not np.array_equal(before[k], after[k])}
    assert len([k for k in after if k.endswith("router_kernel")]) == 8
    # B = 0 at step 0: the task loss gives A no gradient and the gates none either (their
    # mixture of zero updates is zero); the gates move by the aux loss alone.
    assert moved == {"router_kernel", "lora_b"}, moved


# --------------------------------------------------------------------------- configs --


def test_configs_defaults_and_library_variant():
    config = molora_config.get_config("quick")
    assert (config.peft.method, config.peft.num_experts, config.peft.top_k,
            config.peft.rank) == ("molora", 4, 2, 8)
    assert config.peft.targets == r".*(attention\.(q|k|v|o)|mlp\.(wi_0|wi_1|wo))"
    assert config.data.pack is False and config.train.steps == 20
    lib = molora_config.get_config("quick,library")
    assert (lib.peft.method, lib.peft.compose) == ("none", "molora")
    assert lib.peft.sources == ("/tmp/peftjax_lora_sources/reverse_shift",
                                "/tmp/peftjax_lora_sources/shift_upper")
    assert len(molora_config.get_config("library").peft.sources) == 8
    config = smora_config.get_config("quick")
    assert (config.peft.method, config.peft.rank, config.peft.top_k) == ("smora", 32, 8)
    PeftConfig(method="smora", rank=32, top_k=8)  # valid
