"""LoRA training-step speed: peftjax vs Hugging Face peft on the T5 v1.1 small shape, on CPU.

Launch from the repository root with the project's virtual environment:

    . .venv/bin/activate
    PYTHONPATH=. python bench/t5_lora_step.py [--steps 10] [--threads 2] [--json]

What is measured (random weights, no downloads; batch 8 x 128 input / 32 target tokens):
  * peftjax LoRA: `peftjax.train.step.make_train_step` over the LoRA factors (r=8, alpha=16, on q
    and v of every self- and cross-attention), AdamW, the frozen base an undifferentiated argument;
  * HF peft LoRA: `peft.get_peft_model(T5ForConditionalGeneration(...), LoraConfig(r=8,
    lora_alpha=16, target_modules=["q", "v"]))`, torch AdamW, `loss.backward()`, `step()`,
    `zero_grad()`;
  * full fine-tuning of both (peftjax: the same step with every `nnx.Param` trainable);
  * both LoRA steps again in bf16: peftjax with `dtype=param_dtype="bfloat16"` (bf16 compute and
    frozen base, fp32 LoRA masters and AdamW state), HF peft under
    `torch.autocast("cpu", dtype=torch.bfloat16)` (what transformers' Trainer runs with
    `bf16=True`), beside both frameworks' bf16 matmul rate (`--no-bf16` skips them);
  * XLA's FLOP count of the peftjax steps and this machine's fp32 2048^3 matmul rate in JAX (and
    torch), hence the FLOP floor of a step.

Every framework runs in its own subprocess pinned to the first `--threads` CPUs
(`sched_setaffinity`, i.e. what `taskset` does); torch additionally gets `set_num_threads`. The
affinity mask is what bounds XLA:CPU's thread pools: `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1` was checked to leave a jitted matmul using 2 cores with jax 0.10.
Each worker compiles / warms up first, waits (up to `--quiet-wait` s) for other processes to leave
the CPUs idle, then times `--steps` steps and reports the median. Other processes' CPU use is
recorded during every timed step; on a contended run the 3x target is left undecided, since a
busy core slows torch's OpenMP threads far more than XLA's. Tokens/s = batch x (128 + 32) /
median step time. Peak memory is `ru_maxrss` of each worker. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, when run as a script

import common  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BATCH, SOURCE_LEN, TARGET_LEN = 8, 128, 32
TOKENS_PER_STEP = BATCH * (SOURCE_LEN + TARGET_LEN)
LORA_RANK, LORA_ALPHA = 8, 16
LEARNING_RATE = 1e-4
MATMUL_N = 2048
TARGET_SPEEDUP = 3.0  # peftjax LoRA tokens/s over HF peft's
# T5 v1.1 small (google/t5-v1_1-small); the peftjax worker checks preset("small") against it.
SHAPE = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_heads=6,
             num_encoder_layers=8, num_decoder_layers=8)
# `--quick`: a tiny model, batch and matmul that check the plumbing in seconds (numbers mean
# nothing); `use_quick_shapes` switches this module's constants to them.
QUICK = False
QUICK_SHAPE = dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_heads=4,
                   num_encoder_layers=1, num_decoder_layers=1)


def use_quick_shapes() -> None:
    """Switch the shapes of this process to `QUICK_SHAPE`, batch 2 x 16 / 8, 128^3 matmuls."""
    global QUICK, SHAPE, BATCH, SOURCE_LEN, TARGET_LEN, TOKENS_PER_STEP, MATMUL_N
    QUICK, SHAPE, BATCH, SOURCE_LEN, TARGET_LEN, MATMUL_N = True, QUICK_SHAPE, 2, 16, 8, 128
    TOKENS_PER_STEP = BATCH * (SOURCE_LEN + TARGET_LEN)


def synthetic_batch() -> dict[str, Any]:
    """Identical int32 numpy features for both frameworks; no padding (token ids >= 1)."""
    import numpy as np

    rng = np.random.default_rng(0)
    inputs = rng.integers(1, SHAPE["vocab_size"], (BATCH, SOURCE_LEN), dtype=np.int32)
    targets = rng.integers(1, SHAPE["vocab_size"], (BATCH, TARGET_LEN), dtype=np.int32)
    decoder_inputs = np.concatenate([np.zeros((BATCH, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones((BATCH, TARGET_LEN), np.int32),
        "encoder_task_ids": np.zeros((BATCH, SOURCE_LEN), np.int32),
        "decoder_task_ids": np.zeros((BATCH, TARGET_LEN), np.int32),
    }


# --------------------------------------------------------------------------------------------
# Workers: each runs in its own pinned subprocess and returns a JSON-able dict.


def _xla_gflop(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / 1e9


def worker_jax_matmul(steps: int, warmup: int, quiet_wait_s: float,
                      bf16: bool = False) -> dict[str, Any]:
    """fp32, or bf16 operands accumulated in fp32 (the product peftjax's bf16 layers run)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if bf16 else jnp.float32
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (MATMUL_N, MATMUL_N), dtype)
    b = jax.random.normal(key_b, (MATMUL_N, MATMUL_N), dtype)
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    for _ in range(warmup):
        matmul(a, b).block_until_ready()
    timing = common.time_steps(lambda: matmul(a, b).block_until_ready(), steps,
                              quiet_wait_s=quiet_wait_s)
    return _matmul_summary(timing)


