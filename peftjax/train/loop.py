"""The train loop: one pure jitted step per batch, periodic logging, eval and checkpoints."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict
from tqdm import tqdm

from peftjax import data, distributed
from peftjax.checkpoint import Checkpoints
from peftjax.config import to_json
from peftjax.models import stacking
from peftjax.peft import FrozenAdapter
from peftjax.sharding import replicate_unplaced
from peftjax.train.evaluate import evaluate, mean_over_tasks
from peftjax.train.experiment import Experiment, build
from peftjax.train.optim import make_optimizer
from peftjax.train.preemption import Preempted, PreemptionWatch
from peftjax.train.step import TrainState, init_train_state, make_train_step, summarize
from peftjax.train.writers import create_writer

log = logging.getLogger(__name__)


def put_batch(batch: dict[str, np.ndarray], exp: Experiment) -> dict[str, jax.Array]:
    """Host batch (this process's rows) → global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(exp.batch_sharding, v)
            for k, v in batch.items()}


def _fresh_state(exp: Experiment, config: ConfigDict) -> tuple[optax.GradientTransformation,
                                                                TrainState]:
    """The optimizer and step-0 state, every leaf on the mesh (also the template to restore)."""
    optimizer = make_optimizer(config.optim, int(config.train.steps),
                               lora_plus_ratio=config.peft.lora_plus_ratio)
    return optimizer, replicate_unplaced(init_train_state(exp.trainable, optimizer), exp.mesh)


def _checkpointed(state: TrainState, exp: Experiment, *, frozen_adapters: bool = True) -> dict:
    """What a checkpoint holds: the train state, plus the run's frozen adapter state (frozen LoRA
    A, sparse masks, composed source adapters) when it has any. That state is rebuilt from the
    seed, the first pass or the source runs, which may change after this run used them; saving it
    keeps a resumed or evaluated run on exactly what it trained with. `frozen_adapters=False`
    gives the layout of checkpoints written without it (their meta lacks "frozen_adapters")."""
    # Checkpoints hold one entry per layer whatever the layout trained in (models.stacking), so
    # a run resumes with or without scan_layers.
    tree = stacking.unstack_placed(state.as_dict())
    if frozen_adapters and _has_frozen_adapters(exp):
        tree["frozen_adapters"] = stacking.unstack_placed(exp.frozen.filter(FrozenAdapter))
    return tree


def _has_frozen_adapters(exp: Experiment) -> bool:
    return bool(jax.tree.leaves(exp.frozen.filter(FrozenAdapter)))


def _restore(ckpt: Checkpoints, like: TrainState, exp: Experiment) -> tuple[TrainState, dict]:
    """The latest checkpoint into `like`'s layout; its frozen adapter state goes to `exp`."""
    saved_frozen = bool(ckpt.read_meta().get("frozen_adapters", False))
    restored, meta = ckpt.restore(_checkpointed(like, exp, frozen_adapters=saved_frozen))
    _use_saved_frozen_adapters(exp, restored)
    return TrainState.from_dict(restored), meta


def _use_saved_frozen_adapters(exp: Experiment, restored: dict) -> None:
    """Put the checkpoint's frozen adapter state into `exp.frozen`, saying so if it differs from
    what the run's sources give today."""
    saved = restored.get("frozen_adapters")
    if saved is None:
        return
    rebuilt = exp.frozen.filter(FrozenAdapter)
    changed = [jax.tree_util.keystr(path) for (path, now), then in
               zip(jax.tree_util.tree_leaves_with_path(rebuilt), jax.tree.leaves(saved),
                   strict=True) if not np.array_equal(np.asarray(now), np.asarray(then))]
    if changed:
        print(f"Note: {len(changed)} frozen adapter arrays (e.g. {changed[0]}) differ from what "
              "config.peft.sources / sparse_mask_from / the seed give now (did a source run "
              "change?); using the checkpoint's: this run was trained with them.", flush=True)
    exp.frozen = nnx.merge_state(exp.frozen, saved)


def _existing_checkpoints(workdir: str, config: ConfigDict) -> Checkpoints | None:
    directory = os.path.join(workdir, "checkpoints")
    # Every process must take the same branch (orbax's constructors synchronise the processes),
    # and process 0 may already be creating the directory: go by what process 0 saw.
    if not distributed.same_on_all_processes(os.path.isdir(directory)):
        return None
    ckpt = Checkpoints(directory, max_to_keep=config.train.keep_checkpoints, create=False)
    return ckpt if ckpt.latest_step() is not None else None


def prepare(config: ConfigDict, workdir: str) -> tuple[Experiment, Checkpoints | None]:
    """Build the run and check that the workdir's checkpoint (if any) fits it; writes nothing."""
    exp = build(config)
    ckpt = _existing_checkpoints(workdir, config)
    if ckpt is not None:
        ckpt.check_fingerprint(exp.fingerprint())
    return exp, ckpt


