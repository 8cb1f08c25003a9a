"""Prompt tuning on the synthetic suite: learned vectors prepended to the encoder's input.

    peftjax train --config configs/prompt_tuning.py --workdir runs/prompt_tuning
    peftjax train --config configs/prompt_tuning.py:per_task --workdir runs/prompt_tuning_per_task
    peftjax train --config configs/prompt_tuning.py:quick --workdir /tmp/prompt_tuning   # smoke run

Lester et al. (2021), as HF peft's PROMPT_TUNING for seq2seq: 16 vectors before the encoder's
input embeddings (positions 0..15, always visible), initialised from the embeddings of sampled
vocabulary tokens; everything else stays frozen. A prompt belongs to one example, so rows are not
packed (`config.data.pack=False`, as in the suite). `per_task` gives each task its own prompt,
picked by task id inside mixed-task batches.
"""

from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "prompt_tuning"
    config.peft.num_virtual_tokens = 16
    config.peft.prompt_init = "vocab"
    config.data.pack = False  # required: one prompt per example
    # A few thousand parameters steer a frozen model: prompts need a larger step than adapters
    # (HF peft's prompt-tuning examples use 3e-2 with AdamW; Lester et al. 0.3 with Adafactor).
    config.optim.learning_rate = 3e-2
    return config
