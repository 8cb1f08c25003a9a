"""Compacter on the synthetic suite: low-rank PHM adapters sharing one rule across all layers.

    peftjax train --config configs/compacter.py --workdir runs/compacter
    peftjax train --config configs/compacter.py:per_task --workdir runs/compacter_per_task
    peftjax train --config configs/compacter.py:quick --workdir /tmp/compacter   # a smoke run

Houlsby placement (after attention and after the FFN); each projection is
`W = Σ_{i<n} A_i ⊗ s_i t_iᵀ` with rank-1 `s_i t_iᵀ` per layer and the rules `A_i` shared by every
adapter layer (Karimi Mahabadi et al. 2021): the paper's n = 4, rank 1, GELU. Width 16 on the
128-wide base (the paper's 32x reduction would leave 4), as every bottleneck-family config.
"""

from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "compacter"
    config.peft.reduction_factor = 8
    config.peft.phm_dim = 4
    config.peft.phm_rank = 1
    config.peft.adapter_activation = "gelu_new"
    return config
