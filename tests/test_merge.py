"""Folding LoRA in and out, task vectors, merges (vs HF peft's merge_utils), SVD re-compression."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft.utils import merge_utils

from peftjax.models import T5, preset
from peftjax.models.layers import Dense
from peftjax.peft import PeftConfig, PeftParam, apply_peft
from peftjax.peft import fold as F
from peftjax.peft import merge as M
from peftjax.peft.lora import LoRADense
from peftjax.peft.variables import Adapter

RNG = np.random.default_rng(0)
ENC = jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])
DEC = jnp.array([[0, 5, 6], [0, 7, 8]])


def f64(x):
    return np.asarray(x, dtype=np.float64)


# Every kind of projection (q, k, v, o, wi_0, wi_1, wo; self and cross attention; lm_head) once.
SITES = r"(encoder|decoder)\.layers\.0\..*|lm_head"


def lora_model(mode="per_task", targets=SITES, num_tasks=3, rank=2, dora=False):
    """Tiny T5 with non-initial (random, O(0.3)) LoRA factors everywhere `targets` matches."""
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    apply_peft(model, PeftConfig(method="lora", mode=mode, targets=targets, rank=rank,
                                 alpha=2.0 * rank, dora=dora),
               num_tasks=num_tasks, rngs=nnx.Rngs(1))
    for lora in F.lora_sites(model).values():
        for v in (lora.lora_a, lora.lora_b):
            v.set_value(jnp.asarray(0.3 * RNG.normal(size=v.get_value().shape), jnp.float32))
    return model


@pytest.fixture(scope="module")
def per_task():
    """Shared by the tests below, which never modify it (every function here is pure)."""
    return lora_model("per_task")


def assert_logits_close(ours, ref, rel=2e-5):
    scale = float(np.max(np.abs(ref)))
    assert float(np.max(np.abs(np.asarray(ours) - np.asarray(ref)))) <= rel * scale, scale


# ---------------------------------------------------------------- fold / unfold


@pytest.mark.parametrize("mode, task", [("shared", None), ("per_task", 2)])
def test_fold_equals_lora_forward_and_is_a_plain_model(mode, task, per_task):
    model = per_task if mode == "per_task" else lora_model(mode)
    ids = None if task is None else jnp.array([task, task])
    ref = model(ENC, DEC, task_ids=ids)
    before = jax.tree.map(np.asarray, nnx.state(model))
    folded = F.fold_lora(model, task=task)
    assert not F.lora_sites(folded)
    plain = nnx.state(T5(preset("tiny"), rngs=nnx.Rngs(0)), nnx.Param)
    assert jax.tree.structure(nnx.state(folded, nnx.Param)) == jax.tree.structure(plain)
    assert_logits_close(folded(ENC, DEC), ref)
    # The LoRA changed the logits (the test can fail) and the input model is untouched.
    if mode == "shared":
        assert not np.allclose(F.strip_lora(model)(ENC, DEC), ref, atol=1e-3)
    jax.tree.map(np.testing.assert_array_equal, before,
                 jax.tree.map(np.asarray, nnx.state(model)))


def test_fold_kernel_matches_float64(per_task):
    lora = F.lora_sites(per_task)["encoder.layers.0.mlp.wo"]
    a, b, w0 = (f64(v.get_value()) for v in (lora.lora_a, lora.lora_b, lora.base.kernel))
    ref = w0 + lora.scale * a[1] @ b[1]
    folded = F.fold_lora(per_task, task=1)
    np.testing.assert_allclose(folded.encoder.layers[0].mlp.wo.kernel.get_value(), ref,
                               rtol=1e-6, atol=1e-6)


def test_unfold_recovers_w0_within_the_documented_bound(per_task):
    model = per_task
    folded = F.fold_lora(model, task=1)
    back = F.unfold_lora(folded, model, task=1)
    eps = float(jnp.finfo(jnp.float32).eps)
    lora_back = F.lora_sites(back)
    worst = 0.0
    for path, lora in F.lora_sites(model).items():
        w0 = f64(lora.base.kernel.get_value())
        wf = f64(F._variable(folded, (*F._split_path(path), "kernel")).get_value())
        err = np.abs(f64(lora_back[path].base.kernel.get_value()) - w0)
        assert np.all(err <= eps * (np.abs(w0) + np.abs(wf))), path
        worst = max(worst, float(np.max(err)))
        np.testing.assert_array_equal(lora_back[path].lora_a.get_value(),
                                      lora.lora_a.get_value())
    assert worst > 0  # rounding really is lost: a bit-exact check would be wrong
    # Everything else comes back exactly (tree structure included).
    others = nnx.state(back, nnx.Param), nnx.state(model, nnx.Param)
    assert jax.tree.structure(others[0]) == jax.tree.structure(others[1])
    np.testing.assert_array_equal(back.shared.embedding.get_value(),
                                  model.shared.embedding.get_value())


def test_unfold_is_not_bit_exact_when_the_delta_dwarfs_w0():
    w0 = jnp.array([[1e-9, 0.1]], jnp.float32)
    d = jnp.array([[1.0, 3.0]], jnp.float32)
    wf = F.fold_kernel(w0, d)
    back = F.unfold_kernel(wf, d)
    assert float(back[0, 0]) == 0.0  # W0's 1e-9 fell below the ulp of 1.0
    assert float(back[0, 1]) != float(w0[0, 1])  # 0.1's low bits were rounded off in 3.1
    eps = float(jnp.finfo(jnp.float32).eps)
    assert np.all(np.abs(f64(back) - f64(w0)) <= eps * (np.abs(f64(w0)) + np.abs(f64(wf))))


def test_fold_and_unfold_on_the_training_split(per_task):
    graphdef, trainable, frozen = nnx.split(per_task, PeftParam, ...)
    g, state = F.fold_lora_split(graphdef, trainable, frozen, task=0)
    jax.tree.map(np.testing.assert_array_equal, state,
                 nnx.state(F.fold_lora(per_task, task=0)))
    g2, trainable2, frozen2 = F.unfold_lora_split((g, state), (graphdef, trainable, frozen),
                                                  task=0)
    jax.tree.map(np.testing.assert_array_equal, trainable2, trainable)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6),
                 frozen2, frozen)


def test_fold_errors_name_the_fix():
    base = Dense(6, 5, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0))
    model = nnx.Dict(site=LoRADense(base, rank=2, alpha=4.0, num_tasks=3, rngs=nnx.Rngs(1)))
    with pytest.raises(ValueError, match="pass task=k"):
        F.fold_lora(model)
    with pytest.raises(ValueError, match="out of range"):
        F.fold_lora(model, task=3)
    with pytest.raises(ValueError, match="no LoRADense"):
        F.fold_lora(nnx.Dict(site=base))
    shared = nnx.Dict(site=LoRADense(base, rank=2, alpha=4.0, rngs=nnx.Rngs(1)))
    np.testing.assert_array_equal(F.fold_lora(shared, task=2)["site"].kernel.get_value(),
                                  F.fold_lora(shared)["site"].kernel.get_value())


def test_dora_fold_formula_and_refused_unfold():
    """DoRA: W' = m (W0 + sAB) / ‖W0 + sAB‖_col (norm over `in`, per output column)."""
    base = Dense(6, 5, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0))
    lora = LoRADense(base, rank=2, alpha=4.0, num_tasks=2, dora=True, rngs=nnx.Rngs(1))
    lora.lora_b.set_value(jnp.asarray(RNG.normal(size=(2, 2, 5)), jnp.float32))
    m = RNG.uniform(0.5, 2.0, size=(2, 5))
    lora.lora_magnitude.set_value(jnp.asarray(m, jnp.float32))
    v = f64(base.kernel.get_value()) + 2.0 * f64(lora.lora_a.get_value())[1] @ f64(
        lora.lora_b.get_value())[1]
    ref = m[1] * v / np.linalg.norm(v, axis=0)
    np.testing.assert_allclose(F.folded_kernel(lora, 1), ref, rtol=1e-5, atol=1e-6)
    holder = nnx.Dict(site=lora)
    with pytest.raises(ValueError, match="not invertible"):
        F.unfold_lora(F.fold_lora(holder, task=1), holder, task=1)


