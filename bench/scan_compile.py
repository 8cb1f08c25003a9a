"""Compile time of a LoRA training step at 6 and 24 layers, layers scanned vs unrolled, on CPU.

Launch from the repository root with the project's virtual environment:

    PYTHONPATH=. python bench/scan_compile.py [--repeats 1] [--threads 2] [--steps 0] [--json]
        [--quick]

The T5 v1.1 small shape of bench/t5_lora_step.py with 6 and with 24 encoder and decoder layers
(`preset("small", num_encoder_layers=L, num_decoder_layers=L, scan_layers=...)`), LoRA r=8 on q
and v, AdamW, batch 8 x 128 / 32: the time to trace and lower `make_train_step` (`lower_s`) and
for XLA to compile it (`compile_s`). Scanned points use the stacked layout a scanned run trains
in (`peftjax.models.stacking`). The model is built abstractly (`nnx.eval_shape`): no weights are
materialised, and nothing runs unless `--steps N` asks for the median time of N steps on
zero-filled state (`step_s`: scanned vs unrolled). Every (layers, scan) point runs in a fresh
subprocess pinned to the first `--threads` CPUs (no compilation cache, in memory or on disk,
carries over); with `--repeats N` each point runs N times, interleaved, and the minimum is kept.

The headline `scan_compile_ratio_24_vs_6` is total (lower + compile) time at 24 layers over 6
with `scan_layers=True`: with the layers scanned the program holds one layer body, so the ratio
should stay near 1; unrolled, the program grows with the depth (reported for contrast).
Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, when run as a script

import common  # noqa: E402
import t5_lora_step  # noqa: E402  (shapes, batch, LoRA settings)

LAYERS = (6, 24)
QUICK_LAYERS = (1, 4)  # `--quick`: tiny shapes, same 4x depth ratio
TARGET_RATIO = 1.5  # compile time at 24 layers over 6, layers scanned


def worker(layers: int, scan: bool, steps: int = 0) -> dict[str, Any]:
    """Lower and compile one train step; `available: False` when this checkout's T5Config has
    no `scan_layers` (then nothing is compiled). With `steps > 0` also run the compiled step
    that many times on zero-filled state (the time of a step does not depend on the values)
    and report the median (`step_s`)."""
    import time

    import jax
    import numpy as np
    import optax
    from flax import nnx

    from peftjax.models import T5, preset
    from peftjax.peft import TRAINABLE, PeftConfig, apply_peft
    from peftjax.train.step import init_train_state, make_train_step

    overrides = dict(t5_lora_step.SHAPE, num_encoder_layers=layers, num_decoder_layers=layers)
    if scan:
        overrides["scan_layers"] = True
    try:
        cfg = preset("small", **overrides)
    except TypeError as e:  # dataclasses.replace: no such field
        return {"available": False, "error": f"{type(e).__name__}: {e}"}

    def build() -> T5:
        model = T5(cfg, rngs=nnx.Rngs(0))
        apply_peft(model, PeftConfig(method="lora", mode="shared", rank=t5_lora_step.LORA_RANK,
                                     alpha=t5_lora_step.LORA_ALPHA,
                                     targets=r".*attention\.(q|v)"),
                   num_tasks=None, rngs=nnx.Rngs(1))
        return model

    graphdef, trainable, frozen = nnx.split(nnx.eval_shape(build), TRAINABLE, ...)
    if scan:  # the layout a scanned run trains in (peftjax.models.stacking), when available
        try:
            from peftjax.models import stacking
        except ImportError:
            pass
        else:
            stacks = stacking.scanned_stacks(cfg)
            trainable, frozen = jax.eval_shape(lambda *s: stacking.stack_layers(s, stacks),
                                               trainable, frozen)
    optimizer = optax.adamw(t5_lora_step.LEARNING_RATE)
    state = jax.eval_shape(lambda t: init_train_state(t, optimizer), trainable)
    features = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                for k, v in t5_lora_step.synthetic_batch().items()}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    step = make_train_step(graphdef, optimizer, packed=False, num_task_ids=1)

    clock = common.CpuClock()
    clock.start()
    start = time.perf_counter()
    lowered = step.lower(state, frozen, features, rng)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    window = clock.stop()
    step_s = None
    if steps:
        concrete = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype),
                                (state, frozen, features))
        state_, frozen_, batch = concrete
        batch = {k: v + 1 for k, v in batch.items()}  # tokens and loss weights, not padding
        key = jax.random.key(0)
        times = []
        for _ in range(steps + 1):  # the first run is warm-up
            begin = time.perf_counter()
            state_, metrics = compiled(state_, frozen_, batch, key)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - begin)
        step_s = float(np.median(times[1:]))
    return {"available": True, "layers": layers, "scan": scan, "step_s": step_s,
            "lower_s": lowered_at - start, "compile_s": compiled_at - lowered_at,
            "total_s": compiled_at - start, "step_gflop": t5_lora_step._xla_gflop(compiled),
            "hlo_chars": len(lowered.as_text()), "cpu_util": window.own_cpu_s / window.wall_s,
            "others_cores": window.others_cores, "contended": window.contended,
            "peak_rss_mb": common.peak_rss_mb()}


# --------------------------------------------------------------------------------------------
# Orchestration.


def run(*, threads: int, timeout: float, repeats: int = 1, quick: bool = False,
        unrolled: bool = True, steps: int = 0) -> dict[str, Any]:
    """Every (layers, scan) point in its own pinned subprocess, `repeats` times; summary.
    `steps > 0` also times that many steps at each point (`step_s`)."""
    if quick:
        t5_lora_step.use_quick_shapes()
    layer_counts = QUICK_LAYERS if quick else LAYERS
    cpus = common.first_cpus(threads)
    env = dict(common.worker_env(threads), JAX_ENABLE_COMPILATION_CACHE="false")
    points = [(layers, scan) for scan in ((True, False) if unrolled else (True,))
              for layers in layer_counts]
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(repeats):
        for layers, scan in points:
            key = _key(layers, scan)
            if runs.get(key) and not runs[key][0]["available"]:
                continue  # no scan_layers in this checkout: asking again changes nothing
            print(f"[scan] {key} on CPUs {cpus} ...", file=sys.stderr, flush=True)
            payload = common.run_worker(
                [str(Path(__file__).resolve()), "--worker", str(layers),
                 *(["--scan"] if scan else []), *(["--quick"] if quick else []),
                 "--steps", str(steps)],
                cpus, env, timeout)
            runs.setdefault(key, []).append(json.loads(payload))
    return summarize(runs, layer_counts, threads=threads, quick=quick)


def _key(layers: int, scan: bool) -> str:
    return f"{'scan' if scan else 'unrolled'}_{layers}"


def summarize(runs: dict[str, list[dict[str, Any]]], layer_counts: tuple[int, int], *,
              threads: int, quick: bool) -> dict[str, Any]:
    """Best (minimum) times per point and the 24-over-6 ratios; the headline is None, with a
    note, when `scan_layers` is not available."""
    shallow, deep = layer_counts
    best = {key: min(rs, key=lambda r: r["total_s"]) for key, rs in runs.items()
            if rs[0]["available"]}

    def ratio(kind: str, field: str = "total_s") -> float | None:
        a, b = best.get(_key(deep, kind == "scan")), best.get(_key(shallow, kind == "scan"))
        return a[field] / b[field] if a and b else None

    headline = ratio("scan")
    step_s = {k: min(r["step_s"] for r in runs[k]) for k, v in best.items()
              if v.get("step_s") is not None}
    note = None
    if headline is None:
        errors = [rs[0].get("error") for rs in runs.values() if not rs[0]["available"]]
        note = ("scan_layers is not available in this checkout (T5Config has no such field: "
                f"{errors[0] if errors else 'not run'}); only the unrolled points were compiled.")
    return {
        "scan_compile_ratio_24_vs_6": headline,
        "target": TARGET_RATIO,
        "target_met": None if headline is None else headline <= TARGET_RATIO,
        "scan_compile_only_ratio": ratio("scan", "compile_s"),
        "unrolled_compile_ratio_24_vs_6": ratio("unrolled"),
        "unrolled_compile_only_ratio": ratio("unrolled", "compile_s"),
        "layers": list(layer_counts), "note": note,
        "total_s": {k: v["total_s"] for k, v in best.items()},
        "lower_s": {k: v["lower_s"] for k, v in best.items()},
        "compile_s": {k: v["compile_s"] for k, v in best.items()},
        "step_s": step_s,
        # Step time scanned over unrolled, per depth (the stacked layout's runtime cost).
        "scan_step_over_unrolled": {
            n: step_s[_key(n, True)] / step_s[_key(n, False)] for n in layer_counts
            if _key(n, True) in step_s and _key(n, False) in step_s},
        "peak_rss_mb": max((v["peak_rss_mb"] for v in best.values()), default=None),
        "contended": [k for k, v in best.items() if v["contended"]],
        "threads": threads, "quick": quick, "runs": runs,
    }


def print_summary(s: dict[str, Any]) -> None:
    if s["quick"]:
        print("\n--quick: tiny shapes, the numbers below only check the plumbing")
    shallow, deep = s["layers"]
    print(f"\nLoRA train step compile time, {shallow} vs {deep} encoder + decoder layers "
          f"(lower + XLA compile, best of {max(len(r) for r in s['runs'].values())})")
    for key in s["total_s"]:
        print(f"  {key:12} lower {s['lower_s'][key]:7.2f} s  compile {s['compile_s'][key]:7.2f} s"
              f"  total {s['total_s'][key]:7.2f} s")
    for key, seconds in s.get("step_s", {}).items():
        print(f"  {key:12} step {seconds:7.3f} s (median)")
    if s["note"]:
        print(f"NOTE: {s['note']}")
    for kind in ("scan", "unrolled"):
        value = s["scan_compile_ratio_24_vs_6" if kind == "scan" else
                  "unrolled_compile_ratio_24_vs_6"]
        if value is not None:
            print(f"{kind}: {deep} / {shallow} layers total compile time {value:.2f}x")
    if s["target_met"] is not None:
        print(f"target scanned ratio <= {TARGET_RATIO}: "
              f"{'met' if s['target_met'] else 'NOT met'}")
    if s["contended"]:
        print(f"WARNING: other processes used the CPUs while compiling: "
              f"{', '.join(s['contended'])}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per point (min is kept)")
    parser.add_argument("--threads", type=int, default=2, help="CPUs (threads) per worker")
    parser.add_argument("--no-unrolled", action="store_true", help="skip the unrolled points")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-worker timeout (s)")
    parser.add_argument("--json", action="store_true", help="print a JSON object as last line")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, to check the plumbing (the numbers mean nothing)")
    parser.add_argument("--steps", type=int, default=0,
                        help="also time this many train steps per point (median; 0: none)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # its value: layers
    parser.add_argument("--scan", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.worker is not None:
        if args.quick:
            t5_lora_step.use_quick_shapes()
        print(common.RESULT_PREFIX + json.dumps(worker(args.worker, args.scan, args.steps)),
              flush=True)
        return
    summary = run(threads=args.threads, timeout=args.timeout, repeats=args.repeats,
                  quick=args.quick, unrolled=not args.no_unrolled, steps=args.steps)
    print_summary(summary)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
