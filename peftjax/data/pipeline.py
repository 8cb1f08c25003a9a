"""seqio tasks/mixtures -> NumPy batches: the data API the training loop calls.

Every batch is a dict of int32 arrays [batch_size, length] with the features of
`TaskAwareEncDecFeatureConverter` (tokens, loss weights, per-token task and language ids and,
when packed, segment ids and positions).

Tasks are found by name in seqio's registries, so the module that registers them must have been
imported first (`import_task_modules(config.data.task_modules)`, e.g. ["tasks.synthetic"]).
Task ids and language ids live in a small registry here (`register_task_id` / `task_id_of` /
`language_id_of`), filled in by the module that registers the seqio task. One task in several
languages is several seqio tasks sharing a task id, each with its own language id.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from peftjax.data.features import LANGUAGE_ID_KEY, TASK_ID_KEY, TaskAwareEncDecFeatureConverter

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
Provider = seqio.Task | seqio.Mixture

TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation"
_MAX_NAMES_LISTED = 40


def _keep_tf_off_accelerators() -> None:
    """tf.data only needs the host CPU; a visible GPU would make TF reserve memory JAX needs."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        # TF already initialised its devices (someone ran a TF op before importing us).
        log.warning("TensorFlow was initialised before peftjax.data; it may hold GPU memory.")


_keep_tf_off_accelerators()


# ----------------------------------------------------------------------- task id registry --

# seqio task name -> (task id, language id).
_IDS: dict[str, tuple[int, int]] = {}


