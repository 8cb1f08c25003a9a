"""Prompt tuning (vs HF peft) and prefix tuning (vs float64 attention with prefixes)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax.models import T5, Context, from_hf, greedy_decode, preset
from peftjax.models.attention import MASK_VALUE, Attention
from peftjax.peft import PeftConfig, apply_peft
from peftjax.peft.prefix import PrefixProjection, PrefixTuning, fold_prefix_projection
from peftjax.peft.prompt import PromptTuning
from tests.helpers import save_hf_t5

RNG = np.random.default_rng(0)
# d_model 64, 4 heads of 16, vocab 259; one layer per stack keeps the file fast.
CFG = dataclasses.replace(preset("tiny"), num_encoder_layers=1, num_decoder_layers=1)


def f64(x):
    return np.asarray(x, dtype=np.float64)


def normal(shape, scale=1.0):
    return jnp.asarray(scale * RNG.normal(size=shape), jnp.float32)


def batch():
    enc = jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])
    dec = jnp.array([[0, 5, 6], [0, 7, 8]])
    return enc, dec


@functools.cache
def base_state():
    return nnx.split(T5(CFG, rngs=nnx.Rngs(0)))


def base_model():
    """A fresh T5 (new modules and variables, same weights): building one is slow on CPU."""
    graphdef, state = base_state()
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def adapted(method, mode="shared", **kwargs):
    model = base_model()
    paths = apply_peft(model, PeftConfig(method=method, mode=mode, **kwargs), num_tasks=3,
                       rngs=nnx.Rngs(1))
    return model, paths


# ---------------------------------------------------------------- prompt tuning


def test_prompt_tuning_matches_hf_peft(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    hf_model = save_hf_t5(tmp_path, tie=False, feed_forward_proj="gated-gelu", d_model=32,
                          d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=2)
    model = from_hf(str(tmp_path))
    p = 5
    peft_config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=p,
                                          prompt_tuning_init="RANDOM")
    hf_peft = peft.get_peft_model(hf_model, peft_config).eval()
    table = hf_peft.prompt_encoder["default"].embedding.weight  # [2p, d]; encoder uses [:p]
    with torch.no_grad():
        table.copy_(torch.randn_like(table))
    apply_peft(model, PeftConfig(method="prompt_tuning", num_virtual_tokens=p),
               num_tasks=None, rngs=nnx.Rngs(0))
    assert isinstance(model.encoder.prompt, PromptTuning)
    model.encoder.prompt.prompt.value = jnp.asarray(table.detach().numpy()[:p])
    enc = RNG.integers(2, 97, (3, 11))
    enc[1, 6:] = 0  # padding
    dec = RNG.integers(2, 97, (3, 7))
    dec[:, 0] = 0
    with torch.no_grad():
        ref = hf_peft(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                      decoder_input_ids=torch.tensor(dec)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(enc), jnp.asarray(dec)))
    base = np.asarray(from_hf(str(tmp_path))(jnp.asarray(enc), jnp.asarray(dec)))
    assert np.max(np.abs(base - ref)) > 1e-2  # the prompt matters
    assert float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref))) < 1e-4


def test_vocab_init_samples_token_embeddings():
    model, _ = adapted("prompt_tuning", "per_task", num_virtual_tokens=4)
    prompt = np.asarray(model.encoder.prompt.prompt.value)
    assert prompt.shape == (3, 4, CFG.d_model)
    table = np.asarray(model.shared.embedding.value)
    for row in prompt.reshape(-1, CFG.d_model):
        assert np.min(np.max(np.abs(table - row), axis=1)) == 0.0


def test_per_task_prompts_select_per_example():
    model, _ = adapted("prompt_tuning", "per_task", prompt_init="random")
    table = model.encoder.prompt.prompt.value
    enc, dec = batch()
    ids = [2, 0]
    mixed = np.asarray(model(enc, dec, task_ids=jnp.array(ids)))
    for i, k in enumerate(ids):  # each row equals a model whose only prompt is its task's
        model.encoder.prompt = PromptTuning(table[k], per_task=False)
        np.testing.assert_allclose(mixed[i], np.asarray(model(enc, dec))[i], rtol=1e-5,
                                   atol=1e-5)
    assert not np.allclose(mixed[0], np.asarray(model(enc, dec))[0], atol=1e-3)


def test_prompt_tuning_refuses_packed_rows():
    model, _ = adapted("prompt_tuning", "per_task")
    enc, dec = batch()
    seg = (enc > 0).astype(jnp.int32)
    with pytest.raises(ValueError, match="config.data.pack=False"):
        model(enc, dec, encoder_segment_ids=seg, decoder_segment_ids=jnp.ones_like(dec),
              task_ids=jnp.array([0, 1]))
    with pytest.raises(ValueError, match="config.data.pack=False"):
        model(enc, dec, encoder_task_ids=jnp.zeros_like(enc), decoder_task_ids=jnp.zeros_like(dec))


# ---------------------------------------------------------------- prefix tuning


def attention_reference(att, x_btd, kv_bsd, bias_bhts, prefixes):
    """float64 attention where query (b, t) also attends to `prefixes(b, t)` = (keys, values)
    `[p, h, d_kv]` with score bias 0."""
    h, dk = att.num_heads, att.d_kv
    q = (f64(x_btd) @ f64(att.q.kernel.value)).reshape(*x_btd.shape[:2], h, dk)
    k = (f64(kv_bsd) @ f64(att.k.kernel.value)).reshape(*kv_bsd.shape[:2], h, dk)
    v = (f64(kv_bsd) @ f64(att.v.kernel.value)).reshape(*kv_bsd.shape[:2], h, dk)
    b_, t_ = x_btd.shape[:2]
    out = np.zeros((b_, t_, h, dk))
    for b in range(b_):
        for t in range(t_):
            pk, pv = (f64(a) for a in prefixes(b, t))
            for head in range(h):
                keys = np.concatenate([pk[:, head], k[b, :, head]])
                values = np.concatenate([pv[:, head], v[b, :, head]])
                scores = keys @ q[b, t, head]
                scores += np.concatenate([np.zeros(len(pk)), f64(bias_bhts[b, head, t])])
                w = np.exp(scores - scores.max())
                out[b, t, head] = (w / w.sum()) @ values
    return out.reshape(b_, t_, h * dk) @ f64(att.o.kernel.value)


def prefix_attention(num_tasks, p=3):
    att = Attention(CFG, salt=0, rngs=nnx.Rngs(0))
    lead = (num_tasks,) if num_tasks else ()
    shape = (*lead, p, CFG.num_heads, CFG.d_kv)
    att.prefix = PrefixTuning(normal(shape), normal(shape), per_task=bool(num_tasks))
    return att


def check_prefix_attention(att, x, kv, bias, ids, prefixes):
    ctx = Context(task_ids=None if ids is None else jnp.asarray(ids))
    ours = np.asarray(att(jnp.asarray(x), jnp.asarray(kv), jnp.asarray(bias), ctx))
    full_bias = np.broadcast_to(bias, (x.shape[0], CFG.num_heads, x.shape[1], kv.shape[1]))
    ref = attention_reference(att, x, kv, full_bias, prefixes)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def self_bias(batch_size, length, mask_bts):
    """Random relative-position-like bias plus an additive mask, `[b, h, t, t]`."""
    bias = RNG.normal(size=(1, CFG.num_heads, length, length))
    return (bias + np.where(mask_bts[:, None], 0.0, MASK_VALUE)).astype(np.float32)


@pytest.mark.parametrize("ids", [None, np.array([2, 0])], ids=["shared", "per-example"])
def test_prefix_attention_matches_float64(ids):
    att = prefix_attention(None if ids is None else 3)
    keys, values = att.prefix.prefixes()
    x = RNG.normal(size=(2, 4, CFG.d_model)).astype(np.float32)
    src = RNG.normal(size=(2, 6, CFG.d_model)).astype(np.float32)
    key_mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], bool)
    bias = np.where(key_mask, 0.0, MASK_VALUE).astype(np.float32)[:, None, None, :]  # cross
    if ids is None:
        def prefixes(b, t):
            return keys, values
    else:
        def prefixes(b, t):
            return keys[ids[b]], values[ids[b]]
    check_prefix_attention(att, x, src, bias, ids, prefixes)


def test_per_token_prefixes_follow_each_tokens_task_in_packed_rows():
    att = prefix_attention(3)
    keys, values = att.prefix.prefixes()
    # Two packed rows: segments of tasks (1, 1, 2 | 0, 0, 2, 2, 2) and (0, 0, 0, 0, 1, 1, pad).
    segments = np.array([[1, 1, 1, 2, 2, 3, 3, 3], [1, 1, 1, 1, 2, 2, 0, 0]])
    ids = np.array([[1, 1, 1, 0, 0, 2, 2, 2], [0, 0, 0, 0, 1, 1, 0, 0]])
    mask = (segments[:, :, None] == segments[:, None, :]) & (segments > 0)[:, None, :]
    bias = self_bias(2, 8, mask)
    x = RNG.normal(size=(2, 8, CFG.d_model)).astype(np.float32)

    def prefixes(b, t):
        return keys[ids[b, t]], values[ids[b, t]]

    check_prefix_attention(att, x, x, bias, ids, prefixes)


def test_per_token_ids_equal_per_example_ids_when_rows_are_single_task():
    model, _ = adapted("prefix_tuning", "per_task", prompt_init="random")
    enc, dec = batch()
    ids = jnp.array([2, 1])
    per_example = model(enc, dec, task_ids=ids)
    per_token = model(enc, dec, encoder_task_ids=jnp.repeat(ids[:, None], 5, 1),
                      decoder_task_ids=jnp.repeat(ids[:, None], 3, 1))
    np.testing.assert_allclose(per_example, per_token, rtol=1e-5, atol=1e-5)
    assert not np.allclose(per_example, model(enc, dec, task_ids=jnp.array([0, 0])), atol=1e-3)


def test_prefixes_reach_every_attention_and_vocab_init_is_on_key_scale():
    model, paths = adapted("prefix_tuning")
    assert len(paths) == CFG.num_encoder_layers + 2 * CFG.num_decoder_layers
    assert all(isinstance(m.prefix, PrefixTuning) for _, m in nnx.iter_modules(model)
               if isinstance(m, Attention))
    keys = np.asarray(model.encoder.layers[0].self_attention.prefix.prefix_keys.value)
    assert keys.shape == (8, CFG.num_heads, CFG.d_kv) and 0.1 < keys.std() < 10


@pytest.mark.parametrize("mode", ["shared", "per_task"])
def test_folding_the_prefix_mlp_keeps_the_logits(mode):
    model, _ = adapted("prefix_tuning", mode, prefix_projection=True, prefix_hidden=24)
    prefix = model.decoder.layers[0].cross_attention.prefix
    assert isinstance(prefix, PrefixProjection)
    assert prefix.prefix_mlp_in.value.shape == (CFG.d_model, 24)
    enc, dec = batch()
    ids = jnp.array([2, 0])
    before = np.asarray(model(enc, dec, task_ids=ids))
    folded = fold_prefix_projection(model)
    assert len(folded) == 3 and fold_prefix_projection(model) == []
    prefix = model.decoder.layers[0].cross_attention.prefix
    assert isinstance(prefix, PrefixTuning)
    lead = (3,) if mode == "per_task" else ()
    assert prefix.prefix_keys.value.shape == (*lead, 8, CFG.num_heads, CFG.d_kv)
    np.testing.assert_allclose(np.asarray(model(enc, dec, task_ids=ids)), before, rtol=1e-6,
                               atol=1e-6)


# ---------------------------------------------------------------- decoding and bad input


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_greedy_decode_equals_teacher_forced_argmax(method):
    model, _ = adapted(method, "per_task", prompt_init="random")
    enc, _ = batch()
    ids = jnp.array([1, 2])
    decoded = jax.jit(lambda e, i: greedy_decode(model, e, max_length=6, task_ids=i,
                                                 eos_id=-1))(enc, ids)
    inputs = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), decoded[:, :-1]], axis=1)
    np.testing.assert_array_equal(decoded, jnp.argmax(model(enc, inputs, task_ids=ids), -1))
    base = greedy_decode(base_model(), enc, max_length=6, eos_id=-1)
    assert not np.array_equal(decoded, base)  # the prompt / prefixes change the output


def test_prefix_tuning_on_a_module_without_attention_names_the_fix():
    model = base_model()
    with pytest.raises(ValueError, match=r"(?s)'.\*mlp' matches no module.*Attention modules"
                                         r".*\(self\|cross\)_attention.*a MLP"):
        apply_peft(model, PeftConfig(method="prefix_tuning", targets=r".*mlp"), num_tasks=None,
                   rngs=nnx.Rngs(1))


def test_unknown_prompt_init_names_the_choices():
    with pytest.raises(ValueError, match="prompt_init 'text'.*vocab"):
        adapted("prompt_tuning", prompt_init="text")
    with pytest.raises(ValueError, match="prompt_init 'text'.*vocab"):
        adapted("prefix_tuning", prompt_init="text")
