"""Average: the outputs of eight frozen single-task adapters averaged, plus a new shared adapter.

At every layer's FFN output `h + Σ_i w_i d_i(h)` over the children, the eight frozen source
adapters (one per suite task, trained alone) and then a new shared Pfeiffer adapter, the only
thing that trains. Weights: `config.peft.compose_weights` (one per child, sources in order, then
the new adapter), default uniform, normalised to sum to 1 (as AdapterHub's `Average`). First the
sources (see `configs/source_adapter.py` for the loop over all eight tasks), then:

    peftjax train --config configs/average.py --workdir runs/average

Smoke run, two sources (the `:quick` variant reads them from /tmp/peftjax_sources):

    peftjax train --config configs/source_adapter.py:quick,task=reverse_shift \
        --workdir /tmp/peftjax_sources/reverse_shift
    peftjax train --config configs/source_adapter.py:quick,task=shift_upper \
        --workdir /tmp/peftjax_sources/shift_upper
    peftjax train --config configs/average.py:quick --workdir /tmp/average
"""

from configs.source_adapter import task_sources
from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "pfeiffer"
    config.peft.compose = "average"
    config.peft.sources = task_sources(arg)
    return config
