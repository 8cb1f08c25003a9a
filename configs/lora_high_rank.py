"""High-rank LoRA (r=64, alpha=128: scale 2 as in r=8 / alpha=16) on every projection, shared.

The strong simple baseline: one big adapter for all tasks.

    peftjax train --config configs/lora_high_rank.py --workdir runs/lora_high_rank
    peftjax train --config configs/lora_high_rank.py:quick --workdir /tmp/lora_high_rank
"""

from configs import lora


def get_config(arg: str = ""):
    config = lora.get_config(arg)
    config.peft.rank = 64
    config.peft.alpha = 128.0
    return config
