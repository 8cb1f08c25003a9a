"""`peftjax params` / `count_parameters`: shape-only counts that agree exactly with transformers +
peft (models built on torch's meta device, so nothing is allocated on either side)."""

import importlib
import json
import os
import time

import jax
import peft
import pytest
import torch
import transformers
from flax import nnx

from peftjax.config import to_json
from peftjax.models import T5, preset
from peftjax.models.hf import to_hf
from peftjax.train import build
from peftjax.train.accounting import count_parameters
from tests.helpers import REPO, run_peftjax_in_one_process

LORA = os.path.join(REPO, "configs", "lora.py")
QV = r".*attention\.(q|v)"
# T5 v1.1 (google/t5-v1_1-*) published shapes: d_model, d_ff, heads, layers per stack; d_kv 64,
# vocabulary 32128, 32 relative-position buckets, gated-GELU, untied head.
V11 = {"base": (768, 2048, 12, 12), "xxl": (4096, 10240, 64, 24)}


def hf_t5(size="base") -> transformers.T5ForConditionalGeneration:
    """A T5 v1.1 on the meta device, with its own `lm_head` as in the google/t5-v1_1-* weights.

    transformers >= 5 always ties `lm_head` to the input embedding in a model built from a
    config, and unties it only when loading a checkpoint that holds a distinct `lm_head.weight`
    (every v1.1 one does): give it that separate head here.
    """
    d_model, d_ff, heads, layers = V11[size]
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=32128, d_model=d_model, d_ff=d_ff, d_kv=64, num_heads=heads,
            num_layers=layers, num_decoder_layers=layers, feed_forward_proj="gated-gelu"))
        model.lm_head.weight = torch.nn.Parameter(torch.empty(32128, d_model))
    assert model.lm_head.weight is not model.shared.weight
    return model


def hf_counts(model, peft_config=None) -> tuple[int, int]:
    """(total, trainable) as HF reports them: `model.parameters()` (a tied weight counts once)."""
    if peft_config is not None:
        with torch.device("meta"):
            model = peft.get_peft_model(model, peft_config)
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def ours(size="base", config_name="lora", **peft_overrides) -> dict:
    """`count_parameters` of `configs/<config_name>.py` on T5 v1.1 `size` shapes."""
    config = importlib.import_module(f"configs.{config_name}").get_config()
    config.model.hf_path = ""
    config.model.size = size
    for key, value in peft_overrides.items():
        config.peft[key] = value
    return count_parameters(config)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """`peftjax params` on LoRA's config (T5 v1.1 base shapes, q and v) and on a target that
    matches nothing, run in one process from an empty directory: (that directory, results)."""
    cwd = tmp_path_factory.mktemp("cwd")
    results = run_peftjax_in_one_process({
        "lora": ["params", "--config", LORA, "--config.model.hf_path=",
                 "--config.model.size=base", "--config.peft.rank=8",
                 f"--config.peft.targets={QV}"],
        "bad": ["params", "--config", LORA, "--config.peft.targets=nothing_matches"],
    }, cwd=str(cwd), timeout=300)
    return cwd, results


def test_cli_lora_matches_peft_on_t5_v11_base_and_writes_nothing(cli):
    cwd, results = cli
    result = results["lora"]
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # one JSON line, nothing else on stdout
    counts = json.loads(lines[0])
    total, trainable = hf_counts(hf_t5(), peft.LoraConfig(r=8, target_modules=["q", "v"]))
    assert (counts["total"], counts["trainable"]) == (total, trainable)
    assert counts["frozen"] == total - trainable
    assert counts["method"] == "lora" and counts["mode"] == "shared"
    # q and v of 12 encoder self-attentions, 12 decoder self- and 12 cross-attentions
    assert counts["adapted_modules"] == 12 * 2 + 12 * 4
    assert counts["trainable_by_variable"] == {"lora_a": 72 * 768 * 8, "lora_b": 72 * 8 * 768}
    assert counts["per_task_trainable"] is None and counts["shared_trainable"] == trainable
    assert counts["trainable_bytes"] == 4 * trainable  # float32
    assert os.listdir(cwd) == []  # the working directory is left untouched


def test_cli_bad_input_is_one_line_and_exit_2(cli):
    cwd, results = cli
    result = results["bad"]
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("peftjax params:")]
    assert len(error) == 1 and "config.peft.targets" in error[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stdout == "" and os.listdir(cwd) == []


def test_dora_matches_peft():
    counts = ours(targets=QV, dora=True)
    expected = hf_counts(hf_t5(), peft.LoraConfig(r=8, target_modules=["q", "v"],
                                                  use_dora=True))
    assert (counts["total"], counts["trainable"]) == expected
    assert counts["trainable_by_variable"]["lora_magnitude"] == 72 * 768


def test_ia3_default_targets_match_peft_defaults():
    """HF peft's IA3 defaults for T5: k, v (scaled on output) and wo (feed-forward, on input)."""
    counts = ours("base", "ia3", targets="")  # "" = the method's default insertion points
    expected = hf_counts(hf_t5(), peft.IA3Config(task_type="SEQ_2_SEQ_LM"))
    assert (counts["total"], counts["trainable"]) == expected
    assert counts["adapted_modules"] == 12 * 3 + 12 * 5


def test_prompt_tuning_matches_the_prompt_peft_uses():
    """HF peft allocates `num_virtual_tokens x num_transformer_submodules` prompt rows, 2 for
    SEQ_2_SEQ_LM, but its prompt-tuning forward only prepends the first `num_virtual_tokens`
    rows, to the encoder input; the second copy never reaches the model (no gradient). So the
    honest comparison is with `num_transformer_submodules=1`, which runs the same forward; the
    default's count is ours plus that dead copy."""
    counts = ours(method="prompt_tuning", targets="", num_virtual_tokens=8)
    used = hf_counts(hf_t5(), peft.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=8, num_transformer_submodules=1))
    assert (counts["total"], counts["trainable"]) == used
    default_total, default_trainable = hf_counts(hf_t5(), peft.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=8))
    assert default_trainable == 2 * counts["trainable"] == 2 * 8 * 768
    assert default_total == counts["total"] + 8 * 768