def worker_torch_matmul(steps: int, warmup: int, quiet_wait_s: float, threads: int,
                        bf16: bool = False) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(MATMUL_N, MATMUL_N, generator=gen).to(dtype)
    b = torch.randn(MATMUL_N, MATMUL_N, generator=gen).to(dtype)
    for _ in range(warmup):
        a @ b
    timing = common.time_steps(lambda: a @ b, steps, quiet_wait_s=quiet_wait_s)
    return _matmul_summary(timing)


def _matmul_summary(timing: dict[str, Any]) -> dict[str, Any]:
    flop = 2 * MATMUL_N ** 3
    return {**timing, "gflops_median": flop / timing["step_s"] / 1e9,
            "gflops_best": flop / timing["step_min_s"] / 1e9, "peak_rss_mb": common.peak_rss_mb()}


def worker_peftjax(method: str, steps: int, warmup: int, quiet_wait_s: float,
                   bf16: bool = False) -> dict[str, Any]:
    """`method`: "lora" (LoRA factors trainable) or "full" (every nnx.Param trainable); `bf16`:
    bf16 compute and frozen base (the trainables stay fp32)."""
    import time

    import jax
    import optax
    from flax import nnx

    from peftjax.models import T5, preset
    from peftjax.peft import TRAINABLE, PeftConfig, apply_peft
    from peftjax.train.step import init_train_state, make_eval_step, make_train_step

    rss_after_import = common.rss_mb()
    cfg = preset("small", **SHAPE) if QUICK else preset("small")
    if bf16:
        cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    mismatch = {k: (getattr(cfg, k), v) for k, v in SHAPE.items() if getattr(cfg, k) != v}
    if mismatch or cfg.feed_forward_proj != "gated-gelu" or cfg.tie_word_embeddings:
        raise RuntimeError(f"preset('small') is not the T5 v1.1 small shape: {mismatch}")
    model = T5(cfg, rngs=nnx.Rngs(0))
    if method == "lora":
        apply_peft(model, PeftConfig(method="lora", mode="shared", rank=LORA_RANK,
                                     alpha=LORA_ALPHA, targets=r".*attention\.(q|v)"),
                   num_tasks=None, rngs=nnx.Rngs(1))
        trainable_filter = TRAINABLE
    else:
        trainable_filter = nnx.Param
    graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
    trainable_params = sum(x.size for x in jax.tree.leaves(trainable))
    frozen_params = sum(x.size for x in jax.tree.leaves(frozen))

    optimizer = optax.adamw(LEARNING_RATE)
    batch = {k: jax.numpy.asarray(v) for k, v in synthetic_batch().items()}
    rng = jax.random.key(0)
    train_step = make_train_step(graphdef, optimizer, packed=False, num_task_ids=1)
    eval_step = make_eval_step(graphdef, packed=False, num_task_ids=1)
    forward_gflop = _xla_gflop(eval_step.lower(trainable, frozen, batch).compile())
    state = init_train_state(trainable, optimizer)

    start = time.perf_counter()
    compiled = train_step.lower(state, frozen, batch, rng).compile()
    compile_s = time.perf_counter() - start
    step_gflop = _xla_gflop(compiled)

    holder: dict[str, Any] = {"state": state}
    losses: list[float] = []

    def step() -> None:
        holder["state"], metrics = compiled(holder["state"], frozen, batch, rng)
        jax.block_until_ready((holder["state"], metrics))
        holder["metrics"] = metrics

    def loss() -> float:
        m = holder["metrics"]
        return float(m["loss_sum"]) / float(m["tokens"])

    for _ in range(warmup):
        step()
        losses.append(loss())
    timing = common.time_steps(step, steps, quiet_wait_s=quiet_wait_s)
    losses.append(loss())
    return {**timing, "compile_s": compile_s, "step_gflop": step_gflop,
            "forward_gflop": forward_gflop, "trainable_params": trainable_params,
            "frozen_params": frozen_params, "loss_first": losses[0], "loss_last": losses[-1],
            "rss_after_import_mb": rss_after_import, "peak_rss_mb": common.peak_rss_mb()}


