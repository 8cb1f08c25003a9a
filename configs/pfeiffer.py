"""Pfeiffer adapters on the synthetic suite: one bottleneck after each FFN.

    peftjax train --config configs/pfeiffer.py --workdir runs/pfeiffer
    peftjax train --config configs/pfeiffer.py:per_task --workdir runs/pfeiffer_per_task
    peftjax train --config configs/pfeiffer.py:quick --workdir /tmp/pfeiffer   # a smoke run

`h ↦ h + U relu(D h)` on the FFN's output before its residual add (Pfeiffer et al. 2021; half
the Houlsby adapters). Width 16 on the 128-wide base, as every bottleneck-family config.
"""

from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "pfeiffer"
    config.peft.reduction_factor = 8
    config.peft.adapter_activation = "relu"
    return config
