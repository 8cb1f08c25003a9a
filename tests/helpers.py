"""What several test files share: running the CLI as users do, and random HF T5 checkpoints."""

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