def test_dora_fold_equals_dora_forward():
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    apply_peft(model, PeftConfig(method="lora", mode="per_task", dora=True), num_tasks=2,
               rngs=nnx.Rngs(1))
    for lora in F.lora_sites(model).values():
        for v in (lora.lora_a, lora.lora_b, lora.lora_magnitude):
            x = v.get_value()
            v.set_value(x + jnp.asarray(0.2 * RNG.normal(size=x.shape), x.dtype))
    ref = model(ENC, DEC, task_ids=jnp.array([1, 1]))
    assert_logits_close(F.fold_lora(model, task=1)(ENC, DEC), ref)


# ---------------------------------------------------------------- task vectors


def test_lora_task_vectors_are_scaled_products(per_task):
    model = per_task
    vectors = F.task_vectors(model)
    sites = F.lora_sites(model)
    assert set(vectors) == {f"{p}.kernel" for p in sites}
    lora = sites["decoder.layers.0.cross_attention.v"]
    tau = vectors["decoder.layers.0.cross_attention.v.kernel"]
    assert tau.shape == (3, 64, 64)
    a, b = f64(lora.lora_a.get_value()), f64(lora.lora_b.get_value())
    np.testing.assert_allclose(tau, lora.scale * np.einsum("tir,tro->tio", a, b),
                               rtol=1e-5, atol=1e-6)
    # Adding task 2's vector to the stripped base is folding task 2.
    one = {k: v[2] for k, v in vectors.items()}
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6),
                 nnx.state(F.add_task_vector(F.strip_lora(model), one)),
                 nnx.state(F.fold_lora(model, task=2)))


