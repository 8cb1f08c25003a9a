"""Write an sbatch script running one multi-process `peftjax` run on a SLURM cluster; submit it.

    python launch/slurm.py --nodes 2 --gpus-per-node 4 --time 04:00:00 --partition gpu \\
        --account my-lab --setup 'source .venv/bin/activate' --dry-run -- \\
        peftjax train --config configs/quickstart.py --workdir /shared/runs/qs
    # the same without --dry-run writes ./peftjax.sbatch (--script PATH) and runs `sbatch` on it

The script runs `srun peftjax ... --distributed=auto`: every task calls
`jax.distributed.initialize()` with no arguments, and JAX reads the coordinator (the first node;
port from the job id, or JAX_COORDINATOR_PORT), the process count and id from SLURM's variables.

One process per GPU: `--ntasks-per-node` equals `--gpus-per-node`. That is what JAX's SLURM
detection assumes: it gives each task only the GPU numbered SLURM_LOCALID (one process per node
would see one GPU). Each process reads the whole data stream and keeps its rows of each batch
(peftjax.data.train_batches), which is cheap for PEFT-sized data. Without GPUs
(`--gpus-per-node 0`): one process per node on its CPUs. The workdir must be on storage every
node sees. `srun --kill-on-bad-exit=1` stops the other tasks when one fails.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `launch` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import (  # noqa: E402
    LaunchError,
    env_assignments,
    parse,
    positive,
    quote,
    shell_path,
    with_distributed_auto,
)

# SLURM time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}")
_WORD = re.compile(r"[^\s'\"\\]+")


def sbatch_script(options: argparse.Namespace, command: Sequence[str]) -> str:
    """The batch script's text."""
    gpus = options.gpus_per_node
    directives = [f"--job-name={options.job_name}", f"--nodes={options.nodes}",
                  f"--ntasks-per-node={max(gpus, 1)}"]
    if gpus:
        directives.append(f"--gpus-per-node={gpus}")
    if options.cpus_per_task:
        directives.append(f"--cpus-per-task={options.cpus_per_task}")
    directives.append(f"--time={options.time}")
    for key in ("partition", "account"):
        if getattr(options, key):
            directives.append(f"--{key}={getattr(options, key)}")
    directives.append(f"--output={options.output}")
    layout = ("# One process per GPU: JAX's SLURM detection gives each task the GPU numbered "
              "SLURM_LOCALID." if gpus else "# One process per node, on its CPUs.")
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), layout, "set -e",
             f"cd {shell_path(options.repo_dir)}"]
    if options.setup:
        lines.append(options.setup)  # a shell snippet, as written
    lines += [f"export {assignment}" for assignment in env_assignments(options.env)]
    lines.append(f"srun --kill-on-bad-exit=1 {quote(with_distributed_auto(command))}")
    return "\n".join(lines) + "\n"


def _check(options: argparse.Namespace) -> None:
    if not _TIME.fullmatch(options.time):
        raise LaunchError(f"--time {options.time!r} is not a SLURM time limit; use HH:MM:SS, "
                          "MM, or D-HH:MM:SS (e.g. --time 04:00:00).")
    for key in ("partition", "account", "job_name", "output"):
        value = getattr(options, key)
        if value is not None and not _WORD.fullmatch(value):
            raise LaunchError(f"--{key.replace('_', '-')} {value!r} must be one word without "
                              "spaces or quotes.")
    if options.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be >= 0, got {options.gpus_per_node}.")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/slurm.py", usage="%(prog)s --nodes N [options] -- COMMAND ...",
        description="Write (and submit) an sbatch script running COMMAND over N nodes.")
    p.add_argument("--nodes", type=positive, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node, one process each (0: one CPU process per node)")
    p.add_argument("--cpus-per-task", type=positive, default=None,
                   help="CPUs per process (for the data pipeline); default: SLURM's")
    p.add_argument("--time", default="01:00:00", help="time limit (default 01:00:00)")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--account", default=None, help="SLURM account to charge")
    p.add_argument("--job-name", default="peftjax", help="job name (default: peftjax)")
    p.add_argument("--output", default="slurm-%j.out",
                   help="log file (%%j: the job id; default slurm-%%j.out)")
    p.add_argument("--repo-dir", default=os.getcwd(),
                   help="the repo's directory on the nodes (default: the current directory)")
    p.add_argument("--setup", default=None,
                   help="shell run before srun, e.g. 'source .venv/bin/activate'")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable exported for the run (repeatable)")
    p.add_argument("--script", default=None,
                   help="where to write the script (default: ./JOB_NAME.sbatch)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the script and the sbatch command; write and submit nothing")
    return p


def plan(argv: Sequence[str]) -> tuple[argparse.Namespace, str, list[str]]:
    """(options, script text, sbatch command). Bad arguments exit with status 2 and a message
    naming the fix (argparse)."""
    p = parser()
    options, command = parse(p, argv)
    try:
        _check(options)
        script = sbatch_script(options, command)
    except LaunchError as e:
        p.error(str(e))
    path = options.script or os.path.abspath(f"{options.job_name}.sbatch")
    return options, script, ["sbatch", path]


def main(argv: Sequence[str] | None = None) -> int:
    options, script, sbatch = plan(sys.argv[1:] if argv is None else argv)
    if options.dry_run:
        print(script + quote(sbatch))
        return 0
    path = sbatch[-1]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(script)
    print(f"Wrote {path}", flush=True)
    return subprocess.call(sbatch)


if __name__ == "__main__":
    sys.exit(main())
