"""HF peft adapter directories ⇄ peftjax, checked against the real peft library (torch).

Every adapter is made by peft itself on a tiny random transformers T5, its weights set to random
non-initial values, and saved with `save_pretrained`; logits are compared with peft's forward.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.interop import PeftInteropError, load_peft, save_peft
from tests import helpers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = helpers.REPO
VOCAB = 61
BASE = dict(d_model=16, d_kv=4, num_heads=2, d_ff=24, num_layers=2, num_decoder_layers=1,
            feed_forward_proj="gated-gelu")
TOL = 1e-4


def save_hf_t5(path, *, seed=0, **fields):
    """A random untied (v1.1-style) transformers T5 directory with non-trivial norms."""
    helpers.save_hf_t5(path, tie=False, seed=seed, vocab_size=VOCAB, **fields)
    return path


def hf_base(path):
    return transformers.T5ForConditionalGeneration.from_pretrained(path).eval()


def make_adapter(base_dir, out_dir, peft_config, *, seed):
    """peft's own adapter on a fresh copy of the base, every adapter weight randomised."""
    model = peft.get_peft_model(hf_base(base_dir), peft_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen)
            # Multiplicative vectors (IA3, DoRA magnitudes) around their init, others around 0.
            p.copy_(p + 0.3 * noise if ("ia3" in name or "magnitude" in name) else 0.5 * noise)
    model.save_pretrained(out_dir)
    return model.eval()


BATCH = np.random.default_rng(0)
ENC = BATCH.integers(2, VOCAB, (3, 9))
ENC[1, 6:] = 0  # padding
DEC = BATCH.integers(2, VOCAB, (3, 7))
DEC[:, 0] = 0


def peft_logits(model, enc=ENC, dec=DEC):
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                     decoder_input_ids=torch.tensor(dec)).logits.numpy()


def our_logits(model, enc=ENC, dec=DEC, task_ids=None):
    ids = None if task_ids is None else jnp.asarray(task_ids)
    return np.asarray(model(encoder_input_tokens=jnp.asarray(enc),
                            decoder_input_tokens=jnp.asarray(dec), task_ids=ids))


def assert_close(ours, ref):
    assert ours.shape == ref.shape
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert err < TOL, err


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_hf_t5(tmp_path_factory.mktemp("base"), **BASE)


SEQ2SEQ = dict(task_type="SEQ_2_SEQ_LM")
ADAPTERS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], **SEQ2SEQ),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True,
                                      target_modules=["k", "o", "wi_0", "wo"], **SEQ2SEQ),
    # Per-module ranks and alphas, and lm_head: padded / folded into peftjax's one rank.
    "lora patterns": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "wi_1", "lm_head"],
        rank_pattern={"wi_1": 2}, alpha_pattern={"lm_head": 3}, **SEQ2SEQ),
    "dora": lambda: peft.LoraConfig(r=3, lora_alpha=5, use_dora=True,
                                    target_modules=["q", "v", "wo"], **SEQ2SEQ),
    "ia3": lambda: peft.IA3Config(target_modules=["k", "v", "wo", "wi_0"],
                                  feedforward_modules=["wo"], **SEQ2SEQ),
    "prompt tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=3, **SEQ2SEQ),
}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_load_matches_peft_and_save_round_trips_through_peft(base_dir, tmp_path, name):
    ref_model = make_adapter(base_dir, tmp_path / "hf", ADAPTERS[name](), seed=1)
    ref = peft_logits(ref_model)
    assert np.max(np.abs(ref - peft_logits(hf_base(base_dir)))) > 1e-2  # the adapter matters
    model = load_peft(base_dir, tmp_path / "hf")
    assert_close(our_logits(model), ref)

    save_peft(model, tmp_path / "ours", base_model_name_or_path=str(base_dir))
    again = peft.PeftModel.from_pretrained(hf_base(base_dir), tmp_path / "ours").eval()
    assert_close(peft_logits(again), ref)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)


