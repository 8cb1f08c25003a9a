"""Pretrain the small frozen base that the quickstart adapts (full fine-tuning from scratch).

It learns the single skills of the synthetic suite (copy, reverse, shift, upper, double); the
quickstart's adapters then learn their compositions on top of it, frozen. The result ships as
`assets/quickstart_base/` (an HF-format T5 directory) through:

    python scripts/pretrain_quickstart_base.py            # ~15 min on 2 CPU cores
"""

from peftjax.config import default_config


def get_config(arg: str = ""):
    config = default_config()
    config.seed = 0
    config.model.size = "mini"
    config.peft.method = "full"
    config.data.mixture = "synthetic_pretrain"
    config.data.batch_size = 64
    config.data.inputs_length = 32
    config.data.targets_length = 32
    config.data.eval_examples = 64
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 200
    config.optim.weight_decay = 0.01
    config.train.steps = 6000
    config.train.log_every = 100
    config.train.checkpoint_every = 1000
    if arg == "quick":
        config.train.steps = 20
    return config
