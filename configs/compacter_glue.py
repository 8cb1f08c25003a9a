"""Compacter on GLUE: low-rank PHM adapters on a frozen T5 v1.1 base, one per task.

    peftjax train --config configs/compacter_glue.py --workdir runs/compacter_glue \
        --config.model.hf_path=/path/to/t5-v1_1-base
    peftjax train --config configs/compacter_glue.py:pp --workdir runs/compacter_pp_glue \
        --config.model.hf_path=/path/to/t5-v1_1-base
    peftjax eval  --config configs/compacter_glue.py --workdir runs/compacter_glue \
        --config.model.hf_path=/path/to/t5-v1_1-base
    peftjax train --config configs/compacter_glue.py:quick --workdir /tmp/compacter_glue

`config.model.hf_path` must be set (see configs/glue.py). Compacter's GLUE setup (Karimi
Mahabadi et al. 2021; rabeehk/compacter seq2seq/configs/compacter.json, compacter++.json):
Houlsby placement (`pp`: Compacter++, after the FFN only), reduction factor 32 (width 24 on
T5-base's 768), n = 4 Kronecker summands with rank-1 factors and one rule shared by all layers,
GELU ("gelu_new"), learning rate 3e-3 with 500 warmup steps, batch 100.

One Compacter per task (`config.peft.mode = "per_task"`, rows picked by task id; `shared` for one
Compacter for all tasks): the paper trains each task separately, here the tasks train jointly on
the GLUE mixture of configs/glue.py (HyperFormer's 8 tasks, temperature 10, 2^16 steps). The
paper's budget is per task (20 epochs in the reference configs), which has no direct counterpart
in a joint run, so the step count is glue_config's. Also different from the paper: its base is the
original T5-base (pre-trained with GLUE in its mixture), and it trains the layer norms as well
(peftjax's compacter trains adapters only; combine with ln_tuning for that).

Switches (comma-separated, with those of configs/glue.py): `pp`, `shared`, `quick`, `super_glue`.
`quick` uses reduction factor 4 (the tiny model's 64 / 32 = 2 is not divisible by n = 4).
"""

from configs.glue import glue_config
from configs.suite import switches


def get_config(arg: str = ""):
    flags = switches(arg)
    config = glue_config(",".join([arg, "" if "shared" in flags else "per_task"]))
    config.peft.method = "compacter_pp" if "pp" in flags else "compacter"
    config.peft.reduction_factor = 4 if "quick" in flags else 32
    config.peft.phm_dim = 4
    config.peft.phm_rank = 1
    config.peft.adapter_activation = "gelu_new"
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 1 if "quick" in flags else 500
    if "quick" not in flags:
        config.data.batch_size = 100
    return config
