"""Per-task evaluation by greedy decoding and the tasks' seqio metric functions."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from peftjax import data
from peftjax.models import greedy_decode, stacking


@functools.lru_cache(maxsize=8)
def _decoder(graphdef: nnx.GraphDef, max_length: int):
    @jax.jit
    def decode(trainable, frozen, encoder_input_tokens, task_ids, language_ids):
        model = stacking.merge(graphdef, trainable, frozen)  # either layout
        return greedy_decode(model, encoder_input_tokens, max_length=max_length,
                             task_ids=task_ids, language_ids=language_ids)
    return decode


def evaluate(graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State, *,
             task_names: list[str], data_config, sharding: NamedSharding | None = None
             ) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` over the first `data_config.eval_examples` validation examples."""
    decode = _decoder(graphdef, int(data_config.targets_length))
    results = {}
    for task in task_names:
        predictions, targets = [], []
        for batch, texts in data.eval_batches(
                task, batch_size=data_config.eval_batch_size,
                inputs_length=data_config.inputs_length,
                targets_length=data_config.targets_length,
                num_examples=data_config.eval_examples):
            inputs, ids = batch["encoder_input_tokens"], batch["encoder_task_ids"][:, 0]
            languages = batch.get("encoder_language_ids", np.zeros_like(inputs))[:, 0]
            if sharding is not None:
                inputs, ids, languages = (_place(a, sharding) for a in (inputs, ids, languages))
            tokens = _to_host(decode(trainable, frozen, inputs, ids, languages))
            predictions += data.decode_tokens(task, tokens[:len(texts)])
            targets += texts
        scores: dict[str, float] = {}
        for metric_fn in data.resolve(task).metric_fns:
            scores.update({k: float(v) for k, v in metric_fn(targets, predictions).items()})
        results[task] = scores
    return results


def _place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global batch (the same on every process: eval batches are read in order) on the
    mesh; each process places only the rows its own devices hold."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole array on this host; in a multi-process run the rows decoded on other
    processes' devices are gathered first, so every process scores every example."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return multihost_utils.process_allgather(array, tiled=True)


def mean_over_tasks(results: dict[str, dict[str, float]]) -> dict[str, float]:
    metrics = sorted({m for scores in results.values() for m in scores})
    return {m: float(np.mean([s[m] for s in results.values() if m in s])) for m in metrics}


def format_table(columns: dict[str, dict[str, dict[str, float]]]) -> str:
    """A per-task text table; `columns` maps a label (e.g. 'adapted') to its results."""
    labels = list(columns)
    tasks = sorted({t for r in columns.values() for t in r})
    metrics = sorted({m for r in columns.values() for s in r.values() for m in s})
    header = ["task"] + [f"{m} ({label})" for m in metrics for label in labels]
    rows = [[t] + [f"{columns[label].get(t, {}).get(m, float('nan')):.3f}"
                   for m in metrics for label in labels] for t in tasks]
    means = {label: mean_over_tasks(r) for label, r in columns.items()}
    rows.append(["MEAN"] + [f"{means[label].get(m, float('nan')):.3f}"
                            for m in metrics for label in labels])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # task names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
