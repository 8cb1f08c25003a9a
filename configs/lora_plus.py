"""LoRA+: B learns 16x faster than A (the LoRA+ paper's suggested ratio), same schedule shape.

    peftjax train --config configs/lora_plus.py --workdir runs/lora_plus
    peftjax train --config configs/lora_plus.py:quick --workdir /tmp/lora_plus
"""

from configs import lora


def get_config(arg: str = ""):
    config = lora.get_config(arg)
    config.peft.lora_plus_ratio = 16.0
    return config
