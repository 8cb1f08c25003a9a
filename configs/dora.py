"""DoRA: LoRA's direction with a trained per-column magnitude (numerics of HF peft's DoRA).

    peftjax train --config configs/dora.py --workdir runs/dora
    peftjax train --config configs/dora.py:quick --workdir /tmp/dora
"""

from configs import lora


def get_config(arg: str = ""):
    config = lora.get_config(arg)
    config.peft.dora = True
    return config
