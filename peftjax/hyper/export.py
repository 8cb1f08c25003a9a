"""`peftjax export-adapters`: a trained hypernetwork run as an ordinary per-task adapter run.

A hypernetwork (HyperFormer, HyperFormer++ / Hyper-X, Text-to-LoRA) generates each task's
adapters from its conditioning; once trained, those adapters are fixed tables. `export_run` writes
them as a new run directory, laid out exactly as `peftjax train` writes one, of the method the
hypernetwork generates:

  hyperformer, hyperformer_pp  ->  houlsby, mode per_task, adapter_bias=True,
                                   adapter_norm=hyper_norm
  text_to_lora                 ->  lora, mode per_task

one table row per task id (held-out tasks' rows included), so the run evaluates, exports to HF
peft (LoRA), composes and resumes like any per-task adapter run, with no hypernetwork at run time.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from peftjax.config import default_config, from_saved
from peftjax.hyper import HYPER_METHODS
from peftjax.peft.registry import method_spec
from peftjax.peft.runs import read_config

# What each hypernetwork method generates, as an ordinary method.
EXPORTED_METHOD = {"hyperformer": "houlsby", "hyperformer_pp": "houlsby", "text_to_lora": "lora"}
# Generated array name -> the exported module's attribute (bottlenecks use the same names).
_ARRAY_NAMES = {"a": "lora_a", "b": "lora_b"}
# LoRA options a generated LoRA never has (its scale is alpha / rank, A and B both generated).
_LORA_DEFAULTS = ("rslora", "dora", "freeze_a", "skills_from")


def exported_config(config: ConfigDict, num_tasks: int) -> ConfigDict:
    """The config of the per-task adapter run a hypernetwork run of `config` exports to: same
    base, data, optimizer and sites; the generated method, `num_tasks` table rows; hypernetwork
    keys (`hyper_*`, `num_languages`) back at their defaults."""
    source = config.peft.method
    method = EXPORTED_METHOD[source]
    new = from_saved(config.to_dict())  # a deep, unlocked copy
    defaults = default_config().peft
    for key in defaults:
        if key.startswith("hyper_") or key == "num_languages" or (
                method == "lora" and key in _LORA_DEFAULTS):
            new.peft[key] = defaults[key]
    new.peft.method = method
    new.peft.mode = "per_task"
    new.peft.num_tasks = num_tasks
    if not config.peft.targets and method_spec(source).targets != method_spec(method).targets:
        new.peft.targets = method_spec(source).targets  # the sites the hypernetwork adapted
    if method == "houlsby":
        new.peft.adapter_bias = True
        new.peft.adapter_norm = bool(config.peft.hyper_norm)
    return new


def check_exportable(config: ConfigDict, out: str) -> None:
    """Raise ValueError, naming the fix, unless the run of `config` can be exported to `out`."""
    method = config.peft.method
    if method not in HYPER_METHODS:
        raise ValueError(
            f"export-adapters turns a hypernetwork run (config.peft.method in {HYPER_METHODS}) "
            f"into per-task adapters, but this run's config.peft.method is {method!r}: its "
            "adapters are already ordinary; evaluate it as it is, or write HF peft adapters "
            "with `peftjax export-peft`.")
    if config.peft.hyper_train_norms:
        raise ValueError(
            "This run was trained with config.peft.hyper_train_norms=True: it also trained the "
            "base's layer norms, which are not adapters, so the exported adapters alone would not "
            "reproduce it. Export a run trained with hyper_train_norms=False.")
    if config.peft.compose != "none":
        raise ValueError(
            f"This run composes source adapters (config.peft.compose={config.peft.compose!r}); "
            "the composition's trained state is not part of the generated adapters. Export a "
            "hypernetwork run with config.peft.compose='none'.")
    if not out:
        raise ValueError("--out is required: the new run directory to write the adapters to.")
    held = [name for name in ("config.json", "checkpoints")
            if os.path.exists(os.path.join(out, name))]
    if held:
        raise ValueError(f"{out!r} already holds a run ({', '.join(held)}); export-adapters "
                         "never overwrites one: pass a new directory as --out.")


def _language_rows(tables: dict[str, dict[str, jax.Array]], num_languages: int,
                   language_id: int, condition: str) -> dict[str, dict[str, np.ndarray]]:
    """Every site's rows of `language_id` (rows are task-major, `t * languages + l`)."""
    if not 0 <= language_id < num_languages:
        what = ("conditions on the task only (config.peft.hyper_condition="
                f"{condition!r}), so its one language row is 0"
                if num_languages == 1 else f"has languages 0..{num_languages - 1}")
        raise ValueError(f"language_id={language_id} is outside the hypernetwork's language "
                         f"table: the run {what}. Pick a language id in it.")
    return {path: {name: np.asarray(rows)[language_id::num_languages]
                   for name, rows in arrays.items()}
            for path, arrays in tables.items()}


