"""T5 v1.1 base LoRA training on one GPU in bf16: utilisation, and HF peft side by side.

Run on a machine with a CUDA GPU, from the repository root (jax with CUDA, flax, optax; torch,
transformers and peft for the HF side):

    PYTHONPATH=. python bench/gpu_t5_base.py --batch 32 --steps 20 [--json] [--skip-hf]

What is measured (random weights, no downloads; batch B x 512 input / 128 target tokens, no
padding; the T5 v1.1 base shape: d_model 768, 12+12 layers, 12 heads, d_ff 2048, vocab 32128):
  * this GPU's bf16 matmul rate (8192^3 in JAX, median of 20): the practical ceiling;
  * peftjax LoRA (r=8, alpha 16, q and v of every attention) trained with
    `peftjax.train.step.make_train_step`, bf16 compute (`T5Config.dtype`), the frozen base stored
    in bf16 or fp32 (`--base-dtype`), LoRA factors and AdamW state in fp32 (master weights);
    XLA's FLOP count of the lowered step (before compilation: the compiled program's cuBLAS
    calls are not counted) over its median time = achieved FLOP/s, and that over
    the matmul rate = utilisation; peak device memory (`memory_stats`);
  * peftjax full fine-tuning (every parameter trained, fp32 masters, bf16 compute), for the
    frozen-base ratio;
  * HF peft on the same shape and batch: `peft.get_peft_model(T5ForConditionalGeneration)`, fp32
    weights under `torch.autocast(bfloat16)` (mixed precision as transformers' Trainer runs it
    with `bf16=True`), AdamW; median step time and `max_memory_allocated`.
Each framework runs in its own subprocess (one GPU, one process at a time). Results:
bench/RESULTS.md ("GPU").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

SOURCE_LEN, TARGET_LEN = 512, 128
VOCAB = 32128
MATMUL_N = 8192


def _median_time(fn, steps: int) -> tuple[float, float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def _batch(batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    inputs = rng.integers(1, VOCAB, (batch, SOURCE_LEN), dtype=np.int32)
    targets = rng.integers(1, VOCAB, (batch, TARGET_LEN), dtype=np.int32)
    decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs,
            "decoder_target_tokens": targets,
            "decoder_loss_weights": np.ones((batch, TARGET_LEN), np.int32),
            "encoder_task_ids": np.zeros((batch, SOURCE_LEN), np.int32),
            "decoder_task_ids": np.zeros((batch, TARGET_LEN), np.int32)}


def worker_matmul(steps: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (MATMUL_N, MATMUL_N), jnp.bfloat16)
    b = jax.random.normal(kb, (MATMUL_N, MATMUL_N), jnp.bfloat16)
    matmul = jax.jit(jnp.matmul)
    for _ in range(3):
        matmul(a, b).block_until_ready()
    median, best = _median_time(lambda: matmul(a, b).block_until_ready(), steps)
    flop = 2 * MATMUL_N ** 3
    return {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "tflops_median": flop / median / 1e12, "tflops_best": flop / best / 1e12}


def worker_peftjax(method: str, batch: int, steps: int, base_dtype: str, remat: str,
                   scan: bool) -> dict[str, Any]:
    import jax
    import optax
    from flax import nnx

    from peftjax.models import T5, preset
    from peftjax.peft import TRAINABLE, PeftConfig, apply_peft
    from peftjax.train.step import init_train_state, make_train_step

    overrides: dict[str, Any] = dict(dtype="bfloat16", param_dtype=base_dtype)
    if remat != "none":
        overrides["remat"] = remat
    if scan:
        overrides["scan_layers"] = True
    model = T5(preset("base", **overrides), rngs=nnx.Rngs(0))
    if method == "lora":
        apply_peft(model, PeftConfig(method="lora", mode="shared", rank=8, alpha=16,
                                     targets=r".*attention\.(q|v)"),
                   num_tasks=None, rngs=nnx.Rngs(1))
        graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    else:  # full fine-tuning: fp32 masters for every weight
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
        trainable = jax.tree.map(lambda x: x.astype("float32"), trainable)
    optimizer = optax.adamw(1e-4)
    data = {k: jax.numpy.asarray(v) for k, v in _batch(batch).items()}
    state = init_train_state(trainable, optimizer)
    if scan:  # the layout a scanned run trains in (peftjax.models.stacking)
        from peftjax.models import stacking

        stacks = stacking.scanned_stacks(model.config)
        state, frozen = stacking.stack_placed((state, frozen), stacks)
    step_fn = make_train_step(graphdef, optimizer, packed=False, num_task_ids=1)
    start = time.perf_counter()
    lowered = step_fn.lower(state, frozen, data, jax.random.key(0))
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    # FLOPs of the program before compilation: the compiled GPU program's matmuls are cuBLAS
    # custom calls, which its cost analysis does not count.
    cost = lowered.cost_analysis() or compiled.cost_analysis()  # None on some GPU backends
    cost = cost[0] if isinstance(cost, list) else cost
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], frozen, data, jax.random.key(0))
        holder["loss"] = metrics["loss_sum"] / metrics["tokens"]
        jax.block_until_ready(holder["state"])

    for _ in range(3):
        step()
    median, best = _median_time(step, steps)
    stats = jax.devices()[0].memory_stats() or {}
    tokens = batch * (SOURCE_LEN + TARGET_LEN)
    return {"method": method, "base_dtype": base_dtype, "remat": remat, "scan": scan,
            "step_s": median, "step_min_s": best, "tokens_per_s": tokens / median,
            "compile_s": compile_s, "step_tflop": cost["flops"] / 1e12,
            "tflops": cost["flops"] / median / 1e12, "loss": float(holder["loss"]),
            "trainable_params": sum(x.size for x in jax.tree.leaves(trainable)),
            "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30}


def worker_hf(batch: int, steps: int) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_layers=12,
        num_decoder_layers=12, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())  # untied
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16,
                                                       target_modules=["q", "v"],
                                                       lora_dropout=0.0)).cuda()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    f = {k: torch.from_numpy(v).long().cuda() for k, v in _batch(batch).items()}
    inputs = dict(input_ids=f["encoder_input_tokens"],
                  attention_mask=torch.ones_like(f["encoder_input_tokens"]),
                  decoder_input_ids=f["decoder_input_tokens"], labels=f["decoder_target_tokens"])
    holder = {}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        holder["loss"] = loss

    for _ in range(3):
        step()
    torch.cuda.reset_peak_memory_stats()
    median, best = _median_time(step, steps)
    tokens = batch * (SOURCE_LEN + TARGET_LEN)
    return {"step_s": median, "step_min_s": best, "tokens_per_s": tokens / median,
            "loss": float(holder["loss"]), "torch": torch.__version__,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def _in_subprocess(argv: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True,
                         text=True, check=False)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print one JSON line at the end")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-fp32-base", action="store_true")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        name, *rest = args.worker
        if name == "matmul":
            result = worker_matmul(args.steps)
        elif name == "hf":
            result = worker_hf(args.batch, args.steps)
        else:
            method, base_dtype, remat, scan = rest
            result = worker_peftjax(method, args.batch, args.steps, base_dtype, remat,
                                    scan == "scan")
        print(json.dumps(result))
        return
    common = ["--batch", str(args.batch), "--steps", str(args.steps)]
    results: dict[str, Any] = {"batch": args.batch, "source_len": SOURCE_LEN,
                               "target_len": TARGET_LEN}
    runs = {"matmul": ["matmul"],
            "peftjax_lora_bf16base": ["peftjax", "lora", "bfloat16", "none", "unrolled"],
            "peftjax_lora_fp32base": ["peftjax", "lora", "float32", "none", "unrolled"],
            "peftjax_full": ["peftjax", "full", "float32", "none", "unrolled"]}
    if args.skip_fp32_base:
        del runs["peftjax_lora_fp32base"]
    if not args.skip_hf:
        runs["hf_peft_lora"] = ["hf"]
    for key, argv in runs.items():
        results[key] = _in_subprocess([*argv, *common])
        print(key, json.dumps(results[key]), flush=True)
    rate = results["matmul"].get("tflops_median")
    for key in ("peftjax_lora_bf16base", "peftjax_lora_fp32base", "peftjax_full"):
        run = results.get(key, {})
        if rate and "tflops" in run:
            run["utilisation_vs_matmul"] = run["tflops"] / rate
    hf, ours = results.get("hf_peft_lora", {}), results["peftjax_lora_bf16base"]
    if "step_s" in hf and "step_s" in ours:
        results["lora_vs_peft_speedup_gpu"] = hf["step_s"] / ours["step_s"]
    if "step_s" in results["peftjax_full"] and "step_s" in ours:
        results["peft_vs_full_step_ratio_gpu"] = ours["step_s"] / results["peftjax_full"]["step_s"]
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
