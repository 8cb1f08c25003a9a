"""Multi-process training through `launch/local.py` and the real CLI on the tiny config.

One reference run (1 process x 4 CPU devices, 4 steps) against runs that change the process
count mid-way: 2 processes x 2 devices for 2 steps then 1 x 4 resumes to step 4, and the
reference's own step-2 checkpoint resumed by 2 x 2. The mesh puts all 4 devices on `fsdp`, so
LoRA factors (embed dim) and the batch are split across the processes and every checkpoint is
written in parts by each process. Per-step losses and the final train states must equal the
reference's: the data stream, the sharded step and the checkpoints do not depend on the
topology.
"""

import json
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from launch import local
from peftjax import distributed
from peftjax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from tests.helpers import REPO, compile_cache_env, run_peftjax

ARGS = ["--config", os.path.join(REPO, "configs", "tiny.py"),
        "--config.data.mixture=synthetic_reverse_shift",  # one task: a short final eval
        "--config.train.log_every=1", "--config.train.checkpoint_every=2",
        "--config.train.keep_checkpoints=3",
        # A constant learning rate, so a run for 2 steps resumed to 4 follows the 4-step run.
        "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
        "--config.optim.learning_rate=0.01",
        "--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=4"]
RTOL = 1e-5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The launches' environment: this repo importable, no coordinator settings inherited, one
    compilation cache (the 1 x 4 runs compile the same programs, and so do the 2 x 2 ones)."""
    env = {k: v for k, v in os.environ.items()
           if k not in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)}
    env["PYTHONPATH"] = REPO
    env.update(compile_cache_env(tmp_path_factory.mktemp("jax_cache")))
    return env


def train(env, workdir, *, processes, devices, steps):
    losses, result = local.train_losses([*ARGS, f"--config.train.steps={steps}"], str(workdir),
                                        processes=processes, devices=devices, env=env, cwd=REPO)
    return losses, result.output


def saved_state(workdir, step):
    """A checkpoint's train state as host numpy arrays (whatever process wrote which part)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ocp.PyTreeCheckpointer().restore(path, restore_args=restore_args)


def assert_same_states(a, b):
    flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    assert len(flat_a) > 10
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def eval_records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if any(k.startswith("eval/") for k in r)]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ref_1x4")
    losses, _ = train(env, workdir, processes=1, devices=4, steps=4)
    return workdir, losses


@pytest.fixture(scope="module")
def two_then_one(env, tmp_path_factory):
    """2 processes x 2 devices for steps 1-2, then 1 process x 4 devices resumes to step 4."""
    workdir = tmp_path_factory.mktemp("2x2_then_1x4")
    first, output = train(env, workdir, processes=2, devices=2, steps=2)
    losses, resumed = train(env, workdir, processes=1, devices=4, steps=4)
    return workdir, first, output, losses, resumed


@pytest.fixture(scope="module")
def one_then_two(env, reference, tmp_path_factory):
    """The reference's step-2 checkpoint (written by 1 process), resumed by 2 x 2 to step 4."""
    ref_dir, _ = reference
    workdir = tmp_path_factory.mktemp("1x4_then_2x2")
    top = str(ref_dir / "checkpoints")
    shutil.copytree(top, workdir / "checkpoints",
                    ignore=lambda directory, _: ["4"] if directory == top else [])
    losses, output = train(env, workdir, processes=2, devices=2, steps=4)
    return workdir, losses, output


def assert_close(losses, expected):
    assert sorted(losses) == sorted(expected)
    np.testing.assert_allclose([losses[k] for k in sorted(losses)],
                               [expected[k] for k in sorted(expected)], rtol=RTOL)


@pytest.mark.slow  # four launches of the CLI (about 2 min of CPU; shared by the next test)
def test_two_processes_train_like_one_with_the_same_devices(reference, two_then_one,
                                                            one_then_two):
    _, ref = reference
    _, first, output, _, _ = two_then_one
    assert "[p0] Process 0 of 2: 2 local of 4 cpu devices." in output
    assert "[p1] Process 1 of 2: 2 local of 4 cpu devices." in output
    assert sorted(ref) == [1, 2, 3, 4] and len(set(ref.values())) == 4  # the loss moves
    assert_close(first, {k: ref[k] for k in (1, 2)})  # 2 x 2 from scratch
    _, losses, _ = one_then_two
    assert_close({k: losses[k] for k in (3, 4)}, {k: ref[k] for k in (3, 4)})  # 2 x 2 resumed


@pytest.mark.slow
def test_checkpoints_resume_across_process_counts(reference, two_then_one, one_then_two):
    ref_dir, ref = reference
    # Written by 2 processes (each its own shards of the state), resumed by 1.
    workdir, _, _, losses, resumed = two_then_one
    assert "Resumed from step 2" in resumed
    assert_close(losses, ref)
    parts = [p for p in os.listdir(workdir / "checkpoints" / "2" / "state")
             if p.startswith("ocdbt.process_")]
    assert sorted(parts) == ["ocdbt.process_0", "ocdbt.process_1"]
    assert_same_states(saved_state(workdir, 2), saved_state(ref_dir, 2))
    assert_same_states(saved_state(workdir, 4), saved_state(ref_dir, 4))
    # Written by 1 process, resumed by 2.
    workdir, losses, output = one_then_two
    assert "[p0] Resumed from step 2" in output and "[p1] Resumed from step 2" in output
    assert sorted(losses) == [3, 4]  # only process 0 writes metrics, once per step
    assert_same_states(saved_state(workdir, 4), saved_state(ref_dir, 4))
    # The final eval ran on both processes' devices and scored every example like the reference.
    (ref_eval,), (eval_2x2,) = eval_records(ref_dir), eval_records(workdir)
    assert eval_2x2.keys() == ref_eval.keys()
    for key in ref_eval.keys() - {"time", "step"}:
        assert eval_2x2[key] == pytest.approx(ref_eval[key], rel=RTOL), key


