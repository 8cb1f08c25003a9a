"""Base models: T5 v1.1 / Flan-T5 in Flax NNX, presets, HF checkpoint loading, decoding."""

from peftjax.models.config import PRESETS, T5Config, preset
from peftjax.models.context import Context
from peftjax.models.decoding import greedy_decode
from peftjax.models.hf import from_hf, load_hf_config, to_hf
from peftjax.models.t5 import T5

__all__ = ["PRESETS", "Context", "T5", "T5Config", "from_hf", "greedy_decode", "load_hf_config",
           "preset", "to_hf"]
