"""Multi-process check: 2 processes x 2 CPU devices train exactly like 1 process x 4 devices.

Launch from the repository root with the project's virtual environment:

    python bench/multiprocess_check.py [--steps 4] [--processes 2] [--devices 2]

Runs `peftjax train` on the tiny config twice through `launch/local.py` (the same launch and
metrics reading as tests/test_multihost.py): once as 1 process with processes x devices CPU
devices, once as `processes` processes with `devices` each, same global batch and mesh. Prints
one JSON line:

    {"multiprocess_loss_match": true, "max_abs_loss_diff": 0.0, "processes": 2,
     "devices_per_process": 2, "steps": 4, "seconds": 95.2}

`multiprocess_loss_match`: every logged step's loss agrees within 1e-5 relative. A failed launch
prints `{"multiprocess_loss_match": false, "error": ...}` and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `launch`, when run as a script

from launch.common import positive  # noqa: E402
from launch.local import train_losses  # noqa: E402

RTOL = 1e-5


def check(steps: int, processes: int, devices: int, timeout: float = 900) -> dict:
    """Train both topologies and compare their per-step losses."""
    args = ["--config", os.path.join(REPO, "configs", "tiny.py"), f"--config.train.steps={steps}",
            "--config.train.log_every=1", f"--config.train.checkpoint_every={steps}"]
    env = dict(os.environ, PYTHONPATH=REPO)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peftjax_multiprocess_") as tmp:
        single, _ = train_losses(args, os.path.join(tmp, "one"), processes=1,
                                 devices=processes * devices, env=env, cwd=REPO, timeout=timeout)
        multi, _ = train_losses(args, os.path.join(tmp, "many"), processes=processes,
                                devices=devices, env=env, cwd=REPO, timeout=timeout)
    same_steps = sorted(single) == sorted(multi) == list(range(1, steps + 1))
    diffs = [abs(single[k] - multi[k]) for k in single if k in multi]
    match = same_steps and all(abs(single[k] - multi[k]) <= RTOL * abs(single[k])
                               for k in single)
    return {"multiprocess_loss_match": bool(match),
            "max_abs_loss_diff": max(diffs) if diffs else None,
            "processes": processes, "devices_per_process": devices, "steps": steps,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=positive, default=4)
    parser.add_argument("--processes", type=positive, default=2)
    parser.add_argument("--devices", type=positive, default=2, help="CPU devices per process")
    options = parser.parse_args()
    try:
        result = check(options.steps, options.processes, options.devices)
    except RuntimeError as e:  # a launch failed: still one JSON line, saying why
        print(json.dumps({"multiprocess_loss_match": False, "error": str(e)[-2000:],
                          "processes": options.processes,
                          "devices_per_process": options.devices}), flush=True)
        sys.exit(1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