@pytest.fixture(scope="module")
def library(base_dir, tmp_path_factory):
    """Two separately trained LoRAs (different alpha too) for the same targets and rank."""
    root = tmp_path_factory.mktemp("library")
    refs = {}
    for i, (task, alpha) in enumerate((("task_a", 8), ("task_b", 3))):
        config = peft.LoraConfig(r=2, lora_alpha=alpha, target_modules=["q", "v", "wi_0"],
                                 **SEQ2SEQ)
        refs[task] = peft_logits(make_adapter(base_dir, root / task, config, seed=10 + i))
    return root, refs


def test_two_adapters_load_as_one_per_task_model(base_dir, library, tmp_path):
    root, refs = library
    model = load_peft(base_dir, {"task_a": root / "task_a", "task_b": root / "task_b"})
    for task_id, task in enumerate(refs):
        assert_close(our_logits(model, task_ids=[task_id] * 3), refs[task])
    # A mixed batch picks each row's adapter.
    mixed = our_logits(model, task_ids=[1, 0, 1])
    assert_close(mixed[[0, 2]], refs["task_b"][[0, 2]])
    assert_close(mixed[[1]], refs["task_a"][[1]])
    # Saving one task of the per-task model gives back that task's adapter.
    save_peft(model, tmp_path / "b", task=1)
    again = peft.PeftModel.from_pretrained(hf_base(base_dir), tmp_path / "b").eval()
    assert_close(peft_logits(again), refs["task_b"])
    with pytest.raises(PeftInteropError, match="pass task=<id in 0..1>"):
        save_peft(model, tmp_path / "c")


def test_library_of_mismatched_adapters_is_refused(base_dir, library, tmp_path):
    root, _ = library
    make_adapter(base_dir, tmp_path / "r4", peft.LoraConfig(
        r=4, target_modules=["q", "v", "wi_0"], **SEQ2SEQ), seed=3)
    with pytest.raises(PeftInteropError, match=r"differ in rank \(2 vs 4\)"):
        load_peft(base_dir, {"a": root / "task_a", "b": tmp_path / "r4"})
    make_adapter(base_dir, tmp_path / "qv", peft.LoraConfig(
        r=2, target_modules=["q", "v"], **SEQ2SEQ), seed=4)
    with pytest.raises(PeftInteropError, match="adapt different modules"):
        load_peft(base_dir, {"a": root / "task_a", "b": tmp_path / "qv"})
    make_adapter(base_dir, tmp_path / "ia3", peft.IA3Config(**SEQ2SEQ), seed=5)
    with pytest.raises(PeftInteropError, match=r"differ in method \('lora' vs 'ia3'\)"):
        load_peft(base_dir, {"a": root / "task_a", "b": tmp_path / "ia3"})


def test_adapter_for_another_base_names_module_and_shapes(base_dir, tmp_path):
    wider = save_hf_t5(tmp_path / "wider", **{**BASE, "d_model": 20})
    make_adapter(wider, tmp_path / "lora", peft.LoraConfig(
        r=4, target_modules=["q"], **SEQ2SEQ), seed=6)
    with pytest.raises(PeftInteropError) as err:
        load_peft(base_dir, tmp_path / "lora")
    message = str(err.value)
    assert "lora_A.weight of 'decoder.block.0.layer.0.SelfAttention.q'" in message
    assert "shape (4, 20)" in message and "needs (4, 16)" in message
    assert "another base model" in message