def hf_base_model() -> Any:
    """`transformers.T5ForConditionalGeneration` of `SHAPE` (random weights, untied head)."""
    import torch
    import transformers

    config = transformers.T5Config(
        vocab_size=SHAPE["vocab_size"], d_model=SHAPE["d_model"], d_kv=SHAPE["d_kv"],
        d_ff=SHAPE["d_ff"], num_heads=SHAPE["num_heads"], num_layers=SHAPE["num_encoder_layers"],
        num_decoder_layers=SHAPE["num_decoder_layers"], feed_forward_proj="gated-gelu",
        dropout_rate=0.0, tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config)
    # transformers 5 always ties T5's lm_head to the input embedding (T5Config forces
    # tie_word_embeddings=True; False only turns off decoder-output scaling). T5 v1.1 has an
    # untied head, as peftjax's preset does: give lm_head its own weight.
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    return model


def worker_hf(method: str, steps: int, warmup: int, quiet_wait_s: float, threads: int,
              bf16: bool = False) -> dict[str, Any]:
    """`method`: "lora" (HF peft LoRA) or "full" (plain model, every parameter trained); `bf16`:
    the forward under `torch.autocast` to bf16 (fp32 weights, as transformers' Trainer runs)."""
    import contextlib

    import peft
    import torch
    import transformers  # noqa: F401  (loaded before `rss_after_import`, as before)
    from torch.utils.flop_counter import FlopCounterMode

    rss_after_import = common.rss_mb()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = hf_base_model()
    base_params = sum(p.numel() for p in model.parameters())
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=["q", "v"], lora_dropout=0.0))
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        raise RuntimeError("lm_head is tied again to the input embedding")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in params)
    frozen_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)

    features = {k: torch.from_numpy(v).long() for k, v in synthetic_batch().items()}
    inputs = dict(input_ids=features["encoder_input_tokens"],
                  attention_mask=torch.ones_like(features["encoder_input_tokens"]),
                  decoder_input_ids=features["decoder_input_tokens"],
                  labels=features["decoder_target_tokens"])
    losses: list[float] = []

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    for _ in range(warmup):
        step()
    timing = common.time_steps(step, steps, quiet_wait_s=quiet_wait_s)
    with FlopCounterMode(display=False) as flop_counter:  # after timing: it slows the step
        step()
    return {**timing, "step_gflop": flop_counter.get_total_flops() / 1e9,
            "trainable_params": trainable_params, "frozen_params": frozen_params,
            "base_params": base_params, "loss_first": losses[0], "loss_last": losses[-1],
            "rss_after_import_mb": rss_after_import, "peak_rss_mb": common.peak_rss_mb()}


def run_worker_in_process(args: argparse.Namespace) -> dict[str, Any]:
    name, steps, warmup, quiet = args.worker, args.steps, args.warmup, args.quiet_wait
    bf16 = name.endswith("_bf16")
    name = name.removesuffix("_bf16")
    if name == "jax_matmul":
        return worker_jax_matmul(max(steps, 10), warmup, quiet, bf16)
    if name == "torch_matmul":
        return worker_torch_matmul(max(steps, 10), warmup, quiet, args.threads, bf16)
    if name.startswith("peftjax_"):
        return worker_peftjax(name.removeprefix("peftjax_"), steps, warmup, quiet, bf16)
    if name.startswith("hf_"):
        return worker_hf(name.removeprefix("hf_"), steps, warmup, quiet, args.threads, bf16)
    raise SystemExit(f"unknown worker {name!r}")


