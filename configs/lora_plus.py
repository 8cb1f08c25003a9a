"""LoRA+: B learns 16x faster than A (the LoRA+ paper's suggested ratio), same schedule shape.

    peftjax train --config configs/lora_plus.py --workdir runs/lora_plus
    peftjax train --config configs/lora_plus.py:quick --workdir /tmp/lora_plus
"""

from configs import lora


def get_config(arg: str = ""):
    config = lora.get_config(arg)
    config.peft.lora_plus_ratio = 16.0
    # The ratio multiplies B's step: at the suite's 3e-3 B moved at 4.8e-2 and training diverged
    # (exact match 0 after 500 steps). A at 3e-4 puts B at 4.8e-3, near plain LoRA's 3e-3.
    config.optim.learning_rate = 3e-4
    return config
