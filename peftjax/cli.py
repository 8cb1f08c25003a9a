"""`peftjax` command line.

    peftjax train --config configs/quickstart.py --workdir runs/qs [--config.key=value ...]
    peftjax eval  --config configs/quickstart.py --workdir runs/qs
    peftjax eval  --workdir runs/qs              # with the config.json the run saved
    peftjax params --config configs/quickstart.py --config.model.size=xxl  # counts only
    peftjax export-peft --workdir runs/qs --out runs/qs/hf_peft  # HF peft adapter dirs
    peftjax export-adapters --workdir runs/hyper --out runs/hyper_adapters  # hypernetwork's
        # generated adapters as an ordinary per-task run (--language_id for Hyper-X runs)
    peftjax routing --workdir runs/poly --out runs/poly/routing.npz  # every router's weights

Multi-process (one run over several hosts; see launch/ for launchers):
    peftjax train ... --coordinator HOST:PORT --num_processes N --process_id I
    peftjax train ... --distributed=auto     # Cloud TPU pods, SLURM

`--config` takes an ml-collections config file (optionally `file.py:arg`); any key can be
overridden with `--config.section.key=value`.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

# Before TensorFlow is imported (through seqio): keep its C++ logs out of the user's terminal.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

COMMANDS = {"train": "train adapters (resumes from the workdir's latest checkpoint)",
            "eval": "evaluate the trained adapters and the frozen base on every task",
            "params": "print parameter counts as one JSON line (shapes only; no --workdir)",
            "export-peft": "write the trained adapters as HF peft directories (--out DIR)",
            "export-adapters": "write a hypernetwork run's generated adapters as a new "
                               "per-task adapter run (--out DIR)",
            "routing": "write every router's weights as one .npz (--out FILE.npz)"}
USAGE = ("usage: peftjax {" + ",".join(COMMANDS) + "} --config CONFIG.py[:ARG] --workdir DIR "
         "[--config.key=value ...]\n" + "\n".join(f"  {c:11s} {h}" for c, h in COMMANDS.items()))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and eval.")
_OUT = flags.DEFINE_string("out", None, "export-peft: where to write the HF peft adapter(s); "
                           "routing: the .npz file to write.")
_LANGUAGE = flags.DEFINE_integer("language_id", 0, "export-adapters: the language whose "
                                 "adapters a task x language hypernetwork exports.")
_EXAMPLES = flags.DEFINE_integer("examples", 8, "routing: eval examples per task that token "
                                 "routers are run on.")
# Multi-process runs (peftjax/distributed.py; the launchers in launch/ set these).
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for a "
                                   "multi-process run (env PEFTJAX_COORDINATOR).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (env "
                                      "PEFTJAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. "
                                   "num_processes - 1 (env PEFTJAX_PROCESS_ID).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", None, ["auto"], "auto: let JAX detect the "
                                 "processes (Cloud TPU pods, SLURM).")


class UserError(Exception):
    """Bad input: printed as one line, no traceback."""


def _run(command: str) -> None:
    # Imported here so `peftjax --help` is instant and flag errors come before heavy imports.
    from peftjax.checkpoint import CheckpointMismatchError
    from peftjax.config import ConfigError
    from peftjax.models.hf import CheckpointError
    from peftjax.train import evaluate_run, train
    from peftjax.train.evaluate import format_table
    from peftjax.train.preemption import Preempted

    if _WORKDIR.value is None and command != "params":
        raise UserError("--workdir is required.")
    if _CONFIG.value is None and command not in (  # these read DIR/config.json
            "eval", "export-peft", "export-adapters", "routing"):
        raise UserError("--config is required, e.g. --config configs/quickstart.py")
    if _CONFIG.value is not None:
        _make_task_modules_importable(flags.FLAGS["config"].config_filename)
    _join_processes()
    _check_process_count(command)
    try:
        if command == "params":
            from peftjax.train.accounting import count_parameters

            print(json.dumps(count_parameters(_CONFIG.value)))
        elif command == "train":
            try:
                train(_CONFIG.value, _WORKDIR.value)
            except Preempted as e:  # a clean stop: exit 0, so schedulers just start it again
                _report_preemption(e)
        elif command == "export-peft":
            from peftjax.interop.export import export_run

            print("\n".join(export_run(_CONFIG.value, _WORKDIR.value, _OUT.value)))
        elif command == "export-adapters":
            from peftjax.hyper.export import export_run as export_adapters

            print("\n".join(export_adapters(_CONFIG.value, _WORKDIR.value, _OUT.value,
                                             language_id=_LANGUAGE.value)))
        elif command == "routing":
            _routing(_WORKDIR.value, _OUT.value, _EXAMPLES.value)
        else:
            config = _CONFIG.value
            if config is None:  # the run's own config (an exported run, say)
                from peftjax.peft.runs import read_config

                if os.getcwd() not in sys.path:  # its task modules, as with --config
                    sys.path.insert(0, os.getcwd())
                config = read_config(_WORKDIR.value)
            results = evaluate_run(config, _WORKDIR.value)
            if _is_main_process():  # every process has every score; one prints them
                print(format_table({k: results[k] for k in ("adapted", "base")}))
                if "heldout" in results:
                    print("Held-out tasks (never trained on):")
                    print(format_table({"adapted": results["heldout"],
                                        "base": results["heldout_base"]}))
                print(f"Wrote {os.path.join(_WORKDIR.value, 'eval', 'metrics.json')}")
    except (ConfigError, CheckpointError, CheckpointMismatchError, FileNotFoundError,
            ImportError, ValueError, KeyError) as e:
        raise UserError(str(e).strip('"')) from e


def _join_processes() -> None:
    """A multi-process run: join the other processes before anything touches a JAX device."""
    from peftjax import distributed

    try:
        setup = distributed.settings(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                     _DISTRIBUTED.value)
        joined = distributed.initialize(setup)
    except distributed.DistributedError as e:
        raise UserError(str(e)) from e
    if joined:
        print(distributed.describe(), flush=True)


# Commands that read a trained run and write files from one process: they handle the small
# trainable state only, and a checkpoint written by any number of processes restores in one.
SINGLE_PROCESS_COMMANDS = ("export-peft", "export-adapters", "routing")


def _check_process_count(command: str) -> None:
    import jax

    if command in SINGLE_PROCESS_COMMANDS and jax.process_count() > 1:
        raise UserError(f"peftjax {command} runs in one process (it would write the same files "
                        f"from all {jax.process_count()}); run it without --coordinator / "
                        "--num_processes / --distributed: it reads checkpoints written by any "
                        "number of processes.")


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def _report_preemption(e) -> None:
    if _is_main_process():
        command = "peftjax " + shlex.join(sys.argv[1:])
        print(f"peftjax train: {e.reason}: saved a checkpoint at step {e.step} in {e.directory}."
              f" Resume with the same command: {command}", flush=True)


def _routing(workdir: str, out: str | None, examples: int) -> None:
    from peftjax.analysis.routing import routing_weights, save_npz

    if not out:
        raise UserError("--out is required: the .npz file to write the routing weights to.")
    if os.getcwd() not in sys.path:  # the run's config.data.task_modules, as with --config
        sys.path.insert(0, os.getcwd())
    weights = routing_weights(workdir, examples=examples)
    save_npz(weights, out)
    for name, array in weights.items():
        print(f"{name} {tuple(array.shape)}")
    print(f"Wrote {out}")


def _make_task_modules_importable(config_file: str) -> None:
    """`config.data.task_modules` (e.g. `tasks.synthetic`) live in the experiment repo, not in
    the installed package: import them from the working directory, as `python -m` would, and
    from the repo that holds the config file (`REPO/configs/x.py` → `REPO`)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(config_file.split(":")[0])))
    for path in (repo, os.getcwd()):
        if path not in sys.path:
            sys.path.insert(0, path)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if len(argv) >= 2 else 2)
    command = argv.pop(1)
    if command not in COMMANDS:
        print(f"peftjax: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)

    def run(_):
        if not any(a.startswith(("--verbosity", "-v")) for a in argv):
            logging.set_verbosity(logging.ERROR)  # seqio's per-task notices drown the progress
        try:
            _run(command)
        except UserError as e:
            print(f"peftjax {command}: error: {e}", file=sys.stderr)
            sys.exit(2)

    try:
        app.run(run, argv=argv, flags_parser=_parse_flags)
    except UserError as e:
        print(f"peftjax {command}: error: {e}", file=sys.stderr)
        sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config-override mistakes reported as one clear line."""
    from peftjax.config import ConfigError, check_key

    for arg, following in zip(argv[1:], [*argv[2:], ""], strict=True):
        # Config files import shared parts (`configs.suite`) from their repo: make it importable.
        if arg.startswith("--config="):
            _make_task_modules_importable(arg.removeprefix("--config="))
        elif arg == "--config" and following:
            _make_task_modules_importable(following)
    for arg in argv[1:]:
        if arg.startswith("--config."):
            try:
                check_key(arg.removeprefix("--config.").split("=", 1)[0])
            except ConfigError as e:
                raise UserError(f"{arg}: {e}") from e
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise UserError(" ".join(str(e).split())) from e


if __name__ == "__main__":
    main()
