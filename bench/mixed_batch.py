"""Mixed-task batches: 16 LoRA adapters in one batch vs one adapter, peftjax vs HF peft, on CPU.

Launch from the repository root with the project's virtual environment:

    PYTHONPATH=. python bench/mixed_batch.py [--steps 10] [--threads 2] [--json] [--quick]

What is measured (T5 v1.1 small shape, random weights, LoRA r=8 alpha=16 on q and v as in
bench/t5_lora_step.py; batch 16 rows x 128 input / 32 target tokens, one row per task):

  peftjax training steps (`make_train_step`, AdamW), all in one pinned process, timed round-robin:
    shared         one LoRA for every row (mode="shared": plain matmuls, no task ids read);
    single         16 per-task LoRAs (mode="per_task"), every row on task 0;
    mixed          the same 16 per-task LoRAs, row i on task i;
    packed_shared  one LoRA, rows packed with two segments each (per-token task ids);
    packed_mixed   16 per-task LoRAs, packed rows whose two segments are two different tasks.
  peftjax inference (teacher-forced forward, `make_eval_step`): shared vs mixed.
  HF peft inference, in its own pinned process: a PeftModel with 16 LoRA adapters (task0..15),
    `model(...)` with the active adapter for the whole batch vs `model(..., adapter_names=[16
    distinct names])` (peft's mixed-batch path, inference only), and adapter_names with one
    name 16 times.

The headline `mixed_vs_single_batch_ratio` is mixed / shared. With one task per row, a per-task
step gathers each row's A and B by its task id whatever the ids are, so `single` and `mixed`
run the same compiled program on the same shapes: their ratio (reported as
`mixed_vs_same_step_ratio`) is 1 up to noise by construction and cannot show what mixing costs.
The cheapest way to serve one adapter to the whole batch is a shared LoRA, so mixed / shared is
the price of 16 adapters in one batch. Packed rows take the other per-task path (the low-rank
code for every task, masked by a one-hot of the token's task), reported as
`packed_mixed_vs_shared_ratio`. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, when run as a script

import common  # noqa: E402
import t5_lora_step  # noqa: E402  (shapes, LoRA settings, the HF base model)

NUM_TASKS = 16
SOURCE_LEN, TARGET_LEN = 128, 32
TARGET_RATIO = 1.15  # mixed-task step over one-adapter step
TRAIN_VARIANTS = ("shared", "single", "mixed", "packed_shared", "packed_mixed")
INFER_VARIANTS = ("infer_shared", "infer_mixed")
HF_VARIANTS = ("single", "mixed", "same_name")


def use_quick_shapes() -> None:
    """Tiny model and sequences (`--quick`): checks the plumbing, the numbers mean nothing."""
    global SOURCE_LEN, TARGET_LEN
    t5_lora_step.use_quick_shapes()
    SOURCE_LEN, TARGET_LEN = 16, 8


def batch_tokens(rows: int) -> dict[str, Any]:
    """Random int32 tokens (>= 1: no padding) for `rows` rows, and target shifted right."""
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = t5_lora_step.SHAPE["vocab_size"]
    inputs = rng.integers(1, vocab, (rows, SOURCE_LEN), dtype=np.int32)
    targets = rng.integers(1, vocab, (rows, TARGET_LEN), dtype=np.int32)
    return {"encoder_input_tokens": inputs,
            "decoder_input_tokens": np.concatenate(
                [np.zeros((rows, 1), np.int32), targets[:, :-1]], axis=1),
            "decoder_target_tokens": targets,
            "decoder_loss_weights": np.ones((rows, TARGET_LEN), np.int32)}


def unpacked_batch(task_ids: Any) -> dict[str, Any]:
    """One example per row; row i on task `task_ids[i]`."""
    import numpy as np

    task_ids = np.asarray(task_ids, np.int32)
    batch = batch_tokens(len(task_ids))
    batch["encoder_task_ids"] = np.repeat(task_ids[:, None], SOURCE_LEN, axis=1)
    batch["decoder_task_ids"] = np.repeat(task_ids[:, None], TARGET_LEN, axis=1)
    return batch


def packed_batch(rows: int, num_tasks: int) -> dict[str, Any]:
    """Two segments per row (halves of source and target), row i's on tasks i and i + rows/2
    (mod `num_tasks`): every task appears, and no row is one task."""
    import numpy as np

    batch = batch_tokens(rows)
    first = np.arange(rows, dtype=np.int32) % num_tasks
    second = (first + max(rows // 2, 1)) % num_tasks
    for side, length in (("encoder", SOURCE_LEN), ("decoder", TARGET_LEN)):
        half = length // 2
        segments = np.where(np.arange(length) < half, 1, 2).astype(np.int32)
        batch[f"{side}_segment_ids"] = np.tile(segments, (rows, 1))
        batch[f"{side}_task_ids"] = np.where(np.arange(length)[None] < half, first[:, None],
                                             second[:, None]).astype(np.int32)
    return batch


# --------------------------------------------------------------------------------------------
# Workers: each runs in its own pinned subprocess and returns a JSON-able dict.


def worker_peftjax(steps: int, warmup: int, quiet_wait_s: float) -> dict[str, Any]:
    """Every peftjax variant (module docstring) in this process, timed round-robin."""
    import time

    import jax
    import numpy as np
    import optax
    from flax import nnx

    from peftjax.models import T5, preset
    from peftjax.peft import TRAINABLE, PeftConfig, apply_peft
    from peftjax.train.step import init_train_state, make_eval_step, make_train_step

    shape = t5_lora_step.SHAPE
    cfg = preset("small", **shape)

    def split(mode: str):
        model = T5(cfg, rngs=nnx.Rngs(0))
        apply_peft(model, PeftConfig(method="lora", mode=mode, rank=t5_lora_step.LORA_RANK,
                                     alpha=t5_lora_step.LORA_ALPHA,
                                     targets=r".*attention\.(q|v)"),
                   num_tasks=NUM_TASKS if mode == "per_task" else None, rngs=nnx.Rngs(1))
        return nnx.split(model, TRAINABLE, ...)

    graphdefs, trainables = {}, {}
    graphdefs["shared"], trainables["shared"], frozen = split("shared")
    graphdefs["per_task"], trainables["per_task"], frozen_per_task = split("per_task")
    # Same seed, same base: one frozen copy serves both (and halves the memory).
    if jax.tree.structure(frozen) != jax.tree.structure(frozen_per_task):
        raise RuntimeError("shared and per-task LoRA models split into different frozen trees")
    del frozen_per_task

    rows = NUM_TASKS
    batches = {"single": unpacked_batch(np.zeros(rows)),
               "mixed": unpacked_batch(np.arange(rows) % NUM_TASKS),
               "packed": packed_batch(rows, NUM_TASKS)}
    batches["shared"] = batches["single"]
    batches = {k: {f: jax.numpy.asarray(v) for f, v in b.items()} for k, b in batches.items()}
    optimizer = optax.adamw(t5_lora_step.LEARNING_RATE)
    rng = jax.random.key(0)

    steps_by_name, info = {}, {}
    for name in TRAIN_VARIANTS:
        packed = name.startswith("packed_")
        kind = "shared" if name.endswith("shared") else "per_task"
        batch = batches["packed" if packed else name]
        step_fn = make_train_step(graphdefs[kind], optimizer, packed=packed,
                                  num_task_ids=NUM_TASKS)
        state = init_train_state(jax.tree.map(jax.numpy.copy, trainables[kind]), optimizer)
        start = time.perf_counter()
        compiled = step_fn.lower(state, frozen, batch, rng).compile()
        info[name] = {"compile_s": time.perf_counter() - start,
                      "step_gflop": t5_lora_step._xla_gflop(compiled), "packed": packed,
                      "adapters": kind}
        steps_by_name[name] = _train_runner(compiled, state, frozen, batch, rng, info[name])
    for name in INFER_VARIANTS:
        kind = "shared" if name.endswith("shared") else "per_task"
        batch = batches[name.removeprefix("infer_")]
        compiled = make_eval_step(graphdefs[kind], packed=False, num_task_ids=NUM_TASKS).lower(
            trainables[kind], frozen, batch).compile()
        info[name] = {"step_gflop": t5_lora_step._xla_gflop(compiled), "adapters": kind}
        steps_by_name[name] = _eval_runner(compiled, trainables[kind], frozen, batch, info[name])

    for _ in range(warmup):
        for step in steps_by_name.values():
            step()
    timing = common.time_interleaved(steps_by_name, steps, quiet_wait_s=quiet_wait_s)
    variants = {name: {**info[name], **timing[name]} for name in steps_by_name}
    return {"variants": variants, "rows": rows, "num_tasks": NUM_TASKS,
            "trainable_params": {k: sum(x.size for x in jax.tree.leaves(v))
                                 for k, v in trainables.items()},
            "peak_rss_mb": common.peak_rss_mb()}


def _train_runner(compiled: Any, state: Any, frozen: Any, batch: Any, rng: Any,
                  record: dict[str, Any]):
    """A blocking step closure over a donated train state; the first step's loss -> `record`."""
    import jax

    holder = {"state": state}

    def step() -> None:
        holder["state"], metrics = compiled(holder["state"], frozen, batch, rng)
        jax.block_until_ready((holder["state"], metrics))
        if "loss_first" not in record:
            record["loss_first"] = float(metrics["loss_sum"]) / float(metrics["tokens"])

    return step


