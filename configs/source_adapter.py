"""A source adapter for the composition configs (stack, average, scalearn): one shared Pfeiffer
adapter on the frozen quickstart base, trained alone on one suite task, or on the whole suite.

    peftjax train --config configs/source_adapter.py:task=reverse_shift \
        --workdir runs/sources/reverse_shift
    peftjax train --config configs/source_adapter.py:task=suite --workdir runs/sources/suite

All eight suite tasks (what `configs/scalearn.py` and `configs/average.py` read):

    for t in reverse_shift reverse_upper reverse_double shift_upper shift_double upper_double \
             reverse_shift_upper shift_upper_double; do
      peftjax train --config configs/source_adapter.py:task=$t --workdir runs/sources/$t
    done

`quick` makes smoke-run sources where the composed configs' `:quick` variants look for them:

    peftjax train --config configs/source_adapter.py:quick,task=reverse_shift \
        --workdir /tmp/peftjax_sources/reverse_shift

`arg` is comma-separated: `task=NAME` (a suite task, or `suite` for the whole mixture; default
suite) and `quick`. A source is always one shared adapter (compositions refuse per-task runs).
"""

import os

from configs.suite import suite_config, switches
from peftjax.data.synthetic import SUITE_TASKS

SOURCES = "runs/sources"  # where the composed configs look for source runs
QUICK_SOURCES = "/tmp/peftjax_sources"  # ... and for their `:quick` variants
QUICK_TASKS = ("reverse_shift", "shift_upper")  # the two sources a `:quick` composition reads


def source_task(arg: str) -> str:
    tasks = [s.removeprefix("task=") for s in switches(arg) if s.startswith("task=")]
    task = tasks[-1] if tasks else "suite"
    if task != "suite" and task not in SUITE_TASKS:
        raise ValueError(f"configs/source_adapter.py: unknown task={task!r}; choose 'suite' or "
                         f"one of {list(SUITE_TASKS)}.")
    return task


def source_dirs(tasks, arg: str = "") -> tuple[str, ...]:
    """The workdirs of the source runs of `tasks`, as the commands above name them."""
    root = QUICK_SOURCES if "quick" in switches(arg) else SOURCES
    return tuple(os.path.join(root, task) for task in tasks)


def task_sources(arg: str = "") -> tuple[str, ...]:
    """One single-task source run per suite task (two for `quick`): what average and ScaLearn
    compose."""
    return source_dirs(QUICK_TASKS if "quick" in switches(arg) else tuple(SUITE_TASKS), arg)


def get_config(arg: str = ""):
    task = source_task(arg)
    config = suite_config(",".join(s for s in switches(arg) if s != "per_task"))
    config.peft.method = "pfeiffer"
    config.peft.mode = "shared"
    config.data.mixture = "synthetic_suite" if task == "suite" else f"synthetic_{task}"
    return config
