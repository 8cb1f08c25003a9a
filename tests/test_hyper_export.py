"""Hypernetwork runs exported as ordinary per-task adapter runs (`peftjax.hyper.export`).

Each case saves a "trained" hypernetwork run (random trainables, as `peftjax train` saves them),
exports it, rebuilds the exported run from its own config and checkpoint, and compares its logits
with the hypernetwork's on one batch that mixes every task (held-out tasks included).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import data
from peftjax.checkpoint import Checkpoints
from peftjax.config import default_config
from peftjax.hyper import HYPER_METHODS
from peftjax.hyper.export import export_run
from peftjax.peft.runs import read_config
from peftjax.train import restore_trained
from tests import helpers

SMALL_HYPER = dict(peft__hyper_embed_dim=8, peft__hyper_hidden=16, peft__hyper_proj_dim=8)
CASES = {
    "hyperformer_pp": dict(peft__method="hyperformer_pp"),
    "text_to_lora": dict(peft__method="text_to_lora", peft__hyper_condition="description",
                         peft__targets=r".*attention\.(q|v)|.*mlp\.wo",
                         data__heldout="synthetic_heldout"),
    # Hyper-X, without the generated layer norm (exports adapter_norm=False).
    "hyper_x": dict(peft__method="hyperformer_pp", peft__hyper_condition="task_language",
                    peft__hyper_norm=False, data__mixture="synthetic_multilingual"),
}
EXPORTED = {"hyperformer_pp": "houlsby", "text_to_lora": "lora", "hyper_x": "houlsby"}
LANGUAGE = {"hyper_x": 1}  # the exported language (others: 0, the only row)
STEP = 7


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Lazily saved hypernetwork runs, one per case: `runs(name)` -> (workdir, config)."""
    root = tmp_path_factory.mktemp("hyper_runs")
    saved = {}

    def get(name):
        if name not in saved:
            config = helpers.tiny_config(**SMALL_HYPER, **CASES[name])
            workdir = str(root / name)
            helpers.save_run(workdir, config, scale=0.3, seed=3, step=STEP)
            saved[name] = (workdir, config)
        return saved[name]

    return get


def mixed_batch(config, vocab_size):
    """One example of every task id of the run (trained and held out), random tokens."""
    names = data.task_names(config.data.mixture)
    if config.data.heldout:
        names += data.task_names(config.data.heldout)
    task_ids = np.array(sorted({data.task_id_of(n) for n in names}), np.int32)
    rng = np.random.default_rng(0)
    enc = rng.integers(2, vocab_size, (len(task_ids), 9))
    enc[0, 6:] = 0  # padding
    dec = rng.integers(2, vocab_size, (len(task_ids), 6))
    dec[:, 0] = 0
    return jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(task_ids)


def restored(config, workdir):
    exp, state = restore_trained(config, workdir)
    return nnx.merge(exp.graphdef, state.trainable, exp.frozen), state


def logits(model, batch, **ids):
    enc, dec, task_ids = batch
    return np.asarray(model(encoder_input_tokens=enc, decoder_input_tokens=dec,
                            task_ids=task_ids, **ids))