def _eval_runner(compiled: Any, trainable: Any, frozen: Any, batch: Any,
                 record: dict[str, Any]):
    import jax

    def step() -> None:
        metrics = jax.block_until_ready(compiled(trainable, frozen, batch))
        if "loss_first" not in record:
            record["loss_first"] = float(metrics["loss_sum"]) / float(metrics["tokens"])

    return step


def worker_hf(steps: int, warmup: int, quiet_wait_s: float, threads: int) -> dict[str, Any]:
    """HF peft inference with 16 LoRA adapters: active adapter vs `adapter_names` per row."""
    import peft
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lora = dict(r=t5_lora_step.LORA_RANK, lora_alpha=t5_lora_step.LORA_ALPHA,
                target_modules=["q", "v"], lora_dropout=0.0)
    names = [f"task{i}" for i in range(NUM_TASKS)]
    model = peft.get_peft_model(t5_lora_step.hf_base_model(), peft.LoraConfig(**lora),
                                adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(**lora))
    model.eval()  # peft accepts adapter_names at inference only
    features = {k: torch.from_numpy(v).long()
                for k, v in unpacked_batch(list(range(NUM_TASKS))).items()}
    inputs = dict(input_ids=features["encoder_input_tokens"],
                  attention_mask=torch.ones_like(features["encoder_input_tokens"]),
                  decoder_input_ids=features["decoder_input_tokens"])
    calls = {"single": {}, "mixed": {"adapter_names": names},
             "same_name": {"adapter_names": [names[0]] * NUM_TASKS}}

    def runner(extra: dict[str, Any]):
        def step() -> None:
            with torch.inference_mode():
                model(**inputs, **extra)
        return step

    steps_by_name = {name: runner(extra) for name, extra in calls.items()}
    for _ in range(warmup):
        for step in steps_by_name.values():
            step()
    timing = common.time_interleaved(steps_by_name, steps, quiet_wait_s=quiet_wait_s)
    return {"variants": timing, "adapters": len(model.peft_config),
            "peak_rss_mb": common.peak_rss_mb()}


