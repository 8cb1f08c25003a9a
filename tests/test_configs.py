"""Every experiment config in `configs/` validates and builds (as shapes) with its `quick` switch.

Parametrized over the files found, so a new `configs/<method>.py` is covered without editing this
test. Shapes only (`count_parameters`): cheap, and it catches unknown keys, bad values, targets
that match nothing and methods that fail to attach.
"""

import glob
import importlib
import os

import pytest

from peftjax.train.accounting import count_parameters

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_RUNS = {"suite"}  # shared settings imported by the method configs, not a run
CONFIGS = sorted(
    name for name in (os.path.basename(p)[:-3]
                      for p in glob.glob(os.path.join(REPO, "configs", "*.py")))
    if name not in NOT_RUNS and not name.startswith("_"))


def test_configs_are_found():
    assert {"quickstart", "tiny"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_counts(name):
    module = importlib.import_module(f"configs.{name}")
    if not hasattr(module, "get_config"):
        pytest.skip(f"configs/{name}.py defines no get_config (a shared part, not a run)")
    config = module.get_config("quick")
    missing = [w for w in config.peft.sources if not os.path.isfile(os.path.join(w, "config.json"))]
    if missing:  # a composition whose source runs were not trained here: refused, clearly ...
        with pytest.raises(FileNotFoundError, match="Train it first"):
            count_parameters(config)
        config.peft.compose, config.peft.sources = "none", ()  # ... and the rest must still build
    counts = count_parameters(config)
    method = config.peft.method
    assert counts["method"] == method and counts["mode"] == config.peft.mode
    assert counts["total"] == counts["trainable"] + counts["frozen"]
    # Nothing but base weights, trained adapter weights and frozen adapter state is counted.
    assert counts["total"] == counts["base"] + counts["frozen_adapter"] + (
        0 if method == "full" else counts["trainable"])
    if method == "none":
        assert counts["trainable"] == 0
    elif method == "full":
        assert counts["trainable"] == counts["total"] == counts["base"]
    else:
        assert 0 < counts["trainable"] < counts["total"]
        assert counts["adapted_modules"] > 0
        if config.peft.mode == "per_task":
            assert counts["per_task_trainable"] > 0
