"""What several test files share: running the CLI as users do, random HF T5 checkpoints, tiny
run configs, and "trained" runs saved without training."""

import functools
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_peftjax(*args: str, cwd: str = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """`peftjax ARGS` in a fresh process, in module form (so no install step is assumed)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "peftjax.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def compile_cache_env(directory) -> dict[str, str]:
    """Environment variables under which subprocesses share JAX's persistent compilation cache
    in `directory`, every program cached (most of a tiny run's take well under the default 1 s
    threshold): runs of one config, or a run and its resume, then compile each program once.
    A cached executable is the one XLA would compile again, so no result changes."""
    return {"JAX_COMPILATION_CACHE_DIR": str(directory),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def save_hf_t5(path, *, tie: bool, seed: int = 0, vocab_size: int = 97, **fields):
    """A random transformers T5 saved as a v1.1-style (untied) or original-style directory.

    Returns the reloaded transformers model (eval mode). Needs torch and transformers.
    """
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=vocab_size, dropout_rate=0.0, **fields)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # random norms so no parameter sits at its init value
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    if not tie:  # a real v1.1 checkpoint: separate lm_head, tie_word_embeddings false
        tensors = load_file(f"{path}/model.safetensors")
        tensors["lm_head.weight"] = torch.randn(vocab_size, fields["d_model"])
        save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
        config_file = os.path.join(path, "config.json")
        with open(config_file) as f:
            cfg = json.load(f)
        cfg["tie_word_embeddings"] = False
        cfg.pop("scale_decoder_outputs", None)
        with open(config_file, "w") as f:
            json.dump(cfg, f)
    return transformers.T5ForConditionalGeneration.from_pretrained(path).eval()


def host(tree):
    """A numpy copy of a pytree of (device) arrays."""
    import jax
    import numpy as np

    return jax.tree.map(np.asarray, jax.device_get(tree))


def tiny_config(**changes):
    """`configs/tiny.py` with `section__key=value` changes (a bare `key` sets a top-level key)."""
    from configs import tiny

    config = tiny.get_config()
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition("__")
        (config[section] if section else config)[key] = value
    return config


def save_run(workdir, config, *, scale=0.1, seed=0, step=5):
    """A "trained" run: the built run's trainables + seeded noise (so B != 0), saved as `peftjax
    train` saves them. Returns (experiment, host copy of the saved trainables)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from peftjax.checkpoint import Checkpoints
    from peftjax.train import build
    from peftjax.train import loop as train_loop
    from peftjax.train.step import TrainState

    exp = build(config)
    rng = np.random.default_rng(seed)
    trainable = jax.tree.map(
        lambda x: x + jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), exp.trainable)
    _, state = train_loop._fresh_state(exp, config)
    state = TrainState(state.step + step, trainable, state.opt_state)
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"))
    ckpt.save(step, train_loop._checkpointed(state, exp), train_loop._meta(exp, step))
    ckpt.wait()
    train_loop._write_config(config, str(workdir), resumed_at=None)
    return exp, host(trainable)


def single_and_sharded_step(exp, config, optimizer):
    """One train step on a packed batch of `config`'s mixture whose rows mix tasks, run on one
    device and on `exp`'s mesh. Returns (single-device metrics, sharded state, sharded metrics,
    the host batch)."""
    import jax

    from peftjax.train.loop import put_batch
    from peftjax.train.step import init_train_state, make_train_step

    step = make_train_step(exp.graphdef, optimizer, packed=True, num_task_ids=exp.num_task_ids,
                           donate=False)
    assert config.data.pack, "single_and_sharded_step needs config.data.pack=True"
    batch = first_batch(config)  # shared with the other callers of the same data setup
    assert any(len(set(row[row > 0])) > 1 for row in batch["encoder_task_ids"])  # mixed rows
    one = jax.devices()[0]
    single = step(*jax.device_put((init_train_state(exp.trainable, optimizer), exp.frozen), one),
                  jax.device_put(batch, one), jax.random.key(0))[1]
    state, sharded = step(init_train_state(exp.trainable, optimizer), exp.frozen,
                          put_batch(batch, exp), jax.random.key(0))
    return single, state, sharded, batch


def first_batch(config) -> dict:
    """The first training batch of `config`'s data (host numpy arrays), cached per data setup."""
    d = config.data
    return _first_batch(d.mixture, d.batch_size, d.inputs_length, d.targets_length, d.pack,
                        config.seed)


@functools.cache  # a seqio pipeline costs seconds to set up; the tests share a few batches
def _first_batch(mixture, batch_size, inputs_length, targets_length, pack, seed):
    from peftjax import data

    return next(data.train_batches(mixture, batch_size=batch_size, inputs_length=inputs_length,
                                   targets_length=targets_length, pack=pack, seed=seed))


def perturbed(trainable, seed=0, scale=0.1):
    """Trainables + seeded noise, so that adapters whose init is the identity (LoRA's B = 0)
    change the output and get gradients everywhere; dtypes kept."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(scale * rng.normal(size=x.shape), x.dtype),
                        trainable)