def train(config: ConfigDict, workdir: str) -> dict[str, float]:
    """Train (resuming from `workdir` if it holds a checkpoint); returns the final eval means.

    On SIGTERM / SIGINT (a preemption) the step in flight finishes, a checkpoint is saved at
    that step (whatever `config.train.checkpoint_every`), the final eval is skipped and
    `Preempted` is raised once the save is complete: calling `train` again with the same config
    and workdir resumes there and ends as an uninterrupted run would. `peftjax train` turns it
    into exit status 0. Several processes agree on the step (`peftjax.train.preemption`).
    """
    # The previous signal handlers come back on the way out, also for in-process callers.
    with PreemptionWatch(agree_every=config.train.log_every) as preemption:
        return _train(config, workdir, preemption)


def _train(config: ConfigDict, workdir: str, preemption: PreemptionWatch) -> dict[str, float]:
    exp, existing = prepare(config, workdir)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    ckpt = existing or Checkpoints(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.train.keep_checkpoints)
    if is_main:
        _write_config(config, workdir, resumed_at=None if existing is None else
                      existing.latest_step())
    counts = exp.parameter_counts()
    print(_parameter_line(counts, exp), flush=True)

    total_steps = int(config.train.steps)
    optimizer, state = _fresh_state(exp, config)
    meta = _meta(exp, 0)
    if existing is not None:
        state, meta = _restore(ckpt, state, exp)
        print(f"Resumed from step {int(state.step)} ({ckpt.directory}).", flush=True)
    # A scanned model trains in the stacked layout (one variable per layer stack, see
    # peftjax.models.stacking); each per-layer frozen array is freed once its stack is built,
    # so the base never exists twice.
    stacks = stacking.scanned_stacks(exp.model_config)
    state = stacking.stack_placed(state, stacks)
    exp.frozen = stacking.stack_placed(exp.frozen, stacks, consume=True)
    start = int(state.step)
    # Every process reads the same global batches and keeps its rows: the data is the same
    # whatever the number of processes (a run may resume on another topology).
    shard_index, num_shards = distributed.batch_shard(exp.batch_sharding, config.data.batch_size)
    batches = data.train_batches(
        config.data.mixture, batch_size=config.data.batch_size,
        inputs_length=config.data.inputs_length, targets_length=config.data.targets_length,
        pack=config.data.pack, seed=config.seed, start_batch=int(meta["data_position"]),
        shard_index=shard_index, num_shards=num_shards)
    train_step = make_train_step(exp.graphdef, optimizer, packed=exp.packed,
                                 num_task_ids=exp.num_task_ids,
                                 grad_accum_steps=config.train.grad_accum_steps)
    writer = create_writer(workdir, is_main_process=is_main)
    rng = jax.random.key(config.seed)

    def run_eval(step: int, trainable) -> dict[str, float]:
        results = evaluate(exp.graphdef, trainable, exp.frozen, task_names=exp.task_names,
                           data_config=config.data, sharding=exp.batch_sharding)
        scalars = {f"eval/{m}/{t}": v for t, s in results.items() for m, v in s.items()}
        means = mean_over_tasks(results)
        scalars.update({f"eval/{m}": v for m, v in means.items()})
        writer.write_scalars(step, scalars)
        return means

    accumulated, interval_start, interval_first, preempted = None, None, start, False
    progress = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="train",
                    disable=not (config.train.progress and is_main), file=sys.stderr,
                    dynamic_ncols=True)
    for step in progress:
        state, metrics = train_step(state, exp.frozen, put_batch(next(batches), exp), rng)
        accumulated = metrics if accumulated is None else jax.tree.map(jnp.add, accumulated,
                                                                       metrics)
        done = step + 1
        preempted = preemption.should_stop(done)  # the same answer on every process
        if interval_start is None:  # time from the end of the first (compiling) step
            jax.block_until_ready(state.step)
            interval_start, interval_first = time.perf_counter(), done
        # A preempted run logs its partial interval: the resumed run starts after it.
        if done % config.train.log_every == 0 or done == total_steps or preempted:
            summary = summarize(jax.device_get(accumulated), exp.names_by_id())
            summary["grad_norm"] = float(metrics["grad_norm"])
            if done > interval_first:  # device_get above waited for these steps to finish
                summary["perf/step_seconds"] = ((time.perf_counter() - interval_start)
                                                / (done - interval_first))
            interval_start, interval_first = time.perf_counter(), done
            writer.write_scalars(done, summary)
            progress.set_postfix(loss=f"{summary['loss']:.3f}",
                                 acc=f"{summary['token_accuracy']:.3f}")
            accumulated = None
        if preempted:
            ckpt.save(done, _checkpointed(state, exp), _meta(exp, done), force=True)
            break
        if config.train.eval_every and done % config.train.eval_every == 0 and done < total_steps:
            run_eval(done, state.trainable)
        if done % config.train.checkpoint_every == 0 or done == total_steps:
            ckpt.save(done, _checkpointed(state, exp), _meta(exp, done))
    progress.close()
    if existing is None and start >= total_steps:  # a zero-step run (Arrow): nothing trained,
        # but `peftjax eval` / export restore from a checkpoint, so write the initial state.
        ckpt.save(start, _checkpointed(state, exp), _meta(exp, start))
    # Asked again after the last step: in one process, a signal since then skips the eval.
    if preempted or preemption.should_stop(max(start, total_steps)):
        ckpt.wait()  # the checkpoint must be complete before the process goes
        writer.flush()
        raise Preempted(ckpt.latest_step(), ckpt.directory, reason=_preemption_reason(preemption))
    means = run_eval(total_steps, state.trainable)
    ckpt.wait()
    writer.flush()
    print("Final eval (mean over tasks): " + json.dumps({k: round(v, 4) for k, v in means.items()}),
          flush=True)
    return means


