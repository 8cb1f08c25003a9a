"""AdapterFusion and Arrow: activation-space routers over a library of frozen trained adapters.

Fusion is checked against a float64 recomputation of AdapterHub's dynamic fusion; Arrow against
HF peft's `ArrowLoraLinearLayer` (torch) and a float64 recomputation. Sources are hand-made
(`attach`) or saved as `peftjax train` saves them (no long training); one slow test runs a
zero-step Arrow run through the CLI.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import arrow as arrow_config
from configs import fusion as fusion_config
from configs import lora as lora_config
from configs import source_adapter
from peftjax.checkpoint import Checkpoints
from peftjax.data import task_id_of, task_names
from peftjax.models import T5, Context, preset
from peftjax.models.layers import Dense
from peftjax.peft import Adapter, FrozenAdapter, PeftConfig, PeftParam, apply_peft, module_paths
from peftjax.peft.bottleneck import BottleneckAdapter
from peftjax.peft.compose import Composition, Source, attach
from peftjax.peft.lora import LoRADense
from peftjax.peft.runs import freeze
from peftjax.peft.variables import Router
from peftjax.routing.arrow import Arrow, arrow_block, top_singular_vector
from peftjax.routing.fusion import REG_COEF, Fusion
from peftjax.routing.record import capture
from peftjax.train import build
from peftjax.train import loop as train_loop
from tests.helpers import run_peftjax, save_run, shared_compile_cache, tiny_config

RNG = np.random.default_rng(0)
FFN = "encoder.layers.1.post_ffn"
Q = "decoder.layers.0.cross_attention.q"


def f64(x):
    return np.asarray(x, dtype=np.float64)


def randomize(*variables, scale=1.0):
    for v in variables:
        v.value = jnp.asarray(scale * RNG.normal(size=v.value.shape), jnp.float32)


def softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def recorded(module, x):
    """`(output, the one recorded weights array, aux loss)` of one eval call under `capture`."""
    out, weights, aux = capture(lambda m, x: m(x, Context()))(module, jnp.asarray(x))
    assert list(weights) == ["/weights"]
    return np.asarray(out), np.asarray(weights["/weights"]), float(aux)


def bottleneck_source(name, d, paths, scale=0.3):
    modules = {}
    for path in paths:
        adapter = BottleneckAdapter(d, 8, scale=0.7, rngs=nnx.Rngs(len(modules)))
        randomize(adapter.down, adapter.up, scale=scale)
        modules[path] = adapter
    return Source(name, "houlsby", modules)


def lora_source(name, model, paths, *, rank=3, seed=0):
    current = module_paths(model)
    modules = {}
    for path in paths:
        base = getattr(current[path], "base", current[path])
        lora = LoRADense(base, rank=rank, alpha=2.0 * rank, rngs=nnx.Rngs(seed))
        randomize(lora.lora_b, scale=0.3)
        modules[path] = lora
    return Source(name, "lora", modules)


def composed(compose, sources_of, method="none", **peft):
    """A tiny T5 with in-memory sources attached under `compose`."""
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    config = PeftConfig(method=method, compose=compose, **peft)
    adapted = apply_peft(model, config, num_tasks=3, rngs=nnx.Rngs(1))
    attach(model, config, sources_of(model), adapted, num_tasks=3, rngs=nnx.Rngs(2))
    return model


# ------------------------------------------------------------------------- AdapterFusion --


def fusion_ref(block, x, outputs, residual):
    """AdapterHub's dynamic fusion in float64: `outputs` `[b, t, n, w]` are the a_i."""
    q = f64(x) @ f64(block.query.value) + f64(block.query_bias.value)
    k = outputs @ f64(block.key.value)
    alpha = softmax(np.einsum("btw,btnw->btn", q, k))
    v = outputs @ f64(block.value.value)
    fused = np.einsum("btn,btnw->btw", alpha, v)
    return (fused if residual is None else residual + fused), alpha


def randomize_fusion(block):
    randomize(block.query, block.key, scale=0.3)
    randomize(block.query_bias, scale=0.5)
    block.value.value = jnp.asarray(np.eye(block.value.value.shape[0])
                                    + 0.2 * RNG.normal(size=block.value.value.shape), jnp.float32)


