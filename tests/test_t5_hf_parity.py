"""T5 logits, buckets and decoding equal transformers' PyTorch T5 on the same weights."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.models import from_hf, greedy_decode, to_hf
from peftjax.models.attention import relative_position_buckets
from peftjax.models.hf import CheckpointError
from tests.helpers import save_hf_t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIGS = {
    "v1.1 untied": dict(feed_forward_proj="gated-gelu", tie=False, d_model=32, d_kv=8,
                        num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=3),
    "original relu tied": dict(feed_forward_proj="relu", tie=True, d_model=24, d_kv=6,
                               num_heads=3, d_ff=40, num_layers=3, num_decoder_layers=2),
    "odd inner dim, few buckets": dict(feed_forward_proj="gated-silu", tie=False, d_model=20,
                                       d_kv=7, num_heads=2, d_ff=36, num_layers=1,
                                       num_decoder_layers=1, relative_attention_num_buckets=8,
                                       relative_attention_max_distance=20),
}


def random_batch(rng, vocab_size, batch=3, source=37, target=29):
    enc = rng.integers(2, vocab_size, (batch, source))
    enc[1, 20:] = 0  # padding
    enc[2, 5:] = 0
    dec = rng.integers(2, vocab_size, (batch, target))
    dec[:, 0] = 0  # decoder start token
    return enc, dec


def relative_error(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    fields = dict(CONFIGS[name])
    tie = fields.pop("tie")
    hf_model = save_hf_t5(tmp_path, tie=tie, **fields)
    model = from_hf(str(tmp_path))
    assert model.config.tie_word_embeddings == tie
    enc, dec = random_batch(np.random.default_rng(1), 97)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                       decoder_input_ids=torch.tensor(dec)).logits.numpy()
    ours = np.asarray(model(encoder_input_tokens=jnp.asarray(enc),
                            decoder_input_tokens=jnp.asarray(dec)))
    valid = enc.sum(1) > 0
    assert ours.shape == ref.shape
    assert relative_error(ours[valid], ref[valid]) < 1e-4


def test_buckets_match_transformers_exactly():
    from transformers.models.t5.modeling_t5 import T5Attention
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (8, 20), (64, 256)):
            ours = relative_position_buckets(300, 300, bidirectional=bidirectional,
                                             num_buckets=num_buckets, max_distance=max_distance)
            rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
            ref = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets,
                                                        max_distance).numpy()
            np.testing.assert_array_equal(ours, ref)


def test_greedy_decode_matches_uncached_transformers_argmax(tmp_path):
    """Cached greedy decoding equals re-running transformers' full forward at every step."""
    fields = {k: v for k, v in CONFIGS["v1.1 untied"].items() if k != "tie"}
    hf_model = save_hf_t5(tmp_path, tie=False, **fields)
    model = from_hf(str(tmp_path))
    enc, _ = random_batch(np.random.default_rng(2), 97)
    ref = torch.zeros((enc.shape[0], 1), dtype=torch.long)  # decoder start token
    with torch.no_grad():
        for _ in range(12):
            logits = hf_model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                              decoder_input_ids=ref).logits
            ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    ours = np.asarray(jax.jit(lambda e: greedy_decode(model, e, max_length=12, eos_id=-1))(enc))
    np.testing.assert_array_equal(ours, ref.numpy()[:, 1:])


def test_to_hf_round_trip_loads_in_transformers(tmp_path):
    hf_model = save_hf_t5(tmp_path / "a", tie=False, **{k: v for k, v in
                                                         CONFIGS["v1.1 untied"].items()
                                                         if k != "tie"})
    to_hf(from_hf(str(tmp_path / "a")), str(tmp_path / "b"))
    again = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "b").eval()
    enc, dec = random_batch(np.random.default_rng(3), 97)
    with torch.no_grad():
        a = hf_model(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits
        b = again(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)


def test_other_architecture_is_refused(tmp_path):
    config = transformers.BartConfig(vocab_size=50, d_model=16, encoder_layers=1,
                                     decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=16,
                                     decoder_ffn_dim=16)
    transformers.BartForConditionalGeneration(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="'bart' checkpoint.*model_type 't5'"):
        from_hf(str(tmp_path))


def test_missing_directory_names_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        from_hf(str(tmp_path))