def _check_id(task_name: str, what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{what} for {task_name!r} must be an int >= 0, got {value!r}.")
    return int(value)


def register_task_id(task_name: str, task_id: int, language_id: int = 0) -> None:
    """Records the fixed (task id, language id) of a seqio task.

    Several seqio tasks may share a task id when their language ids differ (one task in several
    languages); the pair must be unique. Idempotent; conflicting re-registration raises.
    """
    pair = (
        _check_id(task_name, "Task id", task_id),
        _check_id(task_name, "Language id", language_id),
    )
    previous = _IDS.get(task_name)
    if previous is not None and previous != pair:
        raise ValueError(
            f"Task {task_name!r} already has id {previous[0]} (language id {previous[1]}); "
            f"refusing to change it to {pair[0]} (language id {pair[1]}) (ids index learned "
            "task and language embeddings, so they must never change)."
        )
    owner = next((n for n, p in _IDS.items() if p == pair and n != task_name), None)
    if owner is not None:
        raise ValueError(
            f"Task id {pair[0]} with language id {pair[1]} is already used by {owner!r}; pick an "
            "unused id, or a different language id if the task is the same task in another "
            "language."
        )
    _IDS[task_name] = pair


def _ids_of(task_name: str) -> tuple[int, int]:
    if task_name in _IDS:
        return _IDS[task_name]
    provider = resolve(task_name)  # Raises a helpful error for unknown names.
    if isinstance(provider, seqio.Mixture):
        raise ValueError(
            f"{task_name!r} is a mixture; task ids belong to tasks. Use task_names({task_name!r}) "
            "to list its tasks."
        )
    raise ValueError(
        f"seqio task {task_name!r} has no task id. Call "
        f"peftjax.data.register_task_id({task_name!r}, <id>) where the task is registered."
    )


def task_id_of(task_name: str) -> int:
    """The fixed id of a seqio task (as stored by `register_task_id`)."""
    return _ids_of(task_name)[0]


def language_id_of(task_name: str) -> int:
    """The fixed language id of a seqio task (as stored by `register_task_id`; default 0)."""
    return _ids_of(task_name)[1]


# ------------------------------------------------------------------------------- lookup --


def import_task_modules(modules: Sequence[str]) -> None:
    """Imports each module by name, so that its seqio registrations run."""
    if isinstance(modules, str):
        modules = [modules]
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            # Only rephrase when the task module itself is missing, not a dependency inside it.
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise
            raise ModuleNotFoundError(
                f"Cannot import task module {module!r} (no module named {e.name!r}). Task modules "
                "are imported by name: run from the repo root, or add the directory containing "
                f"it to PYTHONPATH. sys.path[0] is {sys.path[0]!r}.",
                name=e.name,
            ) from e


def _registered_names() -> list[str]:
    return sorted({*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()})


def _unknown_name_message(name: str) -> str:
    names = _registered_names()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    lines = [f"Unknown seqio task or mixture {name!r}."]
    if close:
        lines.append(f"Close matches: {close}.")
    if not names:
        lines.append("No seqio tasks or mixtures are registered at all.")
    elif len(names) <= _MAX_NAMES_LISTED:
        lines.append(f"Registered: {names}.")
    else:
        lines.append(f"{len(names)} names are registered, e.g. {names[:_MAX_NAMES_LISTED]}.")
    lines.append(
        "Tasks are registered by importing their module: list it in config.data.task_modules "
        "(e.g. 'tasks.synthetic') or call peftjax.data.import_task_modules([...]) first."
    )
    return " ".join(lines)


def resolve(name: str) -> Provider:
    """The registered seqio Task or Mixture called `name`."""
    is_task = name in seqio.TaskRegistry.names()
    is_mixture = name in seqio.MixtureRegistry.names()
    if is_task and is_mixture:
        raise ValueError(f"{name!r} is registered both as a seqio task and a mixture; rename one.")
    if is_mixture:
        return seqio.MixtureRegistry.get(name)
    if is_task:
        return seqio.TaskRegistry.get(name)
    raise ValueError(_unknown_name_message(name))


def _resolve_task(name: str) -> seqio.Task:
    provider = resolve(name)
    if not isinstance(provider, seqio.Task):
        raise ValueError(
            f"{name!r} is a mixture, but a single task is needed here; pick one of "
            f"{task_names(name)}."
        )
    return provider


def task_names(name: str) -> list[str]:
    """Sorted names of the seqio tasks in a task ([name]) or a mixture (recursively)."""
    provider = resolve(name)
    if isinstance(provider, seqio.Task):
        return [provider.name]
    return sorted(task.name for task in provider.tasks)


def vocabulary(name: str) -> seqio.Vocabulary:
    """The vocabulary of the `targets` feature of a task or mixture."""
    return resolve(name).output_features["targets"].vocabulary


# ------------------------------------------------------------------------------ batches --


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    # Explicit, so that no global tf.data default can make the stream order nondeterministic.
    options.deterministic = True
    # One thread per op: tf.data's parallelism is across elements; leave the cores to JAX.
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def _check_positive(**values: int) -> None:
    bad = {k: v for k, v in values.items() if not isinstance(v, int | np.integer) or v <= 0}
    if bad:
        raise ValueError(f"Expected positive ints, got {bad}.")


def _check_split(provider: Provider, split: str) -> None:
    if split not in provider.splits:
        raise ValueError(
            f"{provider.name!r} has no {split!r} split (it has {sorted(provider.splits)})."
        )


def _task_features(
    provider: Provider,
    lengths: Mapping[str, int],
    *,
    split: str,
    shuffle: bool,
    seed: int | None,
    num_epochs: int | None,
) -> tf.data.Dataset:
    """Preprocessed, unbatched examples (inputs, targets, task_id, language_id, *_pretokenized)."""
    _check_split(provider, split)
    kwargs = dict(
        sequence_length=dict(lengths),
        split=split,
        shuffle=shuffle,
        seed=seed,
        num_epochs=num_epochs,
    )
    if isinstance(provider, seqio.Mixture):
        # Mixtures keep only output features unless told otherwise; the ids must survive.
        return provider.get_dataset(**kwargs, passthrough_features=[TASK_ID_KEY, LANGUAGE_ID_KEY])
    return provider.get_dataset(**kwargs)


def train_batches(
    name: str,
    *,
    batch_size: int,
    inputs_length: int,
    targets_length: int,
    pack: bool,
    seed: int,
    start_batch: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
) -> Iterator[Batch]:
    """Endless, shuffled training batches of a task or mixture.

    Deterministic given (name, lengths, pack, seed): the stream is fixed by `seed`, and
    `start_batch` skips that many batches, so a run resumed at step k sees exactly the batches
    an uninterrupted run would have. Skipping still computes the skipped batches (cheap here;
    O(start_batch)).

    Multi-process runs: `batch_size` is the GLOBAL batch. Every process reads the same global
    stream and keeps rows [shard_index * batch_size / num_shards, (shard_index + 1) * ...) of
    each global batch (`peftjax.distributed.batch_shard` gives a process its shard). So the
    global batch of every step is the same whatever the number of processes: 2 processes x 2
    devices train exactly like 1 x 4, and a run resumed on another topology continues the same
    stream. The price: each process reads and preprocesses the whole stream (num_shards times
    the host work of disjoint per-host files), cheap for PEFT-sized data next to the model step.

    Returns:
      Iterator of dicts of int32 arrays: [batch_size / num_shards, inputs_length] for encoder_*
      features, [batch_size / num_shards, targets_length] for decoder_* features (see
      TaskAwareEncDecFeatureConverter).
    """
    _check_positive(
        batch_size=batch_size,
        inputs_length=inputs_length,
        targets_length=targets_length,
        num_shards=num_shards,
    )
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}.")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}.")
    if batch_size % num_shards:
        raise ValueError(
            f"The global batch_size {batch_size} does not split into {num_shards} equal process "
            "shards; make config.data.batch_size a multiple of the number of processes."
        )
    provider = resolve(name)
    lengths = {"inputs": inputs_length, "targets": targets_length}
    ds = _task_features(
        provider, lengths, split=TRAIN_SPLIT, shuffle=True, seed=seed, num_epochs=None
    )
    ds = TaskAwareEncDecFeatureConverter(pack=pack)(ds, lengths)
    ds = ds.batch(batch_size, drop_remainder=True).skip(start_batch)
    if num_shards > 1:
        rows = batch_size // num_shards
        ds = ds.map(
            lambda batch: {k: v[shard_index * rows : (shard_index + 1) * rows] for k, v in
                           batch.items()}
        )
    return _with_options(ds.prefetch(tf.data.AUTOTUNE)).as_numpy_iterator()


