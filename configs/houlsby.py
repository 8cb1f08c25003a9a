"""Houlsby adapters on the synthetic suite: a bottleneck after attention and after the FFN.

    peftjax train --config configs/houlsby.py --workdir runs/houlsby
    peftjax train --config configs/houlsby.py:per_task --workdir runs/houlsby_per_task
    peftjax train --config configs/houlsby.py:quick --workdir /tmp/houlsby   # a smoke run

`h ↦ h + U relu(D h)` before each residual add of self-attention and of the FFN (Houlsby et al.
2019); U starts at zero, so training starts from the frozen base. Every bottleneck-family config
uses the same width, 16 on the 128-wide quickstart base (reduction factor 8).
"""

from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "houlsby"
    config.peft.reduction_factor = 8
    config.peft.adapter_activation = "relu"
    return config
