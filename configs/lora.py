"""LoRA (r=8, alpha=16) on every projection of the frozen quickstart base, synthetic suite.

    peftjax train --config configs/lora.py --workdir runs/lora
    peftjax train --config configs/lora.py:quick --workdir /tmp/lora            # smoke run
    peftjax train --config configs/lora.py:per_task --workdir runs/lora_per_task  # one per task

Shared by default: one adapter for all 8 tasks. `per_task` gives each task its own pair, picked by
task id inside mixed-task batches.
"""

from configs.suite import suite_config

# Every attention projection (self and cross) and every feed-forward projection.
ALL_PROJECTIONS = r".*(attention\.(q|k|v|o)|mlp\.(wi_0|wi_1|wo))"


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "lora"
    config.peft.rank = 8
    config.peft.alpha = 16.0
    config.peft.targets = ALL_PROJECTIONS
    return config
