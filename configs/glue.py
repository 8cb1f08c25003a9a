"""Shared settings of the GLUE / SuperGLUE configs: a frozen T5 v1.1 base, HyperFormer's data setup.

Not a run by itself. `configs/<method>_glue.py` starts from `glue_config(arg)` and sets its
method, so the methods compare on equal footing:

    peftjax train --config configs/compacter_glue.py --workdir runs/compacter_glue \
        --config.model.hf_path=/path/to/t5-v1_1-base
    peftjax train --config configs/compacter_glue.py:quick --workdir /tmp/compacter_glue

The base model must be given: `config.model.hf_path` is "" here and has to be set (as above) to
an HF T5 v1.1 base checkpoint directory (google/t5-v1_1-base, downloaded beforehand). Left empty,
the run trains adapters on a *randomly initialised* base-size T5, which is only a smoke test.
T5 v1.1 rather than the original T5: v1.1 was pre-trained on C4 alone, while the original T5's
pre-training mixture already contained GLUE and SuperGLUE.

Tasks come from `tasks.glue` (T5's text-to-text format, TFDS; prepare the datasets first, e.g.
`tfds build glue/cola`, so that the mixing rates know the split sizes) with T5's SentencePiece
vocabulary from $PEFTJAX_SPM_MODEL (see tasks/glue.py).

HyperFormer's setup (Karimi Mahabadi et al. 2021; rabeehk/hyperformer configs): the 8 GLUE tasks
without WNLI, sampled with temperature T = 10 (`glue_temperature`), inputs and targets of at
most 128 tokens, batch 32, 65,536 steps (2^16), learning rate 3e-4 with 500 warmup steps.
Differences: HyperFormer decays the learning rate linearly to 0 (cosine to 0 here), smooths
labels by 0.1 (not available here), evaluates every 1,000 steps and keeps the best checkpoint
(here: once, at the end), and scores half of each validation split, keeping the other half for
model selection (here: the whole validation split, see `eval_examples`).

`arg` is a comma-separated list of switches:
  quick      a CPU smoke run: the tiny random model, lengths 32, batch 4, 2 steps, 4 eval examples
             per task, and seqio's bundled test SentencePiece model unless $PEFTJAX_SPM_MODEL is
             set (so no download is needed; set it before tasks.glue is imported)
  per_task   one adapter per task (selected by task id) instead of one shared by all tasks
  super_glue the SuperGLUE mixture (`super_glue_temperature`) instead of GLUE
"""

import os

from ml_collections import ConfigDict

from configs.suite import switches
from peftjax.config import default_config

# Larger than every GLUE / SuperGLUE validation split (QQP's, the largest, has 40,430): the whole
# split is scored.
ALL_EXAMPLES = 1_000_000
# T5 v1.1's embedding rows (32,100 SentencePiece ids padded to a multiple of 128), also used by the
# tiny quick model so it fits the real vocabulary as well as seqio's 26-piece test model.
T5_VOCAB_SIZE = 32128


def seqio_test_spm_model() -> str:
    """seqio's bundled test SentencePiece model (26 pieces), located without importing seqio."""
    import importlib.util

    spec = importlib.util.find_spec("seqio")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("seqio is not installed; it is needed for the GLUE tasks.")
    package = os.path.dirname(spec.origin)
    return os.path.join(package, "test_data", "sentencepiece", "sentencepiece.model")


def glue_config(arg: str = "") -> ConfigDict:
    """T5 v1.1 base (hf_path to be set by the user) on HyperFormer's GLUE setup; the method is
    left to the caller."""
    flags = switches(arg)
    config = default_config()
    config.seed = 0
    config.model.size = "base"
    config.model.hf_path = ""  # required: an HF T5 v1.1 base directory (see the docstring)
    config.peft.mode = "per_task" if "per_task" in flags else "shared"
    config.data.task_modules = ("tasks.glue",)
    config.data.mixture = "super_glue_temperature" if "super_glue" in flags else "glue_temperature"
    config.data.inputs_length = 128
    config.data.targets_length = 128
    config.data.batch_size = 32
    config.data.pack = False
    config.data.eval_examples = ALL_EXAMPLES
    config.data.eval_batch_size = 64
    config.optim.learning_rate = 3e-4
    config.optim.warmup_steps = 500
    config.optim.final_lr_fraction = 0.0
    config.train.steps = 2**16
    config.train.log_every = 200
    config.train.checkpoint_every = 1000
    if "quick" in flags:  # a smoke run for tests and CI (CPU, offline given prepared data)
        os.environ.setdefault("PEFTJAX_SPM_MODEL", seqio_test_spm_model())
        config.model.size = "tiny"
        config.model.hf_path = ""
        config.model.vocab_size = T5_VOCAB_SIZE
        config.data.inputs_length = 32
        config.data.targets_length = 32
        config.data.batch_size = 4
        config.data.eval_batch_size = 4
        config.data.eval_examples = 4
        config.optim.warmup_steps = 1
        config.train.steps = 2
        config.train.log_every = 1
        config.train.checkpoint_every = 2
        config.train.progress = False
    return config
