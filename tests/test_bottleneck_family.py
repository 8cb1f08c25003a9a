"""Bottleneck family: parallel adapters, PHM adapters, Compacter, Compacter++.

Float64 recomputation (shared, `[batch]` and per-token ids), Kronecker sums against `np.kron`,
identity at init, the Compacter rule shared across layers (stored once, summed gradient, through
the train loop and a checkpoint restore), width errors, and the paper's parameter counts.
"""

import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from peftjax.models import T5, Context, T5Config, preset
from peftjax.models.layers import RMSNorm
from peftjax.models.t5 import MLP
from peftjax.peft import TRAINABLE, PeftConfig, apply_peft
from peftjax.peft.bottleneck import BottleneckAdapter, ParallelAdapter
from peftjax.peft.phm import PHMAdapter, PHMLinear, kronecker_sum, new_rule
from peftjax.peft.variables import Adapter
from peftjax.train import train
from peftjax.train.experiment import model_config_from, peft_config_from
from peftjax.train.loop import restore_trained

RNG = np.random.default_rng(0)
IDS = [None, np.array([1, 0]), np.array([[0, 1, 1, 0], [1, 1, 0, 0]])]  # shared, batch, token


def f64(x):
    return np.asarray(x, dtype=np.float64)


def variables(module, kind=Adapter):
    return [v for _, v in nnx.to_flat_state(nnx.state(module, kind))]


def randomize(module, scale=1.0, rng=RNG):
    """Every adapter variable to N(0, scale²), zero-initialised ones included."""
    for v in variables(module):
        v.value = jnp.asarray(scale * rng.normal(size=v.value.shape), jnp.float32)


def token_tasks(ids, batch, length):
    """`[batch, length]` task index per token (None: shared weights)."""
    if ids is None:
        return None
    return ids if ids.ndim == 2 else np.repeat(ids[:, None], length, axis=1)


def gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_kron_sum(rules, factors):
    return sum(np.kron(a, b) for a, b in zip(f64(rules), f64(factors), strict=True))


# --- Kronecker sums -------------------------------------------------------------------------


def test_kronecker_sum_matches_numpy_kron():
    rules, factors = RNG.normal(size=(3, 3, 3)), RNG.normal(size=(3, 4, 5))
    ours = kronecker_sum(jnp.asarray(rules), jnp.asarray(factors))
    assert ours.shape == (12, 15)
    np.testing.assert_allclose(ours, np_kron_sum(rules, factors), rtol=1e-5, atol=1e-5)
    # Per task: a leading tasks axis on both.
    rules, factors = RNG.normal(size=(2, 2, 2, 2)), RNG.normal(size=(2, 2, 3, 1))
    ours = kronecker_sum(jnp.asarray(rules), jnp.asarray(factors))
    for k in range(2):
        np.testing.assert_allclose(ours[k], np_kron_sum(rules[k], factors[k]), rtol=1e-5,
                                   atol=1e-5)


def phm_weight_ref(layer: PHMLinear, task):
    """float64 `Σ_k A_k ⊗ B_k` of one task (or the shared weight when `task` is None)."""
    pick = (lambda v: f64(v.value)) if task is None else (lambda v: f64(v.value)[task])
    factors = (np.einsum("kir,kro->kio", pick(layer.s), pick(layer.t)) if layer.low_rank
               else pick(layer.factors))
    return np_kron_sum(pick(layer.rule), factors), pick(layer.bias)


# --- float64 recomputation --------------------------------------------------------------------


