"""Parameter accounting: what a method trains, counted from shapes alone.

    peftjax params --config configs/lora.py --config.model.size=xxl

`count_parameters(config)` builds the base model and attaches PEFT under `nnx.eval_shape`, so no
array is allocated and no weight is read (of `config.model.hf_path`, only `config.json` and the
tensor names in the safetensors header): an 11B-parameter T5 is counted in seconds on a laptop.
Compositions rebuild their source runs from the runs' `config.json` the same way. `summarize`
counts a split state, abstract or concrete; `Experiment.parameter_counts` uses it too, so what
`params` reports is what `train` trains.

Counting follows `sum(p.numel() for p in model.parameters())` of transformers + peft: the tied
input embedding counts once, every trainable table counts in full (per-task tables: all rows).
"""

from __future__ import annotations

import types
from collections import Counter
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from peftjax.models import T5
from peftjax.peft import FrozenAdapter, PeftConfig, PeftParam, apply_peft, trainable_filter
from peftjax.peft.compose import compose_sources
from peftjax.peft.runs import base_identity
from peftjax.peft.sparse import kept_count
from peftjax.peft.variables import Conditioning
from peftjax.train.experiment import Plan, condition_data, plan


def count_parameters(config: ConfigDict) -> dict[str, Any]:
    """Validate `config` and count its run's parameters without allocating them.

    Returns `summarize`'s dict plus `model` (the checkpoint path or preset size). Raises
    ConfigError / ValueError (naming the key to fix) on a config that `train` would refuse,
    except for checks that need the devices (batch size vs mesh).
    """
    resolved = plan(config)
    adapted: list[str] = []

    def build_abstract() -> T5:
        model, paths = _construct(config, resolved)
        adapted.extend(paths)
        return model

    model = nnx.eval_shape(build_abstract)
    _, trainable, frozen = nnx.split(model, trainable_filter(resolved.peft_config.method), ...)
    counts = summarize(trainable, frozen, peft_config=resolved.peft_config,
                       num_tasks=len(resolved.task_names), adapted_paths=adapted)
    counts["model"] = config.model.hf_path or config.model.size
    return counts


def _construct(config: ConfigDict, resolved: Plan, *,
               compose: bool = True) -> tuple[T5, list[str]]:
    """`experiment.build`'s model and adapted paths; called under `nnx.eval_shape`, so only
    shapes are made. A checkpoint's weights would overwrite values, never change a shape
    (`from_hf` checks that), so the base is built from its config.json alone."""
    model = T5(resolved.model_config, rngs=_host_counted(nnx.Rngs(config.seed)))
    adapted = apply_peft(model, resolved.peft_config, num_tasks=resolved.num_tasks,
                         rngs=_host_counted(nnx.Rngs(config.seed + 1)),
                         conditioning=condition_data(config, resolved, model))
    if compose:  # frozen adapters of trained runs (config.peft.sources), as `build` attaches them
        adapted = compose_sources(model, resolved.peft_config, adapted,
                                  base=base_identity(config), num_tasks=resolved.num_tasks,
                                  rngs=_host_counted(nnx.Rngs(config.seed + 2)),
                                  load=_load_source_shapes)
    return model, adapted


def _load_source_shapes(workdir: str, run_config: ConfigDict):
    """`runs.load_trained` from shapes: the source run rebuilt from its config.json, its
    checkpoint left unread (a source cannot itself be a composition)."""
    del workdir
    model, adapted = _construct(run_config, plan(run_config), compose=False)
    return types.SimpleNamespace(adapted_paths=adapted), model


