"""Shared settings of the per-method configs: adapt the quickstart base on the synthetic suite.

Not a run by itself. Each `configs/<method>.py` starts from `suite_config(arg)` and sets its
method, so the methods compare on equal footing (same base, data, budget and optimizer):

    peftjax train --config configs/lora.py --workdir runs/lora
    peftjax train --config configs/lora.py:quick --workdir /tmp/lora   # a smoke run

`arg` is a comma-separated list of switches: `quick` (20 steps, tiny eval) and `per_task`
(one adapter per task instead of one shared by all tasks).
"""

import os

from ml_collections import ConfigDict

from peftjax.config import default_config

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def switches(arg: str) -> set[str]:
    return {s for s in (arg or "").split(",") if s}


def suite_config(arg: str = "") -> ConfigDict:
    """The quickstart's base, data, budget and optimizer; the method is left to the caller."""
    config = default_config()
    config.seed = 0
    config.model.hf_path = os.path.join(ASSETS, "quickstart_base")
    config.peft.mode = "per_task" if "per_task" in switches(arg) else "shared"
    config.data.mixture = "synthetic_suite"
    config.data.batch_size = 32
    config.data.pack = False
    config.data.inputs_length = 32
    config.data.targets_length = 32
    config.data.eval_examples = 64
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 50
    config.train.steps = 1000
    config.train.log_every = 100
    config.train.checkpoint_every = 500
    if "quick" in switches(arg):  # a smoke run for tests and CI
        config.train.steps = 20
        config.train.log_every = 10
        config.train.checkpoint_every = 10
        config.data.eval_examples = 8
    return config