def test_full_fine_tuning_task_vectors_and_task_arithmetic():
    base = T5(preset("tiny"), rngs=nnx.Rngs(0))
    runs = []
    for seed in (1, 2):
        run = nnx.clone(base)
        for _, v in nnx.to_flat_state(nnx.state(run, nnx.Param)):
            x = v.get_value()
            v.set_value(x + jnp.asarray(0.01 * np.random.default_rng(seed).normal(
                size=x.shape), x.dtype))
        runs.append(run)
    vectors = F.task_vectors(runs, base)
    key = "encoder.layers.1.mlp.wi_0.kernel"
    w = [f64(r.encoder.layers[1].mlp.wi_0.kernel.get_value()) for r in (base, *runs)]
    np.testing.assert_allclose(vectors[key], np.stack([w[1] - w[0], w[2] - w[0]]), atol=1e-7)
    # The training split for method='full' (trainable = every Param) gives the same vectors.
    from_states = F.task_vectors([nnx.split(r, nnx.Param, ...)[1] for r in runs],
                                 nnx.split(base, nnx.Param, ...)[1])
    jax.tree.map(np.testing.assert_array_equal, from_states, vectors)
    merged = F.add_task_vector(base, M.merge_tree(vectors, "linear", jnp.array([0.5, 1.5])),
                               scale=2.0)
    np.testing.assert_allclose(merged.encoder.layers[1].mlp.wi_0.kernel.get_value(),
                               w[0] + 2.0 * (0.5 * (w[1] - w[0]) + 1.5 * (w[2] - w[0])),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- merges vs HF peft


def stacked(t=3, shape=(7, 6), seed=0):
    return np.random.default_rng(seed).normal(size=(t, *shape)).astype(np.float32)


WEIGHTS = np.array([0.5, 1.0, 0.7], np.float32)


def peft_inputs(tau):
    return [torch.from_numpy(x.copy()) for x in tau], torch.from_numpy(WEIGHTS)


@pytest.mark.parametrize("density", [0.0, 0.3, 0.75, 1.0])
def test_linear_magnitude_prune_and_ties_match_peft(density):
    tau = stacked()
    ts, w = peft_inputs(tau)
    cases = [
        (M.task_arithmetic(jnp.asarray(tau), WEIGHTS), merge_utils.task_arithmetic(ts, w)),
        (M.magnitude_prune(jnp.asarray(tau), WEIGHTS, density=density),
         merge_utils.magnitude_prune(ts, w, density)),
    ]
    for sign in ("total", "frequency"):
        cases.append((M.ties(jnp.asarray(tau), WEIGHTS, density=density,
                             majority_sign_method=sign),
                      merge_utils.ties(ts, w, density, sign)))
    for ours, theirs in cases:
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-6)