def _pad_rows(batch: Batch, batch_size: int) -> Batch:
    """Appends all-zero rows up to batch_size (zero loss weights, zero segment ids)."""
    return {
        k: np.concatenate([v, np.zeros((batch_size - v.shape[0], *v.shape[1:]), v.dtype)])
        for k, v in batch.items()
    }


def _target_text(task: seqio.Task, example: Mapping[str, np.ndarray]) -> str:
    """The postprocessed target string of a (numpy) task example, as seqio's Evaluator does."""
    if "targets_pretokenized" in example:
        text = example["targets_pretokenized"].decode("utf-8")
    else:  # Tasks tokenized without copy_pretokenized: best effort from the (trimmed) tokens.
        text = task.output_features["targets"].vocabulary.decode(example["targets"].tolist())
    return task.postprocess_fn(text, example=example, is_target=True)


def eval_batches(
    task_name: str,
    *,
    batch_size: int,
    inputs_length: int,
    targets_length: int,
    num_examples: int | None = None,
) -> Iterator[tuple[Batch, list[str]]]:
    """The validation split of one task, in order, unpacked, as padded batches.

    Every batch has exactly `batch_size` rows; the last one is zero-padded. The second item is
    the list of postprocessed target strings of the *real* rows only, so `len(texts)` is the
    number of real rows: rows [len(texts):] are padding (all zeros, decoder_loss_weights 0) and
    must be dropped from predictions before scoring.

    Args:
      task_name: a seqio task (not a mixture: metrics are per task).
      num_examples: evaluate only the first `num_examples` examples (None: the whole split).
    """
    _check_positive(
        batch_size=batch_size, inputs_length=inputs_length, targets_length=targets_length
    )
    if num_examples is not None and num_examples < 0:
        raise ValueError(f"num_examples must be >= 0 or None, got {num_examples}.")
    task = _resolve_task(task_name)
    lengths = {"inputs": inputs_length, "targets": targets_length}
    examples = _task_features(
        task, lengths, split=EVAL_SPLIT, shuffle=False, seed=None, num_epochs=1
    )
    if num_examples is not None:
        examples = examples.take(num_examples)
    model_ds = TaskAwareEncDecFeatureConverter(pack=False)(examples, lengths).batch(batch_size)
    # Two passes over the same ordered, unshuffled split: model features and raw examples.
    raw = _with_options(examples).as_numpy_iterator()
    batches = _with_options(model_ds).as_numpy_iterator()

    def generate() -> Iterator[tuple[Batch, list[str]]]:
        for batch in batches:
            rows = next(iter(batch.values())).shape[0]
            texts = [_target_text(task, next(raw)) for _ in range(rows)]
            yield _pad_rows(batch, batch_size), texts

    return generate()


def decode_tokens(task_name: str, token_ids: np.ndarray) -> list[str]:
    """Token ids -> postprocessed strings, one per row.

    Args:
      token_ids: int [batch, length] (or [length] for one sequence). Each row is cut at the
        first EOS (id 1); padding and other special ids are dropped by the vocabulary.
    """
    task = _resolve_task(task_name)
    ids = np.asarray(token_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"token_ids must be [batch, length] or [length], got shape {ids.shape}.")
    vocab = task.output_features["targets"].vocabulary
    return [
        task.postprocess_fn(vocab.decode(row.tolist()), example=None, is_target=False)
        for row in ids
    ]
