"""Parallel adapters on the synthetic suite: a scaled bottleneck beside every FFN.

    peftjax train --config configs/parallel.py --workdir runs/parallel
    peftjax train --config configs/parallel.py:per_task --workdir runs/parallel_per_task
    peftjax train --config configs/parallel.py:quick --workdir /tmp/parallel   # a smoke run

`mlp(x) + 4 · U relu(D x)` with x the FFN's (normalised) input (He et al. 2022); the scale 4 is
AdapterHub's `par_bn` default. U starts at zero. Width 16 on the 128-wide base, as every
bottleneck-family config.
"""

from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "parallel"
    config.peft.reduction_factor = 8
    config.peft.adapter_activation = "relu"
    config.peft.adapter_scale = 4.0
    return config
