"""AdapterFusion: learn, per token and layer, attention over eight frozen single-task adapters.

At every layer's FFN output `h + Σ_i α_i(h) a_i(h) W_V`, with a_i the frozen source adapters (one
Pfeiffer adapter per suite task, trained alone) and α = softmax_i((h W_Q + b_Q) · a_i W_K): only
the fusion (W_Q, b_Q, W_K, W_V per layer) trains. AdapterHub's "dynamic" fusion, W_V starting at
the identity and held near it by 0.01·‖W_V - I‖² (see `peftjax.routing.fusion`). First the
sources (see `configs/source_adapter.py` for the loop over all eight tasks), then:

    peftjax train --config configs/fusion.py --workdir runs/fusion

The paper trains one fusion per target task; this is one fusion for the whole suite (mode
shared). One target task: `--config.data.mixture=synthetic_<task>`.

Smoke run, two sources (the `:quick` variant reads them from /tmp/peftjax_sources):

    peftjax train --config configs/source_adapter.py:quick,task=reverse_shift \
        --workdir /tmp/peftjax_sources/reverse_shift
    peftjax train --config configs/source_adapter.py:quick,task=shift_upper \
        --workdir /tmp/peftjax_sources/shift_upper
    peftjax train --config configs/fusion.py:quick --workdir /tmp/fusion

Learning rate 1e-3. AdapterHub's 5e-5 (BERT-base, 10 epochs of GLUE-sized data: 10^4-10^5
steps) would barely move W_Q and W_K (init std 0.02) in the suite's 1000 steps, leaving the
attention near uniform, i.e. compose="average". The suite's 3e-3 (what new adapters train with)
lets Adam move each of W_V's d² entries by up to 3e-3 a step away from the identity, which the
small ‖W_V - I‖² penalty barely resists. 1e-3 sits between: Q/K can grow to sharp attention
within the budget while V stays near the identity.
"""

from configs.source_adapter import task_sources
from configs.suite import suite_config, switches


def get_config(arg: str = ""):
    config = suite_config(",".join(s for s in switches(arg) if s != "per_task"))
    config.peft.method = "none"  # only the fusion trains
    config.peft.compose = "fusion"
    config.peft.sources = task_sources(arg)
    config.optim.learning_rate = 1e-3
    return config