# --------------------------------------------------------------------------------------------
# Orchestration.


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    cpus = common.first_cpus(args.threads)
    env = common.worker_env(args.threads)
    names = ["jax_matmul", "torch_matmul", "peftjax_lora", "hf_lora"]
    if not args.no_full_ft:
        names += ["peftjax_full", "hf_full"]
    if not args.no_bf16:
        names += ["jax_matmul_bf16", "torch_matmul_bf16", "peftjax_lora_bf16", "hf_lora_bf16"]
    results: dict[str, Any] = {}
    for name in names:
        print(f"[bench] {name} on CPUs {cpus} ...", file=sys.stderr, flush=True)
        payload = common.run_worker(
            [str(Path(__file__).resolve()), "--worker", name, "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--threads", str(args.threads),
             "--quiet-wait", str(args.quiet_wait), *(["--quick"] if QUICK else [])],
            cpus, env, timeout_s=args.timeout)
        results[name] = json.loads(payload)
        r = results[name]
        print(f"[bench] {name}: median {r['step_s']:.3f} s (min {r['step_min_s']:.3f}), "
              f"cpu util {r['cpu_util']:.2f}, others {r['others_cores']:.2f} cores",
              file=sys.stderr, flush=True)
    return summarize(results, args, cpus)


def summarize(r: dict[str, Any], args: argparse.Namespace, cpus: list[int]) -> dict[str, Any]:
    pj, hf, mm = r["peftjax_lora"], r["hf_lora"], r["jax_matmul"]
    contended = [name for name, w in r.items() if w["contended_steps"]]
    out: dict[str, Any] = {
        "machine": common.machine(), "threads": args.threads, "cpus": cpus, "steps": args.steps,
        "batch": BATCH, "source_len": SOURCE_LEN, "target_len": TARGET_LEN,
        "tokens_per_step": TOKENS_PER_STEP, "quick": QUICK,
        "peftjax_step_s": pj["step_s"], "peftjax_step_min_s": pj["step_min_s"],
        "peftjax_tokens_per_s": TOKENS_PER_STEP / pj["step_s"],
        "hf_peft_step_s": hf["step_s"], "hf_peft_step_min_s": hf["step_min_s"],
        "hf_peft_tokens_per_s": TOKENS_PER_STEP / hf["step_s"],
        "speedup": hf["step_s"] / pj["step_s"],
        "target_speedup": TARGET_SPEEDUP,
        # Only meaningful on a quiet machine: torch's OpenMP threads degrade far more than
        # XLA's when another process takes a core, which inflates the ratio.
        "target_met": None if contended else hf["step_s"] / pj["step_s"] >= TARGET_SPEEDUP,
        "contended_workers": contended,
        "peftjax_compile_s": pj["compile_s"],
        "peftjax_step_gflop": pj["step_gflop"], "peftjax_forward_gflop": pj["forward_gflop"],
        "peftjax_step_over_forward_flops": pj["step_gflop"] / pj["forward_gflop"],
        "matmul_gflops": mm["gflops_best"], "matmul_gflops_median": mm["gflops_median"],
        "torch_matmul_gflops": r["torch_matmul"]["gflops_best"],
        "achieved_gflops": pj["step_gflop"] / pj["step_s"],
        "hf_peft_step_gflop": hf["step_gflop"],
        "hf_peft_achieved_gflops": hf["step_gflop"] / hf["step_s"],
        "floor_step_s": pj["step_gflop"] / mm["gflops_best"],
        "peftjax_trainable_params": pj["trainable_params"],
        "hf_peft_trainable_params": hf["trainable_params"],
        "peftjax_base_params": pj["frozen_params"], "hf_base_params": hf["base_params"],
        "peftjax_peak_rss_mb": pj["peak_rss_mb"], "hf_peft_peak_rss_mb": hf["peak_rss_mb"],
    }
    if "peftjax_full" in r:
        pf, hff = r["peftjax_full"], r["hf_full"]
        out.update({
            "peftjax_full_ft_step_s": pf["step_s"], "hf_full_ft_step_s": hff["step_s"],
            "peftjax_full_ft_tokens_per_s": TOKENS_PER_STEP / pf["step_s"],
            "hf_full_ft_tokens_per_s": TOKENS_PER_STEP / hff["step_s"],
            "full_ft_speedup": hff["step_s"] / pf["step_s"],
            "peftjax_full_ft_step_gflop": pf["step_gflop"],
            "peftjax_full_ft_achieved_gflops": pf["step_gflop"] / pf["step_s"],
            "peftjax_full_ft_peak_rss_mb": pf["peak_rss_mb"],
            "hf_full_ft_peak_rss_mb": hff["peak_rss_mb"],
        })
    if "peftjax_lora_bf16" in r:
        pj16, hf16 = r["peftjax_lora_bf16"], r["hf_lora_bf16"]
        mm16 = r["jax_matmul_bf16"]
        out.update({
            "bf16_peftjax_step_s": pj16["step_s"], "bf16_hf_peft_step_s": hf16["step_s"],
            "bf16_peftjax_tokens_per_s": TOKENS_PER_STEP / pj16["step_s"],
            "bf16_hf_peft_tokens_per_s": TOKENS_PER_STEP / hf16["step_s"],
            "bf16_speedup": hf16["step_s"] / pj16["step_s"],
            # peftjax in bf16 against HF peft as most users run it (fp32).
            "bf16_vs_hf_fp32_speedup": hf["step_s"] / pj16["step_s"],
            "bf16_over_fp32_peftjax": pj16["step_s"] / pj["step_s"],
            "bf16_matmul_gflops": mm16["gflops_best"],
            "bf16_torch_matmul_gflops": r["torch_matmul_bf16"]["gflops_best"],
            "bf16_peftjax_achieved_gflops": pj16["step_gflop"] / pj16["step_s"],
            "bf16_hf_peft_achieved_gflops": hf16["step_gflop"] / hf16["step_s"],
            "bf16_floor_step_s": pj16["step_gflop"] / mm16["gflops_best"],
            "bf16_peftjax_loss": [pj16["loss_first"], pj16["loss_last"]],
            "bf16_hf_peft_loss": [hf16["loss_first"], hf16["loss_last"]],
            "bf16_peftjax_peak_rss_mb": pj16["peak_rss_mb"],
            "bf16_hf_peft_peak_rss_mb": hf16["peak_rss_mb"],
        })
    out["workers"] = r
    return out


