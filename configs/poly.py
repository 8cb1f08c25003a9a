"""Poly (Polytropon): 4 LoRA skills (r=8) per projection, a learned task x skill router.

Every projection of the frozen quickstart base gets an inventory of 4 LoRA skills; each suite
task mixes them with its own router row (relaxed-Bernoulli while training, sigmoid at eval). The
inventory and the router train together; one learning rate for both (the suite's 3e-3).

    peftjax train --config configs/poly.py --workdir runs/poly
    peftjax train --config configs/poly.py:quick --workdir /tmp/poly             # smoke run
    peftjax train --config configs/poly.py:uniform --workdir runs/poly_uniform   # mu-routing

Switches (comma-separated): `quick` (20 steps), `uniform` (no router: every skill weighs 1/K,
the inventory's average). Variants on a trained run's inventory (here runs/poly):

    # Poly-z: freeze the inventory, train only a fresh router
    peftjax train --config configs/poly.py --workdir runs/poly_z \
        --config.peft.skills_from=runs/poly
    # Poly-mu: one LoRA (same rank and targets) initialised at the inventory's average
    peftjax train --config configs/lora.py --workdir runs/poly_mu \
        --config.peft.skills_from=runs/poly

The multi-head version (MHR) is `configs/mhr.py`.
"""

from configs.lora import ALL_PROJECTIONS
from configs.suite import suite_config, switches


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "poly"
    config.peft.rank = 8
    config.peft.num_skills = 4  # the synthetic suite is built from 4 skills
    config.peft.num_splits = 1
    config.peft.targets = ALL_PROJECTIONS
    config.peft.router = "uniform" if "uniform" in switches(arg) else "learned"
    return config
