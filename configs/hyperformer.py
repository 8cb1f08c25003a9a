"""HyperFormer++ on the synthetic suite: one shared hypernetwork generates every adapter.

    peftjax train --config configs/hyperformer.py --workdir runs/hyperformer_pp
    peftjax train --config configs/hyperformer.py:per_layer --workdir runs/hyperformer
    peftjax train --config configs/hyperformer.py:languages --workdir runs/hyper_x
    peftjax eval  --config configs/hyperformer.py:languages --workdir runs/hyper_x
    peftjax export-adapters --workdir runs/hyperformer_pp --out runs/hyperformer_pp_adapters
    peftjax train --config configs/hyperformer.py:quick --workdir /tmp/hyperformer   # smoke run

Karimi Mahabadi et al. 2021 (rabeehk/hyperformer): bottleneck adapters after self-attention and
after the FFN, `h + LN_cond(U act(D h + b_D) + b_U)`, every weight generated from
LN(MLP(concat[task, layer-id, position embeddings])) by one hypernetwork per stack (encoder,
decoder) shared by its layers and positions and by all tasks (64-d embeddings, projector
128 -> 64). Width 16 on the 128-wide base (reduction factor 8), as every bottleneck config here.

Switches (comma-separated): `per_layer` (HyperFormer: a hypernetwork per site on the task
embedding), `languages` (Hyper-X: task and language embeddings, trained on
`synthetic_multilingual`; `peftjax eval` adds the held-out task x language pairs of
`synthetic_multilingual_heldout`), `per_example` (generate per example instead of once per task
per call), `quick` (a smoke run).
"""

from configs.suite import suite_config, switches


def get_config(arg: str = ""):
    config = suite_config(arg)
    on = switches(arg)
    config.peft.method = "hyperformer" if "per_layer" in on else "hyperformer_pp"
    config.peft.reduction_factor = 8
    config.peft.adapter_activation = "gelu_new"  # HyperFormer's non_linearity
    config.peft.hyper_generate = "per_example" if "per_example" in on else "per_task"
    if "languages" in on:
        config.peft.hyper_condition = "task_language"
        config.data.mixture = "synthetic_multilingual"
        config.data.heldout = "synthetic_multilingual_heldout"
    return config
