"""Layer-norm tuning on the synthetic suite: only (copies of) the RMSNorm scales train.

    peftjax train --config configs/ln_tuning.py --workdir runs/ln_tuning
    peftjax train --config configs/ln_tuning.py:per_task --workdir runs/ln_tuning_per_task
    peftjax train --config configs/ln_tuning.py:quick --workdir /tmp/ln_tuning   # a smoke run

T5 has no biases, so this is the suite's BitFit-like baseline: every norm (attention, cross
attention, FFN and final norms) gets a trainable scale that starts as the frozen one.
"""

from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "ln_tuning"
    config.peft.targets = r".*norm"
    return config
