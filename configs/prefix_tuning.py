"""Prefix tuning on the synthetic suite: learned keys and values prepended at every attention.

    peftjax train --config configs/prefix_tuning.py --workdir runs/prefix_tuning
    peftjax train --config configs/prefix_tuning.py:per_task --workdir runs/prefix_tuning_per_task
    peftjax train --config configs/prefix_tuning.py:quick --workdir /tmp/prefix_tuning   # smoke

Li & Liang (2021): 8 prefix keys/values per self- and cross-attention of both stacks, always
visible, with no relative position bias. Add `--config.peft.prefix_projection=True` to train them
through the paper's MLP reparameterisation (`peftjax.peft.prefix.fold_prefix_projection` folds it
away for serving). Per-token task ids work, so packed rows could mix tasks; the suite does not pack.
"""

from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "prefix_tuning"
    config.peft.num_virtual_tokens = 8
    config.peft.prompt_init = "vocab"  # prefixes from the attention's k/v of sampled tokens
    config.peft.prefix_projection = False
    return config
