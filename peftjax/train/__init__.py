"""Training: pure jitted steps, the loop, evaluation, optimizer and metric writers.

`peftjax.train.step` (the jitted steps) imports only JAX; the loop and evaluation, which need the
data pipeline (TensorFlow, seqio) and metric writers, load on first use of their names here.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Experiment": "experiment", "build": "experiment",
    "evaluate_run": "loop", "restore_trained": "loop", "train": "loop",
    "TrainState": "step", "make_eval_step": "step", "make_train_step": "step",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'peftjax.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"peftjax.train.{_EXPORTS[name]}"), name)
