"""Poly / MHR task routers over LoRA skill inventories: float64 recomputation of the math,
relaxed-Bernoulli training weights, per-token ids, bad task ids, MHR-z / MHR-mu on a saved run,
the 4-device build, and HF peft POLY adapters loaded against the real peft (torch).
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import mhr as mhr_config
from configs import poly as poly_config
from configs import tiny
from peftjax.models import Context
from peftjax.models.context import site_salt
from peftjax.models.layers import Dense
from peftjax.peft import FrozenAdapter, module_paths
from peftjax.peft.lora import LoRADense
from peftjax.peft.variables import Router, trainable_filter
from peftjax.routing import capture
from peftjax.routing.poly import PolyLoRADense
from peftjax.train import build
from peftjax.train.accounting import count_parameters
from tests.helpers import save_run

RNG = np.random.default_rng(0)
PATH = "encoder.layers.0.self_attention.q"


def f64(x):
    return np.asarray(x, dtype=np.float64)


def flat(state):
    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


def poly_layer(splits=1, *, skills=3, rank=2, tasks=4, d_in=12, d_out=10, **kwargs):
    """A PolyLoRADense with every parameter random (B and logits too)."""
    base = Dense(d_in, d_out, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0))
    layer = PolyLoRADense(base, rank=rank, num_skills=skills, num_splits=splits, num_tasks=tasks,
                          path=PATH, rngs=nnx.Rngs(1), **kwargs)
    for v in (layer.poly_b, layer.router_logits):
        if v is not None:
            v.value = jnp.asarray(RNG.normal(size=v.value.shape), jnp.float32)
    return layer


def reference(layer, x, w_bhk):
    """float64 `x W0 + x A_b B_b / r`, A_b / B_b assembled head by head with loops."""
    a, b = f64(layer.poly_a.value), f64(layer.poly_b.value)  # [h, K, d, r], [h, K, r, o]
    h, _, d, r = a.shape
    o = b.shape[-1]
    out = f64(x) @ f64(layer.base.kernel.value)
    for i in range(x.shape[0]):
        a_ir, b_ro = np.zeros((h * d, r)), np.zeros((r, h * o))
        for j in range(h):
            a_ir[j * d:(j + 1) * d] = np.einsum("k,kdr->dr", w_bhk[i, j], a[j])
            b_ro[:, j * o:(j + 1) * o] = np.einsum("k,kro->ro", w_bhk[i, j], b[j])
        out[i] += f64(x[i]) @ a_ir @ b_ro / r
    return out


def eval_weights(logits):
    s = 1.0 / (1.0 + np.exp(-f64(logits)))
    return s / s.sum(-1, keepdims=True)


def run(layer, x, ctx):
    """(output, recorded weights) of one call under `capture`."""
    y, weights, _ = capture(lambda m, x, c: m(x, c))(layer, jnp.asarray(x), ctx)
    (w,) = weights.values()
    return np.asarray(y), np.asarray(w)


# --------------------------------------------------------------------------- the math


@pytest.mark.parametrize("splits", [1, 2])
def test_forward_matches_float64(splits):
    layer = poly_layer(splits)
    x = RNG.normal(size=(3, 5, 12)).astype(np.float32)
    ids = np.array([2, 0, 3])
    y, w = run(layer, x, Context(task_ids=jnp.asarray(ids)))
    expected_w = eval_weights(layer.router_logits.value)[ids]
    np.testing.assert_allclose(w, expected_w, rtol=1e-6, atol=1e-7)
    assert w.shape == (3, splits, 3)
    np.testing.assert_allclose(y, reference(layer, x, expected_w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.task_weights()),
                               eval_weights(layer.router_logits.value), rtol=1e-6)
    # Shapes and logical axes, as peft's layouts.
    assert layer.poly_a.value.shape == (splits, 3, 12 // splits, 2)
    assert layer.poly_b.value.shape == (splits, 3, 2, 10 // splits)
    assert layer.router_logits.get_metadata()["axes"] == ("tasks", "splits", "skills")
    assert layer.poly_a.get_metadata()["axes"] == ("splits", "skills", "embed", "lora_rank")


def test_init_is_peft_s():
    layer = PolyLoRADense(Dense(64, 32, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0)),
                          rank=4, num_skills=3, num_splits=4, num_tasks=5, rngs=nnx.Rngs(1))
    a, b, z = (np.asarray(v.value) for v in (layer.poly_a, layer.poly_b, layer.router_logits))
    assert np.all(b == 0) and np.abs(z).max() <= 1e-3 and np.abs(z).max() > 0
    assert np.abs(a).max() <= 1 / np.sqrt(16) and np.abs(a).max() > 0.9 / np.sqrt(16)
    x = jnp.asarray(RNG.normal(size=(2, 3, 64)), jnp.float32)
    np.testing.assert_array_equal(layer(x, Context(task_ids=jnp.array([0, 4]))),
                                  layer.base(x))


@pytest.mark.parametrize("splits", [1, 2])
def test_training_weights_are_relaxed_bernoulli(splits):
    layer = poly_layer(splits, temperature=0.5)
    x = RNG.normal(size=(3, 4, 12)).astype(np.float32)
    key = jax.random.key(7)
    noise_key = jax.random.fold_in(key, site_salt(PATH))
    z = f64(layer.router_logits.value)
    # [batch] ids: noise per example.
    ids = np.array([1, 1, 3])
    y, w = run(layer, x, Context(task_ids=jnp.asarray(ids), dropout_key=key))
    noise = f64(jax.random.logistic(noise_key, (3, splits, 3)))
    s = 1.0 / (1.0 + np.exp(-(z[ids] + noise) / 0.5))
    expected = s / s.sum(-1, keepdims=True)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(w[0], w[1], atol=1e-3)  # same task, independent draws
    np.testing.assert_allclose(y, reference(layer, x, expected), rtol=1e-5, atol=1e-5)
    # Per-token ids: noise per task row of the table.
    tok = np.array([[0, 0, 2, 2], [1, 1, 1, 1], [3, 2, 1, 0]])
    y, w = run(layer, x, Context(task_ids=jnp.asarray(tok), dropout_key=key))
    noise = f64(jax.random.logistic(noise_key, (4, splits, 3)))
    s = 1.0 / (1.0 + np.exp(-(z + noise) / 0.5))
    table = s / s.sum(-1, keepdims=True)
    np.testing.assert_allclose(w, table[tok], rtol=1e-5, atol=1e-6)
    for t in range(4):  # token t of every row uses its task's mixed pair
        np.testing.assert_allclose(y[:, t], reference(layer, x[:, t:t + 1], table[tok[:, t]])[:, 0],
                                   rtol=1e-5, atol=1e-5)


def test_per_token_ids_equal_per_example_ids_on_single_task_rows():
    layer = poly_layer(2)
    x = jnp.asarray(RNG.normal(size=(3, 5, 12)), jnp.float32)
    ids = jnp.array([3, 0, 2])
    y1, w1 = run(layer, x, Context(task_ids=ids))
    y2, w2 = run(layer, x, Context(task_ids=jnp.repeat(ids[:, None], 5, axis=1)))
    np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)
    assert w2.shape == (3, 5, 2, 3)
    np.testing.assert_allclose(w2, np.repeat(w1[:, None], 5, axis=1), rtol=1e-6)


def test_task_ids_outside_the_table_raise_or_give_nan():
    layer = poly_layer(2)
    x = jnp.asarray(RNG.normal(size=(2, 3, 12)), jnp.float32)
    for ids in (jnp.array([1, 4]), jnp.array([[0, 0, 1], [2, -1, 2]])):
        with pytest.raises(ValueError, match=r"task id (4|-1) outside the router's table of 4 "
                                             r"tasks.*config.peft.num_tasks"):
            layer(x, Context(task_ids=ids))
        y = jax.jit(lambda m, x, i: m(x, Context(task_ids=i)))(layer, x, ids)  # ids traced
        bad = np.broadcast_to(((ids < 0) | (ids >= 4)).reshape(2, -1), (2, 3))
        y = np.asarray(y)
        assert np.all(np.isnan(y[bad])) and np.all(np.isfinite(y[~bad]))


def test_uniform_router_is_the_inventory_average():
    layer = poly_layer(2, router="uniform")
    assert layer.router_logits is None
    assert not nnx.state(layer, Router)  # nothing to route
    x = RNG.normal(size=(2, 3, 12)).astype(np.float32)
    y, w = run(layer, x, Context(task_ids=jnp.array([0, 3]), dropout_key=jax.random.key(0)))
    np.testing.assert_array_equal(w, np.full((2, 2, 3), 1 / 3, np.float32))
    np.testing.assert_allclose(y, reference(layer, x, np.full((2, 2, 3), 1 / 3)), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(layer(jnp.asarray(x), Context()), y, rtol=1e-6)  # ids optional
    assert layer.task_weights().shape == (4, 2, 3)


def test_widths_that_do_not_split_name_num_splits():
    base = Dense(12, 10, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"num_splits=4 does not divide the output width 10 of "
                                         rf"{PATH}.*Set config.peft.num_splits to a divisor"):
        PolyLoRADense(base, rank=2, num_skills=3, num_splits=4, num_tasks=2, path=PATH,
                      rngs=nnx.Rngs(0))


# ------------------------------------------------------------- runs: build, MHR-z, MHR-mu


def tiny_config(**peft):
    config = tiny.get_config()
    for key, value in peft.items():
        config.peft[key] = value
    return config


# alpha 3: the inventory's scale (3 / 2) differs from peft's 1/r and from the MHR-mu LoRA's.
MHR = dict(method="mhr", rank=2, alpha=3.0, num_skills=3, num_splits=4,
           targets=r".*attention\.q")


@pytest.fixture(scope="module")
def mhr_run(tmp_path_factory):
    """A saved MHR run on the tiny base (4 heads, 3 skills, rank 2, every q), built on the
    4-device test mesh as fsdp 2 x model 2 (so the inventories are sharded)."""
    workdir = str(tmp_path_factory.mktemp("mhr"))
    config = tiny_config(**MHR)
    config.mesh.shape = {"data": 1, "fsdp": 2, "model": 2}
    exp, trained = save_run(workdir, config, scale=0.2)
    return workdir, exp, flat(trained)


ENC = jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])
DEC, TARGETS = jnp.array([[0, 5, 6], [0, 7, 8]]), jnp.array([[5, 6, 1], [7, 8, 1]])


def test_mhr_builds_and_runs_jitted_on_the_4_device_mesh(mhr_run):
    _, exp, _ = mhr_run
    assert dict(exp.mesh.shape) == {"data": 1, "fsdp": 2, "model": 2}
    trainable = flat(exp.trainable)
    assert {k.rsplit("/", 1)[1] for k in trainable} == {"poly_a", "poly_b", "router_logits"}
    assert len(exp.adapted_paths) == 6  # q of 2 encoder + 2x2 decoder attentions
    logits = trainable[f"{PATH.replace('.', '/')}/router_logits"]
    assert logits.shape == (exp.num_task_ids, 4, 3)

    @jax.jit
    def forward(trainable, frozen, key):
        model = nnx.merge(exp.graphdef, trainable, frozen)
        return capture(lambda m: m(ENC, DEC, task_ids=jnp.array([5, 6]), dropout_key=key))(model)

    logits, weights, _ = forward(exp.trainable, exp.frozen, jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(logits)))
    assert len(weights) == 6 and weights[f"{PATH}/weights"].shape == (2, 4, 3)


def test_mhr_z_trains_only_the_router_over_the_frozen_inventory(mhr_run):
    workdir, _, saved = mhr_run
    exp = build(tiny_config(**MHR, skills_from=workdir))
    before = flat(exp.trainable)
    assert {k.rsplit("/", 1)[1] for k in before} == {"router_logits"}  # all the run trains
    model = nnx.merge(exp.graphdef, exp.trainable, exp.frozen)
    layer = module_paths(model)[PATH]
    assert isinstance(layer.poly_a, FrozenAdapter) and isinstance(layer.poly_b, FrozenAdapter)
    key = PATH.replace(".", "/")
    for name in ("poly_a", "poly_b"):  # the source's trained inventory, bit for bit
        np.testing.assert_array_equal(np.asarray(getattr(layer, name).value),
                                      saved[f"{key}/{name}"])
    assert not np.array_equal(before[f"{key}/router_logits"], saved[f"{key}/router_logits"])
    # Adam steps (with router noise) on one layer, split as the train step splits the model (a
    # model-level step compiles for seconds and checks no more).
    graphdef, trainable, rest = nnx.split(layer, trainable_filter("mhr"), ...)
    x = jnp.asarray(RNG.normal(size=(2, 3, 64)), jnp.float32)
    target = jnp.asarray(RNG.normal(size=(2, 3, 64)), jnp.float32)

    def loss(trainable, key):
        ctx = Context(task_ids=jnp.array([5, 6]), dropout_key=key)
        return jnp.mean((nnx.merge(graphdef, trainable, rest)(x, ctx) - target) ** 2)

    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(trainable)
    for i in range(2):
        grads = jax.grad(loss)(trainable, jax.random.key(i))
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    after = flat(trainable)
    assert list(after) == ["router_logits"]
    moved = after["router_logits"] != before[f"{key}/router_logits"]
    # Only the batch's tasks' rows moved (all their entries); the others got no gradient.
    np.testing.assert_array_equal(moved.any(axis=(1, 2)), np.isin(np.arange(len(moved)), [5, 6]))
    np.testing.assert_array_equal(moved[5:7], True)


@pytest.mark.parametrize("change, match", [
    (dict(num_skills=4), r"num_skills=3, this run num_skills=4.*--config.peft.num_skills=3"),
    (dict(num_splits=2), r"num_splits=4, this run num_splits=2"),
    (dict(targets=r".*self_attention\.q"), r"adapts other projections.*config.peft.targets"),
])
def test_mhr_z_refuses_an_inventory_that_does_not_fit(mhr_run, change, match):
    with pytest.raises(ValueError, match=match):
        build(tiny_config(**{**MHR, **change, "skills_from": mhr_run[0]}))


def test_mhr_mu_lora_starts_at_the_uniformly_routed_inventory(mhr_run):
    workdir, _, saved = mhr_run
    exp = build(tiny_config(method="lora", rank=2, alpha=5.0, targets=MHR["targets"],
                            skills_from=workdir))
    model = nnx.merge(exp.graphdef, exp.trainable, exp.frozen)
    paths = module_paths(model)
    x = RNG.normal(size=(2, 3, 64)).astype(np.float32)
    for path in (PATH, "decoder.layers.1.cross_attention.q"):
        lora = paths[path]
        assert isinstance(lora, LoRADense)
        a, b = (f64(saved[f"{path.replace('.', '/')}/{n}"]) for n in ("poly_a", "poly_b"))
        a_ir = np.concatenate(list(a.mean(1)), axis=0)  # heads stacked along d_in
        b_ro = np.concatenate(list(b.mean(1)), axis=1)  # and side by side along d_out
        expected = f64(x) @ a_ir @ b_ro * MHR["alpha"] / MHR["rank"]
        ours = np.asarray(lora.delta(jnp.asarray(x), Context()))
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rank=2, this run rank=4"):
        build(tiny_config(method="lora", rank=4, targets=MHR["targets"], skills_from=workdir))


def test_skills_from_must_be_a_poly_run(mhr_run, tmp_path):
    save_run(str(tmp_path), tiny_config(method="lora", targets=r".*attention\.q"))
    with pytest.raises(ValueError, match="method='lora' run.*trained poly or mhr run"):
        build(tiny_config(**MHR, skills_from=str(tmp_path)))


@pytest.mark.parametrize("module, arg, method, splits", [
    (poly_config, "quick", "poly", 1), (mhr_config, "quick", "mhr", 8),
    (mhr_config, "quick,uniform", "mhr", 8)])
def test_configs_build(module, arg, method, splits):
    config = module.get_config(arg)
    assert config.peft.method == method and config.peft.num_splits == splits
    assert config.train.steps == 20
    counts = count_parameters(config)  # shapes only: the quickstart widths split into heads
    assert counts["adapted_modules"] == 3 * 7 + 3 * 11  # every projection of 3 + 3 layers
    per_site = 4 * 8 * (128 + 128)  # a q/k/v/o skill inventory
    assert counts["trainable"] > 54 * per_site


# --------------------------------------------------------------------------- HF peft


@pytest.fixture(scope="module")
def hf_base_dir(tmp_path_factory):
    pytest.importorskip("torch")
    from tests import test_interop as interop

    return interop.save_hf_t5(tmp_path_factory.mktemp("hf_base"), **interop.BASE)


@pytest.mark.parametrize("splits", [1, 2])
def test_load_peft_poly_matches_peft(hf_base_dir, tmp_path, splits):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peftjax.interop import load_peft
    from tests import test_interop as interop

    base_dir = hf_base_dir
    config = peft.PolyConfig(task_type="SEQ_2_SEQ_LM", r=3, n_tasks=4, n_skills=3,
                             n_splits=splits, target_modules=["q", "v", "wo"])
    ref_model = interop.make_adapter(base_dir, tmp_path / "hf", config, seed=1)
    model = load_peft(base_dir, tmp_path / "hf")
    layer = module_paths(model)["encoder.layers.0.mlp.wo"]
    assert isinstance(layer, PolyLoRADense) and layer.num_splits == splits
    base_logits = interop.peft_logits(interop.hf_base(base_dir))
    refs = []
    for task in range(4):  # peft's forward, one task at a time (eval: sigmoid routing)
        with torch.no_grad():
            refs.append(ref_model(input_ids=torch.tensor(interop.ENC),
                                  attention_mask=torch.tensor(interop.ENC > 0),
                                  decoder_input_ids=torch.tensor(interop.DEC),
                                  task_ids=torch.tensor(np.full(3, task))).logits.numpy())
        assert np.max(np.abs(refs[-1] - base_logits)) > 1e-2  # the adapter matters
    assert np.max(np.abs(refs[0] - refs[1])) > 1e-3  # and the task
    for ids in ([0, 1, 2], [3, 3, 1]):  # every task, in mixed batches
        ours = interop.our_logits(model, task_ids=ids)
        for row, task in enumerate(ids):
            interop.assert_close(ours[row], refs[task][row])
