"""T5 architecture hyper-parameters and the published T5 v1.1 size presets."""

from __future__ import annotations

import dataclasses
from typing import Any

ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
# Rematerialisation of each layer call (`T5Config.remat`), named after the
# `jax.checkpoint_policies` they use: what a layer keeps for the backward pass.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Shape and numerics of a T5 encoder-decoder.

    Field names follow Hugging Face's `T5Config` where they exist so that `config.json` files map
    one to one. Defaults are T5 v1.1 small.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_heads: int = 6
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    # "gated-gelu" (T5 v1.1, Flan-T5: tanh-approximate GELU), "relu" (original T5), "gated-silu"
    feed_forward_proj: str = "gated-gelu"
    # Tied: the output projection is the transposed input embedding (original T5).
    tie_word_embeddings: bool = False
    # Original T5 multiplies the decoder output by d_model**-0.5 before a tied head; v1.1 does not.
    scale_decoder_outputs: bool = False
    dtype: str = "float32"  # compute dtype; parameters stay in param_dtype
    param_dtype: str = "float32"
    # How the layer stacks run; neither changes the parameters or what the model computes.
    # scan_layers: one `jax.lax.scan` over each stack's layers (compile time flat in depth);
    # needs layers that are alike (the same PEFT modules in every layer).
    scan_layers: bool = False
    # What each layer keeps for the backward pass: none (everything, no recomputation) | full
    # (nothing: the layer is recomputed) | dots (matmul outputs) | dots_no_batch (matmul outputs
    # without batch dimensions, i.e. weight matmuls, not attention scores).
    remat: str = "none"

    def __post_init__(self) -> None:
        _ = self.activation  # validates feed_forward_proj
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads",
                     "num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Unknown remat policy {self.remat!r} (config.model.remat); choose "
                             f"one of {REMAT_POLICIES}.")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """Activation of the MLP, named as in Hugging Face's ACT2FN."""
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'; "
                f"use one of {ACTIVATIONS}, optionally prefixed with 'gated-'.")
        act = parts[-1]
        if self.feed_forward_proj == "gated-gelu":
            act = "gelu_new"  # what T5 v1.1 was trained with (and what transformers uses)
        if act not in ACTIVATIONS:
            raise ValueError(f"Unsupported activation {act!r} in feed_forward_proj; "
                             f"supported: {ACTIVATIONS}.")
        return act

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def replace(self, **changes: Any) -> T5Config:
        return dataclasses.replace(self, **changes)


def _v11(d_model: int, d_ff: int, num_heads: int, num_layers: int) -> T5Config:
    return T5Config(d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_kv=64,
                    num_encoder_layers=num_layers, num_decoder_layers=num_layers)


# Published T5 v1.1 / Flan-T5 shapes (google/t5-v1_1-*); "tiny" (tests) and "mini" (CPU
# demos) are ours, sized for the byte vocabulary.
PRESETS: dict[str, T5Config] = {
    "tiny": T5Config(vocab_size=259, d_model=64, d_kv=16, d_ff=128, num_heads=4,
                     num_encoder_layers=2, num_decoder_layers=2),
    "mini": T5Config(vocab_size=259, d_model=128, d_kv=32, d_ff=384, num_heads=4,
                     num_encoder_layers=3, num_decoder_layers=3),
    "small": _v11(512, 1024, 6, 8),
    "base": _v11(768, 2048, 12, 12),
    "large": _v11(1024, 2816, 16, 24),
    "xl": _v11(2048, 5120, 32, 24),
    "xxl": _v11(4096, 10240, 64, 24),
}


def preset(size: str, **overrides: Any) -> T5Config:
    """The T5Config of a named size, with field overrides (e.g. `vocab_size=259`)."""
    if size not in PRESETS:
        raise ValueError(f"Unknown model size {size!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[size].replace(**overrides)
