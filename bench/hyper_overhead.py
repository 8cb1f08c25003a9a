"""How much of a HyperFormer++ training step goes into generating the adapters, on CPU.

Launch from the repository root with the project's virtual environment:

    PYTHONPATH=. python bench/hyper_overhead.py [--steps 10] [--threads 2] [--json] [--quick]

Setup: the T5 v1.1 small shape of bench/t5_lora_step.py (random weights), HyperFormer++
(`peft.method="hyperformer_pp"`) as configs/hyperformer_glue.py sets it up (reduction 32,
gelu_new, 64-d task / layer / position embeddings, projector 128 -> 64, conditional layer norms,
the base's layer norms trained), 8 tasks, batch 8 x 128 / 32 tokens with row i on task i, AdamW.
The model's `HyperNetwork` generates every site's weights for every task once per call
(`hyper_generate="per_task"`), and the sites gather each row's.

Three programs, each compiled once and timed round-robin in one pinned process:
  full       the train step (`make_train_step`): generation, forward, backward, AdamW on the
             hypernetwork (and on the base's layer norms);
  constant   the same step on a model whose hypernetwork is replaced by the weights it generated
             at init, held as parameters: the adapters still get their gradients (the step
             reports their norm) but the optimizer leaves them alone (`optax.set_to_zero`), as
             the full step never updates generated weights; the layer norms still get AdamW.
             What is gone is exactly generation, its backward and the hypernetwork's update;
  generate   the generation alone: `HyperNetwork.per_task()` forward and its VJP into the
             hypernetwork's parameters, jitted.

The headline `hyper_overhead_fraction` is the share by difference, (full - constant) / full,
taken per round (the two steps run back to back, so a change in background load cancels) and
the median over rounds: at least `MIN_ROUNDS`. Also reported: generate / full (generation as
its own program: no fusion with the step, so an upper estimate), the plain difference of
medians, and the FLOP shares from XLA's cost analysis (generate / full, (full - constant) /
full). The first training loss of `full` and `constant` must agree: it shows the constant model
applies the same adapters.
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
import t5_lora_step  # noqa: E402  (shapes, batch, optimizer settings)

NUM_TASKS = 8
TARGET_FRACTION = 0.05  # share of the step spent generating adapters
# The headline is a difference of two ~1 s steps: enough rounds that its median is steady.
MIN_ROUNDS = 20
# configs/hyperformer_glue.py's HyperFormer++ (the paper's setup).
HYPER = dict(method="hyperformer_pp", reduction_factor=32, adapter_activation="gelu_new",
             hyper_condition="task", hyper_embed_dim=64, hyper_hidden=128, hyper_proj_dim=64,
             hyper_norm=True, hyper_train_norms=True)


def batch(rows: int) -> dict[str, Any]:
    """t5_lora_step's synthetic batch with row i on task i mod NUM_TASKS."""
    import numpy as np

    features = t5_lora_step.synthetic_batch()
    task_b = (np.arange(rows) % NUM_TASKS).astype(np.int32)
    features["encoder_task_ids"] = np.repeat(task_b[:, None], t5_lora_step.SOURCE_LEN, axis=1)
    features["decoder_task_ids"] = np.repeat(task_b[:, None], t5_lora_step.TARGET_LEN, axis=1)
    return features


def fixed_generation(weights: dict[str, dict[str, Any]], num_rows: int) -> Any:
    """A stand-in for the model's `HyperNetwork`: fills the contexts with `weights` (`{site:
    {name: [rows, ...]}}`, held as trainable `HyperParam`s) instead of generating them."""
    import jax.numpy as jnp
    from flax import nnx

    from peftjax.peft.variables import HyperParam

    class FixedGeneration(nnx.Module):
        def __init__(self):
            self.keys = tuple((path, name) for path, group in weights.items() for name in group)
            self.values = nnx.List([HyperParam(jnp.asarray(weights[path][name]))
                                    for path, name in self.keys])
            self.num_rows = num_rows

        def rows(self, task_ids):
            # As `Conditioner.row_ids`: an id outside the table reads row `num_rows` (NaN).
            valid = (task_ids >= 0) & (task_ids < self.num_rows)
            return jnp.where(valid, task_ids, self.num_rows).astype(jnp.int32)

        def __call__(self, enc_ctx, dec_ctx):
            generated: dict[str, dict[str, Any]] = {}
            for (path, name), value in zip(self.keys, self.values, strict=True):
                generated.setdefault(path, {})[name] = value.value
            return (enc_ctx.replace(generated=generated, generated_ids=self.rows(enc_ctx.task_ids)),
                    dec_ctx.replace(generated=generated, generated_ids=self.rows(dec_ctx.task_ids)))

    return FixedGeneration()


# --------------------------------------------------------------------------------------------
# The worker: runs in a pinned subprocess and returns a JSON-able dict.