def run_worker_in_process(args: argparse.Namespace) -> dict[str, Any]:
    if args.worker == "peftjax":
        return worker_peftjax(args.steps, args.warmup, args.quiet_wait)
    if args.worker == "hf":
        return worker_hf(args.steps, args.warmup, args.quiet_wait, args.threads)
    raise SystemExit(f"unknown worker {args.worker!r}")


# --------------------------------------------------------------------------------------------
# Orchestration.


def run(*, steps: int, warmup: int, threads: int, quiet_wait: float, timeout: float,
        quick: bool = False) -> dict[str, Any]:
    """Both workers, each in its own subprocess pinned to the first `threads` CPUs; summary."""
    if quick:
        use_quick_shapes()
    cpus = common.first_cpus(threads)
    results = {}
    for name in ("peftjax", "hf"):
        print(f"[mixed] {name} on CPUs {cpus} ...", file=sys.stderr, flush=True)
        payload = common.run_worker(
            [str(Path(__file__).resolve()), "--worker", name, "--steps", str(steps),
             "--warmup", str(warmup), "--threads", str(threads), "--quiet-wait", str(quiet_wait),
             *(["--quick"] if quick else [])], cpus, common.worker_env(threads), timeout)
        results[name] = json.loads(payload)
    return summarize(results, steps=steps, threads=threads, quick=quick)


