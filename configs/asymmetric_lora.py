"""Asymmetric LoRA: A frozen at its random init, only B trains (half the trainable parameters
of `lora.py` for square projections).

    peftjax train --config configs/asymmetric_lora.py --workdir runs/asymmetric_lora
    peftjax train --config configs/asymmetric_lora.py:quick --workdir /tmp/asymmetric_lora
"""

from configs import lora


def get_config(arg: str = ""):
    config = lora.get_config(arg)
    config.peft.freeze_a = True
    return config
