"""Quickstart: per-task LoRA adapters learn skill compositions on a small frozen T5 (CPU, minutes).

    peftjax train --config configs/quickstart.py --workdir runs/quickstart
    peftjax eval  --config configs/quickstart.py --workdir runs/quickstart

The frozen base (`assets/quickstart_base/`, an HF-format T5 made by
`scripts/pretrain_quickstart_base.py`) knows single string skills: copy, reverse, Caesar shift,
uppercase, double letters. The 8 tasks of the `synthetic_suite` mixture compose two or three of
them ("reverse_shift: abc" → "dcb"), which the base cannot do. One LoRA per task, selected per
example by its task id inside mixed-task batches, learns each composition; `eval` prints the
per-task table against the frozen base. Unpacked batches: one task per row lets each row gather
its own adapter, cheaper here than per-token selection over all 13 task ids in packed rows.
"""

import os

from peftjax.config import default_config

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def get_config(arg: str = ""):
    config = default_config()
    config.seed = 0
    config.model.hf_path = os.path.join(ASSETS, "quickstart_base")
    config.peft.method = "lora"
    config.peft.mode = "per_task"
    config.peft.rank = 8
    config.peft.alpha = 16.0
    config.peft.targets = r".*(attention\.(q|k|v|o)|mlp\.(wi_0|wi_1|wo))"
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
    if arg == "quick":  # a smoke run for tests and CI
        config.train.steps = 20
        config.train.log_every = 10
        config.train.checkpoint_every = 10
        config.data.eval_examples = 8
    return config
