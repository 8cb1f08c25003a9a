"""Sparse fine-tuning (LT-SFT): train only the 1% of each projection's entries that a first pass
of full fine-tuning moved most, starting again from the frozen base (θ = θ0 + φ, φ sparse).

Two commands: the first pass (full fine-tuning), then the sparse run, whose mask comes from it
(`config.peft.sparse_mask_from`, default runs/full):

    peftjax train --config configs/full.py --workdir runs/full
    peftjax train --config configs/sparse.py --workdir runs/sparse

Smoke run (the `:quick` variant reads its first pass from /tmp/full):

    peftjax train --config configs/full.py:quick --workdir /tmp/full
    peftjax train --config configs/sparse.py:quick --workdir /tmp/sparse

Sparse runs of different tasks from the same base compose by addition:
`peftjax.peft.sparse.add_sparse_diffs` / `apply_sparse_diffs`.
"""

from configs.suite import suite_config, switches


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "sparse"
    config.peft.sparse_density = 0.01
    config.peft.sparse_mask_from = "/tmp/full" if "quick" in switches(arg) else "runs/full"
    return config