@pytest.mark.parametrize("ids", IDS, ids=["shared", "batch_ids", "token_ids"])
@pytest.mark.parametrize("kind", ["phm", "compacter"])
def test_phm_adapter_matches_float64(kind, ids):
    num_tasks = None if ids is None else 2
    rngs = nnx.Rngs(0)
    shared = new_rule(2, std=0.1, num_tasks=num_tasks, rngs=rngs) if kind == "compacter" else None
    adapter = PHMAdapter(8, 4, phm_dim=2, rank=2 if kind == "compacter" else None, rule=shared,
                         activation="relu", scale=0.5, num_tasks=num_tasks, rngs=rngs)
    assert (adapter.down.rule is adapter.up.rule) == (kind == "compacter")
    randomize(adapter)
    h = RNG.normal(size=(2, 4, 8)).astype(np.float32)
    ctx = Context(task_ids=None if ids is None else jnp.asarray(ids))
    ours = np.asarray(adapter(jnp.asarray(h), ctx))
    tasks = token_tasks(ids, 2, 4)
    for b in range(2):
        for t in range(4):
            k = None if tasks is None else tasks[b, t]
            (wd, bd), (wu, bu) = phm_weight_ref(adapter.down, k), phm_weight_ref(adapter.up, k)
            x = f64(h[b, t])
            ref = x + 0.5 * (np.maximum(x @ wd + bd, 0.0) @ wu + bu)
            np.testing.assert_allclose(ours[b, t], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ids", IDS, ids=["shared", "batch_ids", "token_ids"])
def test_parallel_adapter_matches_float64(ids):
    num_tasks = None if ids is None else 2
    cfg = preset("tiny")  # gated GELU (tanh approximation) FFN
    mlp = MLP(cfg, salt=0, rngs=nnx.Rngs(0))
    wrapped = ParallelAdapter(mlp, BottleneckAdapter(cfg.d_model, 8, activation="relu", scale=4.0,
                                                     num_tasks=num_tasks, rngs=nnx.Rngs(1)))
    randomize(wrapped, scale=0.3)
    x = RNG.normal(size=(2, 4, cfg.d_model)).astype(np.float32)
    ctx = Context(task_ids=None if ids is None else jnp.asarray(ids))
    ours = np.asarray(wrapped(jnp.asarray(x), ctx))
    w0, w1, wo = (f64(mlp.wi_0.kernel.value), f64(mlp.wi_1.kernel.value),
                  f64(mlp.wo.kernel.value))
    down, up = f64(wrapped.adapter.down.value), f64(wrapped.adapter.up.value)
    tasks = token_tasks(ids, 2, 4)
    for b in range(2):
        for t in range(4):
            xt = f64(x[b, t])
            d, u = (down, up) if tasks is None else (down[tasks[b, t]], up[tasks[b, t]])
            ref = (gelu_new(xt @ w0) * (xt @ w1)) @ wo + 4.0 * np.maximum(xt @ d, 0.0) @ u
            np.testing.assert_allclose(ours[b, t], ref, rtol=1e-4, atol=1e-4)


# --- identity at init ------------------------------------------------------------------------


def batch():
    enc = jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])
    dec = jnp.array([[0, 5, 6], [0, 7, 8]])
    return enc, dec


@functools.cache
def tiny_base():
    """A tiny T5 and its logits on `batch()`, built once (building one is slow on CPU)."""
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    return model, model(*batch())


def tiny_model():
    """A fresh copy of the tiny base (new modules and variables, same weights)."""
    return nnx.clone(tiny_base()[0])


@pytest.mark.parametrize("method", ["parallel", "phm", "compacter", "compacter_pp"])
@pytest.mark.parametrize("mode", ["shared", "per_task"])
def test_adapters_start_as_the_identity(method, mode):
    model, before = tiny_model(), tiny_base()[1]
    enc, dec = batch()
    paths = apply_peft(model, PeftConfig(method=method, mode=mode), num_tasks=3,
                       rngs=nnx.Rngs(1))
    assert len(paths) == {"phm": 8, "compacter": 8}.get(method, 4), paths
    np.testing.assert_array_equal(before, model(enc, dec, task_ids=jnp.array([0, 2])))
    if mode == "per_task":
        np.testing.assert_array_equal(before, model(
            enc, dec, encoder_task_ids=jnp.array([[0, 1, 2, 2, 0], [1, 1, 1, 0, 0]]),
            decoder_task_ids=jnp.array([[2, 2, 0], [1, 0, 1]])))


def test_parallel_wraps_every_ffn():
    model = tiny_model()
    paths = apply_peft(model, PeftConfig(method="parallel"), num_tasks=None, rngs=nnx.Rngs(1))
    assert paths == [f"{s}.layers.{i}.mlp" for s in ("decoder", "encoder") for i in (0, 1)]
    assert isinstance(model.encoder.layers[1].mlp, ParallelAdapter)


# --- the shared rule -------------------------------------------------------------------------


def rules_of(model):
    return [m.rule for _, m in nnx.iter_modules(model) if isinstance(m, PHMLinear)]


def compacter_model(mode, activation="relu"):
    model = tiny_model()
    apply_peft(model, PeftConfig(method="compacter", mode=mode, adapter_activation=activation),
               num_tasks=2, rngs=nnx.Rngs(1))
    return model


