"""Pretrain the quickstart's frozen base and write it as an HF-format T5 directory.

    python scripts/pretrain_quickstart_base.py [--workdir runs/pretrain_base] \
        [--out assets/quickstart_base] [--config.train.steps=N ...]

Trains `configs/pretrain_base.py` (resuming if the workdir has a checkpoint), then exports the
trained weights with `peftjax.models.to_hf`, in bfloat16-free float32 safetensors.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from peftjax.models import to_hf  # noqa: E402
from peftjax.train import restore_trained, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs",
                                                                 "pretrain_base.py"))
_WORKDIR = flags.DEFINE_string("workdir", os.path.join(REPO, "runs", "pretrain_base"), "")
_OUT = flags.DEFINE_string("out", os.path.join(REPO, "assets", "quickstart_base"), "")


def main(_):
    config = _CONFIG.value
    train(config, _WORKDIR.value)
    exp, state = restore_trained(config, _WORKDIR.value)
    model = nnx.merge(exp.graphdef, state.trainable, exp.frozen)
    to_hf(model, _OUT.value)
    print(f"Wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
