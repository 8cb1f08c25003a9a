"""Hypernetworks (HyperFormer, HyperFormer++ / Hyper-X, Text-to-LoRA): float64 recomputation of
the generator and of the adapted sites, per-task vs per-example generation, [batch] vs per-token
ids, mixed-task batches, unseen (task, language) pairs, description conditioning, a sharded train
step against a single-device one, bad ids and configs, and parameter counts.

Tests that run a model first replace the hypernetwork's parameters with noise: at init,
Text-to-LoRA's B head is zero and every head is small, so an unused or mis-gathered weight could
hide behind the init.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio
from flax import nnx

from peftjax import data
from peftjax.config import ConfigError
from peftjax.data import features, synthetic
from peftjax.data.pipeline import register_task_id
from peftjax.hyper import HyperBottleneck, HyperLoRADense, SiteGroup, SiteInfo, embed_descriptions
from peftjax.hyper.condition import EOS_ID, description_tokens
from peftjax.hyper.generator import Output
from peftjax.models import Context
from peftjax.models.context import layer_context, split_generated
from peftjax.models.layers import RMSNorm
from peftjax.peft import FrozenAdapter, module_paths
from peftjax.peft.norm_tuning import TunedRMSNorm
from peftjax.peft.variables import Conditioning, HyperParam, PeftParam
from peftjax.sharding import DEFAULT_RULES
from peftjax.train import build
from peftjax.train import loop as train_loop
from peftjax.train.accounting import count_parameters
from peftjax.train.step import init_train_state
from tests.helpers import single_and_sharded_step, tiny_config

LN_EPS = 1e-5
SUITE_IDS = (5, 12)  # task ids of synthetic_suite (first, last); tables have 13 rows
RNG = np.random.default_rng(0)
ENC = np.array([[5, 6, 7, 8, 9, 1, 0], [10, 11, 12, 1, 0, 0, 0],
                [40, 41, 42, 43, 44, 45, 1], [7, 7, 9, 1, 0, 0, 0]], np.int32)
DEC = np.array([[0, 5, 6, 7, 8], [0, 20, 21, 0, 0], [0, 30, 31, 32, 33], [0, 9, 9, 0, 0]],
               np.int32)


def f64(x):
    return np.asarray(x, dtype=np.float64)


def flat(state):
    return {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}


def noise_like(state, seed: int, scale: float = 0.2):
    """`state` with every array replaced by seeded N(0, scale²) noise (nothing at its init)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), state)


@functools.cache
def built(**changes):
    """`build(tiny_config(**changes))`, once per distinct config in this file."""
    return build(tiny_config(**changes))


def model_of(exp, seed: int = 1, trainable=None):
    """The run's model with its hypernetwork's parameters replaced by seeded noise."""
    trainable = noise_like(exp.trainable, seed) if trainable is None else trainable
    return nnx.merge(exp.graphdef, trainable, exp.frozen)


def silu(x):
    return x / (1.0 + np.exp(-x))


def layer_norm(y, scale, bias):
    mean = y.mean(-1, keepdims=True)
    var = ((y - mean) ** 2).mean(-1, keepdims=True)
    return (y - mean) / np.sqrt(var + LN_EPS) * scale + bias


# --------------------------------------------------------------------------- the generator

SITES = [SiteInfo.of(p) for p in ("encoder.layers.0.post_attention", "encoder.layers.3.post_ffn",
                                  "encoder.layers.1.post_attention")]
POSITION_OF_SITE = [0, 1, 0]  # sorted position types: *.post_attention, *.post_ffn
OUTPUTS = {"down": Output((5, 3)), "bias": Output((3,), std=0.0, bias=1.0),
           "up": Output((3, 5))}


def test_site_info_stars_the_layer_index():
    assert SITES[1] == SiteInfo("encoder.layers.3.post_ffn", 3, "encoder.layers.*.post_ffn")
    assert SiteInfo.of("lm_head") == SiteInfo("lm_head", 0, "lm_head")


