"""Full fine-tuning baseline: every weight of the base trains (for comparison with PEFT).

    peftjax train --config configs/full.py --workdir runs/full
    peftjax train --config configs/full.py:quick --workdir /tmp/full   # a smoke run

Also the first pass of sparse fine-tuning (`configs/sparse.py` picks its mask from this run).
"""

from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "full"
    config.optim.learning_rate = 3e-4  # every weight moves: a smaller step than for adapters
    return config
