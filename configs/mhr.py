"""Multi-Head Routing (MHR): Poly with each LoRA split into 8 heads, routed separately.

4 LoRA skills (r=8) per projection of the frozen quickstart base; A is split along d_in and B
along d_out into 8 blocks (widths 128 and 384 / 8: 16 and 48), and every task has a router row
per head. Inventory and router train together with the suite's one learning rate.

    peftjax train --config configs/mhr.py --workdir runs/mhr
    peftjax train --config configs/mhr.py:quick --workdir /tmp/mhr              # smoke run
    peftjax train --config configs/mhr.py:uniform --workdir runs/mhr_uniform    # mu-routing

Switches (comma-separated): `quick` (20 steps), `uniform` (every skill weighs 1/K). On the
trained inventory of runs/mhr (Caccia et al. 2023):

    # MHR-z: the inventory frozen, only a fresh router trains
    peftjax train --config configs/mhr.py --workdir runs/mhr_z \
        --config.peft.skills_from=runs/mhr
    # MHR-mu: one LoRA (rank 8, all projections) initialised at the inventory's average
    peftjax train --config configs/lora.py --workdir runs/mhr_mu \
        --config.peft.skills_from=runs/mhr

Smoke versions: train `configs/mhr.py:quick` into /tmp/mhr, then add `:quick` to the two
commands above with `--config.peft.skills_from=/tmp/mhr`.
"""

from configs.poly import get_config as poly_config


def get_config(arg: str = ""):
    config = poly_config(arg)
    config.peft.method = "mhr"
    config.peft.num_splits = 8  # divides d_model 128, inner 128 and d_ff 384
    return config
