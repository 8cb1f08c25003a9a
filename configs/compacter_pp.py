"""Compacter++ on the synthetic suite: Compacter after the FFN only.

    peftjax train --config configs/compacter_pp.py --workdir runs/compacter_pp
    peftjax train --config configs/compacter_pp.py:per_task --workdir runs/compacter_pp_per_task
    peftjax train --config configs/compacter_pp.py:quick --workdir /tmp/compacter_pp   # smoke run

One low-rank PHM adapter per layer, after the FFN, `W = Σ_{i<n} A_i ⊗ s_i t_iᵀ` with the rules
`A_i` shared by every adapter (Karimi Mahabadi et al. 2021): n = 4, rank 1, GELU as in the paper.
Width 16 on the 128-wide base, as every bottleneck-family config.
"""

from configs import compacter


def get_config(arg: str = ""):
    config = compacter.get_config(arg)  # same adapters, after the FFN only
    config.peft.method = "compacter_pp"
    return config