@pytest.mark.parametrize("site_embeddings", [True, False])
def test_site_group_matches_float64(site_embeddings):
    cond_dim, embed, hidden, proj = 6, 4, 9, 7
    group = SiteGroup(SITES, OUTPUTS, cond_dim=cond_dim, site_embeddings=site_embeddings,
                      embed_dim=embed, hidden=hidden, proj_dim=proj, rngs=nnx.Rngs(0))
    nnx.update(group, noise_like(nnx.state(group, HyperParam), seed=2, scale=0.7))
    cond = RNG.normal(size=(4, cond_dim)).astype(np.float32)
    got = group(jnp.asarray(cond))

    p = {k: f64(v.get_value()) for k, v in flat(nnx.state(group, HyperParam)).items()}
    if site_embeddings:
        assert p["layer_embed"].shape == (4, embed)  # layers 0..3 (largest index + 1)
        assert p["position_embed"].shape == (2, embed)
        assert p["w1"].shape == (cond_dim + 2 * embed, hidden)
        assert p["heads/0/w"].shape == (proj, 15)  # one head per output, shared by the sites
    else:
        assert "layer_embed" not in p and p["w1"].shape == (cond_dim, hidden)
        assert p["heads/0/w"].shape == (3, proj, 15)  # one head per output and site
    assert set(got) == {s.path for s in SITES}
    for s, site in enumerate(SITES):
        x = f64(cond)
        if site_embeddings:
            extra = np.concatenate([p["layer_embed"][site.layer],
                                    p["position_embed"][POSITION_OF_SITE[s]]])
            x = np.concatenate([x, np.broadcast_to(extra, (4, 2 * embed))], axis=-1)
        h = np.maximum(x @ p["w1"] + p["b1"], 0.0) @ p["w2"] + p["b2"]
        i_rp = layer_norm(h, p["norm_scale"], p["norm_bias"])
        for k, (name, out) in enumerate(OUTPUTS.items()):
            w, b = p[f"heads/{k}/w"], p[f"heads/{k}/b"]
            if not site_embeddings:
                w, b = w[s], b[s]
            expected = (i_rp @ w + b).reshape(4, *out.shape)
            assert got[site.path][name].shape == (4, *out.shape)
            np.testing.assert_allclose(got[site.path][name], expected, rtol=1e-5, atol=1e-5)
    # Two sites of one position type differ only by their layer: their weights must differ.
    assert np.max(np.abs(got[SITES[0].path]["down"] - got[SITES[2].path]["down"])) > 1e-2


# --------------------------------------------------------------------- the adapted sites


def site_context(model, ctx, path):
    """What the layer holding the site at `path` passes its sites: `ctx` (the model's) with
    that layer's generated weights under the site's layer path."""
    coder, layers, index = path.split(".")[:3]  # e.g. encoder, layers, 1
    stack, index = f"{coder}.{layers}", int(index)
    num_layers = getattr(model.config, f"num_{coder}_layers")
    rest, per_layer = split_generated(ctx, stack, num_layers)
    return layer_context(rest, index, per_layer[index])


def bottleneck_reference(h_btd, weights, rows_bt, scale):
    """float64 `h + s LN(U silu(D h + b_D) + b_U)`, each token with its row's weights."""
    w = {k: f64(v)[rows_bt] for k, v in weights.items()}  # [b, t, ...]
    h = f64(h_btd)
    code = silu(np.einsum("btd,btdm->btm", h, w["down"]) + w["down_bias"])
    y = np.einsum("btm,btmd->btd", code, w["up"]) + w["up_bias"]
    return h + scale * layer_norm(y, w["norm_scale"], w["norm_bias"])


def token_rows(ids, length):
    ids = np.asarray(ids)
    return ids if ids.ndim == 2 else np.repeat(ids[:, None], length, axis=1)