def test_xxl_lora_is_counted_quickly_from_published_shapes():
    start = time.perf_counter()
    counts = ours("xxl", targets=QV)
    seconds = time.perf_counter() - start
    d, f, heads, layers, vocab, inner = 4096, 10240, 64, 24, 32128, 64 * 64
    encoder_layer = 2 * d + 4 * d * inner + 3 * d * f  # 2 norms, q k v o, wi_0 wi_1 wo
    decoder_layer = 3 * d + 8 * d * inner + 3 * d * f  # + cross-attention and its norm
    base = (2 * vocab * d  # input embedding, untied head
            + layers * (encoder_layer + decoder_layer)
            + 2 * (32 * heads + d))  # per stack: relative position buckets, final norm
    lora = 8 * (d + inner) * (layers * 2 + layers * 4)
    assert base == 11_135_332_352  # the 11.1B of google/t5-v1_1-xxl
    assert (counts["base"], counts["trainable"], counts["total"]) == (base, lora, base + lora)
    assert (counts["total"], counts["trainable"]) == hf_counts(
        hf_t5("xxl"), peft.LoraConfig(r=8, target_modules=["q", "v"]))
    assert seconds < 120, f"counting XXL took {seconds:.0f} s; it should trace shapes only"


def test_per_task_tables_count_every_row_and_report_the_cost_of_one_task():
    shared = ours(targets=QV)
    per_task = ours(targets=QV, mode="per_task")
    rows = per_task["task_table_size"]
    assert rows >= per_task["num_tasks"] > 1  # one row per task id of the mixture
    assert per_task["per_task_trainable"] == shared["trainable"]
    assert per_task["trainable"] == rows * shared["trainable"]
    assert per_task["base"] == shared["base"] and per_task["shared_trainable"] == 0


def test_hf_path_reads_only_config_json(tmp_path):
    """A directory with only config.json (no weights) is counted; an original-T5 config (tied
    head, ReLU MLP) counts the shared embedding once, as `model.parameters()` does."""
    fields = dict(vocab_size=300, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                  num_decoder_layers=3, feed_forward_proj="relu", tie_word_embeddings=True)
    transformers.T5Config(**fields).save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == ["config.json"]
    config = importlib.import_module("configs.lora").get_config()
    config.model.hf_path = str(tmp_path)
    config.peft.targets = r".*(q|v|wi)"
    counts = count_parameters(config)
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**fields))
    expected = hf_counts(model, peft.LoraConfig(r=8, target_modules=["q", "v", "wi"]))
    assert (counts["total"], counts["trainable"]) == expected
    assert counts["model"] == str(tmp_path)


def test_shape_only_counts_equal_the_built_experiment(tmp_path):
    """`Experiment.parameter_counts` (real arrays, what `train` prints) and the abstract count
    share `summarize`: same numbers for the same config. The checkpoint is v1.1-style as
    transformers >= 5 saves it: config.json says tied, yet `lm_head.weight` is there (and
    `from_hf` loads it), which the count must see from the safetensors header."""
    base = T5(preset("tiny"), rngs=nnx.Rngs(0))  # v1.1 shapes: untied head
    to_hf(base, str(tmp_path))
    hf_config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "tie_word_embeddings": True}))
    config = importlib.import_module("configs.tiny").get_config()
    config.model.hf_path = str(tmp_path)
    config.peft.mode = "per_task"
    built = build(config).parameter_counts()
    counted = count_parameters(config)
    assert counted.pop("model") == str(tmp_path)
    assert counted == built
    assert built["trainable"] > 0 and built["per_task_trainable"] > 0
    assert counted["base"] == sum(x.size for x in jax.tree.leaves(nnx.state(base)))


def test_composition_counts_frozen_sources_from_their_config_json(tmp_path):
    """A source run is rebuilt from its config.json alone (no checkpoint here, none is read):
    its adapter counts as frozen adapter state, the new per-task adapters as trainable."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(
        to_json(importlib.import_module("configs.source_adapter").get_config("quick")))
    config = importlib.import_module("configs.stack").get_config("quick")
    config.peft.sources = (str(source),)
    counts = count_parameters(config)
    d_model, width, sites = 128, 128 // 16, 3 + 3  # mini base; Pfeiffer: post_ffn of 3 + 3 layers
    adapter = sites * (d_model * width + width * d_model)
    assert counts["frozen_adapter"] == adapter
    assert counts["trainable"] == counts["task_table_size"] * adapter
    assert counts["total"] == counts["base"] + adapter + counts["trainable"]
    assert os.listdir(source) == ["config.json"]
