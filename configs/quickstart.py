"""Quickstart: per-task LoRA adapters learn skill compositions on a small frozen T5 (CPU, minutes).

    peftjax train --config configs/quickstart.py --workdir runs/quickstart
    peftjax eval  --config configs/quickstart.py --workdir runs/quickstart

The frozen base (`assets/quickstart_base/`, an HF-format T5 made by
`scripts/pretrain_quickstart_base.py`) knows single string skills: copy, reverse, Caesar shift,
uppercase, double letters. The 8 tasks of the `synthetic_suite` mixture compose two or three of
them ("reverse_shift: abc" → "dcb"), which the base cannot do. One LoRA per task, selected per
example by its task id inside mixed-task batches, learns each composition; `eval` prints the
per-task table against the frozen base. Unpacked batches: one task per row lets each row gather
its own adapter, cheaper here than per-token selection over all 13 task ids in packed rows.
"""

from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(",".join(["per_task", arg]))
    config.peft.method = "lora"
    config.peft.rank = 8
    config.peft.alpha = 16.0
    config.peft.targets = r".*(attention\.(q|k|v|o)|mlp\.(wi_0|wi_1|wo))"
    return config
