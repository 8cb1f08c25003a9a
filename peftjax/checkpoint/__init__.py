"""Checkpointing of trainable state (orbax)."""

from peftjax.checkpoint.manager import CheckpointMismatchError, Checkpoints

__all__ = ["CheckpointMismatchError", "Checkpoints"]