@pytest.mark.parametrize("mode", ["shared", "per_task"])
def test_shared_rule_is_one_variable_stored_once(mode):
    model = compacter_model(mode)
    rules = rules_of(model)
    assert len(rules) == 16 and all(r is rules[0] for r in rules)  # 8 adapters x (down, up)
    assert rules[0].value.shape == ((2, 4, 4, 4) if mode == "per_task" else (4, 4, 4))
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    rule_paths = [p for p, _ in nnx.to_flat_state(trainable) if p[-1] == "rule"]
    assert len(rule_paths) == 1, rule_paths
    merged = rules_of(nnx.merge(graphdef, trainable, frozen))
    assert len(merged) == 16 and all(r is merged[0] for r in merged)


def test_shared_rule_gets_the_summed_gradient_of_every_layer():
    # GELU (no dead units) and non-zero up factors, so every layer feeds the rule's gradient.
    model = compacter_model("per_task", activation="gelu_new")
    rng = np.random.default_rng(1)
    randomize(model, scale=0.5, rng=rng)
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    enc, dec = batch()
    probe = jnp.asarray(rng.normal(size=(2, 3, 259)), jnp.float32)

    @jax.jit
    def loss_and_grad(graphdef, trainable, frozen):
        def loss(trainable):
            logits = nnx.merge(graphdef, trainable, frozen)(enc, dec, task_ids=jnp.array([1, 0]))
            return jnp.sum(logits * probe)
        return jax.value_and_grad(loss)(trainable)

    shared_loss, shared_grad = loss_and_grad(graphdef, trainable, frozen)
    (rule_grad,) = [f64(v.value) for p, v in nnx.to_flat_state(shared_grad) if p[-1] == "rule"]
    # Untie: every PHM layer gets its own copy of the rule's value; the shared rule's gradient
    # must be the sum of the copies' gradients.
    untied = nnx.merge(graphdef, trainable, frozen)
    for layer in [m for _, m in nnx.iter_modules(untied) if isinstance(m, PHMLinear)]:
        layer.rule = Adapter(jnp.array(layer.rule.value), axes=layer.rule.get_metadata()["axes"])
    untied_loss, untied_grad = loss_and_grad(*nnx.split(untied, TRAINABLE, ...))
    copies = [f64(v.value) for p, v in nnx.to_flat_state(untied_grad) if p[-1] == "rule"]
    assert len(copies) == 16
    np.testing.assert_allclose(float(untied_loss), float(shared_loss), rtol=1e-6)
    assert all(np.abs(c[k]).max() > 0 for c in copies for k in (0, 1))  # every layer, both tasks
    np.testing.assert_allclose(rule_grad, sum(copies), rtol=1e-4,
                               atol=1e-5 * np.abs(rule_grad).max())


@pytest.mark.slow
def test_compacter_trains_and_restores_with_its_shared_rule(tmp_path):
    config = tiny.get_config()
    config.peft.method, config.peft.mode = "compacter", "per_task"
    config.optim.warmup_steps = 0
    config.train.steps, config.train.checkpoint_every = 3, 3
    config.data.mixture = "synthetic_reverse_shift"  # one task: a short final eval
    config.data.eval_examples = 2
    train(config, str(tmp_path))
    exp, state = restore_trained(config, str(tmp_path))
    assert int(state.step) == 3
    before = {p: f64(v.value) for p, v in nnx.to_flat_state(exp.trainable)}
    after = {p: f64(v.value) for p, v in nnx.to_flat_state(state.trainable)}
    rule_paths = [p for p in after if p[-1] == "rule"]
    assert len(rule_paths) == 1 and after.keys() == before.keys()
    assert not np.allclose(after[rule_paths[0]], before[rule_paths[0]])  # the rule was trained
    model = nnx.merge(exp.graphdef, state.trainable, exp.frozen)
    rules = rules_of(model)
    assert all(r is rules[0] for r in rules)
    np.testing.assert_array_equal(f64(rules[0].value), after[rule_paths[0]])


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="compacter", phm_dim=3), r"config\.peft\.phm_dim=3 does not divide d_model=64"),
    (dict(method="phm", phm_dim=8), r"config\.peft\.reduction_factor"),  # width 64 // 16 = 4
    (dict(method="compacter_pp", reduction_factor=128), r"lower config\.peft\.reduction_factor"),
])
def test_widths_not_divisible_by_phm_dim_are_refused(kwargs, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        apply_peft(model, PeftConfig(**kwargs), num_tasks=None, rngs=nnx.Rngs(1))


# --- parameter counts: the Compacter paper's figures --------------------------------------

T5_BASE_ORIGINAL = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12,
                            num_encoder_layers=12, num_decoder_layers=12,
                            feed_forward_proj="relu", tie_word_embeddings=True,
                            scale_decoder_outputs=True)


