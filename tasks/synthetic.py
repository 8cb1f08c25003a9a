"""seqio registrations of the synthetic skill suite (peftjax.data.synthetic).

Importing this module registers, idempotently:

  synthetic_<task>     one seqio Task per task in synthetic.ALL_TASKS, splits train/validation
  synthetic_<task>__<language>
                       the suite task in each non-plain synthetic.LANGUAGES (a letter cipher)
  synthetic_pretrain   mixture of the single-skill pretraining tasks, equal rates
  synthetic_suite      mixture of the composed suite tasks, rates from SUITE_RATES
  synthetic_heldout    mixture of the held-out tasks (new skill combinations, eval only)
  synthetic_multilingual
                       every (suite task, language) pair except synthetic.HELDOUT_LANGUAGE_PAIRS
                       (plain pairs are the synthetic_<task> tasks), rates from SUITE_RATES
  synthetic_multilingual_heldout
                       the held-out (task, language) pairs (eval only)

and the fixed task id and language id (peftjax.data.task_id_of / language_id_of) and the
description (peftjax.data.description_of) of every task. A task in another language shares the
plain task's task id, splits, metrics and description. Train is an endless stream of fresh
examples (no epochs); validation is a fixed set of NUM_VALIDATION_EXAMPLES per task.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import seqio
import tensorflow as tf

from peftjax.data import features, metrics, synthetic
from peftjax.data.descriptions import register_description
from peftjax.data.pipeline import register_task_id

PREFIX = "synthetic_"
NUM_VALIDATION_EXAMPLES = 256
PRETRAIN_MIXTURE = "synthetic_pretrain"
SUITE_MIXTURE = "synthetic_suite"
HELDOUT_MIXTURE = "synthetic_heldout"
MULTILINGUAL_MIXTURE = "synthetic_multilingual"
MULTILINGUAL_HELDOUT_MIXTURE = "synthetic_multilingual_heldout"
# Relative sampling rates of the suite tasks (equal for now; the knob for imbalance studies).
SUITE_RATES: dict[str, float] = {task: 1.0 for task in synthetic.SUITE_TASKS}

VOCABULARY = seqio.ByteVocabulary()
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
    "targets": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
}


def seqio_name(task: str, language: str = synthetic.PLAIN) -> str:
    """The seqio name of a task in a language: synthetic_reverse_shift, ...__atbash."""
    return PREFIX + synthetic.stream_key(task, language)


def _as_bytes(texts: list[str]) -> np.ndarray:
    return np.array([t.encode("utf-8") for t in texts], dtype=object)


def _train_block(task: str, language: str, block: np.int64) -> tuple[np.ndarray, np.ndarray]:
    cols = synthetic.columns(synthetic.make_block(task, "train", int(block), language))
    return _as_bytes(cols["inputs"]), _as_bytes(cols["targets"])


@functools.cache
def _validation_columns(task: str, language: str) -> dict[str, np.ndarray]:
    examples = synthetic.make_examples(task, "validation", 0, NUM_VALIDATION_EXAMPLES, language)
    return {k: _as_bytes(v) for k, v in synthetic.columns(examples).items()}


def _train_stream(task: str, language: str, seed: int | None) -> tf.data.Dataset:
    """Blocks first_train_block(seed), +1, ... generated on the fly, flattened to examples."""

    def load(block: tf.Tensor) -> dict[str, tf.Tensor]:
        inputs, targets = tf.numpy_function(
            functools.partial(_train_block, task, language),
            [block],
            [tf.string, tf.string],
            stateful=False,
        )
        inputs.set_shape([synthetic.EXAMPLES_PER_BLOCK])
        targets.set_shape([synthetic.EXAMPLES_PER_BLOCK])
        return {"inputs": inputs, "targets": targets}

    blocks = tf.data.Dataset.counter(start=synthetic.first_train_block(seed))
    return blocks.map(load, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def make_dataset_fn(task: str, language: str = synthetic.PLAIN) -> Callable[..., tf.data.Dataset]:
    """The `seqio.FunctionDataSource` dataset_fn of one task: {"inputs", "targets"} strings."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files  # Nothing to shuffle at the source: the Task's shuffle buffer does it.
        if split == "train":
            return _train_stream(task, language, seed)
        if split == "validation":
            return tf.data.Dataset.from_tensor_slices(_validation_columns(task, language))
        raise ValueError(
            f"Unknown split {split!r} for {seqio_name(task, language)}; expected one of "
            f"{synthetic.SPLITS}."
        )

    dataset_fn.__name__ = f"{seqio_name(task, language)}_dataset_fn"
    return dataset_fn


def _register_task(task: str, language: str = synthetic.PLAIN) -> None:
    name = seqio_name(task, language)
    task_id, language_id = synthetic.TASK_IDS[task], synthetic.LANGUAGES[language]
    seqio.TaskRegistry.remove(name)  # Remove-then-add: re-importing or reloading is harmless.
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(make_dataset_fn(task, language), splits=synthetic.SPLITS),
        output_features=OUTPUT_FEATURES,
        preprocessors=[
            seqio.preprocessors.tokenize,
            features.task_id_preprocessor(task_id, language_id),
            seqio.preprocessors.append_eos_after_trim,
        ],
        metric_fns=[metrics.exact_match, metrics.token_accuracy],
    )
    register_task_id(name, task_id, language_id)
    register_description(name, synthetic.DESCRIPTIONS[task])


def _register_mixture(name: str, rates: dict[str, float]) -> None:
    """`rates` maps seqio task names to sampling rates."""
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, list(rates.items()))


def _pair_rates(pairs: tuple[tuple[str, str], ...]) -> dict[str, float]:
    return {seqio_name(task, language): SUITE_RATES[task] for task, language in pairs}


def register() -> None:
    """(Re-)registers all synthetic tasks and mixtures; safe to call any number of times."""
    for task in synthetic.ALL_TASKS:
        _register_task(task)
    for task in synthetic.SUITE_TASKS:
        for language in synthetic.LANGUAGES:
            if language != synthetic.PLAIN:
                _register_task(task, language)
    _register_mixture(
        PRETRAIN_MIXTURE, {seqio_name(task): 1.0 for task in synthetic.PRETRAIN_TASKS}
    )
    _register_mixture(SUITE_MIXTURE, {seqio_name(t): rate for t, rate in SUITE_RATES.items()})
    _register_mixture(HELDOUT_MIXTURE, {seqio_name(task): 1.0 for task in synthetic.HELDOUT_TASKS})
    _register_mixture(MULTILINGUAL_MIXTURE, _pair_rates(synthetic.TRAIN_LANGUAGE_PAIRS))
    _register_mixture(MULTILINGUAL_HELDOUT_MIXTURE, _pair_rates(synthetic.HELDOUT_LANGUAGE_PAIRS))


register()
