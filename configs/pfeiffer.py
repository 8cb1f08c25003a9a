"""Pfeiffer adapters on the synthetic suite: one bottleneck after each FFN.

    peftjax train --config configs/pfeiffer.py --workdir runs/pfeiffer
    peftjax train --config configs/pfeiffer.py:per_task --workdir runs/pfeiffer_per_task
    peftjax train --config configs/pfeiffer.py:quick --workdir /tmp/pfeiffer   # a smoke run

`h ↦ h + U relu(D h)` on the FFN's output before its residual add (Pfeiffer et al. 2021; half
the Houlsby adapters). Width 16 on the 128-wide base, as every bottleneck-family config.
"""

from configs import houlsby


def get_config(arg: str = ""):
    config = houlsby.get_config(arg)  # same adapter, after the FFN only
    config.peft.method = "pfeiffer"
    return config