def analytic_count(method, d, reduction_factor, n, rank, layers):
    """Trainable parameters of `method` on a T5 with `layers` encoder + decoder layers.

    A PHM layer d_in -> d_out holds its factors, a bias (d_out) and, unless shared, a rule (n³):
    full factors n·(d_in/n)·(d_out/n) = d_in·d_out/n; rank-r factors r·(d_in + d_out).
    """
    m = d // reduction_factor
    sites = layers * (1 if method == "compacter_pp" else 2)  # Houlsby: attention + FFN
    if method == "phm":
        per_adapter = 2 * (d * m // n + n ** 3) + m + d
        return sites * per_adapter
    per_adapter = 2 * rank * (d + m) + m + d
    return sites * per_adapter + n ** 3  # one rule for the whole model


@functools.cache
def abstract_base(model_config):
    """The base T5 as shapes only (`nnx.eval_shape`: nothing of its 223M parameters allocated)."""
    return nnx.eval_shape(lambda: T5(model_config, rngs=nnx.Rngs(0)))


def abstract_adapted(model_config, peft, num_tasks=None):
    """The base with `peft` attached, shapes only."""
    def attach(model):
        apply_peft(model, peft, num_tasks=num_tasks, rngs=nnx.Rngs(1))
        return model

    return nnx.eval_shape(attach, nnx.clone(abstract_base(model_config)))


def abstract_counts(model_config, peft):
    """(trainable, base, layer-norm) parameter counts of the shapes-only adapted model."""
    model = abstract_adapted(model_config, peft)

    def size(state):
        return sum(math.prod(x.shape) for x in jax.tree.leaves(state))

    trainable = size(nnx.state(model, TRAINABLE))
    base = size(nnx.state(model, nnx.Param)) - trainable
    norms = sum(math.prod(m.scale.value.shape) for _, m in nnx.iter_modules(model)
                if isinstance(m, RMSNorm))
    return trainable, base, norms


@pytest.mark.parametrize("method, n, paper_percent", [
    ("compacter_pp", 4, 0.047), ("compacter", 4, 0.073), ("phm", 12, 0.179)])
def test_parameter_counts_reproduce_the_compacter_paper(method, n, paper_percent):
    """Paper (T5-base, Table 1): Compacter++ 0.047%, Compacter 0.073%, PHM-Adapter 0.179%.

    Settings from the paper's configs: reduction factor 32, rank 1, n = 4 (Compacter) / 12 (PHM);
    adapters have biases; the paper's runs also train the layer norms (`unfreeze_layer_norms`),
    and only with those counted do the percentages match (of original T5-base, 222.9M).
    """
    peft = PeftConfig(method=method, reduction_factor=32, phm_dim=n, phm_rank=1)
    trainable, base, norms = abstract_counts(T5_BASE_ORIGINAL, peft)
    assert base == 222_903_552  # transformers' t5-base
    assert trainable == analytic_count(method, 768, 32, n, 1, 24)
    assert norms == 62 * 768  # 2 per encoder layer, 3 per decoder layer, 2 final
    assert round(100 * (trainable + norms) / base, 3) == paper_percent
    if method == "compacter_pp":
        assert trainable == 24 * 2376 + 64 == 57_088
        assert round(100 * trainable / base, 4) == 0.0256  # adapters alone: about half


def test_compacter_pp_count_on_t5_v1_1_base():
    peft = PeftConfig(method="compacter_pp", reduction_factor=32, phm_dim=4, phm_rank=1)
    trainable, base, norms = abstract_counts(preset("base"), peft)
    assert base == 247_577_856
    assert trainable == analytic_count("compacter_pp", 768, 32, 4, 1, 24) == 57_088
    assert round(100 * trainable / base, 4) == 0.0231
    assert round(100 * (trainable + norms) / base, 4) == 0.0423


# --- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["houlsby", "pfeiffer", "parallel", "phm", "compacter",
                                  "compacter_pp"])
def test_configs_attach_to_the_quickstart_base(name):
    """The configs' settings fit the 128-wide quickstart base (the CLI `:quick` runs train)."""
    config = importlib.import_module(f"configs.{name}").get_config("quick,per_task")
    peft = peft_config_from(config)
    assert peft.method == name and peft.mode == "per_task"
    model = abstract_adapted(model_config_from(config), peft, num_tasks=13)
    assert nnx.state(model, TRAINABLE)