def worker(steps: int, warmup: int, quiet_wait_s: float) -> dict[str, Any]:
    import time

    import jax
    import optax
    from flax import nnx

    from peftjax.hyper import ConditionData
    from peftjax.models import T5, preset
    from peftjax.peft import TRAINABLE, PeftConfig, apply_peft
    from peftjax.train.step import init_train_state, make_train_step

    cfg = preset("small", **t5_lora_step.SHAPE)
    hyper = dict(HYPER, reduction_factor=8) if t5_lora_step.QUICK else HYPER
    model = T5(cfg, rngs=nnx.Rngs(0))
    apply_peft(model, PeftConfig(**hyper), num_tasks=NUM_TASKS, rngs=nnx.Rngs(1),
               conditioning=ConditionData(num_tasks=NUM_TASKS))
    features = {k: jax.numpy.asarray(v) for k, v in batch(t5_lora_step.BATCH).items()}
    optimizer = optax.adamw(t5_lora_step.LEARNING_RATE)
    rng = jax.random.key(0)

    graphdefs, trainables = {}, {}
    graphdefs["full"], trainables["full"], frozen = nnx.split(model, TRAINABLE, ...)
    hyper_graphdef, hyper_state = nnx.split(model.hypernet)
    weights = model.hypernet.per_task()
    model.hypernet = fixed_generation(weights, NUM_TASKS)
    graphdefs["constant"], trainables["constant"], frozen_constant = nnx.split(
        model, TRAINABLE, ...)
    if jax.tree.structure(frozen) != jax.tree.structure(frozen_constant):
        raise RuntimeError("the constant-weights model's frozen part differs from the full one")

    optimizers = {"full": optimizer, "constant": optax.multi_transform(
        {"train": optimizer, "keep": optax.set_to_zero()}, _generated_stay)}
    if "keep" not in jax.tree.leaves(_generated_stay(trainables["constant"])):
        raise RuntimeError("no generated weight found under `hypernet` in the constant model")
    steps_by_name, info = {}, {}
    for name in ("full", "constant"):
        # A copy: the step donates its state, and these arrays are the model's own.
        state = init_train_state(jax.tree.map(jax.numpy.copy, trainables[name]),
                                 optimizers[name])
        start = time.perf_counter()
        compiled = make_train_step(graphdefs[name], optimizers[name], packed=False,
                                   num_task_ids=NUM_TASKS).lower(
            state, frozen, features, rng).compile()
        info[name] = {"compile_s": time.perf_counter() - start,
                      "step_gflop": t5_lora_step._xla_gflop(compiled),
                      "trainable_params": sum(x.size for x in jax.tree.leaves(trainables[name]))}
        steps_by_name[name] = _train_runner(compiled, state, frozen, features, rng, info[name])

    def generate(state):
        return nnx.merge(hyper_graphdef, state).per_task()

    def generate_and_back(state, cotangent):
        out, vjp = jax.vjp(generate, state)
        return out, vjp(cotangent)[0]

    cotangent = jax.tree.map(jax.numpy.ones_like, weights)
    compiled_gen = jax.jit(generate_and_back).lower(hyper_state, cotangent).compile()
    info["generate"] = {
        "step_gflop": t5_lora_step._xla_gflop(compiled_gen),
        "hyper_params": sum(x.size for x in jax.tree.leaves(hyper_state)),
        "generated_params": sum(x.size for x in jax.tree.leaves(weights))}
    steps_by_name["generate"] = lambda: jax.block_until_ready(
        compiled_gen(hyper_state, cotangent))

    for _ in range(warmup):
        for step in steps_by_name.values():
            step()
    rounds = steps if t5_lora_step.QUICK else max(steps, MIN_ROUNDS)
    timing = common.time_interleaved(steps_by_name, rounds, quiet_wait_s=quiet_wait_s)
    return {"rounds": rounds,
            "programs": {name: {**info[name], **timing[name]} for name in steps_by_name},
            "num_tasks": NUM_TASKS, "sites": len(weights), "peak_rss_mb": common.peak_rss_mb()}


def _generated_stay(tree: Any) -> Any:
    """Optimizer labels of the constant model's trainable state: "keep" for the generated
    weights (under `hypernet`), "train" for the rest (the layer norms)."""
    import jax

    def label(path, _):
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return "keep" if "hypernet" in names else "train"

    return jax.tree_util.tree_map_with_path(label, tree)


def _train_runner(compiled: Any, state: Any, frozen: Any, features: Any, rng: Any,
                  record: dict[str, Any]):
    """A blocking step closure over a donated train state; the first step's loss -> `record`."""
    import jax

    holder = {"state": state}

    def step() -> None:
        holder["state"], metrics = compiled(holder["state"], frozen, features, rng)
        jax.block_until_ready((holder["state"], metrics))
        if "loss_first" not in record:
            record["loss_first"] = float(metrics["loss_sum"]) / float(metrics["tokens"])

    return step