def test_ties_disjoint_mean_counts_agreeing_tasks():
    """Entry by entry: trimmed to nothing, the elected sign is + and the mean is over agreeing
    tasks only (count, not weight mass)."""
    tau = np.array([[[3.0, -1.0]], [[-1.0, -2.0]], [[2.0, 0.5]]], np.float32)
    ours = M.ties(jnp.asarray(tau), jnp.array([1.0, 1.0, 2.0]), density=1.0)
    np.testing.assert_allclose(ours, [[(3.0 + 2 * 2.0) / 2, (-1.0 - 2.0) / 2]])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_peft_given_the_same_masks(method, monkeypatch):
    tau = stacked()
    density, key = 0.6, jax.random.key(3)
    masks = iter(np.asarray(M.dare_mask(key, tau.shape, density), np.float32))
    drawn = []

    def bernoulli(p):  # peft draws one mask per task, in order: hand it ours
        assert np.allclose(p.numpy(), density)
        drawn.append(1)
        return torch.from_numpy(next(masks))

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    ts, w = peft_inputs(tau)
    theirs = (merge_utils.dare_linear(ts, w, density) if method == "dare_linear"
              else merge_utils.dare_ties(ts, w, density))
    ours = M.merge(jnp.asarray(tau), method, WEIGHTS, density=density, key=key)
    assert len(drawn) == 3
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-6)


def test_dare_drops_a_p_fraction_and_keeps_the_mean():
    tau = jnp.ones((1, 200, 200))
    dropped = M.dare_drop(tau, 0.25, jax.random.key(0))
    kept = float(jnp.mean(dropped != 0))
    assert abs(kept - 0.25) < 0.01
    assert abs(float(jnp.mean(dropped)) - 1.0) < 0.04
    np.testing.assert_allclose(np.unique(np.asarray(dropped)), [0.0, 4.0])
    with pytest.raises(ValueError, match="pass key"):
        M.merge(tau, "dare_ties", density=0.5)


def test_merge_tree_merges_every_leaf_and_jits():
    tree = {"a": jnp.asarray(stacked(seed=1)), "b": [jnp.asarray(stacked(shape=(4,), seed=2))]}
    merged = M.merge_tree(tree, "ties", WEIGHTS, density=0.5)
    np.testing.assert_allclose(merged["b"][0],
                               M.ties(tree["b"][0], WEIGHTS, density=0.5), rtol=1e-6)
    jitted = jax.jit(lambda t, k: M.merge_tree(t, "dare_ties", WEIGHTS, density=0.5, key=k))
    key = jax.random.key(0)
    np.testing.assert_allclose(jitted(tree, key)["a"],
                               M.dare_ties(tree["a"], WEIGHTS, density=0.5,
                                           key=jax.random.fold_in(key, 0)), rtol=1e-6)


# ---------------------------------------------------------------- SVD re-compression


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_compress_meets_eckart_young(rank):
    delta = RNG.normal(size=(12, 9)).astype(np.float32)
    a, b = M.svd_compress(jnp.asarray(delta), rank, scale=0.5)
    assert a.shape == (12, rank) and b.shape == (rank, 9)
    err2 = np.sum((f64(delta) - 0.5 * f64(a) @ f64(b)) ** 2)
    s = np.linalg.svd(f64(delta), compute_uv=False)
    np.testing.assert_allclose(err2, np.sum(s[rank:] ** 2), rtol=1e-4)


