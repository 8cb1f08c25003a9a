"""MoLoRA: 4 LoRA experts (r=8) on every projection, top-2 per token by a learned gate.

    peftjax train --config configs/molora.py --workdir runs/molora
    peftjax train --config configs/molora.py:quick --workdir /tmp/molora          # smoke run
    peftjax train --config configs/molora.py --workdir runs/molora_soft \\
        --config.peft.top_k=4                  # soft merging of all experts (the paper's default)

Shared by all tasks (the gate routes tokens, not tasks; `per_task` is refused). The
load-balancing loss (`config.peft.balance_coef` per routed layer when balanced) is added to the
objective and logged as `aux_loss`, with `routing_entropy`.

`library` (MeteoRA style): no new experts; a trained top-2 gate over frozen single-task LoRA
runs at every site they adapt. First the library, one LoRA run per suite task (see
`configs/source_adapter.py` for the loop over all eight tasks; any shared adapter run on this
base works, LoRA is MeteoRA's choice):

    peftjax train --config configs/source_adapter.py:task=reverse_shift \\
        --workdir runs/lora_sources/reverse_shift --config.peft.method=lora
    ...
    peftjax train --config configs/molora.py:library --workdir runs/molora_library

Smoke run over two sources (the `:quick,library` variant reads them from
/tmp/peftjax_lora_sources):

    peftjax train --config configs/source_adapter.py:quick,task=reverse_shift \\
        --workdir /tmp/peftjax_lora_sources/reverse_shift --config.peft.method=lora
    peftjax train --config configs/source_adapter.py:quick,task=shift_upper \\
        --workdir /tmp/peftjax_lora_sources/shift_upper --config.peft.method=lora
    peftjax train --config configs/molora.py:quick,library --workdir /tmp/molora_library

(With two sources, top-2 mixes both: soft routing, and a constant balance loss.)

Other libraries: `--config.peft.method=none --config.peft.compose=molora
--config.peft.sources="('runs/a', 'runs/b')"` on any config.
"""

import os

from configs.lora import ALL_PROJECTIONS
from configs.source_adapter import QUICK_TASKS
from configs.suite import suite_config, switches
from peftjax.data.synthetic import SUITE_TASKS

LIBRARY = "runs/lora_sources"  # where `library` looks for the source runs
QUICK_LIBRARY = "/tmp/peftjax_lora_sources"  # ... and `quick,library`


def library_sources(arg: str = "") -> tuple[str, ...]:
    """One single-task LoRA run per suite task (two for `quick`), as the commands above name."""
    quick = "quick" in switches(arg)
    root, tasks = (QUICK_LIBRARY, QUICK_TASKS) if quick else (LIBRARY, tuple(SUITE_TASKS))
    return tuple(os.path.join(root, task) for task in tasks)


def get_config(arg: str = ""):
    config = suite_config(arg)  # `per_task` is refused at build, with the reason
    config.peft.num_experts = 4
    config.peft.top_k = 2
    config.peft.balance_coef = 0.01
    if "library" in switches(arg):
        config.peft.method = "none"  # only the gates train
        config.peft.compose = "molora"
        config.peft.sources = library_sources(arg)
        config.optim.learning_rate = 1e-2  # a few gates: a larger step than for adapters
        return config
    config.peft.method = "molora"
    config.peft.rank = 8
    config.peft.alpha = 16.0
    config.peft.targets = ALL_PROJECTIONS
    return config