def summarize(r: dict[str, Any], *, steps: int, threads: int, quick: bool) -> dict[str, Any]:
    """Ratios of median step times (see the module docstring for which is the headline)."""
    pj, hf = r["peftjax"]["variants"], r["hf"]["variants"]

    def ratio(v: dict[str, Any], a: str, b: str) -> float:
        return v[a]["step_s"] / v[b]["step_s"]

    contended = sorted({f"peftjax.{k}" for k, v in pj.items() if v["contended_steps"]}
                       | {f"hf.{k}" for k, v in hf.items() if v["contended_steps"]})
    headline = ratio(pj, "mixed", "shared")
    return {
        "mixed_vs_single_batch_ratio": headline,
        "target": TARGET_RATIO, "target_met": headline <= TARGET_RATIO,
        "mixed_vs_same_step_ratio": ratio(pj, "mixed", "single"),
        "packed_mixed_vs_shared_ratio": ratio(pj, "packed_mixed", "packed_shared"),
        "peftjax_infer_mixed_vs_shared_ratio": ratio(pj, "infer_mixed", "infer_shared"),
        "hf_peft_infer_mixed_vs_single_ratio": ratio(hf, "mixed", "single"),
        "hf_peft_infer_same_name_vs_single_ratio": ratio(hf, "same_name", "single"),
        "hf_vs_peftjax_infer_mixed_speedup": hf["mixed"]["step_s"] / pj["infer_mixed"]["step_s"],
        "mixed_vs_shared_flop_ratio": pj["mixed"]["step_gflop"] / pj["shared"]["step_gflop"],
        "packed_mixed_vs_shared_flop_ratio": (pj["packed_mixed"]["step_gflop"]
                                              / pj["packed_shared"]["step_gflop"]),
        "step_s": {k: v["step_s"] for k, v in pj.items()},
        "hf_peft_infer_step_s": {k: v["step_s"] for k, v in hf.items()},
        "rows": r["peftjax"]["rows"], "num_tasks": r["peftjax"]["num_tasks"],
        "source_len": SOURCE_LEN, "target_len": TARGET_LEN, "steps": steps, "threads": threads,
        "quick": quick, "contended": contended,
        "peak_rss_mb": {"peftjax": r["peftjax"]["peak_rss_mb"], "hf": r["hf"]["peak_rss_mb"]},
        "workers": r,
    }


def print_summary(s: dict[str, Any]) -> None:
    if s["quick"]:
        print("\n--quick: tiny shapes, the numbers below only check the plumbing")
    print(f"\nMixed-task batches: {s['rows']} rows x {s['source_len']} / {s['target_len']} "
          f"tokens, {s['num_tasks']} LoRA adapters, {s['threads']} threads, median of "
          f"{s['steps']} steps (round-robin)")
    pj = s["workers"]["peftjax"]["variants"]
    for name, v in pj.items():
        print(f"  peftjax {name:14} {v['step_s']:.3f} s  {v['step_gflop']:.1f} GFLOP  "
              f"loss {v['loss_first']:.4f}")
    for name, v in s["workers"]["hf"]["variants"].items():
        print(f"  HF peft infer {name:8} {v['step_s']:.3f} s")
    verdict = "met" if s["target_met"] else "NOT met"
    print(f"mixed / shared train step: {s['mixed_vs_single_batch_ratio']:.3f} "
          f"(target <= {TARGET_RATIO}: {verdict}); mixed / single (same program): "
          f"{s['mixed_vs_same_step_ratio']:.3f}; packed mixed / packed shared: "
          f"{s['packed_mixed_vs_shared_ratio']:.3f}")
    print(f"inference mixed / one adapter: peftjax {s['peftjax_infer_mixed_vs_shared_ratio']:.3f},"
          f" HF peft adapter_names {s['hf_peft_infer_mixed_vs_single_ratio']:.3f} (one name x "
          f"{s['rows']}: {s['hf_peft_infer_same_name_vs_single_ratio']:.3f})")
    if s["contended"]:
        print(f"WARNING: other processes used the CPUs during: {', '.join(s['contended'])}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    common.add_step_timing_args(parser, per="variant")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.check_step_timing_args(parser, args)
    if args.worker:
        if args.quick:
            use_quick_shapes()
        print(common.RESULT_PREFIX + json.dumps(run_worker_in_process(args)), flush=True)
        return
    summary = run(steps=args.steps, warmup=args.warmup, threads=args.threads,
                  quiet_wait=args.quiet_wait, timeout=args.timeout, quick=args.quick)
    print_summary(summary)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
