"""Preemption: SIGTERM / SIGINT stop a run after the step in flight with a checkpoint there and
exit status 0, and the same command resumes it to exactly the uninterrupted run's state and
losses; after SIGKILL (uncatchable) the run resumes from its last periodic checkpoint, to the
same result; several processes stop at the same step (JAX's preemption sync point)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from peftjax.checkpoint import Checkpoints
from peftjax.train.loop import restore_trained
from peftjax.train.preemption import SIGNALS, Preempted, PreemptionWatch
from tests.helpers import REPO, host, run_peftjax, shared_compile_cache, tiny_config

TINY = os.path.join(REPO, "configs", "tiny.py")
STEPS, CHECKPOINT_EVERY = 60, 20
# One task keeps the final eval short; log_every=1 shows every step's loss, as it happens.
OVERRIDES = {"train.steps": STEPS, "train.log_every": 1, "train.checkpoint_every": CHECKPOINT_EVERY,
             "data.mixture": "synthetic_reverse_shift", "data.eval_examples": 1}


@pytest.fixture(scope="module", autouse=True)
def shared_compiles(tmp_path_factory):
    """The runs below (one config) compile their programs once, into a shared cache."""
    with shared_compile_cache(tmp_path_factory.mktemp("jax_cache")):
        yield


def train_args(workdir) -> list[str]:
    return ["train", "--config", TINY, "--workdir", str(workdir),
            *(f"--config.{key}={value}" for key, value in OVERRIDES.items())]


def start_training(workdir) -> subprocess.Popen:
    """`peftjax train` in the background, as `run_peftjax` runs it."""
    return subprocess.Popen([sys.executable, "-m", "peftjax.cli", *train_args(workdir)],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended first:\n{process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.01)


def losses(workdir) -> dict[int, float]:
    """Training loss by step from metrics.jsonl (a step logged twice: its latest record)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        records = [json.loads(line) for line in f.read().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def logged_train_steps(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f.read().splitlines()) if "loss" in r]


def checkpoint_steps(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def final_state(workdir) -> tuple[int, list[np.ndarray], dict]:
    """The latest checkpoint's step, train state arrays (trainables, optimizer state) and meta."""
    config = tiny_config(**{key.replace(".", "__"): value for key, value in OVERRIDES.items()})
    _, state = restore_trained(config, str(workdir))
    meta = Checkpoints(os.path.join(workdir, "checkpoints"), create=False).read_meta()
    return int(state.step), jax.tree.leaves(host(state.as_dict())), meta


def test_sigterm_then_sigkill_then_the_same_command_ends_as_an_uninterrupted_run(tmp_path):
    """One run stopped twice: by SIGTERM a few steps in (a checkpoint at that step, exit 0),
    then, resumed by the same command, by SIGKILL once it saved a periodic checkpoint. The same
    command again finishes it: every loss and the final state are the uninterrupted run's."""
    reference = start_training(tmp_path / "reference")  # alongside: it takes as long
    workdir = tmp_path / "run"

    process = start_training(workdir)
    wait_for(lambda: len(losses(workdir)) >= 3, process)  # a few steps done
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    stopped = checkpoint_steps(workdir)[-1]
    assert 3 <= stopped < STEPS and stopped % CHECKPOINT_EVERY != 0  # saved off the schedule
    assert logged_train_steps(workdir) == list(range(1, stopped + 1))  # every step done, logged
    assert "Final eval" not in out  # skipped when preempted
    said = [line for line in out.splitlines() if "Resume with the same command" in line]
    assert len(said) == 1 and f"saved a checkpoint at step {stopped} in {workdir}" in said[0]
    assert said[0].endswith("peftjax " + " ".join(train_args(workdir)))

    process = start_training(workdir)  # the same command
    wait_for(lambda: os.path.isdir(workdir / "checkpoints" / str(CHECKPOINT_EVERY)), process)
    process.kill()  # SIGKILL: no handler runs, the steps since the checkpoint are lost
    out, _ = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert f"Resumed from step {stopped}" in out

    result = run_peftjax(*train_args(workdir))  # the same command again
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = int(result.stdout.split("Resumed from step ")[1].split()[0])
    assert resumed in range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY)
    assert "Final eval" in result.stdout

    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    assert logged_train_steps(tmp_path / "reference") == list(range(1, STEPS + 1))
    # Each step's latest loss (the redone steps' second records) is the uninterrupted run's.
    expected, got = losses(tmp_path / "reference"), losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)],
                               [expected[s] for s in sorted(got)], rtol=1e-6)
    (step, leaves, meta), (want_step, want, want_meta) = (final_state(workdir),
                                                          final_state(tmp_path / "reference"))
    assert step == want_step == meta["data_position"] == want_meta["data_position"] == STEPS
    assert len(leaves) == len(want)
    for a, b in zip(leaves, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_watch_flags_a_signal_and_puts_the_handlers_back():
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    with PreemptionWatch() as watch:
        assert all(signal.getsignal(sig) is not before[sig] for sig in SIGNALS)
        assert not watch.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before os.kill returns
        assert watch.should_stop(2) and watch.signal_name == "SIGTERM"
    assert {sig: signal.getsignal(sig) for sig in SIGNALS} == before


def test_ctrl_c_once_asks_to_stop_and_twice_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), PreemptionWatch() as watch:
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.should_stop(1) and watch.signal_name == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_preempted_says_where_it_saved_and_how_to_resume():
    error = Preempted(7, "/runs/a/checkpoints", reason="preempted (SIGTERM)")
    assert (error.step, error.directory) == (7, "/runs/a/checkpoints")
    assert str(error).startswith("preempted (SIGTERM): saved a checkpoint at step 7 in "
                                 "/runs/a/checkpoints; run the same command")


WORKER = """
import sys, time
import jax

process_id, port, service = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "on"
jax.config.update("jax_enable_preemption_service", service)
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
from peftjax.train.preemption import PreemptionWatch

with PreemptionWatch(agree_every=5) as watch:
    for step in range(101, 3101):  # a run resumed at step 100
        time.sleep(0.01)  # a training step
        if watch.should_stop(step):
            print("stop", step, watch.signal_name, flush=True)
            break
        print("step", step, flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.parametrize("sig, service", [(signal.SIGTERM, "on"), (signal.SIGINT, "on"),
                                          (signal.SIGTERM, "off")])
def test_processes_stop_at_the_same_step_when_one_gets_the_signal(tmp_path, sig, service):
    """Two processes (a pod's hosts) of a run resumed at step 100: only process 1 gets the
    signal, both stop after the same step. With JAX's preemption service, SIGTERM goes to JAX's
    own listener (the watch must leave it in place) and SIGINT is forwarded to it; without it,
    the processes agree every `agree_every` steps."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = [subprocess.Popen([sys.executable, str(worker), str(i), str(port), service],
                                  cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(2)]
    for line in processes[1].stdout:  # until process 1 is a few steps in
        if line.startswith("step") and int(line.split()[1]) >= 105:
            break
    processes[1].send_signal(sig)
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    stops = [[line.split() for line in out.splitlines() if line.startswith("stop")]
             for out in outputs]
    assert len(stops[0]) == len(stops[1]) == 1, outputs
    (_, step0, name0), (_, step1, name1) = stops[0][0], stops[1][0]
    assert step0 == step1 and int(step0) > 105
    if service == "off":
        assert int(step0) % 5 == 0
    # Process 0 got no signal; process 1's SIGTERM went to JAX's handler when the service is on.
    caught_by_jax = service == "on" and sig == signal.SIGTERM
    assert name0 == "None" and name1 == ("None" if caught_by_jax else sig.name)
