"""Scanned layer stacks and rematerialisation (`T5Config.scan_layers`, `T5Config.remat`): the
same logits, gradients, routing records and decoded tokens as the unrolled stacks, dropout
included; per-layer dropout masks; clear errors for layers that differ and for hypernetworks;
the config keys, a config-level train step, and checkpoints shared across the settings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from peftjax.config import ConfigError
from peftjax.models import T5, greedy_decode, preset, stacking
from peftjax.models.context import Context, dropout, layer_context, site_salt
from peftjax.peft import PeftConfig, PeftParam, apply_peft
from peftjax.routing import capture
from peftjax.train import build
from tests.helpers import host, perturbed, tiny_config

NUM_TASKS = 3
KEY = jax.random.key(7)
# Compile with XLA's cheap CPU code generation: dropout's threefry bits otherwise make each tiny
# T5 take ~5x longer to compile. Scanned and unrolled programs get the same options.
FAST = dict(compiler_options={"xla_backend_optimization_level": 0,
                              "xla_llvm_disable_expensive_passes": True})


def model(scan: bool, method: str = "lora", *, remat: str = "none", dropout_rate: float = 0.1,
          **peft) -> T5:
    """A 2-layer tiny T5 with `method` attached; the same seeds whatever `scan` and `remat`."""
    cfg = preset("tiny", dropout_rate=dropout_rate, scan_layers=scan, remat=remat)
    t5 = T5(cfg, rngs=nnx.Rngs(0))
    if method != "none":
        apply_peft(t5, PeftConfig(method=method, **peft), num_tasks=NUM_TASKS, rngs=nnx.Rngs(1))
    return t5


def unpacked_inputs() -> dict:
    rng = np.random.default_rng(0)
    return dict(encoder_input_tokens=jnp.asarray(rng.integers(2, 259, (2, 7)), jnp.int32),
                decoder_input_tokens=jnp.asarray(rng.integers(2, 259, (2, 5)), jnp.int32),
                task_ids=jnp.array([0, 2]))


def packed_inputs() -> dict:
    """Two rows, each packing examples of different tasks (per-token ids), with padding."""
    enc_seg = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 2, 2, 2, 2, 2, 0]])
    dec_seg = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 2, 2, 2]])
    enc_task = np.array([[0, 0, 0, 2, 2, 2, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    dec_task = np.array([[0, 0, 2, 2, 2, 0], [1, 1, 1, 0, 0, 0]])
    rng = np.random.default_rng(1)
    enc = np.where(enc_seg > 0, rng.integers(2, 259, enc_seg.shape), 0)
    dec = np.where(dec_seg > 0, rng.integers(2, 259, dec_seg.shape), 0)
    return {k: jnp.asarray(v, jnp.int32) for k, v in dict(
        encoder_input_tokens=enc, decoder_input_tokens=dec, encoder_segment_ids=enc_seg,
        decoder_segment_ids=dec_seg, encoder_task_ids=enc_task,
        decoder_task_ids=dec_task).items()}


def _call(m, **inputs):
    return m(**inputs)


def run(t5: T5, inputs: dict, dropout_key=KEY):
    """(logits, gradients of the trainables, routing records, aux loss) of a jitted loss; the
    trainables are perturbed (seeded) so no LoRA B is zero and every gradient is informative."""
    trainable_kind = nnx.Param if not any(
        isinstance(v, PeftParam) for _, v in nnx.to_flat_state(nnx.state(t5))) else PeftParam
    graphdef, trainable, frozen = nnx.split(t5, trainable_kind, ...)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noise = [0.2 * jax.random.normal(k, x.shape, jnp.float32) for x, k in zip(leaves, keys,
                                                                              strict=True)]
    trainable = jax.tree.unflatten(treedef, [x + n.astype(x.dtype)
                                             for x, n in zip(leaves, noise, strict=True)])

    def loss(trainable):
        m = nnx.merge(graphdef, trainable, frozen)
        logits, weights, aux = capture(_call)(m, **inputs, dropout_key=dropout_key)
        # Linear in the logits: the gradients are as well conditioned as the logits themselves.
        weights_btv = jax.random.normal(jax.random.key(2), logits.shape, jnp.float32)
        return jnp.mean(logits * weights_btv) + aux, (logits, weights, aux)

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), **FAST)(trainable)
    return (*out[:1], grads, *out[1:])


def assert_same(a, b, grad_tol=2e-4):
    """Same logits and records (fp32 tolerance) and gradients (relative to each leaf's largest
    entry: different fusions round differently, and a float32 run of the unrolled model is as
    far from a float64 one, ~5e-5 on the LoRA gradients)."""
    logits_a, grads_a, weights_a, aux_a = a
    logits_b, grads_b, weights_b, aux_b = b
    np.testing.assert_allclose(logits_a, logits_b, rtol=1e-5, atol=1e-4)
    assert sorted(weights_a) == sorted(weights_b)
    for name in weights_a:
        np.testing.assert_allclose(weights_a[name], weights_b[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux_a, aux_b, rtol=1e-5, atol=1e-7)
    flat_a, flat_b = nnx.to_flat_state(grads_a), nnx.to_flat_state(grads_b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, ga), (_, gb) in zip(flat_a, flat_b, strict=True):
        ga, gb = np.asarray(ga.get_value()), np.asarray(gb.get_value())
        scale = max(np.abs(gb).max(), 1e-6)
        np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=grad_tol * scale, err_msg=str(path))


MOLORA_TARGETS = r".*attention\.(q|k)"  # k: the decoder's cross keys are a scan of their own
# name: (method, PEFT settings, inputs, model dropout). Dropout (model and LoRA) in the per-task
# LoRA and MoLoRA cases; off elsewhere, where it would only make compiling slower.
CASES = {
    "none": ("none", {}, unpacked_inputs, 0.0),
    "lora_shared": ("lora", {}, unpacked_inputs, 0.0),
    "lora_per_task_packed": ("lora", dict(mode="per_task", dropout=0.1), packed_inputs, 0.1),
    "houlsby": ("houlsby", dict(mode="per_task"), unpacked_inputs, 0.0),
    "prefix_tuning": ("prefix_tuning", dict(num_virtual_tokens=3), unpacked_inputs, 0.0),
    "ia3": ("ia3", dict(mode="per_task"), packed_inputs, 0.0),
    "molora": ("molora", dict(dropout=0.1, targets=MOLORA_TARGETS), unpacked_inputs, 0.1),
}


@functools.cache
def unrolled_run(case: str):
    """The reference: `run` of the unrolled model of a case (shared by the remat tests)."""
    method, peft, make_inputs, rate = CASES[case]
    return run(model(False, method, dropout_rate=rate, **peft), make_inputs())


@pytest.mark.parametrize("case", list(CASES))
def test_scanned_equals_unrolled(case):
    method, peft, make_inputs, rate = CASES[case]
    unrolled = unrolled_run(case)
    scanned = run(model(True, method, dropout_rate=rate, **peft), make_inputs())
    assert_same(scanned, unrolled)
    if method == "molora":  # routers recorded per layer, under every layer's path
        assert any(k.startswith("encoder.layers.1.") for k in scanned[2])
        assert any(k.startswith("decoder.layers.1.cross_attention.k") for k in scanned[2])
        assert float(scanned[3]) > 0  # the load-balancing loss came back from the scan


def test_the_scanned_model_runs_one_scan_per_stack():
    inputs = unpacked_inputs()

    def primitives(t5):
        jaxpr = jax.make_jaxpr(lambda: t5(**inputs, dropout_key=KEY))()
        return [e.primitive.name for e in jaxpr.jaxpr.eqns]

    # encoder, decoder cross keys/values, decoder
    assert primitives(model(True)).count("scan") == 3
    assert "scan" not in primitives(model(False))


def test_dropout_is_on_and_deterministic():
    t5, inputs = model(True), unpacked_inputs()
    forward = jax.jit(lambda key: t5(**inputs, dropout_key=key), **FAST)
    with_dropout = np.asarray(forward(KEY))
    np.testing.assert_array_equal(with_dropout, forward(KEY))
    assert not np.allclose(with_dropout, forward(jax.random.key(8)), atol=1e-3)


def test_layers_draw_different_masks_from_one_salt():
    """Salts leave the layer index out (every layer alike); the key folds it in, traced or not."""
    assert site_salt("encoder.layers.0.mlp.wo") == site_salt("encoder.layers.5.mlp.wo")
    assert site_salt("encoder.layers.0.mlp.wo") != site_salt("decoder.layers.0.mlp.wo")
    assert site_salt("encoder.layers.0.mlp.wo") != site_salt("encoder.layers.0.mlp.wi_0")
    ctx, x, salt = Context(dropout_key=KEY), jnp.ones((4, 64)), site_salt("encoder.layers.0.x")
    masks = [np.asarray(dropout(x, 0.5, layer_context(ctx, i), salt)) == 0 for i in range(3)]
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])
    traced = jax.jit(lambda i: dropout(x, 0.5, layer_context(ctx, i), salt))(jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(traced) == 0, masks[1])
    assert layer_context(Context(), 3) == Context()  # deterministic contexts stay as they are


@pytest.mark.parametrize("remat, scan", [("full", False), ("dots_no_batch", True)])
def test_remat_changes_no_value_or_gradient(remat, scan):
    """Routers record from inside `jax.checkpoint` too."""
    method, peft, make_inputs, rate = CASES["molora"]
    rematerialised = run(model(scan, method, remat=remat, dropout_rate=rate, **peft),
                         make_inputs())
    assert_same(rematerialised, unrolled_run("molora"))


def test_greedy_decode_scanned_equals_unrolled():
    tokens = unpacked_inputs()["encoder_input_tokens"]
    outputs = []
    for scan in (False, True):
        t5 = model(scan, mode="per_task", dropout_rate=0.0)
        adapters = nnx.state(t5, PeftParam)
        leaves, treedef = jax.tree.flatten(adapters)
        nnx.update(t5, jax.tree.unflatten(treedef, [  # so that B != 0
            x + 0.3 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]))
        decode = jax.jit(lambda e, t5=t5: greedy_decode(t5, e, max_length=6,
                                                       task_ids=jnp.array([0, 1])), **FAST)
        outputs.append(np.asarray(decode(tokens)))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert len(np.unique(outputs[0])) > 2
    caches = model(True).decoder.init_caches(2, 6)
    assert caches[0].shape == (2, 2, 6, 4, 16)  # [layers, batch, length, heads, d_kv]


def test_layers_that_differ_name_the_layer_and_the_fix():
    t5, inputs = model(True, targets=r"encoder\.layers\.0\.self_attention\.q"), unpacked_inputs()
    with pytest.raises(ValueError) as e:
        jax.eval_shape(lambda: t5(**inputs))
    message = str(e.value)
    assert "encoder.layers.1 differs from encoder.layers.0" in message
    assert "at self_attention.q: LoRADense in layer 0, Dense here" in message
    assert "config.model.scan_layers=False" in message
    unrolled = model(False, targets=r"encoder\.layers\.0\.self_attention\.q")
    jax.eval_shape(lambda: unrolled(**inputs))  # fine unrolled


@pytest.mark.parametrize("method", ["hyperformer_pp", "text_to_lora"])
def test_hypernetwork_stacks_scan_like_unrolled(method):
    """Hypernetwork sites know themselves by their layer path and read their layer's generated
    weights from its context, so their stacks scan: the same logits and gradients (generator
    and conditioning) as unrolled, and the same greedy decode (text_to_lora: cross-attention
    v sites, whose keys and values are a scan over the encoded input of their own).

    Every hypernetwork gradient sums over all sites through the generator's shared layer norm,
    so fusion order moves it more than a LoRA's: text_to_lora's scanned gradients are within
    2.3e-3 of each leaf's largest entry of the unrolled ones (rematerialising alone: 1.2e-4),
    while a scan that gave every layer layer 0's weights is 1.0 off (logits 5.3)."""
    tokens = unpacked_inputs()["encoder_input_tokens"]
    results, decoded = [], []
    for scan in (False, True):
        exp = build(tiny_config(peft__method=method, model__scan_layers=scan))
        assert exp.model_config.scan_layers == scan
        t5 = nnx.merge(exp.graphdef, exp.trainable, exp.frozen)
        results.append(run(t5, unpacked_inputs()))
        if method == "text_to_lora":
            nnx.update(t5, perturbed(nnx.state(t5, PeftParam)))  # so that B != 0
            decode = jax.jit(lambda e, t5=t5: greedy_decode(t5, e, max_length=5,
                                                           task_ids=jnp.array([0, 2])), **FAST)
            decoded.append(np.asarray(decode(tokens)))
    assert_same(results[1], results[0], grad_tol=1e-2)
    if decoded:
        np.testing.assert_array_equal(decoded[0], decoded[1])
        assert len(np.unique(decoded[0])) > 2


