"""`peftjax export-peft`: a trained run's adapters as HF peft adapter directories."""

from __future__ import annotations

import os

from flax import nnx
from ml_collections import ConfigDict

from peftjax.interop.hf_peft import PeftInteropError, save_peft
from peftjax.peft.runs import read_config

EXPORTABLE = ("lora", "ia3", "prompt_tuning")
BASE_DIR = "base_model"  # where a randomly initialised base is written, beside the adapters


def export_run(config: ConfigDict | None, workdir: str, out_dir: str | None) -> list[str]:
    """Restore the run in `workdir` and write its adapter(s) to `out_dir`.

    Shared runs write one adapter directory, `out_dir`; per-task runs one per task,
    `out_dir/<task name>`. A run on a random-init base (no `config.model.hf_path`) also writes
    that base as an HF T5 directory, `out_dir/base_model`, so peft can load the adapters on it.
    Returns human-readable lines saying what was written.
    """
    from peftjax.models import to_hf
    from peftjax.train import restore_trained
    from peftjax.train.experiment import build_base_model

    if not out_dir:
        raise PeftInteropError("--out is required: the directory to write the adapter(s) to.")
    config = read_config(workdir) if config is None else config
    method, compose = config.peft.method, config.peft.compose
    if method not in EXPORTABLE or compose != "none":
        what = f"compose={compose!r}" if compose != "none" else f"method={method!r}"
        raise PeftInteropError(f"The run's config.peft.{what} has no HF peft format; export-peft "
                               f"writes config.peft.method in {EXPORTABLE} without compose.")
    exp, state = restore_trained(config, workdir)
    model = nnx.merge(exp.graphdef, state.trainable, exp.frozen)
    lines = []
    if config.model.hf_path:
        base = os.path.abspath(config.model.hf_path)
    else:
        base = os.path.abspath(os.path.join(out_dir, BASE_DIR))
        to_hf(build_base_model(config), base)
        lines.append(f"Wrote {base} (the run's random-init base, as an HF T5 directory)")
    if exp.peft_config.mode == "per_task":
        for name in exp.task_names:
            path = os.path.join(out_dir, name)
            save_peft(model, path, task=exp.task_ids[name], base_model_name_or_path=base)
            lines.append(f"Wrote {path} ({method}, task {name!r}, id {exp.task_ids[name]})")
    else:
        save_peft(model, out_dir, base_model_name_or_path=base)
        lines.append(f"Wrote {out_dir} ({method}, shared by all tasks)")
    return lines