def test_bad_adapter_directories_are_clear_errors(base_dir, library, tmp_path):
    root, _ = library
    with pytest.raises(PeftInteropError, match="does not exist"):
        load_peft(base_dir, tmp_path / "nowhere")
    shutil.copytree(root / "task_a", tmp_path / "no_weights")
    os.remove(tmp_path / "no_weights" / "adapter_model.safetensors")
    with pytest.raises(PeftInteropError, match="has no adapter_model.safetensors"):
        load_peft(base_dir, tmp_path / "no_weights")
    # A method peft has and peftjax does not.
    make_adapter(base_dir, tmp_path / "loha", peft.LoHaConfig(
        r=2, target_modules=["q"], **SEQ2SEQ), seed=7)
    with pytest.raises(PeftInteropError, match=r"peft_type='LOHA'.*\['IA3', 'LORA', 'POLY', "
                                               r"'PROMPT_TUNING'\]"):
        load_peft(base_dir, tmp_path / "loha")
    # LoRA on the token embeddings: peftjax adapts projections only.
    make_adapter(base_dir, tmp_path / "embed", peft.LoraConfig(
        r=2, target_modules=["shared"], **SEQ2SEQ), seed=8)
    with pytest.raises(PeftInteropError, match="adapts the embedding table 'shared'"):
        load_peft(base_dir, tmp_path / "embed")
    # An option that changes the forward pass.
    shutil.copytree(root / "task_a", tmp_path / "fifo")
    config_file = tmp_path / "fifo" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "fan_in_fan_out": True}))
    with pytest.raises(PeftInteropError, match="fan_in_fan_out=True"):
        load_peft(base_dir, tmp_path / "fifo")


# --------------------------------------------------------------------------- CLI


peftjax_cli = helpers.run_peftjax


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """configs/tiny.py with one LoRA per task on its random-init base, saved as `peftjax train`
    saves a run, its LoRAs randomised (B != 0) instead of trained (tests/test_cli.py trains)."""
    workdir = tmp_path_factory.mktemp("run")
    helpers.save_run(str(workdir), helpers.tiny_config(peft__mode="per_task"), step=2)
    return workdir