def test_bad_remat_policy_lists_the_choices():
    with pytest.raises(ValueError, match="'none', 'full', 'dots', 'dots_no_batch'"):
        preset("tiny", remat="dots_only")
    with pytest.raises(ConfigError, match=r"config.model.remat='dots_only'.*'dots_no_batch'"):
        build(tiny_config(model__remat="dots_only"))


def test_scanned_runs_train_stacked_and_share_checkpoints_with_unrolled_runs(tmp_path):
    """scan_layers / remat come from config.model, change no parameter and stay out of the
    fingerprint. A scanned run trains in the stacked layout (one variable per stack, sharded
    like a layer's, the layer axis replicated) on a mesh that shards the parameters, ends where
    the unrolled run does, and writes per-layer checkpoints: each run's checkpoint restores into
    the other setting."""
    from peftjax.train.loop import restore_trained, train

    changes = dict(peft__mode="per_task", mesh__shape={"data": 1, "fsdp": 2, "model": 2},
                   train__steps=2, train__checkpoint_every=2, data__eval_examples=4)
    configs = {"u": tiny_config(**changes),  # (dropout: see test_scanned_equals_unrolled)
               "s": tiny_config(model__scan_layers=True, model__remat="dots", **changes)}
    unrolled, scanned = build(configs["u"]), build(configs["s"])
    assert scanned.model_config.scan_layers and scanned.model_config.remat == "dots"
    assert not unrolled.model_config.scan_layers
    assert scanned.fingerprint() == unrolled.fingerprint()
    for a, b in zip(jax.tree.leaves(host(unrolled.trainable)),
                    jax.tree.leaves(host(scanned.trainable)), strict=True):
        np.testing.assert_array_equal(a, b)

    stacks = stacking.scanned_stacks(scanned.model_config)
    flat = dict(nnx.to_flat_state(stacking.stack_placed(scanned.trainable, stacks)))
    assert not any(isinstance(k, int) for p in flat for k in p[:3])
    lora_a = flat[("encoder", "layers", "stacked", "self_attention", "q", "lora_a")]
    per_layer = dict(nnx.to_flat_state(scanned.trainable))[
        ("encoder", "layers", 1, "self_attention", "q", "lora_a")]
    assert lora_a.get_value().shape == (2, *per_layer.get_value().shape)
    assert lora_a.get_metadata()["axes"] == ("layers", *per_layer.get_metadata()["axes"])
    layer_sharding = per_layer.get_value().sharding
    assert "fsdp" in layer_sharding.spec
    assert lora_a.get_value().sharding.is_equivalent_to(
        NamedSharding(layer_sharding.mesh, P(None, *layer_sharding.spec)), 4)

    means = {name: train(config, str(tmp_path / name)) for name, config in configs.items()}
    assert means["s"] == pytest.approx(means["u"])
    # The scanned run's checkpoint in the unrolled setting, and the other way round.
    scanned_run = restore_trained(configs["u"], str(tmp_path / "s"))[1]
    unrolled_run = restore_trained(configs["s"], str(tmp_path / "u"))[1]
    assert int(scanned_run.step) == int(unrolled_run.step) == 2
    for tree in ("trainable", "opt_state"):
        a, b = host(getattr(unrolled_run, tree)), host(getattr(scanned_run, tree))
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_stacked_layout_round_trips_and_refuses_a_mixed_layout():
    """`stack_layers` / `unstack_layers` are exact inverses on every state of a model (and on
    pytrees holding states, like optimizer states); a scan cannot mix stacked and per-layer
    variables of one stack, and per-layer models take no `layer_states`."""
    t5 = model(True, "molora", targets=MOLORA_TARGETS)
    stacks = stacking.scanned_stacks(t5.config)
    assert stacks == ("encoder.layers", "decoder.layers")
    assert stacking.scanned_stacks(model(False).config) == ()
    graphdef, trainable, frozen = nnx.split(t5, PeftParam, ...)
    tree = {"mu": trainable, "count": jnp.int32(3)}
    stacked = stacking.stack_layers(tree, stacks)
    assert stacked["count"] is tree["count"]
    paths = {p for p, _ in nnx.to_flat_state(stacked["mu"])}
    assert ("decoder", "layers", "stacked", "cross_attention", "k", "router_kernel") in paths
    assert not any(k in (0, 1) for p in paths for k in p)
    back = stacking.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(a, b)
    assert stacking.unstack_layers(tree) is not None  # per-layer input passes through
    assert stacking.layer_states(trainable, frozen) is None
    with pytest.raises(ValueError, match=r"coder\.layers is stacked in one state and per layer"):
        stacking.layer_states(stacking.stack_layers(trainable, stacks), frozen)
    states = stacking.layer_states(*stacking.stack_layers((trainable, frozen), stacks))
    with pytest.raises(ValueError, match="scan_layers=False"):
        model(False)(**unpacked_inputs(), layer_states=states)


def test_consuming_conversion_frees_each_layer_once_stacked():
    """`stack_placed(..., consume=True)` (what a scanned run does to its frozen base) builds
    the same stacks as the non-consuming conversion and deletes every per-layer array it
    stacked, so the base never exists twice; arrays outside the stacks are left alone."""
    t5 = model(True, "lora")
    stacks = stacking.scanned_stacks(t5.config)
    _, _, frozen = nnx.split(t5, PeftParam, ...)
    before = host(frozen)
    kept = stacking.stack_placed(frozen, stacks)  # the per-layer arrays survive this one
    consumed = stacking.stack_placed(frozen, stacks, consume=True)
    flat = dict(nnx.to_flat_state(frozen))
    in_layers = [p for p in flat if any(isinstance(k, int) for k in p)]
    outside = [p for p in flat if p not in in_layers]
    assert in_layers and outside  # e.g. the embedding and the final norms
    assert all(flat[p].get_value().is_deleted() for p in in_layers)
    assert not any(flat[p].get_value().is_deleted() for p in outside)
    for a, b in zip(jax.tree.leaves(host(kept)), jax.tree.leaves(host(consumed)), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(host(stacking.unstack_placed(consumed))),
                    jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