def test_fusion_at_a_residual_hook_matches_float64():
    d = 64
    model = composed("fusion", lambda m: [bottleneck_source("a", d, [FFN]),
                                          bottleneck_source("b", d, [FFN]),
                                          bottleneck_source("c", d, [FFN])])
    block = module_paths(model)[FFN]
    assert isinstance(block, Fusion) and len(block.adapters) == 3
    # Only the fusion trains: four Router variables per site, the sources frozen.
    _, trainable, frozen = nnx.split(model, PeftParam, ...)
    shapes = {"/".join(map(str, k)): v.get_value().shape
              for k, v in nnx.to_flat_state(trainable)}
    assert all(isinstance(v, Router) for _, v in nnx.to_flat_state(trainable))
    assert {k.rsplit("/", 1)[1] for k in shapes} == {"query", "query_bias", "key", "value"}
    assert shapes[FFN.replace(".", "/") + "/value"] == (d, d) and len(shapes) == 4
    assert isinstance(block.adapters[0].up, FrozenAdapter)
    assert block.query.get_metadata()["axes"] == ("embed", "embed")

    randomize_fusion(block)
    h = RNG.normal(size=(2, 5, d)).astype(np.float32)
    ours, alpha, aux = recorded(block, h)
    outputs = np.stack([f64(a.delta(jnp.asarray(h), Context())) for a in block.adapters], -2)
    ref, ref_alpha = fusion_ref(block, h, outputs, residual=f64(h))
    assert alpha.shape == (2, 5, 3)
    np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-4, atol=1e-5)
    assert ref_alpha.max() > 0.9 and ref_alpha.min() < 0.05  # a far-from-uniform attention
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    # AdapterHub's regularisation 0.01 ‖I - W_V‖², through the aux loss.
    expected = REG_COEF * np.sum((np.eye(d) - f64(block.value.value)) ** 2)
    np.testing.assert_allclose(aux, expected, rtol=1e-5)


def test_fusion_at_a_projection_matches_float64():
    # At a Dense site a_i is the whole projection under child i, f(x) + Δ_i(x); a new LoRA too.
    model = composed("fusion", lambda m: [lora_source("a", m, [Q], seed=1),
                                          lora_source("b", m, [Q], seed=2)],
                     method="lora", targets=r".*cross_attention\.q")
    block = module_paths(model)[Q]
    assert isinstance(block, Fusion) and len(block.adapters) == 3
    assert isinstance(block.adapters[2].lora_b, Adapter)  # the new adapter still trains
    randomize(block.adapters[2].lora_b, scale=0.3)
    randomize_fusion(block)
    x = RNG.normal(size=(2, 4, block.base.in_features)).astype(np.float32)
    ours, alpha, _ = recorded(block, x)
    f = f64(x) @ f64(block.base.kernel.value)
    outputs = np.stack([f + f64(c.scale) * f64(x) @ f64(c.lora_a.value) @ f64(c.lora_b.value)
                        for c in block.adapters], -2)
    ref, ref_alpha = fusion_ref(block, x, outputs, residual=None)
    np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_fusion_starts_near_the_average_of_its_adapters():
    d = 64
    # Adapter outputs of norm ~1 on a residual stream of norm ~8 (unit entries), as trained
    # adapters are: small updates.
    sources = [bottleneck_source(n, d, [FFN], scale=0.15) for n in "abcd"]
    model = composed("fusion", lambda m: sources)
    block = module_paths(model)[FFN]
    # AdapterHub's init: W_V = I with 1e-6 off the diagonal, W_Q, W_K ~ N(0, 0.02²), b_Q = 0.
    value = f64(block.value.value)
    np.testing.assert_array_equal(np.diag(value), 1.0)
    np.testing.assert_allclose(value[~np.eye(d, dtype=bool)], 1e-6, rtol=1e-6)
    for w in (block.query, block.key):
        assert abs(float(np.std(w.value)) - 0.02) < 0.002
    np.testing.assert_array_equal(block.query_bias.value, 0.0)
    h = RNG.normal(size=(2, 6, d)).astype(np.float32)
    deltas = np.stack([f64(a.delta(jnp.asarray(h), Context())) for a in block.adapters], -2)
    assert 1 < np.linalg.norm(deltas, axis=-1).mean() < 3
    ours, alpha, aux = recorded(block, h)
    # Output: h + Σ α_i a_i up to W_V's 1e-6 off-diagonal terms (so aux ≈ 0), with α the
    # softmax of q · k_i = (h W_Q) · (a_i W_K), of std ≈ 0.02² √d ‖h‖ ‖a_i‖ ≈ 0.05 here: every
    # α_i within a factor e^±0.3 of 1/n, though not uniform (the attention is to be learned) ...
    np.testing.assert_allclose(ours, f64(h) + np.einsum("btn,btnw->btw", alpha, deltas),
                               atol=1e-4)
    assert np.abs(np.log(4 * alpha)).max() < 0.3 and np.abs(alpha - 0.25).max() > 1e-3
    assert aux < 1e-6
    # ... and exactly uniform with a zero query: then fusion is compose="average".
    block.query.value = jnp.zeros_like(block.query.value)
    ours, alpha, _ = recorded(block, h)
    np.testing.assert_allclose(alpha, 0.25, rtol=1e-6)
    average = Composition(list(block.adapters), rule="average", weights=(0.25,) * 4)
    np.testing.assert_allclose(ours, np.asarray(average(jnp.asarray(h), Context())), atol=1e-4)


