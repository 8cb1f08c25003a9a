"""SMoRA: one LoRA of rank 32 on every projection whose ranks are experts, 8 per token.

    peftjax train --config configs/smora.py --workdir runs/smora
    peftjax train --config configs/smora.py:quick --workdir /tmp/smora            # smoke run

As many adapter weights as `configs/molora.py` (4 experts x rank 8) and as many active ranks per
token as one LoRA of rank 8. The scale is alpha (each expert is one rank, scaled as a rank-1
LoRA), so with gates summing to 1 over 8 ranks each active rank gets about alpha / 8, as in a
rank-8 LoRA with the same alpha. Shared by all tasks (`per_task` is refused); the
load-balancing loss is logged as `aux_loss`.
"""

from configs.lora import ALL_PROJECTIONS
from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(arg)  # `per_task` is refused at build, with the reason
    config.peft.method = "smora"
    config.peft.rank = 32
    config.peft.top_k = 8
    config.peft.alpha = 16.0
    config.peft.balance_coef = 0.01
    config.peft.targets = ALL_PROJECTIONS
    return config
