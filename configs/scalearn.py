"""ScaLearn: per target task, learn to scale the outputs of eight frozen single-task adapters.

At every layer's FFN output `h + Σ_i ω_i ⊙ a_i(h)`, with a_i the frozen source adapters (one per
suite task, trained alone) and ω one table per target task (`mode=per_task`); only ω trains.
`config.peft.scalearn_form`: vector (ω_i ∈ R^d per layer, the default), scalar, vector_shared
(ScaLearn++), scalar_shared (ScaLearnUniform++: 8 transfer parameters per task). First the
sources (see `configs/source_adapter.py` for the loop over all eight tasks), then:

    peftjax train --config configs/scalearn.py --workdir runs/scalearn
    peftjax train --config configs/scalearn.py --workdir runs/scalearn_uniform_pp \
        --config.peft.scalearn_form=scalar_shared

Smoke run, two sources (the `:quick` variant reads them from /tmp/peftjax_sources):

    peftjax train --config configs/source_adapter.py:quick,task=reverse_shift \
        --workdir /tmp/peftjax_sources/reverse_shift
    peftjax train --config configs/source_adapter.py:quick,task=shift_upper \
        --workdir /tmp/peftjax_sources/shift_upper
    peftjax train --config configs/scalearn.py:quick --workdir /tmp/scalearn
"""

from configs.source_adapter import task_sources
from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(",".join(["per_task", arg]))
    config.peft.method = "none"  # only ω trains
    config.peft.compose = "scalearn"
    config.peft.scalearn_form = "vector"
    config.peft.sources = task_sources(arg)
    config.optim.learning_rate = 1e-2  # a few scaling factors: a larger step than for adapters
    return config
