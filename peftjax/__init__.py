"""peftjax: multi-task parameter-efficient fine-tuning of frozen transformers in JAX / Flax NNX."""

__version__ = "0.1.0"