def _preemption_reason(preemption: PreemptionWatch) -> str:
    if preemption.signal_name is None:  # SIGTERM went to JAX's handler, here or on another host
        return "preempted (notice from JAX's preemption service)"
    return f"preempted ({preemption.signal_name})"


def _parameter_line(counts: dict, exp: Experiment) -> str:
    line = (f"Parameters: total {counts['total']:,} | trainable {counts['trainable']:,} "
            f"({counts['trainable_percent']:.3f}%)")
    if counts["trainable_effective"] != counts["trainable"]:
        line += f", of which {counts['trainable_effective']:,} can change (sparse mask)"
    if counts["per_task_trainable"] is not None:
        line += f" | {counts['per_task_trainable']:,} per task"
    return (line + f" | {exp.peft_config.method} ({exp.peft_config.mode}) on "
            f"{len(exp.adapted_paths)} modules")


def _write_config(config: ConfigDict, workdir: str, resumed_at: int | None) -> None:
    """`config.json` records the run's first config; a resume with changed values (say, more
    steps) adds `config.resume_<step>.json` rather than overwrite what the run started with."""
    text = to_json(config)
    path = os.path.join(workdir, "config.json")
    if resumed_at is not None and os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
        path = os.path.join(workdir, f"config.resume_{resumed_at}.json")
    with open(path, "w") as f:
        f.write(text)


def _meta(exp: Experiment, step: int) -> dict:
    # One batch per step, so the data position is the step; stored apart for clarity on resume.
    return {"fingerprint": exp.fingerprint(), "data_position": step,
            "frozen_adapters": _has_frozen_adapters(exp)}


def restore_trained(config: ConfigDict, workdir: str) -> tuple[Experiment, TrainState]:
    """The built run with the latest checkpoint's trainable state (for eval and export)."""
    exp, ckpt = prepare(config, workdir)
    if ckpt is None:
        raise FileNotFoundError(f"No checkpoint in {workdir!r}; train first with "
                                f"`peftjax train --config ... --workdir {workdir}`.")
    _, like = _fresh_state(exp, config)
    return exp, _restore(ckpt, like, exp)[0]


def evaluate_run(config: ConfigDict, workdir: str) -> dict[str, dict[str, dict[str, float]]]:
    """Evaluate the trained adapters and the frozen base without them, every task.

    Writes `workdir/eval/metrics.json` as `{"adapted": {task: {metric: v}}, "base": {...}}`,
    and with `config.data.heldout` also `"heldout"` / `"heldout_base"`: the same for the
    held-out tasks, never trained on (zero-shot; e.g. new task descriptions).
    """
    exp, state = restore_trained(config, workdir)
    sharding = exp.batch_sharding
    base_exp = build(config, with_peft=False)
    results = {}
    groups = {"": exp.task_names, "heldout": exp.heldout_names}
    for prefix, names in groups.items():
        if not names:
            continue
        adapted_key, base_key = (prefix, f"{prefix}_base") if prefix else ("adapted", "base")
        results[adapted_key] = evaluate(exp.graphdef, state.trainable, exp.frozen,
                                        task_names=names, data_config=config.data,
                                        sharding=sharding)
        results[base_key] = evaluate(base_exp.graphdef, base_exp.trainable, base_exp.frozen,
                                     task_names=names, data_config=config.data,
                                     sharding=sharding)
    if jax.process_index() == 0:
        out_dir = os.path.join(workdir, "eval")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
    return results