@pytest.mark.parametrize("rank", [2, 4, 15])
def test_svd_compress_is_exact_when_the_delta_has_rank_at_most_r(rank):
    delta = RNG.normal(size=(12, 2)) @ RNG.normal(size=(2, 9))
    a, b = M.svd_compress(jnp.asarray(delta, jnp.float32), rank, scale=2.0)
    assert a.shape == (12, rank) and b.shape == (rank, 9)  # padded past min(in, out)
    np.testing.assert_allclose(2.0 * f64(a) @ f64(b), delta, atol=1e-5)


def test_lowrank_compress_equals_dense_svd_of_the_lora_sum():
    a = jnp.asarray(RNG.normal(size=(3, 10, 2)), jnp.float32)
    b = jnp.asarray(RNG.normal(size=(3, 2, 8)), jnp.float32)
    coef = jnp.array([0.2, -1.0, 0.6])
    left, right = M.stack_loras(a, b, coef)
    dense = np.einsum("t,tir,tro->io", f64(coef), f64(a), f64(b))
    np.testing.assert_allclose(f64(left) @ f64(right), dense, atol=1e-5)
    for rank in (3, 6):
        la, lb = M.lowrank_compress(left, right, rank)
        da, db = M.svd_compress(jnp.asarray(dense, jnp.float32), rank)
        np.testing.assert_allclose(f64(la) @ f64(lb), f64(da) @ f64(db), atol=1e-4)


# ---------------------------------------------------------------- per-task -> one shared LoRA


def test_merged_shared_lora_reproduces_the_average_delta(per_task):
    model = per_task  # 3 tasks, rank 2
    mean = {k: np.mean(f64(v), axis=0) for k, v in F.task_vectors(model).items()}
    merged = F.merge_lora_tasks(model, rank=6)  # >= T r: exact
    for path, lora in F.lora_sites(merged).items():
        assert lora.lora_a.get_value().shape == (lora.base.in_features, 6)
        assert isinstance(lora.lora_a, Adapter) and lora.lora_magnitude is None
        assert lora.scale == F.lora_sites(model)[path].scale
        np.testing.assert_allclose(f64(F.site_delta(lora)), mean[f"{path}.kernel"], atol=2e-5)
    # A shared model: no task ids needed, and it computes W0 + mean delta.
    plain = F.add_task_vector(F.strip_lora(model), {k: jnp.asarray(v, jnp.float32)
                                                    for k, v in mean.items()})
    assert_logits_close(merged(ENC, DEC), plain(ENC, DEC))
    # Below T r: the best rank-r approximation of the mean delta (Eckart-Young).
    low = F.merge_lora_tasks(model, rank=2, scale=1.0)
    lora = F.lora_sites(low)["encoder.layers.0.self_attention.q"]
    target = mean["encoder.layers.0.self_attention.q.kernel"]
    s = np.linalg.svd(target, compute_uv=False)
    err2 = np.sum((f64(F.site_delta(lora)) - target) ** 2)
    np.testing.assert_allclose(err2, np.sum(s[2:] ** 2), rtol=1e-3)


def test_merged_shared_lora_with_ties_matches_peft_on_the_task_deltas():
    base = Dense(24, 16, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(0))
    model = nnx.Dict(v=LoRADense(base, rank=2, alpha=4.0, num_tasks=3, rngs=nnx.Rngs(1)))
    model["v"].lora_b.set_value(jnp.asarray(RNG.normal(size=(3, 2, 16)), jnp.float32))
    merged = F.merge_lora_tasks(model, rank=16, method="ties", weights=WEIGHTS, density=0.3)
    ts, w = peft_inputs(np.asarray(F.task_vectors(model)["v.kernel"]))
    theirs = merge_utils.ties(ts, w, 0.3).numpy()
    ours = F.site_delta(merged["v"])
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    assert np.mean(theirs == 0) > 0.3  # TIES really trimmed (a full-rank, sparse delta)
