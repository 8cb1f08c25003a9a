"""The `peftjax` command line end to end on a tiny config, and every bad input it must refuse."""

import json
import os

import pytest

from tests.helpers import REPO, run_peftjax

TINY = os.path.join(REPO, "configs", "tiny.py")


peftjax = run_peftjax  # as users type it


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    result = peftjax("train", "--config", TINY, "--workdir", str(workdir),
                     "--config.peft.mode=per_task")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_train_writes_metrics_checkpoints_and_counts(trained):
    workdir, result = trained
    assert "Parameters: total" in result.stdout and "trainable" in result.stdout
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [2, 4, 6]
    assert any(k.startswith("token_accuracy/synthetic_") for k in records[0])
    assert any("eval/exact_match" in r for r in records)
    assert os.listdir(workdir / "tensorboard")
    assert json.loads((workdir / "config.json").read_text())["peft"]["mode"] == "per_task"


def test_train_again_resumes_from_the_latest_checkpoint(trained, tmp_path):
    workdir, _ = trained
    result = peftjax("train", "--config", TINY, "--workdir", str(workdir),
                     "--config.peft.mode=per_task", "--config.train.steps=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from step 6" in result.stdout
    assert "8" in os.listdir(workdir / "checkpoints")
    # The config the run started with is kept; the changed one is recorded beside it.
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 6
    assert json.loads((workdir / "config.resume_6.json").read_text())["train"]["steps"] == 8


def test_eval_writes_adapted_and_base_metrics_for_every_task(trained):
    workdir, _ = trained
    result = peftjax("eval", "--config", TINY, "--workdir", str(workdir),
                     "--config.peft.mode=per_task")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"adapted", "base"}
    tasks = {f"synthetic_{t}" for t in ("reverse_shift", "reverse_upper", "reverse_double",
                                         "shift_upper", "shift_double", "upper_double",
                                         "reverse_shift_upper", "shift_upper_double")}
    for column in metrics.values():
        assert set(column) == tasks
        for scores in column.values():
            assert set(scores) == {"exact_match", "token_accuracy"}
    assert "MEAN" in result.stdout and "exact_match (adapted)" in result.stdout


def test_eval_without_a_checkpoint_says_train_first(tmp_path):
    result = peftjax("eval", "--config", TINY, "--workdir", str(tmp_path / "empty"))
    assert result.returncode == 2
    assert "No checkpoint" in result.stderr and "peftjax train" in result.stderr


def write_bart(path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BartConfig(vocab_size=300, d_model=16, encoder_layers=1,
                                     decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=16,
                                     decoder_ffn_dim=16)
    transformers.BartForConditionalGeneration(config).save_pretrained(path)
    return path


BAD_INPUTS = {
    "unknown override key": (["--config.peft.rnak=4"], "Did you mean config.peft.rank"),
    "unknown section": (["--config.pef.rank=4"], "Did you mean config.peft"),
    "unknown mixture": (["--config.data.mixture=synthetic_suit"],
                        "Close matches: ['synthetic_suite'"),
    "target regex matches nothing": (["--config.peft.targets=.*attention\\.qq"],
                                     "matches no module"),
    "zero rank": (["--config.peft.rank=0"], "rank must be a positive integer"),
    "negative rank": (["--config.peft.rank=-2"], "rank must be a positive integer"),
    "not an HF directory": (["--config.model.hf_path=/nonexistent"], "no config.json"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, name):
    overrides, message = BAD_INPUTS[name]
    workdir = tmp_path / "run"
    result = peftjax("train", "--config", TINY, "--workdir", str(workdir), *overrides)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_hf_checkpoint_of_another_architecture_is_refused(tmp_path):
    bart = write_bart(tmp_path / "bart")
    result = peftjax("train", "--config", TINY, "--workdir", str(tmp_path / "run"),
                     f"--config.model.hf_path={bart}")
    assert result.returncode == 2 and "'bart' checkpoint" in result.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_key_inside_a_config_file_is_refused(tmp_path):
    config_file = tmp_path / "typo.py"
    config_file.write_text(
        "from configs.tiny import get_config as tiny\n\n"
        "def get_config():\n    c = tiny()\n    c.optim.learning_rat = 0.1\n    return c\n")
    result = peftjax("train", "--config", str(config_file), "--workdir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "Unknown config key 'config.optim.learning_rat'" in result.stderr
    assert "config.optim.learning_rate" in result.stderr
    assert not (tmp_path / "run").exists()


def test_workdir_of_a_different_peft_config_is_refused(trained):
    workdir, _ = trained
    listing = sorted(os.listdir(workdir / "checkpoints"))
    result = peftjax("train", "--config", TINY, "--workdir", str(workdir),
                     "--config.peft.mode=per_task", "--config.peft.rank=4")
    assert result.returncode == 2 and "different model or PEFT setup" in result.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == listing


@pytest.mark.slow
def test_quickstart_adapters_clearly_beat_the_shipped_frozen_base(tmp_path):
    """The quickstart's claim, shortened: adapters on the shipped base beat it by >= 0.2."""
    quickstart = os.path.join(REPO, "configs", "quickstart.py")
    args = ["--config", quickstart, "--workdir", str(tmp_path), "--config.train.steps=250",
            "--config.data.eval_examples=32", "--config.train.progress=false"]
    assert peftjax("train", *args).returncode == 0
    result = peftjax("eval", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    mean = {column: sum(s["exact_match"] for s in tasks.values()) / len(tasks)
            for column, tasks in metrics.items()}
    assert mean["adapted"] - mean["base"] >= 0.2, mean
