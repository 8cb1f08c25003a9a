"""The hypernetwork configs: the paper's parameter count, and a description-conditioned run's
zero-shot evaluation of held-out tasks (`peftjax eval`'s "heldout" section)."""

import json
import math
import os

import jax
from flax import nnx

from peftjax.hyper import ConditionData
from peftjax.models import T5, T5Config, preset
from peftjax.peft import TRAINABLE, PeftConfig, apply_peft

# transformers' t5-base (222,903,552 parameters), the base HyperFormer reported on.
T5_BASE_ORIGINAL = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12,
                            num_encoder_layers=12, num_decoder_layers=12,
                            feed_forward_proj="relu", tie_word_embeddings=True,
                            scale_decoder_outputs=True)
# configs/hyperformer_glue.py's settings (rabeehk/hyperformer configs/hyperformer++.json).
HYPERFORMER_PP = PeftConfig(method="hyperformer_pp", reduction_factor=32,
                            adapter_activation="gelu_new", hyper_embed_dim=64, hyper_hidden=128,
                            hyper_proj_dim=64, hyper_norm=True, hyper_train_norms=True)


def abstract_counts(model_config: T5Config, peft: PeftConfig, num_tasks: int) -> tuple[int, int]:
    """(trainable, base) parameters, from shapes only."""
    def build():
        model = T5(model_config, rngs=nnx.Rngs(0))
        apply_peft(model, peft, num_tasks=num_tasks, rngs=nnx.Rngs(1),
                   conditioning=ConditionData(num_tasks))
        return model

    model = nnx.eval_shape(build)

    def size(state):
        return sum(math.prod(x.shape) for x in jax.tree.leaves(state))

    trainable = size(nnx.state(model, TRAINABLE))
    return trainable, size(nnx.state(model, nnx.Param)) - trainable


def hyperformer_pp_formula(d: int, m: int, layers: int, tasks: int, norms: int) -> int:
    """Task table + per stack (encoder, decoder): layer / position embeddings, projector
    (3 x 64 -> 128 -> 64) and its layer norm, and a head (64 -> n, + bias) per generated array
    (D, b_D, U, b_U, LN scale, LN bias) + the base's layer norms (HyperFormer trains them)."""
    e, hidden, proj = 64, 128, 64
    heads = (proj + 1) * (d * m + m + m * d + d + d + d)
    projector = 3 * e * hidden + hidden + hidden * proj + proj + 2 * proj
    per_stack = layers * e + 2 * e + projector + heads
    return tasks * e + 2 * per_stack + norms


def test_hyperformer_pp_reproduces_the_papers_parameters_per_task():
    """Paper (T5-base, GLUE, 8 tasks): "0.29% parameters per task"."""
    trainable, base = abstract_counts(T5_BASE_ORIGINAL, HYPERFORMER_PP, num_tasks=8)
    assert base == 222_903_552
    norms = 62 * 768  # 2 per encoder layer, 3 per decoder layer, 2 final
    assert trainable == hyperformer_pp_formula(768, 24, 12, 8, norms) == 5_211_056
    assert round(100 * trainable / 8 / base, 2) == 0.29
    # On T5 v1.1 base (untied head, gated FFN: larger) the same hypernetwork is 0.26% per task.
    trainable_v11, base_v11 = abstract_counts(preset("base"), HYPERFORMER_PP, num_tasks=8)
    assert (trainable_v11, base_v11) == (5_211_056, 247_577_856)
    assert round(100 * trainable_v11 / 8 / base_v11, 2) == 0.26


def test_text_to_lora_quick_run_reports_heldout_tasks(tmp_path):
    """Training + `peftjax eval`'s evaluation of the description-conditioned config, trained on
    one of its tasks (every evaluated task costs a pipeline, in each of the 5 evaluations):
    metrics.json has the held-out tasks (new descriptions) in a "heldout" section, beside the
    trained ones, and the eval table prints them apart."""
    from configs import text_to_lora
    from peftjax.train import evaluate_run, train
    from peftjax.train.evaluate import format_table

    workdir = str(tmp_path / "t2l")
    config = text_to_lora.get_config("quick")
    assert config.data.mixture == "synthetic_suite"
    config.data.mixture = "synthetic_reverse_shift"
    config.train.steps = 4
    config.train.progress = False
    train(config, workdir)
    results = evaluate_run(config, workdir)
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics == json.loads(json.dumps(results))
    heldout = {"synthetic_reverse_shift_double", "synthetic_reverse_upper_double"}
    assert set(metrics["heldout"]) == set(metrics["heldout_base"]) == heldout
    assert set(metrics["adapted"]) == set(metrics["base"]) == {"synthetic_reverse_shift"}
    for scores in metrics["heldout"].values():
        assert set(scores) == {"exact_match", "token_accuracy"}
        assert 0.0 <= scores["token_accuracy"] <= 1.0
    table = format_table({"adapted": results["heldout"], "base": results["heldout_base"]})
    assert "synthetic_reverse_upper_double" in table
