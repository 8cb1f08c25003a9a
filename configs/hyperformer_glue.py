"""HyperFormer++ on GLUE: one shared hypernetwork generates every task's adapters, T5 v1.1 base.

    peftjax train --config configs/hyperformer_glue.py --workdir runs/hyperformer_glue \
        --config.model.hf_path=/path/to/t5-v1_1-base
    peftjax eval  --config configs/hyperformer_glue.py --workdir runs/hyperformer_glue \
        --config.model.hf_path=/path/to/t5-v1_1-base
    peftjax params --config configs/hyperformer_glue.py      # counts only (shapes; no weights)
    peftjax train --config configs/hyperformer_glue.py:quick --workdir /tmp/hyperformer_glue

`config.model.hf_path` must be set (see configs/glue.py). The paper's setup (Karimi Mahabadi et
al. 2021; rabeehk/hyperformer configs/hyperformer++.json): the 8 GLUE tasks without WNLI,
temperature-10 sampling, lengths 128, batch 32, 65,536 steps, learning rate 3e-4 with 500
warmup steps, adapters after self-attention and after the FFN with reduction factor 32 (width 24
on 768), GELU ("gelu_new"), conditional layer norms after the adapters, 64-d task / layer /
position embeddings, projector 128 -> 64, one hypernetwork per stack shared by its layers, and
the base's layer norms trained too (`unfreeze_layer_norms`). Switches: `per_layer` (HyperFormer:
a hypernetwork per site), `quick`, `super_glue` (see configs/glue.py). Differences from the
paper are glue_config's (learning-rate decay, no label smoothing, no best-checkpoint selection)
and the base (T5 v1.1 here; the paper used the original T5-base, whose pre-training saw GLUE).
"""

from configs.glue import glue_config
from configs.suite import switches


def get_config(arg: str = ""):
    flags = switches(arg)
    config = glue_config(arg)
    config.peft.method = "hyperformer" if "per_layer" in flags else "hyperformer_pp"
    config.peft.reduction_factor = 32
    config.peft.adapter_activation = "gelu_new"
    config.peft.hyper_condition = "task"
    config.peft.hyper_embed_dim = 64
    config.peft.hyper_hidden = 128
    config.peft.hyper_proj_dim = 64
    config.peft.hyper_norm = True
    config.peft.hyper_train_norms = True
    if "quick" in flags:
        config.peft.reduction_factor = 8
    return config
