"""Arrow: zero-shot routing over the per-task LoRAs of one run, evaluated on held-out tasks.

Each of the suite's eight tasks has its own LoRA in a `per_task` LoRA run; Arrow treats them as
a library of eight experts and, at every projection, sends each token to the top-2 by
|<v_e, x>| (v_e: the top singular vector of expert e's update; see `peftjax.routing.arrow`).
Nothing trains (`train.steps = 0`): the run builds, checkpoints its empty trainable state and
evaluates on `synthetic_heldout`, two tasks never trained on that combine seen skills
(reverse_shift_double, reverse_upper_double).

    peftjax train --config configs/lora.py:per_task --workdir runs/lora_per_task
    peftjax train --config configs/arrow.py --workdir runs/arrow
    peftjax eval --workdir runs/arrow        # adapted vs the bare base, per held-out task

Smoke run (`quick`: the library from a quick per-task run, eight eval examples per task):

    peftjax train --config configs/lora.py:quick,per_task \
        --workdir /tmp/peftjax_sources/lora_per_task
    peftjax train --config configs/arrow.py:quick --workdir /tmp/arrow

top_k = 2: each held-out task chains three skills, and two suite tasks are the fewest whose
skills cover them (reverse_shift_double: reverse_shift + shift_double, or reverse_double +
shift_upper_double, ...), so a token may mix the two experts it aligns with best. HF peft's
`ArrowConfig` defaults to 3 (the paper's libraries hold hundreds of experts); raise
`config.peft.top_k` up to 8 to mix more. `config.peft.arrow_temperature` (1.0) sharpens (< 1) or
flattens (> 1) the softmax over the kept scores.
"""

import os

from configs.source_adapter import QUICK_SOURCES
from configs.suite import suite_config, switches

LIBRARY = "runs/lora_per_task"  # `configs/lora.py:per_task`, as its docstring names the workdir


def get_config(arg: str = ""):
    config = suite_config(",".join(s for s in switches(arg) if s != "per_task"))
    config.peft.method = "none"  # nothing new: the library is frozen, the routing parameter-free
    config.peft.compose = "arrow"
    config.peft.sources = (os.path.join(QUICK_SOURCES, "lora_per_task")
                           if "quick" in switches(arg) else LIBRARY,)
    config.peft.top_k = 2
    config.peft.arrow_temperature = 1.0
    config.data.mixture = "synthetic_heldout"
    config.train.steps = 0  # zero-shot: build, checkpoint, evaluate
    return config
