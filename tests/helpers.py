"""What several test files share: running the CLI as users do, random HF T5 checkpoints, tiny
run configs, and "trained" runs saved without training."""

import contextlib
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


# Runs `peftjax.cli.main` (what the `peftjax` script calls) on each argv of a JSON list, one
# after another in this process: absl's flags are reset between commands, each command's exit
# status and its file descriptors 1 and 2 (Python's and native libraries' output alike) are
# captured, and an exception that escapes `main` is printed to its stderr as Python would (a
# traceback). The results go to the JSON file named last.
_ONE_PROCESS = """
import json, os, sys, tempfile, traceback
from absl import flags
from peftjax import cli

def run(argv):
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # the last overrides
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    sys.argv = ["peftjax", *argv]  # ml_collections reads the overrides from sys.argv
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    saved = [os.dup(1), os.dup(2)]
    sys.stdout.flush(), sys.stderr.flush()
    for fd, f in zip((1, 2), files):
        os.dup2(f.fileno(), fd)
    try:
        cli.main(list(sys.argv))
        status = 0
    except SystemExit as e:  # as the interpreter exits: None is 0, a message is 1
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
    out = []
    for f in files:
        f.seek(0)
        out.append(f.read().decode(errors="replace"))
        f.close()
    return [argv, status, *out]

commands, results_file = json.loads(sys.argv[1]), sys.argv[2]  # before run() sets sys.argv
results = [run(argv) for argv in commands]
with open(results_file, "w") as f:
    json.dump(results, f)
"""


def run_peftjax_in_one_process(commands: dict[str, list[str]], cwd: str = REPO,
                               timeout: int = 600) -> dict[str, subprocess.CompletedProcess]:
    """`peftjax ARGV` for each `{name: ARGV}`, one after another in one fresh process: `{name:
    CompletedProcess}` as `run_peftjax` gives. For commands that stop before training
    (refusals, counts), where a process per command would mostly import TensorFlow again."""
    import tempfile

    env = dict(os.environ, PYTHONPATH=REPO)
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "results.json")
        driver = subprocess.run([sys.executable, "-c", _ONE_PROCESS,
                                 json.dumps(list(commands.values())), out], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=timeout)
        assert driver.returncode == 0, driver.stderr[-3000:]
        with open(out) as f:
            results = json.load(f)
    return {name: subprocess.CompletedProcess(["peftjax", *argv], status, stdout, stderr)
            for name, (argv, status, stdout, stderr) in zip(commands, results, strict=True)}


def compile_cache_env(directory) -> dict[str, str]:
    """Environment variables under which subprocesses share JAX's persistent compilation cache
    in `directory`, every program cached (most of a tiny run's take well under the default 1 s
    threshold): runs of one config, or a run and its resume, then compile each program once.
    A cached executable is the one XLA would compile again, so no result changes."""
    return {"JAX_COMPILATION_CACHE_DIR": str(directory),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@contextlib.contextmanager
def shared_compile_cache(directory):
    """Within it, every subprocess started (runs, kernels) shares the compilation cache in
    `directory` (`compile_cache_env`); the environment is restored on exit."""
    import pytest

    with pytest.MonkeyPatch.context() as patch:
        for key, value in compile_cache_env(directory).items():
            patch.setenv(key, value)
        yield


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
