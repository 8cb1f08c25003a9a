"""Metric writers: TensorBoard (clu) plus one JSON object per line in `metrics.jsonl`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from clu import metric_writers
from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
    """Appends `{"step": N, "time": T, **scalars}` lines; easy to read with pandas or jq."""

    def __init__(self, path: str):
        self._file = open(path, "a")  # noqa: SIM115 (closed in close())

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), "time": time.time()}
        record.update({k: float(v) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_summaries(self, step, values, metadata=None) -> None:
        self.write_scalars(step, {k: v for k, v in values.items() if getattr(v, "ndim", 0) == 0})

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({"hparams": dict(hparams)}, default=str) + "\n")

    # Non-scalar summaries have no JSON form here; TensorBoard keeps them.
    def write_images(self, step, images) -> None: ...
    def write_videos(self, step, videos) -> None: ...
    def write_audios(self, step, audios, *, sample_rate) -> None: ...
    def write_texts(self, step, texts) -> None: ...
    def write_histograms(self, step, arrays, num_buckets=None) -> None: ...

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def create_writer(workdir: str, *, is_main_process: bool) -> metric_writers.MetricWriter:
    """TensorBoard events + metrics.jsonl in `workdir` on the main process; logging elsewhere."""
    if not is_main_process:
        return metric_writers.create_default_writer(just_logging=True, asynchronous=False)
    return metric_writers.MultiWriter([
        metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")),
        JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
    ])
