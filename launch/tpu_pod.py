"""Run one command on every worker of a Cloud TPU VM pod slice (one JAX process per host).

    # Copy the repo to every worker (optional; or clone it there), then train:
    python launch/tpu_pod.py --name my-v4-32 --zone us-central2-b --project my-proj \\
        --copy --dry-run -- peftjax train --config configs/quickstart.py --workdir gs://b/runs/qs
    python launch/tpu_pod.py --name my-v4-32 --zone us-central2-b --project my-proj \\
        --repo-dir '~/peftjax' --setup 'source .venv/bin/activate' --env TF_CPP_MIN_LOG_LEVEL=2 \\
        -- peftjax train --config configs/quickstart.py --workdir gs://b/runs/qs

On every worker it runs (through `gcloud compute tpus tpu-vm ssh NAME --worker=all --command`):

    cd REPO_DIR && SETUP && ENV=... COMMAND --distributed=auto

`--distributed=auto` (appended to a `peftjax` command that lacks it) makes each process find the
others from the TPU metadata (`jax.distributed.initialize()` with no arguments). The workdir must
be storage every worker sees (a gs:// bucket, or a shared filesystem): checkpoints are written by
all processes together. `--dry-run` prints the exact gcloud command(s) instead of running them.
`--copy` first copies the local repo (`--src`, default the current directory) to every worker
with `gcloud compute tpus tpu-vm scp --recurse --worker=all` (into the parent of REPO_DIR). It
copies the directory as it is: point `--src` at a clean checkout (`git clone --depth 1 . /tmp/x`),
not one holding .venv or runs/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `launch` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import (  # noqa: E402
    LaunchError,
    env_assignments,
    parse,
    quote,
    shell_path,
    with_distributed_auto,
)


def remote_script(command: Sequence[str], *, repo_dir: str, setup: str | None = None,
                  env: Sequence[str] = ()) -> str:
    """The shell line each worker runs: cd, optional setup, then env + the command."""
    parts = [f"cd {shell_path(repo_dir)}"]
    if setup:
        parts.append(setup)  # a shell snippet, passed as written (e.g. `source .venv/bin/activate`)
    parts.append(" ".join([*env_assignments(env), quote(with_distributed_auto(command))]))
    return " && ".join(parts)


def _target(options: argparse.Namespace) -> list[str]:
    target = [options.name, f"--zone={options.zone}"]
    if options.project:
        target.append(f"--project={options.project}")
    return [*target, "--worker=all"]


def ssh_command(options: argparse.Namespace, command: Sequence[str]) -> list[str]:
    """`gcloud compute tpus tpu-vm ssh NAME ... --worker=all --command SCRIPT` as argv."""
    script = remote_script(command, repo_dir=options.repo_dir, setup=options.setup,
                           env=options.env)
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", *_target(options), "--command", script]


def scp_command(options: argparse.Namespace) -> list[str]:
    """`gcloud compute tpus tpu-vm scp --recurse SRC NAME:PARENT_OF_REPO_DIR --worker=all`."""
    parent = os.path.dirname(options.repo_dir.rstrip("/")) or "~"
    source = os.path.abspath(options.src)
    if os.path.basename(source) != os.path.basename(options.repo_dir.rstrip("/")):
        raise LaunchError(f"--copy puts {source} at {parent}/{os.path.basename(source)}, but "
                          f"--repo-dir is {options.repo_dir!r}; make their last names match.")
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", source,
            f"{options.name}:{parent}", *_target(options)[1:]]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/tpu_pod.py", usage="%(prog)s --name NAME --zone ZONE [options] -- COMMAND",
        description="Run COMMAND on every worker of a Cloud TPU VM pod (gcloud ssh --worker=all).")
    p.add_argument("--name", required=True, help="TPU VM name (gcloud compute tpus tpu-vm list)")
    p.add_argument("--zone", required=True, help="its zone, e.g. us-central2-b")
    p.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    p.add_argument("--repo-dir", default="~/peftjax",
                   help="the repo's directory on the workers (default: ~/peftjax)")
    p.add_argument("--setup", default=None,
                   help="shell run before the command, e.g. 'source .venv/bin/activate'")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the command (repeatable)")
    p.add_argument("--copy", action="store_true",
                   help="first copy --src to every worker (gcloud tpu-vm scp --worker=all)")
    p.add_argument("--src", default=".", help="local repo to copy with --copy (default: .)")
    p.add_argument("--dry-run", action="store_true", help="print the gcloud command(s) only")
    return p


def plan(argv: Sequence[str]) -> tuple[argparse.Namespace, list[list[str]]]:
    """The options and the gcloud command(s) to run, in order (scp first with --copy).
    Bad arguments exit with status 2 and a message naming the fix (argparse)."""
    p = parser()
    options, command = parse(p, argv)
    try:
        copy = [scp_command(options)] if options.copy else []
        return options, [*copy, ssh_command(options, command)]
    except LaunchError as e:
        p.error(str(e))


def main(argv: Sequence[str] | None = None) -> int:
    options, planned = plan(sys.argv[1:] if argv is None else argv)
    if options.dry_run:
        print("\n".join(quote(c) for c in planned))
        return 0
    for command in planned:
        code = subprocess.call(command)
        if code:
            print(f"launch/tpu_pod.py: `{quote(command[:6])} ...` failed (exit code {code}).",
                  file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
