"""Mixing rates for seqio mixtures, from the size of each task's training split.

A seqio Mixture takes, per task, a constant rate or a callable `rate(task) -> float`, and samples
each example from task i with probability `rate_i / Σ_j rate_j`. The two schemes here, with n the
task's number of training examples (`task.num_input_examples("train")`):

  examples_proportional(K)          rate = min(n, K)          Raffel et al. 2020 (T5), §3.5.2:
                                                              "examples-proportional mixing"
                                                              with an artificial size limit K
  temperature_scaled(T, K=None)     rate = min(n, K)^(1/T)    T5's temperature-scaled mixing;
                                                              HyperFormer (Karimi Mahabadi et al.
                                                              2021) samples p_i ∝ (n_i / N)^(1/T)
                                                              with T = 10 and no limit

HyperFormer writes the rate as (n_i / N)^(1/T), N = Σ_j n_j; the factor N^(-1/T) is the same for
every task and cancels in the normalisation, so a rate callable, which sees one task at a time,
can use n^(1/T). T = 1 is examples-proportional mixing; T → ∞ approaches equal mixing.

A task whose training size seqio cannot tell (a TFDS dataset that is not prepared yet: its
dataset_info has no splits) has no rate; the callables raise a ValueError saying how to fix it.
`normalized_rates(mixture)` gives the sampling probabilities a mixture ends up with.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import seqio

TRAIN_SPLIT = "train"

RateFn = Callable[[seqio.Task], float]


def train_size(task: seqio.Task) -> int:
    """The number of examples in `task`'s training split, as seqio reports it.

    Raises:
      ValueError: seqio does not know the size (unprepared TFDS dataset, a FunctionDataSource
        without sizes, an infinite stream).
    """
    try:
        size = task.num_input_examples(TRAIN_SPLIT)
    except KeyError as e:  # TFDS: "splits is empty" before the dataset is generated
        size, cause = None, e
    else:
        cause = None
    if size is None or not math.isfinite(size) or size <= 0:
        raise ValueError(
            f"Task {task.name!r}: its mixing rate depends on the size of its {TRAIN_SPLIT!r} "
            f"split, which seqio does not know (got {size!r}"
            + (f"; {cause}" if cause is not None else "")
            + "). For a TFDS task, prepare the dataset once so its dataset_info records the "
            "split sizes (`tfds build <name>`, or `tfds.load(<name>)`; set TFDS_DATA_DIR if it "
            "lives elsewhere). Otherwise register the mixture with constant rates."
        ) from cause
    return int(size)


def _check_maximum(maximum: int | float | None) -> None:
    if maximum is not None and not maximum > 0:
        raise ValueError(f"maximum (the size limit K) must be > 0 or None, got {maximum!r}.")


def examples_proportional(maximum: int | float | None) -> RateFn:
    """A seqio rate callable: `min(n, maximum)`, n the task's training-set size.

    Args:
      maximum: the artificial size limit K (T5 §3.5.2), so that huge tasks do not drown small
        ones; None for no limit.
    """
    _check_maximum(maximum)

    def rate(task: seqio.Task) -> float:
        size = train_size(task)
        return float(size if maximum is None else min(size, maximum))

    rate.__name__ = f"examples_proportional_{maximum}"
    return rate


def temperature_scaled(temperature: float, maximum: int | float | None = None) -> RateFn:
    """A seqio rate callable: `min(n, maximum)^(1 / temperature)`.

    Args:
      temperature: T >= 1 flattens the distribution towards equal mixing (HyperFormer: 10);
        T = 1 is examples-proportional.
      maximum: optional size limit applied before the temperature (as T5's rate_num_examples).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    _check_maximum(maximum)
    proportional = examples_proportional(maximum)

    def rate(task: seqio.Task) -> float:
        return proportional(task) ** (1.0 / temperature)

    rate.__name__ = f"temperature_scaled_{temperature}_{maximum}"
    return rate


def normalized_rates(mixture: seqio.Mixture) -> dict[str, float]:
    """{task name: probability that an example of `mixture` comes from that task}."""
    total = mixture.total_rate
    return {task.name: mixture.get_rate(task) / total for task in mixture.tasks}