EVAL_PLACEMENT = """
import json, numpy as np, jax
from peftjax import distributed
distributed.initialize(distributed.settings())
from peftjax.sharding import DEFAULT_RULES, batch_sharding, make_mesh
from peftjax.train.evaluate import _place, _to_host
sharding = batch_sharding(make_mesh({"data": -1}), DEFAULT_RULES)
rows = np.arange(8 * 3).reshape(8, 3)
placed = _place(rows, sharding)
local = sorted(int(s.data[0, 0]) // 3 for s in placed.addressable_shards)
out = _to_host(jax.jit(lambda x: x * 2)(placed))
print(json.dumps({"local_first_rows": local, "out": out.tolist()}))
"""


def test_multi_process_eval_places_the_global_batch_and_gathers_every_row(env):
    result = local.launch([sys.executable, "-c", EVAL_PLACEMENT], processes=2, devices=2, env=env,
                          cwd=REPO, timeout=300)
    assert result.returncode == 0, result.output[-3000:]
    printed = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])
               for line in result.output.splitlines() if line.split(" ", 1)[-1].startswith("{")}
    expected = (np.arange(8 * 3).reshape(8, 3) * 2).tolist()
    # Each process holds its own rows (2 per device) and reads back all 8 decoded rows.
    assert printed["[p0]"] == {"local_first_rows": [0, 2], "out": expected}
    assert printed["[p1]"] == {"local_first_rows": [4, 6], "out": expected}


# ------------------------------------------------- settings and row shards, in process --


def test_settings_come_from_flags_then_environment():
    env = {ENV_COORDINATOR: "10.0.0.2:8476", ENV_NUM_PROCESSES: "4", ENV_PROCESS_ID: "3"}
    assert distributed.settings(environ=env) == distributed.Settings("10.0.0.2:8476", 4, 3)
    assert distributed.settings(process_id=1, environ=env).process_id == 1  # a flag wins
    single = distributed.settings(environ={})
    assert single.single_process and not distributed.initialize(single)  # nothing to join
    auto = distributed.settings(mode="auto", environ={})
    assert auto.auto and not auto.single_process and auto.coordinator is None
    with pytest.raises(distributed.DistributedError, match="PEFTJAX_NUM_PROCESSES must be an"):
        distributed.settings(environ={ENV_NUM_PROCESSES: "two"})


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="10.0.0.2:8476"), "without --num_processes and --process_id"),
    (dict(num_processes=2, process_id=0), "without --coordinator"),
    (dict(coordinator="10.0.0.2", num_processes=2, process_id=0), "must be HOST:PORT"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), "not below --num_processes"),
    (dict(coordinator="h:1", num_processes=0, process_id=0), "--num_processes must be >= 1"),
    (dict(mode="slurm"), "use --distributed=auto"),
])
def test_incomplete_settings_name_the_fix(kwargs, message):
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.settings(**kwargs, environ={})


def test_each_process_feeds_its_block_of_rows():
    # 2 processes x 2 devices, batch 8 over all 4 devices: halves.
    rows = {0: [(0, 2), (2, 4)], 1: [(4, 6), (6, 8)]}
    assert [distributed.shard_of(rows, 8, p) for p in (0, 1)] == [(0, 2), (1, 2)]
    # 4 processes, the batch split 2 ways, replicated over a model axis spanning 2 processes.
    rows = {0: [(0, 4)], 1: [(0, 4)], 2: [(4, 8)], 3: [(4, 8)]}
    assert [distributed.shard_of(rows, 8, p) for p in range(4)] == [(0, 2), (0, 2), (1, 2),
                                                                     (1, 2)]
    assert distributed.shard_of({0: [(0, 8)], 1: [(0, 8)]}, 8, 1) == (0, 1)  # all replicated
    # Interleaved devices would need rows that are not one block of the global batch.
    with pytest.raises(distributed.DistributedError, match="jax.devices"):
        distributed.shard_of({0: [(0, 2), (4, 6)], 1: [(2, 4), (6, 8)]}, 8, 0)
    assert distributed.batch_shard(None, 8) == (0, 1)  # one process: everything


def test_the_cli_refuses_half_given_settings():
    result = run_peftjax("train", "--config", os.path.join(REPO, "configs", "tiny.py"),
                         "--workdir", "/nonexistent/never", "--coordinator", "127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "peftjax train: error: --coordinator given without --num_processes and --process_id: "
        "every process needs the process count and its own id (or env PEFTJAX_NUM_PROCESSES / "
        "PEFTJAX_PROCESS_ID); use --distributed=auto to let JAX detect them on a TPU pod or "
        "under SLURM.")