@pytest.mark.parametrize("ids", [np.array([7, 5, 7]),
                                 np.array([[5, 5, 9, 9, 12], [6, 7, 8, 9, 10], [12] * 5])],
                         ids=["batch", "token"])
def test_hyperformer_pp_bottleneck_matches_float64(ids):
    exp = built(peft__method="hyperformer_pp", peft__adapter_scale=0.7,
                peft__adapter_activation="silu")
    model = model_of(exp)
    per_token = ids.ndim == 2
    ctx_kw = (dict(encoder_task_ids=jnp.asarray(ids), decoder_task_ids=jnp.asarray(ids))
              if per_token else dict(task_ids=jnp.asarray(ids)))
    enc_ctx, dec_ctx = model.contexts(**ctx_kw)
    np.testing.assert_array_equal(enc_ctx.generated_ids, ids)  # per task: row = task id
    h = RNG.normal(size=(3, 5, 64)).astype(np.float32)
    for path, ctx in (("encoder.layers.1.post_ffn", enc_ctx),
                      ("decoder.layers.0.post_attention", dec_ctx)):
        site = module_paths(model)[path]
        assert isinstance(site, HyperBottleneck)
        weights = ctx.generated[path]
        assert weights["down"].shape == (13, 64, 4) and weights["norm_bias"].shape == (13, 64)
        with pytest.raises(ValueError, match="call the whole model"):
            site(jnp.asarray(h), ctx)  # the model's context: not the layer's
        got = site(jnp.asarray(h), site_context(model, ctx, path))
        expected = bottleneck_reference(h, weights, token_rows(ids, 5), 0.7)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        assert np.max(np.abs(expected - f64(h))) > 0.1  # the adapter is not a no-op


@pytest.mark.parametrize("ids", [np.array([7, 5, 7]),
                                 np.array([[5, 5, 9, 9, 12], [6, 7, 8, 9, 10], [12] * 5])],
                         ids=["batch", "token"])
def test_text_to_lora_dense_matches_float64(ids):
    exp = built(peft__method="text_to_lora", peft__rank=4, peft__alpha=5.0)
    model = model_of(exp)
    path = "encoder.layers.0.self_attention.v"
    kw = "encoder_task_ids" if ids.ndim == 2 else "task_ids"
    extra = {"decoder_task_ids": jnp.asarray(ids)} if ids.ndim == 2 else {}
    enc_ctx, _ = model.contexts(**{kw: jnp.asarray(ids)}, **extra)
    site = module_paths(model)[path]
    assert isinstance(site, HyperLoRADense)
    w = enc_ctx.generated[path]
    assert w["a"].shape == (13, 64, 4) and w["b"].shape == (13, 4, 64)
    x = RNG.normal(size=(3, 5, 64)).astype(np.float32)
    rows = token_rows(ids, 5)
    a, b = f64(w["a"])[rows], f64(w["b"])[rows]
    delta = np.einsum("btd,btdr,btro->bto", f64(x), a, b) * 5.0 / 4
    expected = f64(x) @ f64(site.base.kernel.get_value()) + delta
    np.testing.assert_allclose(site(jnp.asarray(x), site_context(model, enc_ctx, path)),
                               expected, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(delta)) > 0.1


# ------------------------------------------------------------- generation modes, id layouts