@pytest.mark.slow
def test_export_peft_cli_writes_adapters_peft_loads(trained_run, tmp_path):
    from flax import nnx

    from peftjax.peft.runs import read_config as run_config
    from peftjax.train import restore_trained

    out = tmp_path / "out"
    result = peftjax_cli("export-peft", "--workdir", str(trained_run), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    exp, state = restore_trained(run_config(str(trained_run)), str(trained_run))
    model = nnx.merge(exp.graphdef, state.trainable, exp.frozen)
    assert sorted(os.listdir(out)) == sorted(["base_model", *exp.task_names])
    rng = np.random.default_rng(5)
    enc, dec = rng.integers(2, 200, (2, 11)), rng.integers(2, 200, (2, 6))
    dec[:, 0] = 0
    base = hf_base(out / "base_model")
    for name in exp.task_names[:2]:
        ours = our_logits(model, enc, dec, task_ids=[exp.task_ids[name]] * 2)
        loaded = peft.PeftModel.from_pretrained(base, out / name).eval()
        assert_close(ours, peft_logits(loaded, enc, dec))
        base = loaded.unload()  # the same base weights, for the next task


def test_export_peft_errors(tmp_path):
    from peftjax.config import default_config
    from peftjax.interop.export import export_run

    result = peftjax_cli("export-peft", "--workdir", str(tmp_path / "none"), "--out",
                         str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines()
                if line.startswith("peftjax export-peft: error: ")]
    assert "holds no trained run (no config.json there)" in error
    with pytest.raises(PeftInteropError, match="--out is required"):
        export_run(default_config(), str(tmp_path), None)
    config = default_config()
    config.peft.method = "houlsby"
    with pytest.raises(PeftInteropError, match="method='houlsby' has no HF peft format"):
        export_run(config, str(tmp_path), str(tmp_path / "o"))


# --------------------------------------------------------------------------- library sources


LIBRARY_VOCAB = 260  # >= the synthetic suite's vocabulary, so configs/tiny.py runs on this base


@pytest.fixture(scope="module")
def peft_library(tmp_path_factory):
    """A tiny HF base with the suite's vocabulary and two HF peft LoRAs (random non-zero A, B;
    different ranks' scale) trained "on it", as a MeteoRA / Arrow library."""
    root = tmp_path_factory.mktemp("peft_library")
    helpers.save_hf_t5(root / "base", tie=False, seed=2, vocab_size=LIBRARY_VOCAB, **BASE)
    dirs = []
    for i, alpha in enumerate((8, 3)):
        config = peft.LoraConfig(r=2, lora_alpha=alpha, target_modules=["q", "v"], **SEQ2SEQ)
        make_adapter(root / "base", root / f"lora{i}", config, seed=20 + i)
        dirs.append(str(root / f"lora{i}"))
    return str(root / "base"), dirs


def library_config(base, sources, compose="molora"):
    from configs import tiny

    config = tiny.get_config()
    config.model.hf_path = base
    config.peft.method = "none"
    config.peft.compose = compose
    config.peft.sources = tuple(sources)
    config.peft.top_k = 2
    return config


def torch_lora_delta(module, x_td):
    """peft's own LoRA update `s·B A x` of a torch LoRA Linear."""
    with torch.no_grad():
        x = torch.tensor(np.asarray(x_td))
        return (module.lora_B["default"](module.lora_A["default"](x))
                * module.scaling["default"]).numpy()


@pytest.mark.parametrize("compose", ["molora", "arrow"])
def test_peft_adapter_directories_as_library_sources(peft_library, compose):
    from flax import nnx

    from peftjax.interop.hf_peft import hf_module_names
    from peftjax.models.context import Context
    from peftjax.peft import module_paths
    from peftjax.train import build
    from peftjax.train.accounting import count_parameters

    base, dirs = peft_library
    config = library_config(base, dirs, compose)
    exp = build(config)
    model = nnx.merge(exp.graphdef, exp.trainable, exp.frozen)
    paths = module_paths(model)
    hf_names = hf_module_names(model.config)
    refs = [peft.PeftModel.from_pretrained(hf_base(base), d).eval() for d in dirs]
    sites = sorted(p for p in exp.adapted_paths if p.endswith((".q", ".v")))
    assert len(sites) == 2 * (BASE["num_layers"] + 2 * BASE["num_decoder_layers"])
    x_btd = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, BASE["d_model"])),
                        jnp.float32)
    ctx = Context(None, None)
    for path in sites:
        block = paths[path]
        assert len(block.adapters) == 2
        for child, ref in zip(block.adapters, refs, strict=True):
            assert child.base is block.base  # the run's own frozen kernel, not a second copy
            torch_module = ref.get_submodule(f"base_model.model.{hf_names[path]}")
            want = torch_lora_delta(torch_module, x_btd)
            assert np.max(np.abs(want)) > 1e-2  # the adapter matters
            np.testing.assert_allclose(np.asarray(child.delta(x_btd, ctx)), want, atol=TOL,
                                       rtol=TOL)
    trained = {str(path[-1]) for path, _ in nnx.to_flat_state(exp.trainable)}
    assert trained == ({"router_kernel"} if compose == "molora" else set())
    # The shapes-only count (`peftjax params`) imports the adapters onto a base from shapes.
    counts, ours = count_parameters(config), exp.parameter_counts()
    for key in ("trainable", "frozen_adapter", "base"):
        assert counts[key] == ours[key], key


def test_peft_source_for_another_base_or_a_random_init_run_is_refused(peft_library, tmp_path):
    from peftjax.train import build

    base, dirs = peft_library
    wider = save_hf_t5(tmp_path / "wider", **{**BASE, "d_model": 20})
    make_adapter(wider, tmp_path / "wide_lora", peft.LoraConfig(
        r=2, target_modules=["q"], **SEQ2SEQ), seed=9)
    with pytest.raises(PeftInteropError) as err:
        build(library_config(base, [dirs[0], str(tmp_path / "wide_lora")]))
    message = str(err.value)
    assert message.startswith(f"config.peft.sources: {tmp_path / 'wide_lora'}: ")
    assert "shape (2, 20)" in message and "needs (2, 16)" in message
    config = library_config(base, dirs)
    config.model.hf_path = ""
    with pytest.raises(ValueError, match=r"config.peft.sources: .*lora0 is an HF peft adapter "
                                         r"directory, .*random init.*needs config.model.hf_path"):
        build(config)
