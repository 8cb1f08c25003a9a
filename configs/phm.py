"""PHM adapters on the synthetic suite: Houlsby adapters whose projections are Kronecker sums.

    peftjax train --config configs/phm.py --workdir runs/phm
    peftjax train --config configs/phm.py:per_task --workdir runs/phm_per_task
    peftjax train --config configs/phm.py:quick --workdir /tmp/phm   # a smoke run

Each projection is `W = Σ_{i<n} A_i ⊗ B_i` with full `B_i` and its own rules `A_i` (Karimi
Mahabadi et al. 2021, "PHM-Adapter"), plus a bias; GELU as in the paper's configs. The paper uses
n = 12 on T5-base (bottleneck 24: blocks of 2); here n = 8 on the width-16 bottleneck of the
128-wide base keeps the same 2-wide blocks.
"""

from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "phm"
    config.peft.reduction_factor = 8
    config.peft.phm_dim = 8
    config.peft.adapter_activation = "gelu_new"
    return config