@pytest.mark.parametrize("method", ["hyperformer_pp", "text_to_lora"])
def test_per_example_generation_and_per_token_ids_agree_with_per_task(method):
    per_task = built(peft__method=method)
    per_example = built(peft__method=method, peft__hyper_generate="per_example",
                        data__pack=False)
    shapes = {k: v.get_value().shape for k, v in flat(per_task.trainable).items()}
    assert shapes == {k: v.get_value().shape for k, v in flat(per_example.trainable).items()}
    trainable = noise_like(per_task.trainable, seed=3)
    model_t = model_of(per_task, trainable=trainable)
    model_e = model_of(per_example, trainable=trainable)
    ids = jnp.array([5, 9, 5, 12])
    # Per example: one generation per row of the batch, rows picked in order.
    enc_ctx, _ = model_e.contexts(task_ids=ids)
    np.testing.assert_array_equal(enc_ctx.generated_ids, np.arange(4))
    first = next(iter(enc_ctx.generated.values()))
    assert all(v.shape[0] == 4 for v in first.values())
    logits = model_t(ENC, DEC, task_ids=ids)
    np.testing.assert_allclose(model_e(ENC, DEC, task_ids=ids), logits, rtol=1e-5, atol=1e-5)
    per_token = model_t(ENC, DEC, encoder_task_ids=jnp.asarray(token_rows(ids, ENC.shape[1])),
                        decoder_task_ids=jnp.asarray(token_rows(ids, DEC.shape[1])))
    # Another contraction order (one-hot over the task table) rounds differently in float32.
    np.testing.assert_allclose(per_token, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["hyperformer", "hyperformer_pp", "text_to_lora"])
