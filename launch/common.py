"""What the launchers share: splitting `LAUNCHER_ARGS -- COMMAND`, checking the command, quoting.

The launchers start processes; training itself is `peftjax train` (peftjax/cli.py), unchanged:
each launcher only adds how the processes find each other (`peftjax/distributed.py`).
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Sequence

DISTRIBUTED_AUTO = "--distributed=auto"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LaunchError(ValueError):
    """Bad launcher arguments; the message names the fix."""


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`[launcher args..., "--", command...]` → (launcher args, command)."""
    argv = list(argv)
    if "--" not in argv:
        raise LaunchError("Put the command to run after `--`, e.g. "
                          "`-- peftjax train --config configs/tiny.py --workdir runs/x`.")
    cut = argv.index("--")
    command = argv[cut + 1:]
    if not command:
        raise LaunchError("Nothing after `--`: give the command to run on every process, e.g. "
                          "`-- peftjax train --config configs/tiny.py --workdir runs/x`.")
    return argv[:cut], command


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace,
                                                                          list[str]]:
    """Launcher options (parsed by `parser`) and the command after `--`."""
    try:
        own, command = split_command(argv)
    except LaunchError as e:
        parser.error(str(e))
    return parser.parse_args(own), command


def with_distributed_auto(command: Sequence[str]) -> list[str]:
    """`command` with `--distributed=auto` appended when it runs `peftjax` and lacks it."""
    command = list(command)
    if _runs_peftjax(command) and not any(a.startswith("--distributed") for a in command):
        command.append(DISTRIBUTED_AUTO)
    return command


def _runs_peftjax(command: Sequence[str]) -> bool:
    return bool(command) and (command[0].endswith("peftjax")
                              or command[:3][1:] == ["-m", "peftjax.cli"])


def quote(command: Sequence[str]) -> str:
    """One shell word per argument (arguments with spaces or quotes survive a remote shell)."""
    return shlex.join(command)


def shell_path(path: str) -> str:
    """A quoted path, except a leading `~/`, which the (remote) shell must expand."""
    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def env_assignments(items: Sequence[str]) -> list[str]:
    """`NAME=VALUE` strings (from `--env`) as shell assignments with the values quoted."""
    result = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise LaunchError(f"--env {item!r} is not NAME=VALUE (e.g. --env XLA_FLAGS=--flag).")
        result.append(f"{name}={shlex.quote(value)}")
    return result


def positive(value: str) -> int:
    """argparse type: an int >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number
