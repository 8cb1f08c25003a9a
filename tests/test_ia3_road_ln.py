"""(IA)^3, RoAd and layer-norm tuning: HF peft parity (torch), float64 recomputation per task,
identity at init on a tiny T5, and RoAd's group-size check."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax.models import T5, Context, preset
from peftjax.models.layers import Dense, RMSNorm
from peftjax.peft import PeftConfig, apply_peft
from peftjax.peft.ia3 import IA3Dense
from peftjax.peft.norm_tuning import TunedRMSNorm
from peftjax.peft.road import RoadDense

RNG = np.random.default_rng(0)
IDS = {"shared": None, "example": np.array([2, 0, 1]),
       "token": np.array([[0, 0, 1, 2], [2, 2, 2, 2], [1, 0, 2, 1]])}
VARIANTS = ("road_1", "road_2", "road_4")


def f64(x):
    return np.asarray(x, dtype=np.float64)


def dense(d_in, d_out, seed=0):
    return Dense(d_in, d_out, axes=("embed", "mlp"), std=0.5, rngs=nnx.Rngs(seed))


def randomize(variable, mean=0.0):
    variable.value = jnp.asarray(mean + RNG.normal(size=variable.value.shape), jnp.float32)


def token_task(ids, i, t):
    """The task of token (i, t), or None for shared weights."""
    if ids is None:
        return None
    return ids[i] if ids.ndim == 1 else ids[i, t]


def row(table, task):
    return f64(table) if task is None else f64(table)[task]


def road_matrix(theta, alpha, variant, g):
    """Float64 `[out, out]` block rotation R (y' = R y) built pair by pair from peft's layout."""
    h = g // 2
    size = {"road_1": len(theta) * 2, "road_2": len(theta), "road_4": len(theta) // 2}[variant]
    r = np.zeros((size, size))
    for i in range(size):
        group, e = divmod(i, g)
        if variant == "road_1":  # one (theta, alpha) per pair
            k = group * h + e % h
            c1, c2 = alpha[k] * np.cos(theta[k]), alpha[k] * np.sin(theta[k])
        elif variant == "road_2":  # one per element
            c1, c2 = alpha[i] * np.cos(theta[i]), alpha[i] * np.sin(theta[i])
        else:  # per group [2, g]: row 0 for the cos term, row 1 for the sin term
            k0, k1 = group * 2 * g + e, group * 2 * g + g + e
            c1, c2 = alpha[k0] * np.cos(theta[k0]), alpha[k1] * np.sin(theta[k1])
        partner = i + h if e < h else i - h
        r[i, i] = c1
        r[i, partner] = -c2 if e < h else c2  # first half: c1 y_i - c2 y_j; second: + c2 y_i
    return r


# --- HF peft parity (torch) ---------------------------------------------------------------------

def torch_model(names_shapes):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (d_in, d_out) in names_shapes.items():
                setattr(self, name, torch.nn.Linear(d_in, d_out, bias=False))

    torch.manual_seed(0)
    return Net()


def ours_from_torch(linear):
    base = dense(linear.in_features, linear.out_features)
    base.kernel.value = jnp.asarray(linear.weight.detach().numpy().T)
    return base


def test_ia3_matches_hf_peft():
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    shapes = {"k": (12, 16), "v": (12, 8), "wo": (16, 12)}
    model = peft.get_peft_model(torch_model(shapes), peft.IA3Config(
        target_modules=["k", "v", "wo"], feedforward_modules=["wo"]))
    x = RNG.normal(size=(2, 3, 16)).astype(np.float32)
    for name, (d_in, _) in shapes.items():
        layer = getattr(model.base_model.model, name)
        with torch.no_grad():
            layer.ia3_l["default"].copy_(torch.randn_like(layer.ia3_l["default"]))
        ours = IA3Dense(ours_from_torch(layer.base_layer), feedforward=name == "wo")
        ours.ia3_l.value = jnp.asarray(layer.ia3_l["default"].detach().numpy().reshape(-1))
        assert ours.feedforward == layer.is_feedforward
        with torch.no_grad():
            ref = layer(torch.from_numpy(x[..., :d_in])).numpy()
        np.testing.assert_allclose(ours(jnp.asarray(x[..., :d_in]), Context()), ref,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_road_matches_hf_peft(variant):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    shapes = {"q": (10, 16), "v": (10, 24)}
    model = peft.get_peft_model(torch_model(shapes), peft.RoadConfig(
        target_modules=["q", "v"], variant=variant, group_size=8))
    x = RNG.normal(size=(2, 3, 10)).astype(np.float32)
    for name in shapes:
        layer = getattr(model.base_model.model, name)
        ours = RoadDense(ours_from_torch(layer.base_layer), variant=variant, group_size=8)
        for ours_p, theirs in ((ours.road_theta, layer.road_theta), (ours.road_alpha,
                                                                      layer.road_alpha)):
            assert ours_p.value.shape == tuple(theirs["default"].shape)  # a 1:1 import
            np.testing.assert_array_equal(ours_p.value, theirs["default"].detach().numpy())
            with torch.no_grad():
                theirs["default"].copy_(torch.randn_like(theirs["default"]))
            ours_p.value = jnp.asarray(theirs["default"].detach().numpy())
        with torch.no_grad():
            ref = layer(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(ours(jnp.asarray(x), Context()), ref, rtol=1e-5, atol=1e-5)


# --- per-task selection against float64 ---------------------------------------------------------

@pytest.mark.parametrize("ids", list(IDS), ids=list(IDS))
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_per_task_matches_float64(ids, feedforward):
    ids = IDS[ids]
    layer = IA3Dense(dense(6, 10), feedforward=feedforward,
                     num_tasks=None if ids is None else 3)
    randomize(layer.ia3_l, mean=1.0)
    x = RNG.normal(size=(3, 4, 6)).astype(np.float32)
    ours = np.asarray(layer(jnp.asarray(x), Context(task_ids=None if ids is None
                                                    else jnp.asarray(ids))))
    w = f64(layer.base.kernel.value)
    for i in range(3):
        for t in range(4):
            scale = row(layer.ia3_l.value, token_task(ids, i, t))
            ref = (scale * f64(x[i, t])) @ w if feedforward else scale * (f64(x[i, t]) @ w)
            np.testing.assert_allclose(ours[i, t], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ids", list(IDS), ids=list(IDS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_road_per_task_matches_float64(ids, variant):
    ids = IDS[ids]
    layer = RoadDense(dense(6, 8), variant=variant, group_size=4,
                      num_tasks=None if ids is None else 3)
    randomize(layer.road_theta)
    randomize(layer.road_alpha, mean=1.0)
    x = RNG.normal(size=(3, 4, 6)).astype(np.float32)
    ours = np.asarray(layer(jnp.asarray(x), Context(task_ids=None if ids is None
                                                    else jnp.asarray(ids))))
    w = f64(layer.base.kernel.value)
    for i in range(3):
        for t in range(4):
            task = token_task(ids, i, t)
            r = road_matrix(row(layer.road_theta.value, task), row(layer.road_alpha.value, task),
                            variant, 4)
            np.testing.assert_allclose(ours[i, t], r @ (f64(x[i, t]) @ w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ids", list(IDS), ids=list(IDS))
def test_norm_tuning_per_task_matches_float64(ids):
    ids = IDS[ids]
    base = RMSNorm(6, eps=1e-6)
    randomize(base.scale, mean=1.0)
    norm = TunedRMSNorm(base, num_tasks=None if ids is None else 3)
    np.testing.assert_array_equal(norm.scale.value,  # a copy of the base scale per task
                                  np.broadcast_to(base.scale.value, norm.scale.value.shape))
    randomize(norm.scale, mean=1.0)
    x = RNG.normal(size=(3, 4, 6)).astype(np.float32)
    ours = np.asarray(norm(jnp.asarray(x), Context(task_ids=None if ids is None
                                                   else jnp.asarray(ids))))
    for i in range(3):
        for t in range(4):
            v = f64(x[i, t])
            ref = v / np.sqrt(np.mean(v * v) + 1e-6) * row(norm.scale.value, token_task(ids, i, t))
            np.testing.assert_allclose(ours[i, t], ref, rtol=1e-5, atol=1e-5)


# --- on a tiny T5 -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ia3", "ln_tuning", "road"])
@pytest.mark.parametrize("mode", ["shared", "per_task"])
def test_init_leaves_logits_unchanged(method, mode):
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    enc = jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])
    dec = jnp.array([[0, 5, 6], [0, 7, 8]])
    before = model(enc, dec)
    paths = apply_peft(model, PeftConfig(method=method, mode=mode), num_tasks=3,
                       rngs=nnx.Rngs(1))
    assert paths
    np.testing.assert_array_equal(before, model(enc, dec, task_ids=jnp.array([0, 2])))
    np.testing.assert_array_equal(before, model(
        enc, dec, encoder_task_ids=jnp.array([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]]),
        decoder_task_ids=jnp.array([[1, 1, 0], [2, 0, 2]])))


def test_default_targets_follow_hf_peft_for_t5():
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    paths = apply_peft(model, PeftConfig(method="ia3"), num_tasks=None, rngs=nnx.Rngs(1))
    assert {p.rsplit(".", 1)[1] for p in paths} == {"k", "v", "wo"}
    mlp, attention = model.encoder.layers[0].mlp, model.encoder.layers[0].self_attention
    assert mlp.wo.feedforward and mlp.wo.ia3_l.value.shape == (preset("tiny").d_ff,)
    assert not attention.k.feedforward
    road = apply_peft(T5(preset("tiny"), rngs=nnx.Rngs(0)), PeftConfig(method="road"),
                      num_tasks=None, rngs=nnx.Rngs(1))
    assert {p.rsplit(".", 1)[1] for p in road} == {"q", "v"}
    norms = apply_peft(T5(preset("tiny"), rngs=nnx.Rngs(0)), PeftConfig(method="ln_tuning"),
                       num_tasks=None, rngs=nnx.Rngs(1))
    assert "encoder.final_norm" in norms and "decoder.layers.1.cross_attention_norm" in norms


@pytest.mark.parametrize("group_size, hint", [(12, "e.g. 8"), (5, "e.g. 4"), (32, "e.g. 16")])
def test_road_group_size_that_does_not_tile_the_output_is_refused(group_size, hint):
    with pytest.raises(ValueError, match=f"config.peft.road_group_size.*{hint}"):
        RoadDense(dense(4, 16), group_size=group_size)


def test_road_group_size_error_names_the_module():
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))  # q, v: 64 wide
    with pytest.raises(ValueError, match=r"road_group_size.*attention\.q.*e\.g\. 32"):
        apply_peft(model, PeftConfig(method="road", road_group_size=48), num_tasks=None,
                   rngs=nnx.Rngs(1))