# --------------------------------------------------------------------------------------------
# Orchestration.


def run(*, steps: int, warmup: int, threads: int, quiet_wait: float, timeout: float,
        quick: bool = False) -> dict[str, Any]:
    """The worker in a subprocess pinned to the first `threads` CPUs; summary."""
    if quick:
        t5_lora_step.use_quick_shapes()
    cpus = common.first_cpus(threads)
    print(f"[hyper] worker on CPUs {cpus} ...", file=sys.stderr, flush=True)
    payload = common.run_worker(
        [str(Path(__file__).resolve()), "--worker", "--steps", str(steps), "--warmup",
         str(warmup), "--quiet-wait", str(quiet_wait), *(["--quick"] if quick else [])],
        cpus, common.worker_env(threads), timeout)
    return summarize(json.loads(payload), steps=steps, threads=threads, quick=quick)


def paired_share(full_s: list[float], constant_s: list[float]) -> float:
    """Median over rounds of (full - constant) / full, each round's two steps side by side."""
    import statistics

    return statistics.median((f - c) / f for f, c in zip(full_s, constant_s, strict=True))


def summarize(r: dict[str, Any], *, steps: int, threads: int, quick: bool) -> dict[str, Any]:
    """Time and FLOP shares of generation (see the module docstring)."""
    p = r["programs"]
    full, const, gen = p["full"], p["constant"], p["generate"]
    share = paired_share(full["steps_s"], const["steps_s"])
    return {
        "hyper_overhead_fraction": share,
        "target": TARGET_FRACTION, "target_met": share <= TARGET_FRACTION,
        "time_share_isolated": gen["step_s"] / full["step_s"],
        "time_share_of_medians": (full["step_s"] - const["step_s"]) / full["step_s"],
        "flop_share": gen["step_gflop"] / full["step_gflop"],
        "flop_share_by_difference": (full["step_gflop"] - const["step_gflop"])
        / full["step_gflop"],
        "step_s": {k: v["step_s"] for k, v in p.items()},
        "step_gflop": {k: v["step_gflop"] for k, v in p.items()},
        "loss_first": {k: p[k]["loss_first"] for k in ("full", "constant")},
        "hyper_params": gen["hyper_params"], "generated_params": gen["generated_params"],
        "num_tasks": r["num_tasks"], "sites": r["sites"], "batch": t5_lora_step.BATCH,
        "source_len": t5_lora_step.SOURCE_LEN, "target_len": t5_lora_step.TARGET_LEN,
        "steps": r.get("rounds", steps), "threads": threads, "quick": quick,
        "contended": [k for k, v in p.items() if v["contended_steps"]],
        "peak_rss_mb": r["peak_rss_mb"], "worker": r,
    }


def print_summary(s: dict[str, Any]) -> None:
    if s["quick"]:
        print("\n--quick: tiny shapes, the numbers below only check the plumbing")
    print(f"\nHyperFormer++ generation overhead: batch {s['batch']} x {s['source_len']} / "
          f"{s['target_len']}, {s['num_tasks']} tasks, {s['sites']} adapted sites, "
          f"{s['hyper_params']:,} hypernetwork parameters generating {s['generated_params']:,} "
          f"adapter weights per call; median of {s['steps']} steps (round-robin)")
    for name, t in s["step_s"].items():
        print(f"  {name:9} {t:.4f} s  {s['step_gflop'][name]:.2f} GFLOP")
    verdict = "met" if s["target_met"] else "NOT met"
    print(f"generation's share of the step: {s['hyper_overhead_fraction']:.2%} by paired "
          f"difference (target <= {TARGET_FRACTION:.0%}: {verdict}); difference of medians "
          f"{s['time_share_of_medians']:.2%}; generation alone / step "
          f"{s['time_share_isolated']:.2%}; FLOPs {s['flop_share']:.2%} (by difference "
          f"{s['flop_share_by_difference']:.2%})")
    print(f"first loss: full {s['loss_first']['full']:.5f}, constant weights "
          f"{s['loss_first']['constant']:.5f}")
    if s["contended"]:
        print(f"WARNING: other processes used the CPUs during: {', '.join(s['contended'])}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    common.add_step_timing_args(parser, per="program")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.check_step_timing_args(parser, args)
    if args.worker:
        if args.quick:
            t5_lora_step.use_quick_shapes()
        result = worker(args.steps, args.warmup, args.quiet_wait)
        print(common.RESULT_PREFIX + json.dumps(result), flush=True)
        return
    summary = run(steps=args.steps, warmup=args.warmup, threads=args.threads,
                  quiet_wait=args.quiet_wait, timeout=args.timeout, quick=args.quick)
    print_summary(summary)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
