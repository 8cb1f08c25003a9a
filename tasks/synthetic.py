"""seqio registrations of the synthetic skill suite (peftjax.data.synthetic).

Importing this module registers, idempotently:

  synthetic_<task>     one seqio Task per task in synthetic.ALL_TASKS, splits train/validation
  synthetic_pretrain   mixture of the single-skill pretraining tasks, equal rates
  synthetic_suite      mixture of the composed suite tasks, rates from SUITE_RATES
  synthetic_heldout    mixture of the held-out tasks (new skill combinations, eval only)

and the fixed task id of every task (peftjax.data.task_id_of). Train is an endless stream of
fresh examples (no epochs); validation is a fixed set of NUM_VALIDATION_EXAMPLES per task.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import seqio
import tensorflow as tf

from peftjax.data import features, metrics, synthetic
from peftjax.data.pipeline import register_task_id

PREFIX = "synthetic_"
NUM_VALIDATION_EXAMPLES = 256
PRETRAIN_MIXTURE = "synthetic_pretrain"
SUITE_MIXTURE = "synthetic_suite"
HELDOUT_MIXTURE = "synthetic_heldout"
# Relative sampling rates of the suite tasks (equal for now; the knob for imbalance studies).
SUITE_RATES: dict[str, float] = {task: 1.0 for task in synthetic.SUITE_TASKS}

VOCABULARY = seqio.ByteVocabulary()
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
    "targets": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
}


def seqio_name(task: str) -> str:
    """The seqio name of a task: reverse_shift -> synthetic_reverse_shift."""
    return PREFIX + task


def _as_bytes(texts: list[str]) -> np.ndarray:
    return np.array([t.encode("utf-8") for t in texts], dtype=object)


def _train_block(task: str, block: np.int64) -> tuple[np.ndarray, np.ndarray]:
    cols = synthetic.columns(synthetic.make_block(task, "train", int(block)))
    return _as_bytes(cols["inputs"]), _as_bytes(cols["targets"])


@functools.cache
def _validation_columns(task: str) -> dict[str, np.ndarray]:
    examples = synthetic.make_examples(task, "validation", 0, NUM_VALIDATION_EXAMPLES)
    return {k: _as_bytes(v) for k, v in synthetic.columns(examples).items()}


def _train_stream(task: str, seed: int | None) -> tf.data.Dataset:
    """Blocks first_train_block(seed), +1, ... generated on the fly, flattened to examples."""

    def load(block: tf.Tensor) -> dict[str, tf.Tensor]:
        inputs, targets = tf.numpy_function(
            functools.partial(_train_block, task), [block], [tf.string, tf.string], stateful=False
        )
        inputs.set_shape([synthetic.EXAMPLES_PER_BLOCK])
        targets.set_shape([synthetic.EXAMPLES_PER_BLOCK])
        return {"inputs": inputs, "targets": targets}

    blocks = tf.data.Dataset.counter(start=synthetic.first_train_block(seed))
    return blocks.map(load, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def make_dataset_fn(task: str) -> Callable[..., tf.data.Dataset]:
    """The `seqio.FunctionDataSource` dataset_fn of one task: {"inputs", "targets"} strings."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files  # Nothing to shuffle at the source: the Task's shuffle buffer does it.
        if split == "train":
            return _train_stream(task, seed)
        if split == "validation":
            return tf.data.Dataset.from_tensor_slices(_validation_columns(task))
        raise ValueError(
            f"Unknown split {split!r} for {seqio_name(task)}; expected one of {synthetic.SPLITS}."
        )

    dataset_fn.__name__ = f"synthetic_{task}_dataset_fn"
    return dataset_fn


def _register_task(task: str) -> None:
    name = seqio_name(task)
    seqio.TaskRegistry.remove(name)  # Remove-then-add: re-importing or reloading is harmless.
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(make_dataset_fn(task), splits=synthetic.SPLITS),
        output_features=OUTPUT_FEATURES,
        preprocessors=[
            seqio.preprocessors.tokenize,
            features.task_id_preprocessor(synthetic.TASK_IDS[task]),
            seqio.preprocessors.append_eos_after_trim,
        ],
        metric_fns=[metrics.exact_match, metrics.token_accuracy],
    )
    register_task_id(name, synthetic.TASK_IDS[task])


def _register_mixture(name: str, rates: dict[str, float]) -> None:
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, [(seqio_name(task), rate) for task, rate in rates.items()])


def register() -> None:
    """(Re-)registers all synthetic tasks and mixtures; safe to call any number of times."""
    for task in synthetic.ALL_TASKS:
        _register_task(task)
    _register_mixture(PRETRAIN_MIXTURE, {task: 1.0 for task in synthetic.PRETRAIN_TASKS})
    _register_mixture(SUITE_MIXTURE, SUITE_RATES)
    _register_mixture(HELDOUT_MIXTURE, {task: 1.0 for task in synthetic.HELDOUT_TASKS})


register()