def _fill(trainable: nnx.State, tables: dict[str, dict[str, np.ndarray]]) -> None:
    """Set every leaf of the exported run's `trainable` to its generated table, in place, on
    the leaf's sharding; raise if a leaf has no table or a table no leaf."""
    unused = {(path, _ARRAY_NAMES.get(name, name)) for path, arrays in tables.items()
              for name in arrays}
    for key, variable in nnx.to_flat_state(trainable):
        path, name = ".".join(map(str, key[:-1])), str(key[-1])
        generated = {_ARRAY_NAMES.get(n, n): a for n, a in tables.get(path, {}).items()}
        if name not in generated:
            raise ValueError(f"The exported run has a trainable {path}.{name} that the "
                             "hypernetwork does not generate; its config (config.peft.targets "
                             "/ method options) does not match the hypernetwork's sites.")
        old = variable.get_value()
        table = generated[name]
        if table.shape != old.shape:
            raise ValueError(f"{path}.{name}: generated {table.shape}, the exported run holds "
                             f"{old.shape}; the exported config does not match the hypernetwork.")
        variable.set_value(jax.device_put(table.astype(old.dtype), old.sharding))
        unused.discard((path, name))
    if unused:
        raise ValueError(f"The hypernetwork generates {len(unused)} arrays the exported run does "
                         f"not hold (e.g. {'.'.join(sorted(unused)[0])}); its config "
                         "(config.peft.targets) does not match the hypernetwork's sites.")


def export_run(config: ConfigDict | None, workdir: str, out: str, *,
               language_id: int = 0) -> list[str]:
    """Write the hypernetwork run in `workdir` as an ordinary per-task adapter run in `out`.

    `config`: the run's config (None: `workdir/config.json`). `language_id`: for a run
    conditioned on task and language (Hyper-X), the language whose adapters are exported (one
    adapter per task in that language). The new run's checkpoint holds the generated tables as
    its trainable state (rows = task ids), a fresh optimizer state and the source's step.
    Returns human-readable lines saying what was written.
    """
    from peftjax.checkpoint import Checkpoints
    from peftjax.train import build, loop, restore_trained
    from peftjax.train.step import TrainState

    config = read_config(workdir) if config is None else config
    check_exportable(config, out)
    exp, state = restore_trained(config, workdir)
    model = nnx.merge(exp.graphdef, state.trainable, exp.frozen)
    conditioner = model.hypernet.conditioner
    tables = _language_rows(model.hypernet.per_task(), conditioner.num_languages, language_id,
                            config.peft.hyper_condition)
    new_config = exported_config(config, conditioner.num_tasks)
    new_exp = build(new_config)
    _fill(new_exp.trainable, tables)
    step = int(state.step)
    _, fresh = loop._fresh_state(new_exp, new_config)
    new_state = TrainState(fresh.step + step, new_exp.trainable, fresh.opt_state)

    os.makedirs(out, exist_ok=True)
    ckpt = Checkpoints(os.path.join(out, "checkpoints"),
                       max_to_keep=new_config.train.keep_checkpoints)
    ckpt.save(step, loop._checkpointed(new_state, new_exp), loop._meta(new_exp, step))
    ckpt.wait()
    loop._write_config(new_config, out, resumed_at=None)

    method = new_config.peft.method
    language = (f", language {language_id}" if config.peft.hyper_condition == "task_language"
                else "")
    names = {i: n for n, i in {**new_exp.task_ids, **_heldout_ids(new_exp)}.items()}
    lines = [f"Wrote {out}: {method} (per_task, {conditioner.num_tasks} task rows{language}, "
             f"step {step}) generated by the {config.peft.method} hypernetwork of {workdir}",
             "Tasks: " + ", ".join(f"{names[i]} ({i})" for i in sorted(names)),
             f"Evaluate it: peftjax eval --workdir {out}"]
    if method == "lora":
        lines.append(f"HF peft adapters: peftjax export-peft --workdir {out} --out "
                     f"{os.path.join(out, 'hf_peft')}")
    return lines


def _heldout_ids(exp) -> dict[str, int]:
    from peftjax import data

    return {name: data.task_id_of(name) for name in exp.heldout_names}