def test_fusion_refuses_per_task_mode_with_nothing_per_task():
    with pytest.raises(ValueError, match="mode='per_task' with method='none'.*mode='shared'"):
        composed("fusion", lambda m: [bottleneck_source("a", 64, [FFN])], mode="per_task")


# ---------------------------------------------------------------------------------- Arrow --


@pytest.mark.parametrize("d_in, rank, d_out", [(16, 4, 12), (6, 8, 3)])
def test_prototype_is_the_top_singular_vector(d_in, rank, d_out):
    a, b = RNG.normal(size=(d_in, rank)), RNG.normal(size=(rank, d_out))
    ours = f64(top_singular_vector(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    # torch's ΔW = B_t A_t is [out, in] = (A B)ᵀ: its top RIGHT singular vector, our top left.
    _, _, vh = np.linalg.svd((a @ b).T)
    np.testing.assert_allclose(np.linalg.norm(ours), 1.0, rtol=1e-5)
    np.testing.assert_allclose(abs(ours @ vh[0]), 1.0, rtol=1e-5)  # equal up to sign
    assert ours[np.argmax(np.abs(ours))] > 0  # the sign convention


def library(num_experts=4, d_in=16, d_out=12, rank=4, base_seed=0):
    """A Dense and frozen LoRA experts with well-separated top singular values (so the 15
    power iterations of peft's prototypes converge: ratio² ≈ 0.1 per iteration)."""
    base = Dense(d_in, d_out, axes=("embed", "joined_kv"), std=0.5, rngs=nnx.Rngs(base_seed))
    experts = []
    for e in range(num_experts):
        lora = LoRADense(base, rank=rank, alpha=2.0 * (e + 1), rngs=nnx.Rngs(e))
        u, _ = np.linalg.qr(RNG.normal(size=(d_in, rank)))
        lora.lora_a.value = jnp.asarray(u * [3.0, 1.0, 0.6, 0.3][:rank], jnp.float32)
        lora.lora_b.value = jnp.asarray(np.linalg.qr(RNG.normal(size=(d_out, rank)))[0].T,
                                        jnp.float32)
        experts.append(freeze(lora))
    return base, experts


def arrow_ref(block, x):
    """Gates and output in float64 from the block's prototypes and experts."""
    protos = f64(block.prototypes.value)
    scores = np.abs(f64(x) @ protos.T)
    k = block.top_k
    top = np.argsort(-scores, axis=-1)[..., :k]
    gates = np.zeros_like(scores)
    kept = np.take_along_axis(scores, top, -1)
    np.put_along_axis(gates, top, softmax(kept / block.temperature), -1)
    deltas = np.stack([f64(e.scale) * f64(x) @ f64(e.lora_a.value) @ f64(e.lora_b.value)
                       for e in block.adapters], -2)
    out = f64(x) @ f64(block.base.kernel.value) + np.einsum("bte,bteo->bto", gates, deltas)
    return out, gates


def test_arrow_matches_hf_peft_and_float64():
    torch = pytest.importorskip("torch")
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer
    from peft.tuners.lora.config import ArrowConfig

    base, experts = library()
    config = PeftConfig(method="none", compose="arrow", top_k=2, arrow_temperature=0.7)
    block = arrow_block(experts, list(range(4)), path="q", base=base, width=12,
                        out_axis="joined_kv", config=config, num_children=4, num_tasks=None,
                        tables={}, rngs=nnx.Rngs(0))
    assert isinstance(block, Arrow) and isinstance(block.prototypes, FrozenAdapter)
    assert block.prototypes.value.shape == (4, 16)
    assert block.prototypes.get_metadata()["axes"] == ("experts", "embed")
    x = RNG.normal(size=(3, 7, 16)).astype(np.float32)
    ours, gates, _ = recorded(block, x)

    # HF peft's Arrow layer on the same experts (torch layout: A [r, in], B [out, r]).
    names = [f"task_{e}" for e in range(4)]
    arrow = ArrowConfig(top_k=2, router_temperature=0.7, rng_seed=0)
    arrow.task_adapter_names, arrow.gks_adapter_names = names, []
    layer = ArrowLoraLinearLayer(16, arrow)
    lora_a, lora_b = torch.nn.ModuleDict(), torch.nn.ModuleDict()
    for name, e in zip(names, experts, strict=True):
        lora_a[name] = torch.nn.Linear(16, 4, bias=False, dtype=torch.float64)
        lora_b[name] = torch.nn.Linear(4, 12, bias=False, dtype=torch.float64)
        with torch.no_grad():
            lora_a[name].weight.copy_(torch.from_numpy(f64(e.lora_a.value).T))
            lora_b[name].weight.copy_(torch.from_numpy(f64(e.lora_b.value).T))
    with torch.no_grad():
        layer.build_prototypes(lora_a, lora_b)
        delta = layer(torch.from_numpy(f64(x)), lora_a, lora_b, torch.nn.Identity(),
                      {n: e.scale for n, e in zip(names, experts, strict=True)}).numpy()
    theirs = layer.prototypes.numpy()
    np.testing.assert_allclose(np.abs(np.sum(theirs * f64(block.prototypes.value), -1)), 1.0,
                               rtol=1e-5)  # the same prototypes, up to sign
    f = f64(x) @ f64(base.kernel.value)
    np.testing.assert_allclose(ours, f + delta, rtol=1e-4, atol=1e-4)
    ref, ref_gates = arrow_ref(block, x)
    np.testing.assert_allclose(gates, ref_gates, rtol=1e-5, atol=1e-6)
    assert gates.shape == (3, 7, 4) and np.all((gates > 0).sum(-1) == 2)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_arrow_refuses_what_it_cannot_route():
    base, experts = library(num_experts=2)
    config = PeftConfig(method="none", compose="arrow", top_k=3)
    with pytest.raises(ValueError, match=r"top_k=3 but only 2 library LoRA.*config\.peft\.top_k"):
        arrow_block(experts, [0, 1], path="q", base=base, width=12, out_axis="joined_kv",
                    config=config, num_children=2, num_tasks=None, tables={},
                    rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="BottleneckAdapter.*LoRA experts only"):
        composed("arrow", lambda m: [bottleneck_source("a", 64, [FFN])])
    with pytest.raises(ValueError, match="trainable LoRA.*method='none'"):
        composed("arrow", lambda m: [lora_source("a", m, [Q]), lora_source("b", m, [Q])],
                 method="lora", targets=r".*cross_attention\.q", top_k=1)


# ------------------------------------------------------ libraries from trained runs --


@pytest.fixture(scope="module")
def per_task_lora(tmp_path_factory):
    """A per-task LoRA run on the tiny base (q and v of every attention), suite mixture."""
    workdir = str(tmp_path_factory.mktemp("lora_per_task"))
    config = tiny_config(peft__method="lora", peft__mode="per_task", peft__rank=4)
    _, trained = save_run(workdir, config, step=2)
    return workdir, trained


def arrow_run(sources, **changes):
    return tiny_config(**{"peft__method": "none", "peft__compose": "arrow",
                          "peft__sources": tuple(sources), "data__mixture": "synthetic_heldout",
                          **changes})


def flat(state):
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(state)}


def test_a_per_task_lora_run_is_one_expert_per_task(per_task_lora):
    workdir, trained = per_task_lora
    exp = build(arrow_run([workdir]))
    assert not jax.tree.leaves(exp.trainable)  # Arrow trains nothing
    model = nnx.merge(exp.graphdef, exp.trainable, exp.frozen)
    rows = np.asarray([task_id_of(t) for t in task_names("synthetic_suite")])  # 8 suite tasks
    blocks = {p: m for p, m in module_paths(model).items() if isinstance(m, Arrow)}
    assert len(blocks) == 12 and sorted(blocks) == exp.adapted_paths  # q, v of 6 attentions
    saved = flat(trained)
    for path, block in blocks.items():
        assert len(block.adapters) == len(rows)
        for expert in block.adapters:
            assert isinstance(expert.lora_a, FrozenAdapter) and isinstance(expert.lora_b,
                                                                           FrozenAdapter)
            assert expert.base is block.base  # one frozen W0 for every expert
        key = path.replace(".", "/")
        for name in ("lora_a", "lora_b"):  # expert k = row task_id(k) of the per-task tables
            np.testing.assert_array_equal(
                np.stack([np.asarray(getattr(e, name).value) for e in block.adapters]),
                saved[f"{key}/{name}"][rows])
        protos = f64(block.prototypes.value)
        for e, expert in enumerate(block.adapters):
            delta = f64(expert.lora_a.value) @ f64(expert.lora_b.value)
            np.testing.assert_allclose(abs(protos[e] @ np.linalg.svd(delta)[0][:, 0]), 1.0,
                                       rtol=1e-4)
    # Other compositions still refuse a per-task source.
    with pytest.raises(ValueError, match="mode='per_task'.*one shared adapter"):
        build(arrow_run([workdir], peft__compose="average"))


def test_library_errors_reach_the_user(per_task_lora, tmp_path):
    workdir, _ = per_task_lora
    # A library trained on another base (here another random init): `check_fits` names it.
    with pytest.raises(ValueError, match=f"{workdir}.*does not fit the base.*trained on "
                                         "'random init, seed 0', this run's base is 'random init, "
                                         "seed 1'"):
        build(arrow_run([workdir], seed=1))
    # A library that is not LoRA, named by its workdir (refused from its config.json, before
    # its checkpoint is read: none is written here).
    houlsby = str(tmp_path / "houlsby")
    os.makedirs(houlsby)
    train_loop._write_config(tiny_config(peft__method="houlsby"), houlsby, resumed_at=None)
    with pytest.raises(ValueError, match=f"{houlsby}.*method='houlsby'.*plain LoRA experts"):
        build(arrow_run([houlsby]))


def test_configs_build():
    config = arrow_config.get_config("quick")
    assert config.peft.sources == (os.path.join(source_adapter.QUICK_SOURCES, "lora_per_task"),)
    assert (config.train.steps, config.peft.top_k, config.peft.method) == (0, 2, "none")
    assert config.data.mixture == "synthetic_heldout"
    assert arrow_config.get_config().peft.sources == ("runs/lora_per_task",)
    config = fusion_config.get_config("quick")
    assert config.peft.sources == source_adapter.task_sources("quick")
    assert (config.peft.compose, config.peft.mode) == ("fusion", "shared")
    assert len(fusion_config.get_config().peft.sources) == 8


@pytest.mark.slow
def test_zero_step_arrow_run_end_to_end(tmp_path):
    """configs/arrow.py:quick over a per-task LoRA run of configs/lora.py:quick,per_task (saved
    with random non-zero B, q projections only for a short build): `peftjax train` with zero
    steps checkpoints and evaluates; `peftjax eval` restores and writes metrics.json (its
    adapted column's programs from the compilation cache the train filled)."""
    with shared_compile_cache(tmp_path / "jax_cache"):
        source = str(tmp_path / "lora_per_task")
        lora = lora_config.get_config("quick,per_task")
        lora.peft.targets = r".*self_attention\.q"
        save_run(source, lora)
        workdir = str(tmp_path / "arrow")
        flags = ["--config", "configs/arrow.py:quick", "--workdir", workdir,
                 f"--config.peft.sources=('{source}',)", "--config.data.eval_examples=2",
                 "--config.data.eval_batch_size=4"]
        result = run_peftjax("train", *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "trainable 0 " in result.stdout and "Final eval" in result.stdout
        assert Checkpoints(os.path.join(workdir, "checkpoints"), create=False).latest_step() == 0
        result = run_peftjax("eval", *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(os.path.join(workdir, "eval", "metrics.json")) as f:
            metrics = json.load(f)
        heldout = {"synthetic_reverse_shift_double", "synthetic_reverse_upper_double"}
        assert set(metrics["adapted"]) == set(metrics["base"]) == heldout
        assert all(np.isfinite(v) for s in metrics["adapted"].values() for v in s.values())
