"""A tiny, fast run on the synthetic suite (tests and smoke checks).

    peftjax train --config configs/tiny.py --workdir /tmp/peftjax_tiny
"""

from peftjax.config import default_config


def get_config(arg: str = ""):
    del arg
    config = default_config()
    config.model.size = "tiny"
    config.data.batch_size = 8
    config.data.inputs_length = 24
    config.data.targets_length = 24
    config.data.eval_examples = 8
    config.data.eval_batch_size = 8
    config.train.steps = 6
    config.train.log_every = 2
    config.train.checkpoint_every = 3
    config.train.progress = False
    return config
