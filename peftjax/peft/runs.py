"""Trained runs as inputs of a new run: frozen source adapters under a composition
(`peftjax.peft.compose`) and the first pass that picks a sparse fine-tuning mask
(`peftjax.peft.sparse`).

A run is its workdir: `DIR/config.json` (the config it started with, written by `peftjax train`)
and `DIR/checkpoints/` (its trainable state). Loading one rebuilds it from that config and
restores the latest checkpoint, exactly as `peftjax eval` does.
"""

from __future__ import annotations

import dataclasses
import json
import os

from flax import nnx
from flax.nnx import graph
from ml_collections import ConfigDict

from peftjax.config import from_saved
from peftjax.models.config import T5Config
from peftjax.peft.variables import FrozenAdapter, PeftParam

# T5Config fields that may differ between a run and the runs it reads: compute precision, the
# frozen base's storage precision, dropout and how the layers run (scanned, rematerialised)
# change no weight's shape or meaning.
_NOT_ARCHITECTURE = ("dtype", "param_dtype", "dropout_rate", "scan_layers", "remat")


def base_identity(config: ConfigDict) -> str:
    """What the base model of a run is: its checkpoint directory, or its random-init seed (the
    same words as `Experiment.fingerprint()["base"]`)."""
    return config.model.hf_path or f"random init, seed {config.seed}"


def read_config(workdir: str, key: str | None = None) -> ConfigDict:
    """The config a run in `workdir` started with; `key` (e.g. "sources") names the config key
    that pointed here, for the error message."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        where = f"config.peft.{key}: " if key else ""
        raise FileNotFoundError(
            f"{where}{workdir!r} holds no trained run (no config.json there). Train it first "
            f"with `peftjax train --config ... --workdir {workdir}`, or fix the path.")
    with open(path) as f:
        return from_saved(json.load(f))


def check_fits(workdir: str, run_config: ConfigDict, model_config: T5Config, *, key: str,
               base: str | None) -> None:
    """Raise ValueError unless the run in `workdir` was trained on this base.

    Compares the architecture (every `T5Config` field but the dtypes and dropout) and, when
    `base` is given, the base's identity (`base_identity`: checkpoint path or random-init seed).
    """
    from peftjax.train.experiment import model_config_from  # it imports this package

    problems = []
    theirs = base_identity(run_config)
    if base is not None and not _same_base(theirs, base):
        problems.append(f"it was trained on {theirs!r}, this run's base is {base!r}")
    their_model = model_config_from(run_config)
    for field in dataclasses.fields(T5Config):
        if field.name in _NOT_ARCHITECTURE:
            continue
        a, b = getattr(their_model, field.name), getattr(model_config, field.name)
        if a != b:
            problems.append(f"{field.name} is {a!r} there, {b!r} here")
    if problems:
        raise ValueError(
            f"config.peft.{key}: {workdir!r} holds an adapter that does not fit the base "
            f"({'; '.join(problems[:4])}). Use a run trained on this run's base "
            f"(config.model.hf_path / size / seed), or retrain it on this base.")


def _same_base(a: str, b: str) -> bool:
    if a.startswith("random init") or b.startswith("random init"):
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


def load_trained(workdir: str, run_config: ConfigDict):
    """`(experiment, trained model)` of the run in `workdir`: rebuilt from `run_config` and
    restored from its latest checkpoint. `experiment.trainable` keeps the pre-training values."""
    from peftjax.train.loop import restore_trained  # the train loop imports this package

    exp, state = restore_trained(run_config, workdir)
    return exp, nnx.merge(exp.graphdef, state.trainable, exp.frozen)


def freeze(root: nnx.Module) -> nnx.Module:
    """Turn every trainable PEFT parameter under `root` into a `FrozenAdapter`, in place.

    The values and metadata (logical axes) stay; a variable shared by several modules (say,
    Compacter's shared rules) becomes one shared frozen variable. Returns `root`.
    """
    frozen: dict[int, FrozenAdapter] = {}
    seen: set[int] = set()

    def visit(node) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        impl = graph.get_node_impl(node)
        for key, value in list(impl.node_dict(node).items()):
            if isinstance(value, PeftParam):
                if id(value) not in frozen:
                    frozen[id(value)] = FrozenAdapter(value.get_value(), **value.get_metadata())
                _set_child(node, key, frozen[id(value)])
            elif isinstance(value, nnx.Module | nnx.List | nnx.Dict):
                visit(value)

    visit(root)
    return root


def _set_child(node, key, value) -> None:
    # Not `set_key` of the graph API: for a Variable it updates the old one in place, type kept.
    if isinstance(key, int):
        node[key] = value
    else:
        setattr(node, key, value)
