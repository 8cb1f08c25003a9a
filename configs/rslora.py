"""rsLoRA: LoRA scaled by alpha / sqrt(r) instead of alpha / r (r=8, alpha=16: scale 5.66).

    peftjax train --config configs/rslora.py --workdir runs/rslora
    peftjax train --config configs/rslora.py:quick --workdir /tmp/rslora
"""

from configs import lora


def get_config(arg: str = ""):
    config = lora.get_config(arg)
    config.peft.rslora = True
    return config