def print_table(s: dict[str, Any]) -> None:
    m = s["machine"]
    if s.get("quick"):
        print("\n--quick: tiny shapes, the numbers below only check the plumbing")
    print(f"\nT5 v1.1 small, batch {s['batch']} x {s['source_len']} in / {s['target_len']} out "
          f"({s['tokens_per_step']} tokens/step), {s['threads']} threads on CPUs {s['cpus']}; "
          f"{m['nproc']} x {m['cpu_model']}")
    print(f"{'':28} {'peftjax':>12} {'HF peft':>12} {'ratio':>8}")

    def row(label: str, a: float, b: float, ratio: float | None, fmt: str = ".3f") -> None:
        ratio_s = f"{ratio:.2f}x" if ratio is not None else ""
        print(f"{label:28} {a:>12{fmt}} {b:>12{fmt}} {ratio_s:>8}")

    row("LoRA step, median (s)", s["peftjax_step_s"], s["hf_peft_step_s"], s["speedup"])
    row("LoRA step, min (s)", s["peftjax_step_min_s"], s["hf_peft_step_min_s"],
        s["hf_peft_step_min_s"] / s["peftjax_step_min_s"])
    row("LoRA tokens/s", s["peftjax_tokens_per_s"], s["hf_peft_tokens_per_s"], s["speedup"],
        ".0f")
    row("LoRA peak RSS (MiB)", s["peftjax_peak_rss_mb"], s["hf_peft_peak_rss_mb"], None, ".0f")
    if "peftjax_full_ft_step_s" in s:
        row("full FT step, median (s)", s["peftjax_full_ft_step_s"], s["hf_full_ft_step_s"],
            s["full_ft_speedup"])
        row("full FT tokens/s", s["peftjax_full_ft_tokens_per_s"], s["hf_full_ft_tokens_per_s"],
            s["full_ft_speedup"], ".0f")
        row("full FT peak RSS (MiB)", s["peftjax_full_ft_peak_rss_mb"],
            s["hf_full_ft_peak_rss_mb"], None, ".0f")
    print(f"LoRA step FLOPs: peftjax {s['peftjax_step_gflop']:.1f} GFLOP (XLA cost analysis, "
          f"{s['peftjax_step_over_forward_flops']:.2f} x its forward), HF "
          f"{s['hf_peft_step_gflop']:.1f} GFLOP (torch FlopCounterMode, matmuls only)")
    print(f"fp32 {MATMUL_N}^3 matmul, best of {len(s['workers']['jax_matmul']['steps_s'])}: "
          f"JAX {s['matmul_gflops']:.0f} GFLOP/s, torch {s['torch_matmul_gflops']:.0f} GFLOP/s "
          f"-> floor {s['floor_step_s']:.3f} s per peftjax LoRA step")
    print(f"achieved: peftjax {s['achieved_gflops']:.0f} GFLOP/s "
          f"({s['achieved_gflops'] / s['matmul_gflops']:.0%} of the JAX matmul rate), HF peft "
          f"{s['hf_peft_achieved_gflops']:.0f} GFLOP/s "
          f"({s['hf_peft_achieved_gflops'] / s['torch_matmul_gflops']:.0%} of torch's)")
    if "peftjax_full_ft_step_gflop" in s:
        print(f"full FT step: peftjax {s['peftjax_full_ft_step_gflop']:.1f} GFLOP, achieved "
              f"{s['peftjax_full_ft_achieved_gflops']:.0f} GFLOP/s")
    if "bf16_speedup" in s:
        row("bf16 LoRA step, median (s)", s["bf16_peftjax_step_s"], s["bf16_hf_peft_step_s"],
            s["bf16_speedup"])
        row("bf16 LoRA peak RSS (MiB)", s["bf16_peftjax_peak_rss_mb"],
            s["bf16_hf_peft_peak_rss_mb"], None, ".0f")
        print(f"bf16 {MATMUL_N}^3 matmul (fp32 accumulation): JAX {s['bf16_matmul_gflops']:.0f} "
              f"GFLOP/s, torch {s['bf16_torch_matmul_gflops']:.0f} GFLOP/s -> floor "
              f"{s['bf16_floor_step_s']:.3f} s; achieved: peftjax "
              f"{s['bf16_peftjax_achieved_gflops']:.0f}, HF peft "
              f"{s['bf16_hf_peft_achieved_gflops']:.0f} GFLOP/s")
        print(f"peftjax bf16 vs HF peft fp32: {s['bf16_vs_hf_fp32_speedup']:.2f}x; peftjax bf16 "
              f"step / fp32 step: {s['bf16_over_fp32_peftjax']:.2f}")
    verdict = {True: "met", False: "NOT met", None: "undecided (contended run)"}[s["target_met"]]
    print(f"target peftjax >= {TARGET_SPEEDUP:.0f}x HF peft tokens/s: {verdict} "
          f"({s['speedup']:.2f}x; at the floor it would be "
          f"{s['hf_peft_step_s'] / s['floor_step_s']:.2f}x)")
    for name, w in s["workers"].items():
        flag = "  <- CONTENDED" if w["contended_steps"] else ""
        print(f"  {name:14} cpu util {w['cpu_util']:.2f}, other processes "
              f"{w['others_cores']:.2f} cores, contended steps {w['contended_steps']}{flag}")
    if s["contended_workers"]:
        print("WARNING: other processes used the CPUs during timing; rerun on a quiet machine.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    common.add_step_timing_args(parser, per="framework")
    parser.add_argument("--no-full-ft", action="store_true", help="skip full fine-tuning runs")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.check_step_timing_args(parser, args)
    if args.quick:
        use_quick_shapes()

    if args.worker:
        result = run_worker_in_process(args)
        print(common.RESULT_PREFIX + json.dumps(result), flush=True)
        return
    summary = run_all(args)
    print_table(summary)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
