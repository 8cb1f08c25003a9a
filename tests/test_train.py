"""Training: loss goes down, the base never moves, optimizer state only for trainables,
checkpoint round trip and resume, sharded step equals single-device step."""

import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from peftjax import data
from peftjax.checkpoint import CheckpointMismatchError, Checkpoints
from peftjax.train import build, train
from peftjax.train.loop import put_batch
from peftjax.train.optim import make_optimizer
from peftjax.train.step import TrainState, init_train_state, make_train_step
from tests.helpers import save_run


def tiny_config(**changes):
    config = tiny.get_config()
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


def batches(config, start=0):
    return data.train_batches(config.data.mixture, batch_size=config.data.batch_size,
                              inputs_length=config.data.inputs_length,
                              targets_length=config.data.targets_length, pack=config.data.pack,
                              seed=config.seed, start_batch=start)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.mark.parametrize("method, mode", [("lora", "per_task"), ("houlsby", "shared")])
def test_training_lowers_loss_and_never_touches_the_base(method, mode):
    config = tiny_config(peft__method=method, peft__mode=mode, optim__learning_rate=1e-2,
                         optim__warmup_steps=0)
    exp = build(config)
    frozen_before = host(exp.frozen)
    optimizer = make_optimizer(config.optim, 40)
    state = init_train_state(exp.trainable, optimizer)
    # The optimizer holds state for trainables only: Adam's two moments, nothing for the base.
    trainable_size = sum(x.size for x in jax.tree.leaves(exp.trainable))
    opt_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert opt_size == 2 * trainable_size
    step = make_train_step(exp.graphdef, optimizer, packed=True, num_task_ids=exp.num_task_ids)
    it, losses = batches(config), []
    for _ in range(40):
        state, metrics = step(state, exp.frozen, put_batch(next(it), exp), jax.random.key(0))
        losses.append(float(metrics["loss_sum"] / metrics["tokens"]))
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])  # deterministic: seeded data, init
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(host(exp.frozen)),
                             strict=True):
        np.testing.assert_array_equal(before, after)  # bit-identical


def test_checkpoint_round_trip(tmp_path):
    config = tiny_config()
    exp = build(config)
    optimizer = optax.adamw(1e-3)
    state = init_train_state(exp.trainable, optimizer)
    state = TrainState(state.step + 7, jax.tree.map(lambda x: x + 1.0, state.trainable),
                       state.opt_state)
    ckpt = Checkpoints(str(tmp_path))
    ckpt.save(7, state.as_dict(), {"fingerprint": exp.fingerprint(), "data_position": 7})
    ckpt.wait()
    restored, meta = ckpt.restore(init_train_state(exp.trainable, optimizer).as_dict())
    assert meta["data_position"] == 7 and int(restored["step"]) == 7
    for a, b in zip(jax.tree.leaves(host(state.as_dict())), jax.tree.leaves(host(restored)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    ckpt.check_fingerprint(exp.fingerprint())
    other = build(tiny_config(peft__rank=4)).fingerprint()
    with pytest.raises(CheckpointMismatchError, match="different model or PEFT setup"):
        ckpt.check_fingerprint(other)


def test_frozen_adapter_state_is_checkpointed_and_wins_over_a_changed_source(tmp_path, capsys):
    """Frozen adapter state (here a frozen LoRA A; also sparse masks and composed sources) is
    rebuilt from its source on restore, which may have changed since: the checkpoint's copy is
    what the run trained with, so it is used, and the user is told."""
    from peftjax.peft import FrozenAdapter
    from peftjax.train.loop import _checkpointed, _meta, _restore

    exp = build(tiny_config(peft__freeze_a=True))
    trained_with = host(exp.frozen.filter(FrozenAdapter))
    assert jax.tree.leaves(trained_with), "freeze_a should give frozen adapter state"
    state = init_train_state(exp.trainable, optax.adamw(1e-3))
    ckpt = Checkpoints(str(tmp_path))
    ckpt.save(1, _checkpointed(state, exp), _meta(exp, 1))
    ckpt.wait()

    rebuilt = build(tiny_config(peft__freeze_a=True))
    rebuilt.frozen = nnx.merge_state(rebuilt.frozen, jax.tree.map(
        lambda x: x + 1.0, rebuilt.frozen.filter(FrozenAdapter)))  # "the source changed"
    _restore(ckpt, state, rebuilt)
    for a, b in zip(jax.tree.leaves(trained_with),
                    jax.tree.leaves(host(rebuilt.frozen.filter(FrozenAdapter))), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "differ from what" in capsys.readouterr().out


def test_workdir_of_another_model_is_refused_without_writing(tmp_path):
    save_run(tmp_path, tiny_config(train__steps=2), step=2)  # a run saved as `train` saves it
    before = sorted(os.listdir(tmp_path)), os.path.getmtime(tmp_path / "config.json")
    with pytest.raises(CheckpointMismatchError, match="different model or PEFT setup"):
        train(tiny_config(train__steps=4, peft__method="houlsby"), str(tmp_path))
    assert (sorted(os.listdir(tmp_path)), os.path.getmtime(tmp_path / "config.json")) == before


def test_lora_state_is_tiny_fraction_and_full_trains_everything():
    lora, full = build(tiny_config()), build(tiny_config(peft__method="full"))
    lora_counts = lora.parameter_counts()
    assert lora_counts["total"] - lora_counts["trainable"] == full.parameter_counts()["total"]
    assert full.parameter_counts()["trainable"] == full.parameter_counts()["total"]
    assert not jax.tree.leaves(full.frozen)
    assert 0 < lora.parameter_counts()["trainable"] < 0.1 * lora.parameter_counts()["total"]
