"""Sparse fine-tuning (LT-SFT), composition blocks over frozen source adapters, and ScaLearn.

Source runs and first passes are made by building a tiny run, setting its trainable values and
saving them through the train loop's own checkpoint code (no long training).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import average, scalearn, source_adapter, sparse, stack
from configs import full as full_config
from peftjax.models import T5, Context, preset
from peftjax.models.layers import Dense
from peftjax.peft import Adapter, FrozenAdapter, PeftConfig, apply_peft, module_paths
from peftjax.peft.bottleneck import BottleneckAdapter
from peftjax.peft.compose import Composition, Source, attach
from peftjax.peft.lora import LoRADense
from peftjax.peft.scalearn import ScaLearn
from peftjax.peft.sparse import (
    SparseDense,
    add_sparse_diffs,
    apply_sparse_diffs,
    choose_mask,
    kept_count,
    sparse_diffs,
)
from peftjax.train import build
from peftjax.train import loop as train_loop
from peftjax.train.experiment import build_base_model
from tests.helpers import host, save_run, tiny_config

RNG = np.random.default_rng(0)


def f64(x):
    return np.asarray(x, dtype=np.float64)


def randomize(*variables, scale=1.0):
    for v in variables:
        v.value = jnp.asarray(scale * RNG.normal(size=v.value.shape), jnp.float32)


ENC = jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])
DEC, TARGETS = jnp.array([[0, 5, 6], [0, 7, 8]]), jnp.array([[5, 6, 1], [7, 8, 1]])


def train_steps(exp, steps=2, lr=1e-2):
    """Adam steps on a fixed batch, trainables only (the frozen state is an argument, as in the
    train loop's step); returns the trainable state after them."""
    optimizer = optax.adam(lr)

    def loss(trainable, frozen):
        model = nnx.merge(exp.graphdef, trainable, frozen)
        logits = model(ENC, DEC, task_ids=jnp.array([5, 6]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, TARGETS).mean()

    @jax.jit
    def step(trainable, opt_state, frozen):
        updates, opt_state = optimizer.update(jax.grad(loss)(trainable, frozen), opt_state)
        return optax.apply_updates(trainable, updates), opt_state

    # One device: the partitioner of the 4-device test mesh would double the compile time.
    trainable, frozen = jax.device_put((exp.trainable, exp.frozen), jax.devices()[0])
    opt_state = optimizer.init(trainable)
    for _ in range(steps):
        trainable, opt_state = step(trainable, opt_state, frozen)
    return host(trainable)


def flat(state):
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(state)}


# ------------------------------------------------------------------------------ sparse --


def test_choose_mask_keeps_exactly_the_top_k():
    theta0 = RNG.normal(size=(7, 9))
    theta1 = theta0 + RNG.normal(size=(7, 9))
    mask = choose_mask(theta0, theta1, 0.2)
    moved = np.abs(theta1 - theta0)
    k = kept_count(63, 0.2)
    assert k == 13 and mask.dtype == bool and mask.sum() == k
    assert moved[mask].min() > moved[~mask].max()
    np.testing.assert_array_equal(np.sort(moved.ravel())[-k:], np.sort(moved[mask]))
    # Ties go to the lower flat index; density bounds.
    ties = choose_mask(np.zeros(6), np.array([1.0, 2.0, 2.0, 2.0, 0.0, 2.0]), 0.5)
    np.testing.assert_array_equal(ties, [False, True, True, True, False, False])
    assert choose_mask(theta0, theta1, 1e-6).sum() == 1
    assert choose_mask(theta0, theta1, 1.0).all()


@pytest.mark.parametrize("ids", [None, np.array([2, 0, 1]),
                                 np.array([[0, 1, 1, 2, 0], [2, 2, 2, 2, 2], [1, 0, 2, 1, 0]])])
def test_sparse_dense_matches_float64(ids):
    base = Dense(12, 10, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0))
    mask = RNG.random((12, 10)) < 0.3
    num_tasks = None if ids is None else 3
    layer = SparseDense(base, mask, num_tasks=num_tasks)
    assert layer.mask.value.shape == layer.phi.value.shape and isinstance(layer.mask,
                                                                           FrozenAdapter)
    randomize(layer.phi)
    x = RNG.normal(size=(3, 5, 12)).astype(np.float32)
    ctx = Context(task_ids=None if ids is None else jnp.asarray(ids))
    ours, delta = (np.asarray(f(jnp.asarray(x), ctx)) for f in (layer, layer.delta))
    phi, w0 = f64(layer.phi.value), f64(base.kernel.value)
    for i in range(3):
        for t in range(5):
            k = None if ids is None else (ids[i] if ids.ndim == 1 else ids[i, t])
            d = mask * (phi if k is None else phi[k])
            np.testing.assert_allclose(ours[i, t], f64(x[i, t]) @ (w0 + d), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(delta[i, t], f64(x[i, t]) @ d, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def first_pass(tmp_path_factory):
    """A full fine-tuning run (θ1 = θ0 + noise) on the tiny base, seed 0."""
    workdir = tmp_path_factory.mktemp("full")
    exp, theta1 = save_run(workdir, tiny_config(peft__method="full"), scale=0.05)
    return str(workdir), host(exp.trainable), theta1


SPARSE_TARGETS = r".*(self_attention\.q|mlp\.wo)"  # 4 + 4 projections: a short compile


def sparse_config(first_pass_dir, **changes):
    return tiny_config(peft__method="sparse", peft__sparse_mask_from=first_pass_dir,
                       peft__sparse_density=0.05, peft__targets=SPARSE_TARGETS, **changes)


def test_sparse_needs_a_first_pass_and_says_how_to_make_it():
    with pytest.raises(ValueError, match="configs/full.py.*\n.*configs/sparse.py"):
        build(tiny_config(peft__method="sparse"))


def test_sparse_mask_from_first_pass_and_only_masked_entries_train(first_pass):
    workdir, theta0, theta1 = first_pass
    exp = build(sparse_config(workdir))
    model = nnx.merge(exp.graphdef, exp.trainable, exp.frozen)
    layers = {p: m for p, m in module_paths(model).items() if isinstance(m, SparseDense)}
    assert sorted(layers) == exp.adapted_paths and len(layers) == 8
    before, after = flat(theta0), flat(theta1)
    for path, layer in layers.items():
        key = path.replace(".", "/") + "/kernel"
        expected = choose_mask(before[key], after[key], 0.05)
        np.testing.assert_array_equal(np.asarray(layer.mask.value), expected)
        assert expected.sum() == kept_count(expected.size, 0.05)
    # Adam steps on one layer (a model-level step compiles for seconds and checks no more).
    layer = layers["decoder.layers.1.mlp.wo"]
    graphdef, phi, rest = nnx.split(layer, Adapter, ...)
    x = jnp.asarray(RNG.normal(size=(2, 3, layer.base.in_features)), jnp.float32)
    target = jnp.asarray(RNG.normal(size=(2, 3, layer.base.out_features)), jnp.float32)

    def loss(phi):
        return jnp.mean((nnx.merge(graphdef, phi, rest)(x, Context()) - target) ** 2)

    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    opt_state = optimizer.init(phi)
    for _ in range(2):
        updates, opt_state = optimizer.update(jax.grad(loss)(phi), opt_state, phi)
        phi = optax.apply_updates(phi, updates)
    trained, mask = np.asarray(phi["phi"].get_value()), np.asarray(layer.mask.value)
    assert np.all(trained[~mask] == 0.0)  # exactly zero outside the mask, weight decay or not
    assert np.all(trained[mask] != 0.0)


def test_sparse_first_pass_must_be_full_fine_tuning_on_this_base(first_pass, tmp_path):
    with pytest.raises(ValueError, match="does not fit the base"):
        build(sparse_config(first_pass[0], seed=1))  # another random init
    save_run(tmp_path, tiny_config(peft__method="lora"))
    with pytest.raises(ValueError, match="method='lora' run.*method=full"):
        build(sparse_config(str(tmp_path)))


def test_sparse_diffs_add_up_and_compose_by_addition(first_pass, tmp_path):
    runs, expected = [], []
    for seed in (1, 2):
        workdir = str(tmp_path / f"sparse{seed}")
        exp, trained = save_run(workdir, sparse_config(first_pass[0]), scale=0.2, seed=seed)
        model = nnx.merge(exp.graphdef, exp.trainable, exp.frozen)
        masks = {p: np.asarray(m.mask.value) for p, m in module_paths(model).items()
                 if isinstance(m, SparseDense)}
        phis = flat(trained)
        expected.append({p: np.where(m, phis[p.replace(".", "/") + "/phi"], 0.0)
                         for p, m in masks.items()})
        runs.append(workdir)
    diffs = [sparse_diffs(w) for w in runs]
    for ours, ref in zip(diffs, expected, strict=True):
        assert ours.keys() == ref.keys()
        for p in ref:
            np.testing.assert_array_equal(ours[p], ref[p])
    total = add_sparse_diffs(diffs)
    for p in total:
        np.testing.assert_array_equal(total[p], expected[0][p] + expected[1][p])
    # θ0 + φ1 + φ2 in one base model ...
    config = tiny_config()
    merged = apply_sparse_diffs(build_base_model(config), total)
    w0 = flat(first_pass[1])
    for p, module in module_paths(merged).items():
        if p in total:
            np.testing.assert_allclose(np.asarray(module.kernel.value),
                                       w0[p.replace(".", "/") + "/kernel"] + total[p], atol=1e-6)
    # ... computes what the two sparse runs composed in parallel (as frozen sources) compute.
    exp = build(tiny_config(peft__method="none", peft__compose="parallel",
                            peft__sources=tuple(runs)))
    composed, merged_paths = module_paths(nnx.merge(exp.graphdef, exp.trainable, exp.frozen)), \
        module_paths(merged)
    for path in total:
        block = composed[path]
        assert isinstance(block, Composition) and len(block.adapters) == 2
        x = jnp.asarray(RNG.normal(size=(2, 3, block.base.in_features)), jnp.float32)
        np.testing.assert_allclose(block(x, Context()), merged_paths[path](x), rtol=1e-5,
                                   atol=1e-5)


# -------------------------------------------------------------------- composition blocks --


def bottleneck_source(name, model, paths, num_tasks=None):
    d = model.config.d_model
    modules = {}
    for path in paths:
        adapter = BottleneckAdapter(d, 8, activation="relu", scale=0.7, num_tasks=num_tasks,
                                    rngs=nnx.Rngs(len(modules)))
        randomize(adapter.down, adapter.up, scale=0.3)
        modules[path] = adapter
    return Source(name, "houlsby", modules)


def lora_source(name, model, paths):
    current = module_paths(model)
    modules = {}
    for path in paths:
        base = getattr(current[path], "base", current[path])  # under the new adapter, if any
        lora = LoRADense(base, rank=3, alpha=6.0, rngs=nnx.Rngs(len(modules)))
        randomize(lora.lora_b, scale=0.3)
        modules[path] = lora
    return Source(name, "lora", modules)


def bottleneck_delta(adapter, h, k=None):
    down, up = f64(adapter.down.value), f64(adapter.up.value)
    if k is not None:
        down, up = down[k], up[k]
    return adapter.scale * np.maximum(f64(h) @ down, 0.0) @ up


def lora_delta(lora, x):
    return lora.scale * (f64(x) @ f64(lora.lora_a.value)) @ f64(lora.lora_b.value)


FFN = "encoder.layers.1.post_ffn"
ATTN = "encoder.layers.1.post_attention"
Q = "decoder.layers.0.cross_attention.q"


def composed_model(compose, sources_of, method="none", mode="shared", **peft):
    """A tiny T5 with a new adapter (`method`) and in-memory sources attached by `attach`."""
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    config = PeftConfig(method=method, mode=mode, compose=compose, **peft)
    adapted = apply_peft(model, config, num_tasks=3, rngs=nnx.Rngs(1))
    for path in adapted:  # a new adapter that already learned something
        for v in jax.tree.leaves(nnx.state(module_paths(model)[path], Adapter),
                                 is_leaf=lambda v: isinstance(v, nnx.Variable)):
            randomize(v, scale=0.3)
    sources = sources_of(model)
    paths = attach(model, config, sources, adapted, num_tasks=3, rngs=nnx.Rngs(2))
    return model, sources, paths


@pytest.mark.parametrize("compose", ["stack", "parallel", "average"])
def test_residual_compositions_match_float64(compose):
    weights = (1.0, 3.0, 4.0) if compose == "average" else ()
    model, (a, b), paths = composed_model(
        compose, lambda m: [bottleneck_source("a", m, [ATTN, FFN]),
                            bottleneck_source("b", m, [FFN])],
        method="pfeiffer", mode="per_task", compose_weights=weights)
    block = module_paths(model)[FFN]
    assert isinstance(block, Composition) and len(block.adapters) == 3
    new = block.adapters[2]
    assert block.adapters[0] is a.modules[FFN] and block.adapters[1] is b.modules[FFN]
    assert {FFN, ATTN} <= set(paths) and len(module_paths(model)[ATTN].adapters) == 1
    h = RNG.normal(size=(2, 4, model.config.d_model)).astype(np.float32)
    ids = np.array([2, 0])
    ours = np.asarray(block(jnp.asarray(h), Context(task_ids=jnp.asarray(ids))))
    for i in range(2):
        x = f64(h[i])
        children = [lambda y: bottleneck_delta(a.modules[FFN], y),
                    lambda y: bottleneck_delta(b.modules[FFN], y),
                    lambda y, k=ids[i]: bottleneck_delta(new, y, k)]
        if compose == "stack":  # language adapter, then the next, then the task adapter
            ref = x
            for child in children:
                ref = ref + child(ref)
        else:
            w = np.array(weights or (1.0, 1.0, 1.0))
            w = w / w.sum() if compose == "average" else np.ones(3)
            ref = x + sum(wj * child(x) for wj, child in zip(w, children, strict=True))
        np.testing.assert_allclose(ours[i], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compose", ["parallel", "average"])
def test_projection_compositions_match_float64(compose):
    model, (a, b), _ = composed_model(
        compose, lambda m: [lora_source("a", m, [Q]), lora_source("b", m, [Q])],
        method="lora", targets=r".*cross_attention\.q", compose_weights=(
            (2.0, 1.0, 1.0) if compose == "average" else ()))
    block = module_paths(model)[Q]
    base = block.base
    assert isinstance(base, Dense) and all(c.base is base for c in block.adapters)  # one W0
    x = RNG.normal(size=(2, 4, model.config.d_model)).astype(np.float32)
    ours = np.asarray(block(jnp.asarray(x), Context()))
    w = np.array([0.5, 0.25, 0.25]) if compose == "average" else np.ones(3)
    ref = f64(x) @ f64(base.kernel.value) + sum(
        wj * lora_delta(c, x) for wj, c in zip(w, block.adapters, strict=True))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_stack_refuses_several_updates_of_one_projection():
    with pytest.raises(ValueError, match="stack.*parallel"):
        composed_model("stack", lambda m: [lora_source("a", m, [Q]), lora_source("b", m, [Q])])


def test_average_needs_one_weight_per_child():
    with pytest.raises(ValueError, match="compose_weights has 2 weights for 3 children"):
        composed_model("average", lambda m: [bottleneck_source("a", m, [FFN]),
                                             bottleneck_source("b", m, [FFN])],
                       method="pfeiffer", compose_weights=(1.0, 1.0))


# ---------------------------------------------------------------------------- ScaLearn --


@pytest.mark.parametrize("form", ["vector", "scalar", "vector_shared", "scalar_shared"])
@pytest.mark.parametrize("ids", [None, np.array([1, 2]),
                                 np.array([[0, 1, 1, 2], [2, 2, 0, 0]])])
def test_scalearn_matches_float64(form, ids):
    mode = "shared" if ids is None else "per_task"
    model, (a, b), _ = composed_model(
        "scalearn", lambda m: [bottleneck_source("a", m, [ATTN, FFN]),
                               bottleneck_source("b", m, [FFN])],
        mode=mode, scalearn_form=form)
    for path, children in ((FFN, (a, b)), (ATTN, (a,))):
        block = module_paths(model)[path]
        assert isinstance(block, ScaLearn)
        randomize(block.omega)
        h = RNG.normal(size=(2, 4, model.config.d_model)).astype(np.float32)
        ctx = Context(task_ids=None if ids is None else jnp.asarray(ids))
        ours = np.asarray(block(jnp.asarray(h), ctx))
        omega = f64(block.omega.value)
        for i in range(2):
            for t in range(4):
                table = omega if ids is None else omega[ids[i] if ids.ndim == 1 else ids[i, t]]
                ref = f64(h[i, t])
                for row, source in zip(block.rows, children, strict=True):
                    w = table[row] if form.startswith("vector") else table[row] * np.ones(
                        model.config.d_model)
                    ref = ref + w * bottleneck_delta(source.modules[path], h[i, t])
                np.testing.assert_allclose(ours[i, t], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form, per_site", [("vector", 8 * 64), ("scalar", 8),
                                             ("vector_shared", None), ("scalar_shared", None)])
@pytest.mark.parametrize("mode", ["shared", "per_task"])
def test_scalearn_parameter_counts(form, per_site, mode):
    ffn = [f"{part}.layers.{i}.post_ffn" for part in ("encoder", "decoder") for i in range(2)]
    model, _, _ = composed_model(
        "scalearn", lambda m: [bottleneck_source(f"s{i}", m, ffn) for i in range(8)],
        mode=mode, scalearn_form=form)
    _, trainable, frozen = nnx.split(model, Adapter, ...)
    shapes = [np.shape(v.get_value()) for _, v in nnx.to_flat_state(trainable)]
    count = sum(int(np.prod(s)) for s in shapes)
    per_task = {"vector": 4 * 8 * 64, "scalar": 4 * 8, "vector_shared": 8 * 64,
                "scalar_shared": 8}[form]
    assert per_site is None or per_task == 4 * per_site
    assert count == per_task * (3 if mode == "per_task" else 1)
    if form == "scalar_shared":  # ScaLearnUniform++: 8 transfer parameters per target task
        assert shapes == ([(3, 8)] if mode == "per_task" else [(8,)])
    assert all(isinstance(v, FrozenAdapter) for _, v in nnx.to_flat_state(frozen)
               if not isinstance(v, nnx.Param))


def test_scalearn_starts_as_the_average_of_its_sources():
    def sources(m):
        return [bottleneck_source("a", m, [FFN]), bottleneck_source("b", m, [FFN])]

    model, _, _ = composed_model("scalearn", sources, scalearn_form="vector")
    omega = np.asarray(module_paths(model)[FFN].omega.value)
    assert omega.shape == (2, 64) and np.abs(omega - 0.5).max() < 0.01


# ------------------------------------------------------------ sources from trained runs --


@pytest.fixture(scope="module")
def source_runs(tmp_path_factory):
    """Two trained shared adapters on the tiny base (seed 0): houlsby and pfeiffer."""
    root = tmp_path_factory.mktemp("sources")
    runs = {}
    for i, method in enumerate(("houlsby", "pfeiffer")):
        workdir = str(root / method)
        _, trained = save_run(workdir, tiny_config(peft__method=method), scale=0.2, seed=10 + i)
        runs[method] = (workdir, trained)
    return runs


def test_sources_stay_frozen_while_the_new_parameters_train(source_runs):
    # ScaLearn over the two sources and a new per-task adapter: ω and the new adapter train.
    sources = tuple(w for w, _ in source_runs.values())
    exp = build(tiny_config(peft__method="pfeiffer", peft__mode="per_task",
                            peft__compose="scalearn", peft__sources=sources))
    model = nnx.merge(exp.graphdef, exp.trainable, exp.frozen)
    block = module_paths(model)["decoder.layers.1.post_ffn"]
    assert len(block.adapters) == 3 and block.omega.value.shape == (13, 3, 64)
    assert len(module_paths(model)["decoder.layers.1.post_attention"].adapters) == 1  # houlsby
    # The sources' trained values, loaded bit for bit, as frozen state.
    saved = flat(source_runs["houlsby"][1])
    np.testing.assert_array_equal(np.asarray(block.adapters[0].up.value),
                                  saved["decoder/layers/1/post_ffn/up"])
    assert isinstance(block.adapters[0].up, FrozenAdapter)
    frozen_before, trainable_before = host(exp.frozen), flat(host(exp.trainable))
    trained = flat(train_steps(exp, steps=2))
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(host(exp.frozen)),
                    strict=True):
        np.testing.assert_array_equal(a, b)  # bit-identical
    assert trained.keys() == trainable_before.keys()
    assert {k.rsplit("/", 1)[1] for k in trained} == {"omega", "down", "up"}
    assert all(not np.array_equal(trained[k], trainable_before[k]) for k in trained), [
        k for k in trained if np.array_equal(trained[k], trainable_before[k])]


@pytest.mark.parametrize("change, match", [
    ({"seed": 1}, "trained on 'random init, seed 0'"),
    ({"model__size": "mini"}, "d_model is 64 there, 128 here"),
])
def test_a_source_of_another_base_is_refused(source_runs, change, match):
    workdir = source_runs["houlsby"][0]
    config = tiny_config(peft__method="none", peft__compose="parallel", peft__sources=(workdir,),
                         **change)
    with pytest.raises(ValueError, match=f"{workdir}.*does not fit the base.*{match}"):
        build(config)


def test_a_per_task_source_is_refused(tmp_path):
    save_run(tmp_path, tiny_config(peft__method="houlsby", peft__mode="per_task"))
    with pytest.raises(ValueError, match="mode='per_task'.*one shared adapter"):
        build(tiny_config(peft__method="none", peft__compose="stack",
                          peft__sources=(str(tmp_path),)))


# --------------------------------------------------------------------------- configs --


@pytest.fixture(scope="module")
def quick_sources(tmp_path_factory):
    """Saved sources for the configs' `:quick` variants (what their docstrings train)."""
    root = tmp_path_factory.mktemp("quick")
    dirs = {}
    for task in ("suite", *source_adapter.QUICK_TASKS):
        dirs[task] = str(root / task)
        save_run(dirs[task], source_adapter.get_config(f"quick,task={task}"), scale=0.05)
    dirs["full"] = str(root / "full")
    save_run(dirs["full"], full_config.get_config("quick"), scale=0.01)
    return dirs


def quick_config(module, dirs):
    config = module.get_config("quick")
    if module is sparse:
        assert config.peft.sparse_mask_from == "/tmp/full"  # where its docstring puts it
        config.peft.sparse_mask_from = dirs["full"]
    else:
        names = tuple(os.path.basename(p) for p in config.peft.sources)
        assert all(p.startswith(source_adapter.QUICK_SOURCES) for p in config.peft.sources)
        config.peft.sources = tuple(dirs[n] for n in names)
    return config


@pytest.mark.parametrize("module", [stack, average, scalearn, sparse])
def test_quick_configs_build_on_their_sources(module, quick_sources):
    exp = build(quick_config(module, quick_sources))
    assert exp.adapted_paths and exp.parameter_counts()["trainable"] > 0


@pytest.mark.slow
def test_quick_scalearn_trains_end_to_end(quick_sources, tmp_path):
    config = quick_config(scalearn, quick_sources)
    config.train.steps, config.data.eval_examples, config.train.progress = 4, 2, False
    config.data.mixture = "synthetic_reverse_shift"  # one task: a short final eval
    means = train_loop.train(config, str(tmp_path))
    assert means and all(np.isfinite(v) for v in means.values())
    exp, state = train_loop.restore_trained(config, str(tmp_path))
    assert int(state.step) == 4
