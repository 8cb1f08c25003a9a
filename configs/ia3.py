"""(IA)^3 on the synthetic suite: learned vectors rescale keys, values and the FFN's hidden units.

    peftjax train --config configs/ia3.py --workdir runs/ia3
    peftjax train --config configs/ia3.py:per_task --workdir runs/ia3_per_task
    peftjax train --config configs/ia3.py:quick --workdir /tmp/ia3   # a smoke run

HF peft's T5 placement: k and v scaled on their output, `mlp.wo` on its input (the FFN's hidden
activations). The vectors start at ones, so training starts from the frozen base.
"""

from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "ia3"
    config.peft.targets = r".*(attention\.(k|v)|mlp\.wo)"
    config.peft.ia3_feedforward = r".*mlp\.wo"
    return config
