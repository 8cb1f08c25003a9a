"""Stack (MAD-X): per-task Pfeiffer adapters stacked on a frozen adapter trained on the whole suite.

In every layer `h ← h + d_suite(h)`, then `h ← h + d_task(h)`: the frozen source adapter (MAD-X's
language adapter) first, then the new per-task adapter (MAD-X's task adapter), which is all that
trains. First the source, then the stack:

    peftjax train --config configs/source_adapter.py:task=suite --workdir runs/sources/suite
    peftjax train --config configs/stack.py --workdir runs/stack

Smoke run (the `:quick` variant reads its source from /tmp/peftjax_sources):

    peftjax train --config configs/source_adapter.py:quick,task=suite \
        --workdir /tmp/peftjax_sources/suite
    peftjax train --config configs/stack.py:quick --workdir /tmp/stack

Other sources: `--config.peft.sources="('runs/a',)"` (trained on the same base, shared mode).
"""

from configs.source_adapter import source_dirs
from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(",".join(["per_task", arg]))
    config.peft.method = "pfeiffer"
    config.peft.compose = "stack"
    config.peft.sources = source_dirs(["suite"], arg)
    return config
