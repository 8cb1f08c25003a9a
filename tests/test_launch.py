"""The launchers in launch/: the exact gcloud / sbatch commands they would run (dry runs), their
argument errors, and the local launcher's process handling with trivial `python -c` children."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch import local, slurm, tpu_pod
from launch.common import LaunchError, split_command
from tests.helpers import REPO

TRAIN = ["peftjax", "train", "--config", "configs/quickstart.py", "--workdir", "gs://b/my runs/qs",
         "--config.peft.method=lora"]


def dry_run(module, capsys, *argv):
    assert module.main([*argv, "--dry-run", "--", *TRAIN]) == 0
    return capsys.readouterr().out


def usage_error(module, capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        module.main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------ TPU pod --


def test_tpu_dry_run_prints_the_exact_ssh_command(capsys):
    out = dry_run(tpu_pod, capsys, "--name", "my-v4-32", "--zone", "us-central2-b",
                  "--project", "my-proj", "--setup", "source .venv/bin/activate",
                  "--env", "TF_CPP_MIN_LOG_LEVEL=2", "--env", "NOTE=two words")
    # The remote line is one shell word; inside it every argument is quoted again, so the
    # workdir with a space reaches peftjax as one argument.
    remote = ("cd ~/peftjax && source .venv/bin/activate && TF_CPP_MIN_LOG_LEVEL=2 "
              "NOTE='two words' peftjax train --config configs/quickstart.py --workdir "
              "'gs://b/my runs/qs' --config.peft.method=lora --distributed=auto")
    expected = ("gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b --project=my-proj "
                "--worker=all --command " + tpu_pod.quote([remote]) + "\n")
    assert out == expected
    assert out == ("gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b "
                   "--project=my-proj --worker=all --command 'cd ~/peftjax && source "
                   ".venv/bin/activate && TF_CPP_MIN_LOG_LEVEL=2 NOTE='\"'\"'two words'\"'\"' "
                   "peftjax train --config configs/quickstart.py --workdir "
                   "'\"'\"'gs://b/my runs/qs'\"'\"' --config.peft.method=lora "
                   "--distributed=auto'\n")
    # What the worker's shell runs: the same argv, plus --distributed=auto.
    assert subprocess.run(["bash", "-c", remote.split(" && ", 2)[2].replace(
        "peftjax", 'printf "%s\\n"', 1)], capture_output=True, text=True).stdout.splitlines() == [
        *TRAIN[1:], "--distributed=auto"]


def test_tpu_copy_step_comes_first_and_the_auto_flag_is_not_repeated(capsys, tmp_path):
    src = tmp_path / "peftjax"
    src.mkdir()
    out = tpu_pod.main(["--name", "pod", "--zone", "europe-west4-a", "--copy", "--src", str(src),
                        "--repo-dir", "/opt/peftjax", "--dry-run", "--", "peftjax", "eval",
                        "--workdir", "/mnt/runs/x", "--distributed=auto"])
    assert out == 0
    assert capsys.readouterr().out.splitlines() == [
        f"gcloud compute tpus tpu-vm scp --recurse {src} pod:/opt --zone=europe-west4-a "
        "--worker=all",
        "gcloud compute tpus tpu-vm ssh pod --zone=europe-west4-a --worker=all --command "
        "'cd /opt/peftjax && peftjax eval --workdir /mnt/runs/x --distributed=auto'",
    ]


def test_tpu_runs_other_commands_unchanged(capsys):
    assert tpu_pod.main(["--name", "pod", "--zone", "z", "--dry-run", "--", "python", "-c",
                         "import jax; print(jax.devices())"]) == 0
    assert capsys.readouterr().out == (
        "gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all --command 'cd ~/peftjax && "
        "python -c '\"'\"'import jax; print(jax.devices())'\"'\"''\n")


@pytest.mark.parametrize("argv, message", [
    (["--name", "pod", "--zone", "z", "peftjax", "train"], "after `--`"),
    (["--name", "pod", "--zone", "z", "--"], "Nothing after `--`"),
    (["--name", "pod", "--", "peftjax", "train"], "required: --zone"),
    (["--name", "pod", "--zone", "z", "--env", "NOVALUE", "--", "peftjax"], "NAME=VALUE"),
    (["--name", "pod", "--zone", "z", "--env", "1X=2", "--", "peftjax"], "NAME=VALUE"),
    (["--name", "pod", "--zone", "z", "--copy", "--src", "/tmp", "--", "peftjax"],
     "make their last names match"),
])
def test_tpu_bad_arguments_name_the_fix(capsys, argv, message):
    assert message in usage_error(tpu_pod, capsys, *argv)


# -------------------------------------------------------------------------------- SLURM --


def test_slurm_dry_run_prints_the_exact_script_and_sbatch_command(capsys):
    out = dry_run(slurm, capsys, "--nodes", "2", "--gpus-per-node", "4", "--time", "04:00:00",
                  "--partition", "gpu", "--account", "my-lab", "--repo-dir", "/shared/peftjax",
                  "--setup", "source .venv/bin/activate", "--env", "XLA_FLAGS=--a --b",
                  "--script", "/shared/jobs/qs.sbatch")
    assert out == "\n".join([
        "#!/bin/bash",
        "#SBATCH --job-name=peftjax",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=04:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=my-lab",
        "#SBATCH --output=slurm-%j.out",
        "# One process per GPU: JAX's SLURM detection gives each task the GPU numbered "
        "SLURM_LOCALID.",
        "set -e",
        "cd /shared/peftjax",
        "source .venv/bin/activate",
        "export XLA_FLAGS='--a --b'",
        "srun --kill-on-bad-exit=1 peftjax train --config configs/quickstart.py --workdir "
        "'gs://b/my runs/qs' --config.peft.method=lora --distributed=auto",
        "sbatch /shared/jobs/qs.sbatch",
    ]) + "\n"


def test_slurm_cpu_nodes_run_one_process_per_node(capsys, tmp_path):
    out = dry_run(slurm, capsys, "--nodes", "3", "--job-name", "qs", "--output", "logs/%j.log",
                  "--repo-dir", "~/my repo")
    lines = out.splitlines()
    assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --nodes=3" in lines
    assert not any("gpus" in line for line in lines)
    assert "#SBATCH --output=logs/%j.log" in lines and "#SBATCH --job-name=qs" in lines
    assert "cd ~/'my repo'" in lines
    assert lines[-1] == f"sbatch {os.path.abspath('qs.sbatch')}"


def test_slurm_writes_the_script_and_submits_it(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"  # records its arguments and the script it was given
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncp "$1" {tmp_path}/submitted\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    script = tmp_path / "jobs" / "run.sbatch"
    assert slurm.main(["--nodes", "1", "--script", str(script), "--", *TRAIN]) == 0
    assert (tmp_path / "args").read_text() == f"{script}\n"
    assert (tmp_path / "submitted").read_text() == script.read_text()
    assert script.read_text().splitlines()[-1].startswith("srun --kill-on-bad-exit=1 peftjax")
    assert f"Wrote {script}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--", "peftjax"], "required: --nodes"),
    (["--nodes", "0", "--", "peftjax"], "positive integer"),
    (["--nodes", "2", "--time", "4h", "--", "peftjax"], "not a SLURM time limit"),
    (["--nodes", "2", "--partition", "a b", "--", "peftjax"], "--partition 'a b' must be one word"),
    (["--nodes", "2", "--gpus-per-node", "-1", "--", "peftjax"], "--gpus-per-node must be >= 0"),
    (["--nodes", "2", "peftjax", "train"], "after `--`"),
])
def test_slurm_bad_arguments_name_the_fix(capsys, argv, message):
    assert message in usage_error(slurm, capsys, *argv)


# -------------------------------------------------------------------------- local launcher --

PRINT_ENV = ("import json, os; print(json.dumps({k: os.environ.get(k) for k in ("
             "'PEFTJAX_COORDINATOR', 'PEFTJAX_NUM_PROCESSES', 'PEFTJAX_PROCESS_ID', 'XLA_FLAGS', "
             "'JAX_NUM_CPU_DEVICES', 'JAX_PLATFORMS')}))")


def test_local_gives_each_process_its_id_coordinator_and_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_foo=1 --xla_force_host_platform_device_count=4")
    result = local.launch([sys.executable, "-c", PRINT_ENV], processes=3, devices=2, env=env,
                          timeout=60)
    assert result.returncode == 0 and result.returncodes == [0, 0, 0] and result.failed is None
    seen = {}
    for line in result.output.splitlines():
        prefix, _, text = line.partition(" ")
        seen[prefix] = json.loads(text)
    assert sorted(seen) == ["[p0]", "[p1]", "[p2]"]
    coordinators = {v["PEFTJAX_COORDINATOR"] for v in seen.values()}
    assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")
    for i in range(3):
        assert seen[f"[p{i}]"] | {"PEFTJAX_COORDINATOR": None} == {
            "PEFTJAX_COORDINATOR": None, "PEFTJAX_NUM_PROCESSES": "3",
            "PEFTJAX_PROCESS_ID": str(i), "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu",
            # the caller's device count is replaced, not added to
            "XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"}


def test_a_failing_process_stops_the_others_and_fails_the_launch():
    script = ("import os, sys, time; i = int(os.environ['PEFTJAX_PROCESS_ID']); "
              "print('started', i, flush=True); time.sleep(0.5)\n"
              "if i == 1: print('giving up', flush=True); sys.exit(3)\n"
              "time.sleep(60); print('never', flush=True)")
    start = time.monotonic()
    result = local.launch([sys.executable, "-c", script], processes=3, timeout=60)
    assert time.monotonic() - start < 30  # the sleepers were killed, not waited for
    assert result.returncode == 3 and result.failed == 1
    assert result.returncodes[1] == 3
    assert result.returncodes[0] == result.returncodes[2] == -signal.SIGTERM
    lines = result.output.splitlines()
    assert sorted(lines) == ["[p0] started 0", "[p1] giving up", "[p1] started 1",
                             "[p2] started 2"]


def test_the_timeout_stops_every_process():
    result = local.launch([sys.executable, "-c", "import time; time.sleep(60)"], processes=2,
                          timeout=1)
    assert result.returncode == local.TIMEOUT_EXIT_CODE and result.failed is None
    assert result.returncodes == [-signal.SIGTERM, -signal.SIGTERM]


def test_sigterm_to_the_launcher_reaches_every_process(tmp_path):
    child = ("import signal, sys, time\n"
             "def stop(*_): print('got SIGTERM', flush=True); sys.exit(7)\n"
             "signal.signal(signal.SIGTERM, stop); print('ready', flush=True); time.sleep(60)")
    launcher = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "launch", "local.py"), "--processes", "2", "--",
         sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = set()
    while len(ready) < 2:
        line = launcher.stdout.readline()
        assert line, launcher.stderr.read()
        ready.add(line.split()[0])
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 7
    assert sorted(out.splitlines()) == ["[p0] got SIGTERM", "[p1] got SIGTERM"]
    assert "failed (exit code 7)" in err


def test_local_cli_runs_and_exits_with_the_failure_code():
    ok = subprocess.run([sys.executable, os.path.join(REPO, "launch", "local.py"), "--processes",
                         "2", "--", sys.executable, "-c", "print('hi')"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and sorted(ok.stdout.splitlines()) == ["[p0] hi", "[p1] hi"]
    bad = subprocess.run([sys.executable, os.path.join(REPO, "launch", "local.py"), "--processes",
                          "1", "--", sys.executable, "-c", "raise SystemExit(5)"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 5 and "p0 failed (exit code 5)" in bad.stderr


@pytest.mark.parametrize("argv, message", [
    (["--", "true"], "required: --processes"),
    (["--processes", "0", "--", "true"], "positive integer"),
    (["--processes", "2", "--devices", "x", "--", "true"], "positive integer"),
    (["--processes", "2", "true"], "after `--`"),
])
def test_local_bad_arguments_name_the_fix(capsys, argv, message):
    assert message in usage_error(local, capsys, *argv)


def test_peftjax_runs_with_the_launchers_own_python():
    assert local.resolve_command(["peftjax", "train", "--workdir", "x"]) == [
        sys.executable, "-m", "peftjax.cli", "train", "--workdir", "x"]
    assert local.resolve_command(["python", "x.py"]) == ["python", "x.py"]
    with pytest.raises(LaunchError, match="--processes must be >= 1"):
        local.launch(["true"], processes=0)
    assert split_command(["--a", "1", "--", "cmd", "--", "x"]) == (["--a", "1"],
                                                                    ["cmd", "--", "x"])


def test_read_losses_keeps_train_records_only(tmp_path):
    records = [{"step": 1, "time": 0, "loss": 2.5}, {"step": 2, "time": 0, "loss": 2.0},
               {"step": 2, "time": 0, "eval/exact_match": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert local.read_losses(str(tmp_path)) == {1: 2.5, 2: 2.0}