@pytest.mark.parametrize("name", sorted(CASES))
def test_exported_run_reproduces_the_hypernetwork(runs, tmp_path, name):
    workdir, config = runs(name)
    language = LANGUAGE.get(name, 0)
    out = str(tmp_path / "exported")
    lines = export_run(None, workdir, out, language_id=language)
    assert lines[0].startswith(f"Wrote {out}: {EXPORTED[name]} (per_task")

    new_config = read_config(out)
    assert new_config.peft.method == EXPORTED[name] not in HYPER_METHODS
    assert new_config.peft.mode == "per_task"
    defaults = default_config().peft
    for key in defaults:
        if key.startswith("hyper_") or key == "num_languages":
            assert new_config.peft[key] == defaults[key], key
    if EXPORTED[name] == "houlsby":
        assert new_config.peft.adapter_bias
        assert new_config.peft.adapter_norm == config.peft.hyper_norm
    else:
        assert (new_config.peft.rank, new_config.peft.alpha) == (config.peft.rank,
                                                                 config.peft.alpha)
    assert new_config.peft.targets == config.peft.targets
    assert new_config.data.to_dict() == config.data.to_dict()
    assert Checkpoints(os.path.join(out, "checkpoints"), create=False).latest_step() == STEP

    batch = mixed_batch(config, 259)
    languages = {"language_ids": jnp.full(batch[2].shape, language, jnp.int32)}
    hyper, _ = restored(config, workdir)
    ref = logits(hyper, batch, **languages)
    exported, state = restored(new_config, out)
    got = logits(exported, batch)
    assert int(state.step) == STEP
    flat = nnx.to_flat_state(state.trainable)
    assert not any("hypernet" in ".".join(map(str, k)) for k, _ in flat)
    assert {v.get_value().shape[0] for _, v in flat} == {int(batch[2].max()) + 1}  # row per id
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # Each task's adapter is its own (a wrong row would show), and so is each language's.
    rolled = (batch[0], batch[1], jnp.roll(batch[2], 1))
    assert np.max(np.abs(logits(hyper, rolled, **languages) - ref)) > 1e-4
    if name == "hyper_x":
        other = {"language_ids": jnp.zeros(batch[2].shape, jnp.int32)}
        assert np.max(np.abs(logits(hyper, batch, **other) - got)) > 1e-4


def test_refusals(runs, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="already ordinary.*export-peft"):
        export_run(helpers.tiny_config(peft__method="lora"), str(tmp_path), out)
    norms = helpers.tiny_config(peft__method="hyperformer", peft__hyper_train_norms=True)
    with pytest.raises(ValueError, match="layer norms.*would not reproduce.*hyper_train_norms"):
        export_run(norms, str(tmp_path), out)
    workdir, _ = runs("hyperformer_pp")
    with pytest.raises(ValueError, match="already holds a run.*never overwrites"):
        export_run(None, workdir, workdir)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run"):
        export_run(None, workdir, str(taken))
    assert (taken / "config.json").read_text() == "{}"
    with pytest.raises(ValueError, match="language_id=1 is outside.*hyper_condition='task'"):
        export_run(None, workdir, out, language_id=1)
    workdir, _ = runs("hyper_x")
    with pytest.raises(ValueError, match="language_id=3 is outside.*languages 0..2"):
        export_run(None, workdir, out, language_id=3)
    assert not os.path.exists(out)  # nothing written by a refused export


@pytest.mark.slow
def test_cli_export_then_export_peft(runs, tmp_path):
    """`peftjax export-adapters` end to end; the exported LoRA run goes on to HF peft, whose
    adapter of one task, loaded alone, gives the hypernetwork's logits for that task."""
    from peftjax.interop import load_peft
    from peftjax.interop.export import export_run as export_peft

    workdir, config = runs("text_to_lora")
    out = str(tmp_path / "exported")
    result = helpers.run_peftjax("export-adapters", "--workdir", workdir, "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"Wrote {out}: lora (per_task" in result.stdout
    assert "synthetic_reverse_shift_double (" in result.stdout  # a held-out task's row

    hf = str(tmp_path / "hf")
    export_peft(None, out, hf)
    name = "synthetic_reverse_shift"
    task = data.task_id_of(name)
    with open(os.path.join(hf, name, "adapter_config.json")) as f:
        adapter = json.load(f)
    assert adapter["r"] == config.peft.rank
    model = load_peft(os.path.join(hf, "base_model"), os.path.join(hf, name))
    enc, dec, _ = mixed_batch(config, 259)
    ours = np.asarray(model(encoder_input_tokens=enc, decoder_input_tokens=dec))
    hyper, _ = restored(config, workdir)
    ref = logits(hyper, (enc, dec, jnp.full(enc.shape[:1], task, jnp.int32)))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
