"""Hugging Face T5 checkpoints (`config.json` + safetensors) ⇄ peftjax T5.

Works with single-file (`model.safetensors`) and sharded (`model.safetensors.index.json`)
checkpoints, with the v1.1 convention (untied head, `lm_head.weight` present) and the original-T5
one (tied head, decoder output scaled by d_model**-0.5).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from peftjax.models.config import T5Config
from peftjax.models.t5 import T5

T5_MODEL_TYPES = ("t5", "mt5")
# Copies of `shared.weight` that some exports include; never separate parameters.
_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked; the message says how to fix it."""


def load_hf_config(path: str, **overrides) -> T5Config:
    """Read `path/config.json` as a T5Config; refuses other architectures with a clear error.

    The head is untied exactly when the checkpoint holds `lm_head.weight` (read from the
    safetensors header or shard index, never the tensor data), whatever config.json says:
    transformers >= 5 writes `tie_word_embeddings: true` for every T5, v1.1 included. A directory
    with config.json alone goes by the JSON.
    """
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{path!r} has no config.json; pass a Hugging Face model directory "
                              "(config.json + model.safetensors), e.g. from save_pretrained().")
    with open(config_file) as f:
        hf = json.load(f)
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    unsupported = [a for a in architectures if not a.startswith(("T5", "MT5"))]
    if model_type not in T5_MODEL_TYPES or unsupported:
        raise CheckpointError(
            f"{path!r} holds a {model_type!r} checkpoint (architectures {architectures}); "
            "peftjax.models.from_hf loads T5 / T5 v1.1 / Flan-T5 / mT5 encoder-decoders "
            "(model_type 't5'). Point config.model.hf_path at a T5 checkpoint.")
    tied = hf.get("tie_word_embeddings", True)
    names = _tensor_names(path)
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
        num_heads=hf["num_heads"], num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout_rate=hf.get("dropout_rate", 0.1),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=hf.get("feed_forward_proj", "relu"),
        tie_word_embeddings=tied if names is None else "lm_head.weight" not in names,
        # transformers >= 5 writes this explicitly; older configs imply it by tying.
        scale_decoder_outputs=hf.get("scale_decoder_outputs", tied),
    )
    fields.update(overrides)
    return T5Config(**fields)


def _hf_key_map(cfg: T5Config) -> Iterator[tuple[tuple, str, bool]]:
    """(peftjax state path, HF tensor name, transpose?) for every parameter of the model."""
    yield ("shared", "embedding"), "shared.weight", False
    mlp = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
    for stack, n_layers in (("encoder", cfg.num_encoder_layers),
                            ("decoder", cfg.num_decoder_layers)):
        yield ((stack, "relative_attention_bias", "embedding"),
               f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False)
        yield (stack, "final_norm", "scale"), f"{stack}.final_layer_norm.weight", False
        for i in range(n_layers):
            ours, hf = (stack, "layers", i), f"{stack}.block.{i}.layer"
            sublayers = [("attention_norm", "self_attention", "0", "SelfAttention")]
            if stack == "decoder":
                sublayers.append(("cross_attention_norm", "cross_attention", "1",
                                  "EncDecAttention"))
            for norm, attn, idx, hf_attn in sublayers:
                yield (*ours, norm, "scale"), f"{hf}.{idx}.layer_norm.weight", False
                for proj in "qkvo":
                    yield (*ours, attn, proj, "kernel"), f"{hf}.{idx}.{hf_attn}.{proj}.weight", True
            ff = "2" if stack == "decoder" else "1"
            yield (*ours, "mlp_norm", "scale"), f"{hf}.{ff}.layer_norm.weight", False
            for proj in mlp:
                yield ((*ours, "mlp", proj, "kernel"), f"{hf}.{ff}.DenseReluDense.{proj}.weight",
                       True)
    if not cfg.tie_word_embeddings:
        yield ("lm_head", "kernel"), "lm_head.weight", True


def _safetensor_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"{path!r} has no model.safetensors (or sharded index); convert "
                          "PyTorch .bin weights with transformers' save_pretrained(..., "
                          "safe_serialization=True).")


def _tensor_names(path: str) -> set[str] | None:
    """Names of the checkpoint's tensors from its index or header alone; None without weights."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    if os.path.isfile(single):
        with safe_open(single, framework="np") as f:
            return set(f.keys())
    return None


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    tensors = {}
    for file in _safetensor_files(path):
        with safe_open(file, framework="flax") as f:  # flax keeps bfloat16 checkpoints intact
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[name] = np.asarray(f.get_tensor(name))
    return tensors


def from_hf(path: str, **config_overrides) -> T5:
    """Load a Hugging Face T5 v1.1 / Flan-T5 (or original T5) checkpoint directory.

    Returns a `peftjax.models.T5`, callable as
    `model(encoder_input_tokens=..., decoder_input_tokens=...)` → float32 logits
    `[batch, length, vocab]`. `config_overrides` change non-shape fields (e.g. `dtype`,
    `dropout_rate`).
    """
    cfg = load_hf_config(path, **config_overrides)
    tensors = _read_tensors(path)
    abstract = nnx.eval_shape(lambda: T5(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    expected = set()
    for ours, hf_name, transpose in _hf_key_map(cfg):
        expected.add(hf_name)
        if hf_name not in tensors:
            raise CheckpointError(f"{path!r} lacks tensor {hf_name!r} that a T5 with this "
                                  "config.json needs; the checkpoint is incomplete or not a T5.")
        value = tensors[hf_name].T if transpose else tensors[hf_name]
        variable = flat[ours]
        if value.shape != variable.value.shape:
            raise CheckpointError(
                f"{hf_name!r} in {path!r} has shape {value.shape} but config.json implies "
                f"{variable.value.shape}; the weights and config.json disagree.")
        variable.value = jnp.asarray(value, dtype=variable.value.dtype)
    unexpected = sorted(set(tensors) - expected - set(_TIED_COPIES))
    if unexpected:
        raise CheckpointError(f"{path!r} has tensors a T5 of this config does not use, e.g. "
                              f"{unexpected[:5]}; is it a T5 (v1.1) checkpoint?")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def to_hf(model: T5, path: str) -> None:
    """Write `model`'s base weights as a Hugging Face T5 directory (config.json + safetensors)."""
    cfg = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {}
    for ours, hf_name, transpose in _hf_key_map(cfg):
        value = np.asarray(flat[ours].value, dtype=np.float32)
        tensors[hf_name] = np.ascontiguousarray(value.T if transpose else value)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf_config = {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout_rate, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "feed_forward_proj": cfg.feed_forward_proj,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "scale_decoder_outputs": cfg.scale_decoder_outputs,
        "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