def summarize(trainable: nnx.State, frozen: nnx.State, *, peft_config: PeftConfig,
              num_tasks: int, adapted_paths: list[str]) -> dict[str, Any]:
    """Counts of a split model state (arrays or `jax.ShapeDtypeStruct`s).

    Keys:
      total, trainable, frozen (= total - trainable), trainable_percent;
      base: parameters of the base model (`nnx.Param` that are not PEFT parameters);
      frozen_adapter: non-trained adapter state (frozen LoRA A, masks, composed sources);
      per_task_trainable: trainable entries of ONE row of the per-task tables (the cost of one
        more task; None in shared mode); shared_trainable: trainable entries used by every task;
      task_table_size: rows of the per-task tables (task ids, may exceed num_tasks), or None;
      trainable_bytes: size of the trainable state (what an adapter checkpoint stores);
      trainable_by_site: trainable entries per module path, layer indices folded to `*`;
      trainable_by_variable: trainable entries per variable name (lora_a, lora_b, ...);
      trainable_effective: entries that training can change: `trainable`, except that a sparse
        update (`phi`, stored dense) counts only the entries its mask lets move;
      trainable_percent_per_task: trainable / (num_tasks * total), in percent;
      buffers: boolean state (sparse masks) and fixed hypernetwork inputs (description
        embeddings), not counted as parameters anywhere above.
    """
    by_site: Counter[str] = Counter()
    by_variable: Counter[str] = Counter()
    per_task_rows, shared, trainable_bytes, table_sizes = 0, 0, 0, set()
    for path, variable in nnx.to_flat_state(trainable):
        value = variable.get_value()
        size = _size(value.shape)
        trainable_bytes += size * value.dtype.itemsize
        by_site[".".join("*" if isinstance(p, int) else str(p) for p in path[:-1])] += size
        by_variable[str(path[-1])] += size
        axes = variable.get_metadata().get("axes") or ()
        if axes and axes[0] == "tasks":  # per-task tables lead with their `tasks` axis
            table_sizes.add(value.shape[0])
            per_task_rows += size // value.shape[0]
        else:
            shared += size
    phi_sites = {path[:-1] for path, _ in nnx.to_flat_state(trainable) if path[-1] == "phi"}
    base = frozen_adapter = other = masked = buffers = 0
    for path, variable in nnx.to_flat_state(frozen):
        value = variable.get_value()
        size = _size(value.shape)
        if isinstance(variable, Conditioning):  # fixed hypernetwork inputs: buffers, too
            buffers += size
            continue
        if value.dtype == bool:  # masks are buffers, not parameters (as torch counts them)
            buffers += size
            if path[:-1] in phi_sites:  # the mask of a sparse update this run trains
                masked += _mask_count(value, peft_config.sparse_density)
            continue
        if isinstance(variable, nnx.Param) and not isinstance(variable, PeftParam):
            base += size
        elif isinstance(variable, FrozenAdapter):
            frozen_adapter += size
        else:
            other += size
    trainable_total = sum(by_variable.values())
    total = trainable_total + base + frozen_adapter + other
    if peft_config.method == "full":
        base += trainable_total  # the base model is what trains
    return {
        "total": total,
        "trainable": trainable_total,
        "trainable_percent": round(100.0 * trainable_total / total, 6) if total else 0.0,
        # All trainable parameters over num_tasks, as % of the model: how HyperFormer reports a
        # hypernetwork's cost ("0.29% parameters per task"), comparable across methods.
        "trainable_percent_per_task": (round(100.0 * trainable_total / (num_tasks * total), 6)
                                       if total and num_tasks else 0.0),
        "frozen": total - trainable_total,
        "method": peft_config.method,
        "mode": peft_config.mode,
        "num_tasks": num_tasks,
        "adapted_modules": len(adapted_paths),
        "per_task_trainable": per_task_rows if table_sizes else None,
        "shared_trainable": shared,
        "task_table_size": max(table_sizes) if table_sizes else None,
        "base": base,
        "frozen_adapter": frozen_adapter,
        "trainable_bytes": trainable_bytes,
        "trainable_by_site": dict(sorted(by_site.items())),
        "trainable_by_variable": dict(sorted(by_variable.items())),
        "trainable_effective": trainable_total - by_variable.get("phi", 0) + masked,
        "buffers": buffers,
    }


def _mask_count(mask, density: float) -> int:
    """Entries a sparse mask `[(T,) in, out]` lets train: counted when concrete, else from shapes
    by `choose_mask`'s rule (`kept_count` per weight matrix)."""
    if isinstance(mask, np.ndarray | jax.Array):
        return int(np.asarray(mask).sum())
    *lead, d_in, d_out = mask.shape
    return _size(lead) * kept_count(d_in * d_out, density)


def _host_counted(rngs: nnx.Rngs) -> nnx.Rngs:
    """`rngs` with each stream's draw counter kept as a host numpy scalar.

    Under a trace, every draw from a traced counter makes flax probe the new counter's
    `.sharding`, and jax answers that probe on a tracer by scanning the whole jaxpr built so far:
    tracing grows quadratic in the number of draws (minutes for XXL with per-task adapters). A
    host counter folds in the same numbers, so the keys, and the shapes, are unchanged.
    """
    for _, stream in rngs.items():
        stream.count.set_raw_value(np.zeros(np.shape(stream.count.get_raw_value()), np.uint32))
    return rngs


def _size(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= int(dim)
    return size