def test_each_row_of_a_mixed_batch_gets_its_own_adapter(method):
    model = model_of(built(peft__method=method), seed=4)
    ids = np.array([5, 9, 5, 12])
    mixed = np.asarray(model(ENC, DEC, task_ids=jnp.asarray(ids)))
    assert np.all(np.isfinite(mixed))
    alone = {}  # every row with one task: what each row gives when its task is all there is
    for task in (5, 9, 12):
        alone[task] = np.asarray(model(ENC, DEC, task_ids=jnp.full(4, task)))
        rows = ids == task
        np.testing.assert_allclose(mixed[rows], alone[task][rows], rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(alone[5] - alone[9])) > 1e-2  # the task matters, on every row
    assert np.all(np.abs(alone[5] - alone[9]).max(axis=(1, 2)) > 1e-3)
    # And a row by itself (nothing else in the batch to leak into it) gives the same.
    single = model(ENC[1:2], DEC[1:2], task_ids=jnp.array([9]))
    np.testing.assert_allclose(mixed[1], single[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- Hyper-X

HYPER_X = dict(peft__method="hyperformer_pp", peft__hyper_condition="task_language",
               data__mixture="synthetic_multilingual")


def test_hyper_x_rows_are_task_major_and_unseen_pairs_get_adapters():
    from tasks import synthetic as registered

    exp = built(**HYPER_X)
    held_task, held_language = synthetic.HELDOUT_LANGUAGE_PAIRS[0]
    assert registered.seqio_name(held_task, held_language) not in exp.task_names
    t, lang = synthetic.TASK_IDS[held_task], synthetic.LANGUAGES[held_language]
    assert (t, lang) == (5, 1)
    model = model_of(exp, seed=5)
    cond = model.hypernet.conditioner
    assert (cond.num_tasks, cond.num_languages) == (13, 3)
    tasks_, langs = f64(cond.task_embed.get_value()), f64(cond.language_embed.get_value())
    rows = f64(cond.all_rows())
    assert rows.shape == (39, 128)
    for task in range(13):
        for language in range(3):
            np.testing.assert_array_equal(rows[task * 3 + language],
                                          np.concatenate([tasks_[task], langs[language]]))
    task_ids, language_ids = jnp.array([5, 5, 5, 6]), jnp.array([1, 0, 2, 1])
    enc_ctx, _ = model.contexts(task_ids=task_ids, language_ids=language_ids)
    np.testing.assert_array_equal(enc_ctx.generated_ids, [16, 15, 17, 19])
    same = np.repeat(ENC[:1], 4, axis=0), np.repeat(DEC[:1], 4, axis=0)
    logits = np.asarray(model(*same, task_ids=task_ids, language_ids=language_ids))
    assert np.all(np.isfinite(logits))
    for other in (1, 2, 3):  # same task in another language, another task in the same language
        assert np.max(np.abs(logits[0] - logits[other])) > 1e-2
    # The unseen pair's weights are what the generator makes of its two embeddings.
    path = "encoder.layers.0.post_ffn"
    per_task = model.hypernet.per_task()[path]["down"]
    direct = model.hypernet.generate(jnp.asarray(rows[16:17], jnp.float32))[path]["down"]
    np.testing.assert_allclose(per_task[16], direct[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ description conditioning

DESCRIBED = dict(peft__method="text_to_lora", peft__hyper_condition="description",
                 data__heldout="synthetic_heldout")
# Inputs long enough for every synthetic description (<= 63 bytes) and its EOS.
DESCRIBED_WHOLE = {**DESCRIBED, "data__inputs_length": 64}


def byte_tokens(text: str, length: int) -> np.ndarray:
    """The byte vocabulary's ids of `text` (byte + 3), EOS, zero padding to `length`."""
    ids = [*(np.frombuffer(text.encode(), np.uint8).astype(np.int32) + 3), EOS_ID]
    return np.pad(ids, (0, length - len(ids)))


def description_table(exp) -> np.ndarray:
    model = nnx.merge(exp.graphdef, exp.trainable, exp.frozen)
    return f64(model.hypernet.conditioner.descriptions.get_value())


def test_description_table_is_the_frozen_base_encoders_mean_pooled_embedding():
    config = tiny_config(**DESCRIBED_WHOLE)
    exp = built(**DESCRIBED_WHOLE)
    assert exp.heldout_names == ["synthetic_reverse_shift_double", "synthetic_reverse_upper_double"]
    assert exp.num_task_ids == 15
    base = build(config, with_peft=False)
    base_model = nnx.merge(base.graphdef, base.trainable, base.frozen)
    assert base_model.hypernet is None
    texts = {data.task_id_of(n): data.description_of(n)
             for n in [*exp.task_names, *exp.heldout_names]}
    assert sorted(texts) == list(range(5, 15))
    tokens = np.zeros((15, 64), np.int32)
    for task, text in texts.items():
        tokens[task] = byte_tokens(text, 64)
    np.testing.assert_array_equal(
        description_tokens(texts, 15, data.vocabulary(config.data.mixture).encode, 64), tokens)
    # Mean over each description's tokens of the base encoder's output, recomputed here.
    encoded = f64(base_model.encode(jnp.asarray(tokens), Context())[0])
    mask = (tokens > 0)[..., None]
    expected = (encoded * mask).sum(1) / np.maximum(mask.sum(1), 1)
    table = description_table(exp)
    np.testing.assert_allclose(table, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embed_descriptions(base_model, tokens), expected, rtol=1e-5,
                               atol=1e-6)
    assert not table[:5].any()  # ids no task of the run uses
    assert np.all(np.abs(table[5:]).max(-1) > 1e-3)  # held-out tasks (13, 14) included
    assert np.max(np.abs(table[13] - table[11])) > 1e-3  # vs reverse_shift_upper (trained)
    # A fixed input: not trained, not checkpointed with the frozen adapters, counted as buffer.
    assert not any("descriptions" in k for k in flat(exp.trainable))
    frozen = flat(exp.frozen)
    assert isinstance(frozen["hypernet/conditioner/descriptions"], Conditioning)
    assert not isinstance(frozen["hypernet/conditioner/descriptions"], FrozenAdapter | PeftParam)
    assert not jax.tree.leaves(exp.frozen.filter(FrozenAdapter))
    state = init_train_state(exp.trainable, optax.sgd(0.1))
    assert "frozen_adapters" not in train_loop._checkpointed(state, exp)
    assert exp.parameter_counts()["buffers"] == 15 * 64
    # A held-out task is reachable zero-shot: its own adapter, finite.
    model = model_of(exp, seed=6)
    logits = np.asarray(model(ENC, DEC, task_ids=jnp.array([13, 5, 14, 11])))
    assert np.all(np.isfinite(logits))
    trained = np.asarray(model(ENC, DEC, task_ids=jnp.array([11, 5, 5, 11])))
    assert np.max(np.abs(logits[0] - trained[0])) > 1e-2
    assert np.max(np.abs(logits[2] - trained[2])) > 1e-2


def test_distinct_descriptions_get_distinct_embeddings_at_any_inputs_length():
    exp = built(**DESCRIBED)  # tiny: inputs_length 24
    table = description_table(exp)
    texts = {data.task_id_of(n): data.description_of(n)
             for n in [*exp.task_names, *exp.heldout_names]}
    for a, b in itertools.combinations(sorted(texts), 2):
        assert np.max(np.abs(table[a] - table[b])) > 1e-4, (texts[a], texts[b])
    # and equal to the embedding of the whole description
    np.testing.assert_allclose(table, description_table(built(**DESCRIBED_WHOLE)), rtol=1e-5,
                               atol=1e-6)


# ---------------------------------------------------------------------------- training

HYPER_AXES = (("hyper_hidden", "model"), ("hyper_out", "model"))


@pytest.mark.slow
def test_hyperformer_pp_trains_sharded_in_mixed_task_packed_rows():
    assert jax.device_count() == 4
    config = tiny_config(peft__method="hyperformer_pp", data__pack=True, data__inputs_length=64,
                         data__targets_length=32, optim__warmup_steps=0)
    config.mesh.shape = {"data": 1, "fsdp": 2, "model": 2}
    # The projector's hidden width and the heads' outputs split over `model`.
    config.mesh.rules = tuple(r for r in DEFAULT_RULES if r[0] not in dict(HYPER_AXES)) \
        + HYPER_AXES
    exp = build(config)
    trainable = flat(exp.trainable)
    assert all(k.startswith("hypernet/") for k in trainable)  # the base is not trained
    assert "model" in tuple(trainable["hypernet/groups/0/heads/0/w"].sharding.spec)
    assert any(isinstance(v, nnx.Param) and not isinstance(v, PeftParam)
               for v in flat(exp.frozen).values())
    optimizer = optax.sgd(1.0)  # update = -gradient
    single, state, sharded, batch = single_and_sharded_step(exp, config, optimizer)
    np.testing.assert_allclose(float(single["loss_sum"]), float(sharded["loss_sum"]), rtol=1e-5)
    np.testing.assert_allclose(float(single["grad_norm"]), float(sharded["grad_norm"]),
                               rtol=1e-4)
    grads = {k: f64(v.get_value()) - f64(flat(state.trainable)[k].get_value())
             for k, v in trainable.items()}
    for key, grad in grads.items():
        if key != "hypernet/conditioner/task_embed":
            assert np.any(grad != 0), key  # projector, embeddings, every head of both stacks
    # Task embeddings: exactly the rows of tasks with tokens in the batch (padding is id 0, but
    # padded positions reach no loss).
    used = set(np.unique(batch["encoder_task_ids"][batch["encoder_segment_ids"] > 0]))
    moved = set(np.flatnonzero(np.any(grads["hypernet/conditioner/task_embed"] != 0, axis=-1)))
    assert moved == used and used <= set(range(SUITE_IDS[0], SUITE_IDS[1] + 1))


def test_hyper_train_norms_adds_the_base_norms_to_the_trainable_state():
    plain = built(peft__method="hyperformer_pp")
    exp = built(peft__method="hyperformer_pp", peft__hyper_train_norms=True)
    model = nnx.merge(exp.graphdef, exp.trainable, exp.frozen)
    tuned = {p for p, m in module_paths(model).items() if isinstance(m, TunedRMSNorm)}
    assert len(tuned) == 2 * 2 + 2 * 3 + 2  # 2 per encoder layer, 3 per decoder layer, finals
    assert not any(isinstance(m, RMSNorm) and p.rsplit(".", 1)[0] not in tuned
                   for p, m in module_paths(model).items() if not p.startswith("hypernet"))
    extra = set(flat(exp.trainable)) - set(flat(plain.trainable))
    assert extra == {p.replace(".", "/") + "/scale" for p in tuned}
    # The copies start at the base's scales: same logits as without them.
    trainable = noise_like(plain.trainable, seed=7)
    merged = nnx.merge_state(exp.trainable, trainable)
    ids = jnp.array([5, 6, 7, 8])
    np.testing.assert_allclose(model_of(exp, trainable=merged)(ENC, DEC, task_ids=ids),
                               model_of(plain, trainable=trainable)(ENC, DEC, task_ids=ids),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- bad input


PER_TASK = dict(peft__method="hyperformer_pp")
PER_EXAMPLE = dict(peft__method="hyperformer_pp", peft__hyper_generate="per_example",
                   data__pack=False)


@functools.cache
def jitted_forward(**changes):
    """(the run, its jitted forward `(trainable, **ids) -> logits` on ENC / DEC)."""
    exp = built(**changes)

    @jax.jit
    def forward(trainable, ids):
        return nnx.merge(exp.graphdef, trainable, exp.frozen)(ENC, DEC, **ids)

    return exp, forward


def nan_rows(changes, ids) -> np.ndarray:
    """Per row of the jitted forward's logits: True if all NaN; asserts the rest finite."""
    exp, forward = jitted_forward(**changes)
    logits = np.asarray(forward(noise_like(exp.trainable, seed=1), ids)).reshape(4, -1)
    nan = np.isnan(logits).all(-1)
    assert np.all(np.isfinite(logits[~nan]))
    return nan


@pytest.mark.parametrize("changes", [PER_TASK, PER_EXAMPLE], ids=["per_task", "per_example"])
def test_task_ids_outside_the_table_raise_eagerly(changes):
    model = model_of(built(**changes))
    for bad in (13, -1):
        with pytest.raises(ValueError, match=rf"task id {bad} is outside the hypernetwork's task "
                                             r"embedding table of 13 rows \(ids 0..12\); set "
                                             r"config\.peft\.num_tasks"):
            model(ENC, DEC, task_ids=jnp.array([5, bad, 6, 7]))
    if changes is PER_TASK:
        tokens = token_rows([5, 9, 6, 7], ENC.shape[1]).copy()
        tokens[2, 1] = 40
        with pytest.raises(ValueError, match=r"task id 40 .*config\.peft\.num_tasks"):
            model(ENC, DEC, encoder_task_ids=jnp.asarray(tokens),
                  decoder_task_ids=jnp.asarray(token_rows([5, 9, 6, 7], DEC.shape[1])))


def test_per_task_ids_outside_the_table_give_nan_rows_under_jit():
    enc = token_rows([5, 9, 6, 7], ENC.shape[1]).copy()
    dec = token_rows([5, 9, 6, 7], DEC.shape[1]).copy()
    enc[1, 2], dec[3, 1] = 13, -1  # one bad token in row 1's inputs, one in row 3's targets
    ids = dict(encoder_task_ids=jnp.asarray(enc), decoder_task_ids=jnp.asarray(dec))
    np.testing.assert_array_equal(nan_rows(PER_TASK, ids), [False, True, False, True])


def test_per_example_ids_beyond_the_table_give_nan_rows_under_jit():
    ids = dict(task_ids=jnp.array([5, 13, 6, 7]))
    np.testing.assert_array_equal(nan_rows(PER_EXAMPLE, ids), [False, True, False, False])


def test_per_example_negative_ids_give_nan_rows_under_jit():
    ids = dict(task_ids=jnp.array([5, 6, -1, 7]))
    np.testing.assert_array_equal(nan_rows(PER_EXAMPLE, ids), [False, False, True, False])


def test_per_example_generation_refuses_packed_ids_and_every_method_needs_ids():
    model = model_of(built(**PER_EXAMPLE))
    with pytest.raises(ValueError, match=r"per_example.*packed.*config\.data\.pack=False"):
        model(ENC, DEC, encoder_task_ids=jnp.asarray(token_rows([5, 6, 7, 8], ENC.shape[1])),
              decoder_task_ids=jnp.asarray(token_rows([5, 6, 7, 8], DEC.shape[1])))
    with pytest.raises(ValueError, match=r"hypernetwork.*pass task_ids=\[batch\]"):
        model(ENC, DEC)


def test_language_ids_outside_the_table_or_missing_name_the_fix():
    model = model_of(built(**HYPER_X))
    with pytest.raises(ValueError, match=r"language id 3 is outside .* 3 rows.*"
                                         r"config\.peft\.num_languages"):
        model(ENC, DEC, task_ids=jnp.array([5, 6, 7, 8]), language_ids=jnp.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"task_language.*language_ids"):
        model(ENC, DEC, task_ids=jnp.array([5, 6, 7, 8]))


def test_description_conditioning_needs_every_task_described():
    name, mixture = "hyper_test_undescribed", "hyper_test_undescribed_mix"
    vocab = seqio.ByteVocabulary()
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(lambda split, shuffle_files: None,
                                              splits=["train"]),
        output_features={k: seqio.Feature(vocabulary=vocab) for k in ("inputs", "targets")},
        preprocessors=[features.task_id_preprocessor(63)])
    register_task_id(name, 63)
    seqio.MixtureRegistry.add(mixture, [(name, 1.0)])
    try:
        config = tiny_config(peft__method="text_to_lora", peft__hyper_condition="description",
                             data__mixture=mixture)
        with pytest.raises(ConfigError, match=rf"'{name}'.*register_description"):
            build(config)
        with pytest.raises(ConfigError, match="register_description"):
            count_parameters(config)  # the shape-only path checks it too
    finally:
        seqio.MixtureRegistry.remove(mixture)
        seqio.TaskRegistry.remove(name)


@pytest.mark.parametrize("changes, match", [
    (dict(peft__hyper_generate="per_example", data__pack=True),
     r"hyper_generate='per_example'.*config\.data\.pack=False"),
    (dict(data__heldout="synthetic_reverse_shift"),
     r"config\.data\.heldout='synthetic_reverse_shift' has tasks the run trains on"),
])
def test_bad_hyper_configs_raise_config_errors(changes, match):
    with pytest.raises(ConfigError, match=match):
        build(tiny_config(peft__method="hyperformer_pp", **changes))


# ------------------------------------------------------------------------------ accounting


@pytest.mark.parametrize("changes", [dict(peft__method="hyperformer"), HYPER_X, DESCRIBED],
                         ids=["hyperformer", "hyper_x", "text_to_lora_description"])
def test_shape_only_counts_equal_the_built_run(changes):
    counts = count_parameters(tiny_config(**changes))
    assert counts.pop("model") == "tiny"
    assert counts == built(**changes).parameter_counts()


def test_hyperformer_pp_trainable_count_by_hand():
    e, h, p, d, m, tasks = 8, 16, 12, 64, 8, 13
    counts = count_parameters(tiny_config(
        peft__method="hyperformer_pp", peft__hyper_embed_dim=e, peft__hyper_hidden=h,
        peft__hyper_proj_dim=p, peft__reduction_factor=d // m))
    outputs = (d * m, m, m * d, d, d, d)  # down, down_bias, up, up_bias, norm scale, norm bias
    per_stack = (2 * e + 2 * e  # layer (2 layers) and position (post_attention, post_ffn) rows
                 + (e + 2 * e) * h + h + h * p + p + 2 * p  # projector MLP and its layer norm
                 + sum(p * o + o for o in outputs))  # heads
    assert counts["trainable"] == tasks * e + 2 * per_stack
    assert counts["task_table_size"] == tasks and counts["per_task_trainable"] == e
    assert counts["base"] == counts["total"] - counts["trainable"]
    assert math.isclose(counts["trainable_percent"],
                        100 * counts["trainable"] / counts["total"], rel_tol=1e-5)
