"""The issue 6 benchmark suite: every figure measured side by side in one run on this machine.

Launch from the repository root with the project's virtual environment:

    PYTHONPATH=. python bench/run.py --json [--steps 10] [--only lora,mixed] [--quick]

Parts (each module pins its workers to the first `--threads` CPUs, one subprocess per framework
or per measurement, and records other processes' CPU use while it times):

  lora          bench/t5_lora_step.py: peftjax LoRA and full fine-tuning vs HF peft on the T5
                v1.1 small shape -> `lora_vs_peft_speedup`, `peft_vs_full_step_ratio`, achieved
                FLOP/s against the measured matmul rate, peak memory;
  mixed         bench/mixed_batch.py: 16 task adapters mixed in one batch vs one adapter ->
                `mixed_vs_single_batch_ratio` (and HF peft's `adapter_names` inference);
  scan          bench/scan_compile.py: compile time at 24 over 6 layers with scan_layers ->
                `scan_compile_ratio_24_vs_6`;
  hyper         bench/hyper_overhead.py: HyperFormer++'s adapter generation as a share of the
                train step -> `hyper_overhead_fraction`;
  multiprocess  bench/multiprocess_check.py (a subprocess printing one JSON line): the 2-process
                run matches the 1-process run -> `multiprocess_loss_match`.

A part that fails (or is missing) is reported under `errors` and its figures are null; the other
parts still run. The LAST line of stdout (with `--json`) is one JSON object: the six figures,
`targets` (each figure's target, value, met and whether its timing was contended), `flops`,
`peak_memory_mb`, `contrast` (the secondary ratios), `machine`, `errors` and every part's full
summary under `parts`. `--quick` runs tiny shapes and single steps: it checks the plumbing, its
numbers mean nothing. Results and the commands: bench/RESULTS.md ("Issue 6 suite").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench modules

import common  # noqa: E402
import hyper_overhead  # noqa: E402
import mixed_batch  # noqa: E402
import scan_compile  # noqa: E402
import t5_lora_step  # noqa: E402

BENCH = Path(__file__).resolve().parent
MULTIPROCESS_SCRIPT = BENCH / "multiprocess_check.py"
PARTS = ("lora", "mixed", "scan", "hyper", "multiprocess")
# figure -> (the part that measures it, comparison, target)
FIGURES: dict[str, tuple[str, str, Any]] = {
    "lora_vs_peft_speedup": ("lora", ">=", t5_lora_step.TARGET_SPEEDUP),
    "peft_vs_full_step_ratio": ("lora", "<=", 0.7),
    "mixed_vs_single_batch_ratio": ("mixed", "<=", mixed_batch.TARGET_RATIO),
    "scan_compile_ratio_24_vs_6": ("scan", "<=", scan_compile.TARGET_RATIO),
    "hyper_overhead_fraction": ("hyper", "<=", hyper_overhead.TARGET_FRACTION),
    "multiprocess_loss_match": ("multiprocess", "==", True),
}


# --------------------------------------------------------------------------------------------
# Parts: each returns its summary dict (printing its human-readable lines) or raises.


def part_lora(opts: argparse.Namespace) -> dict[str, Any]:
    args = argparse.Namespace(steps=opts.steps, warmup=opts.warmup, threads=opts.threads,
                              no_full_ft=False, no_bf16=False, quiet_wait=opts.quiet_wait,
                              timeout=opts.timeout)
    summary = t5_lora_step.run_all(args)
    t5_lora_step.print_table(summary)
    return summary


def part_mixed(opts: argparse.Namespace) -> dict[str, Any]:
    summary = mixed_batch.run(steps=opts.steps, warmup=opts.warmup, threads=opts.threads,
                              quiet_wait=opts.quiet_wait, timeout=opts.timeout, quick=opts.quick)
    mixed_batch.print_summary(summary)
    return summary


def part_scan(opts: argparse.Namespace) -> dict[str, Any]:
    summary = scan_compile.run(threads=opts.threads, timeout=opts.timeout,
                               repeats=opts.scan_repeats, quick=opts.quick,
                               steps=opts.scan_steps)
    scan_compile.print_summary(summary)
    return summary


def part_hyper(opts: argparse.Namespace) -> dict[str, Any]:
    summary = hyper_overhead.run(steps=opts.steps, warmup=opts.warmup, threads=opts.threads,
                                 quiet_wait=opts.quiet_wait, timeout=opts.timeout,
                                 quick=opts.quick)
    hyper_overhead.print_summary(summary)
    return summary


def part_multiprocess(opts: argparse.Namespace) -> dict[str, Any]:
    """bench/multiprocess_check.py in a subprocess: its last JSON line with the key
    `multiprocess_loss_match`."""
    if not MULTIPROCESS_SCRIPT.exists():
        raise FileNotFoundError(f"{os.path.relpath(MULTIPROCESS_SCRIPT, common.REPO)} is "
                                "missing: the multiprocess check (2 processes vs 1) has no "
                                "script to run")
    cpus = common.first_cpus(opts.threads)
    print(f"[multiprocess] {MULTIPROCESS_SCRIPT.name} on CPUs {cpus} ...", file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    # --quick: the fewest steps that still compare a step after an update.
    proc = subprocess.run([sys.executable, str(MULTIPROCESS_SCRIPT),
                           *(["--steps", "2"] if opts.quick else [])],
                          env=common.worker_env(opts.threads), capture_output=True, text=True,
                          timeout=opts.timeout, cwd=common.REPO,
                          preexec_fn=lambda: common.pin_to_cpus(cpus))
    result = last_json_with(proc.stdout, "multiprocess_loss_match")
    if result is None:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise RuntimeError(f"{MULTIPROCESS_SCRIPT.name} exited {proc.returncode} without a JSON "
                           f"line holding multiprocess_loss_match:\n{tail}")
    # A failed launch still reports `"multiprocess_loss_match": false` (and exits 1): keep it.
    result.update(exit_code=proc.returncode, wall_s=time.perf_counter() - start)
    print(f"\nMultiprocess: 2-process run matches the 1-process run: "
          f"{result['multiprocess_loss_match']}")
    return result


PART_RUNNERS = {"lora": part_lora, "mixed": part_mixed, "scan": part_scan, "hyper": part_hyper,
                "multiprocess": part_multiprocess}


def last_json_with(text: str, key: str) -> dict[str, Any] | None:
    """The last line of `text` that is a JSON object holding `key`, else None."""
    for line in reversed(text.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and key in value:
            return value
    return None


# --------------------------------------------------------------------------------------------
# The suite's JSON object.


def figures(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The six headline figures from the part summaries; None for a part not run or failed."""
    lora, mixed, scan = parts.get("lora"), parts.get("mixed"), parts.get("scan")
    hyper, multi = parts.get("hyper"), parts.get("multiprocess")
    return {
        "lora_vs_peft_speedup": lora["speedup"] if lora else None,
        "peft_vs_full_step_ratio": (lora["peftjax_step_s"] / lora["peftjax_full_ft_step_s"]
                                    if lora and "peftjax_full_ft_step_s" in lora else None),
        "mixed_vs_single_batch_ratio": mixed["mixed_vs_single_batch_ratio"] if mixed else None,
        "scan_compile_ratio_24_vs_6": scan["scan_compile_ratio_24_vs_6"] if scan else None,
        "hyper_overhead_fraction": hyper["hyper_overhead_fraction"] if hyper else None,
        "multiprocess_loss_match": (bool(multi["multiprocess_loss_match"])
                                    if multi and multi.get("multiprocess_loss_match") is not None
                                    else None),
    }


def contended_parts(parts: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Per part, what other processes disturbed while it was timed (empty: a quiet run)."""
    out = {}
    for name, s in parts.items():
        flagged = s.get("contended_workers") if name == "lora" else s.get("contended")
        out[name] = list(flagged or [])
    return out


def targets(values: dict[str, Any], contended: dict[str, list[str]]) -> dict[str, Any]:
    """Each figure's target, value, `met` (None when the figure is missing) and whether the part
    measuring it was contended (then `met` is only indicative: rerun on a quiet machine)."""
    out = {}
    for name, (part, op, target) in FIGURES.items():
        value = values[name]
        if value is None:
            met = None
        elif op == ">=":
            met = value >= target
        elif op == "<=":
            met = value <= target
        else:
            met = value == target
        out[name] = {"target": f"{op} {target}", "value": value, "met": met,
                     "contended": bool(contended.get(part))}
    return out


def flops(lora: dict[str, Any] | None) -> dict[str, Any] | None:
    """Achieved FLOP/s of the LoRA step against the measured fp32 matmul rate (the floor)."""
    if not lora:
        return None
    out = {"peftjax_lora_step_gflop": lora["peftjax_step_gflop"],
           "peftjax_lora_achieved_gflops": lora["achieved_gflops"],
           "matmul_gflops": lora["matmul_gflops"],
           "peftjax_lora_fraction_of_matmul": lora["achieved_gflops"] / lora["matmul_gflops"],
           "floor_step_s": lora["floor_step_s"], "peftjax_lora_step_s": lora["peftjax_step_s"],
           "hf_peft_lora_achieved_gflops": lora["hf_peft_achieved_gflops"],
           "torch_matmul_gflops": lora["torch_matmul_gflops"],
           "hf_peft_lora_fraction_of_matmul": (lora["hf_peft_achieved_gflops"]
                                               / lora["torch_matmul_gflops"])}
    if "peftjax_full_ft_achieved_gflops" in lora:
        out["peftjax_full_ft_achieved_gflops"] = lora["peftjax_full_ft_achieved_gflops"]
        out["peftjax_full_ft_fraction_of_matmul"] = (lora["peftjax_full_ft_achieved_gflops"]
                                                     / lora["matmul_gflops"])
    return out


def peak_memory(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Peak RSS (MiB) of every worker process, by part."""
    out: dict[str, Any] = {}
    if lora := parts.get("lora"):
        out.update(peftjax_lora=lora["peftjax_peak_rss_mb"],
                   hf_peft_lora=lora["hf_peft_peak_rss_mb"])
        if "peftjax_full_ft_peak_rss_mb" in lora:
            out.update(peftjax_full_ft=lora["peftjax_full_ft_peak_rss_mb"],
                       hf_full_ft=lora["hf_full_ft_peak_rss_mb"])
    if mixed := parts.get("mixed"):
        out.update(mixed_peftjax=mixed["peak_rss_mb"]["peftjax"],
                   mixed_hf_peft=mixed["peak_rss_mb"]["hf"])
    if hyper := parts.get("hyper"):
        out["hyper_peftjax"] = hyper["peak_rss_mb"]
    if scan := parts.get("scan"):
        out["scan_compile_peftjax"] = scan["peak_rss_mb"]
    return out


def contrast(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Secondary ratios that put the headline figures in context."""
    keys = {"lora": ("full_ft_speedup", "bf16_speedup", "bf16_vs_hf_fp32_speedup",
                     "bf16_over_fp32_peftjax"),
            "mixed": ("mixed_vs_same_step_ratio", "packed_mixed_vs_shared_ratio",
                      "peftjax_infer_mixed_vs_shared_ratio", "hf_peft_infer_mixed_vs_single_ratio",
                      "hf_peft_infer_same_name_vs_single_ratio"),
            "scan": ("scan_compile_only_ratio", "unrolled_compile_ratio_24_vs_6",
                     "scan_step_over_unrolled", "note"),
            "hyper": ("time_share_isolated", "time_share_of_medians", "flop_share",
                      "flop_share_by_difference")}
    return {f"{part}.{key}": parts[part].get(key) for part, names in keys.items()
            if part in parts for key in names}


def suite_summary(parts: dict[str, dict[str, Any]], errors: dict[str, str],
                  opts: argparse.Namespace) -> dict[str, Any]:
    """The suite's JSON object (see the module docstring)."""
    values = figures(parts)
    contended = contended_parts(parts)
    return {**values,
            "targets": targets(values, contended),
            "flops": flops(parts.get("lora")),
            "peak_memory_mb": peak_memory(parts),
            "contrast": contrast(parts),
            "contended": {k: v for k, v in contended.items() if v},
            "machine": {**common.machine(), "threads": opts.threads,
                        "cpus": common.first_cpus(opts.threads)},
            "run": {"parts": list(opts.parts), "steps": opts.steps, "warmup": opts.warmup,
                    "quick": opts.quick, "command": " ".join(["python", *sys.argv])},
            "errors": errors,
            "parts": parts}


def print_figures(s: dict[str, Any]) -> None:
    print("\nIssue 6 suite" + (" (--quick: plumbing only, numbers meaningless)"
                               if s["run"]["quick"] else ""))
    for name, t in s["targets"].items():
        value = t["value"]
        shown = "n/a" if value is None else (f"{value}" if isinstance(value, bool)
                                             else f"{value:.4g}")
        met = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        flag = "  (contended)" if t["contended"] else ""
        print(f"  {name:30} {shown:>10}  target {t['target']:<8} {met}{flag}")
    if f := s["flops"]:
        print(f"  LoRA step {f['peftjax_lora_achieved_gflops']:.0f} GFLOP/s = "
              f"{f['peftjax_lora_fraction_of_matmul']:.0%} of the {f['matmul_gflops']:.0f} GFLOP/s "
              f"fp32 matmul rate (floor {f['floor_step_s']:.3f} s vs "
              f"{f['peftjax_lora_step_s']:.3f} s)")
    if s["peak_memory_mb"]:
        print("  peak RSS (MiB): " + ", ".join(f"{k} {v:.0f}"
                                               for k, v in s["peak_memory_mb"].items()))
    for part, message in s["errors"].items():
        print(f"  ERROR in {part}: {message.splitlines()[0]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per measurement (default 10; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after compiling (default 2; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="CPUs (threads) per worker")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run, from {','.join(PARTS)}")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="max seconds each worker waits for the CPUs to go idle (default "
                             "120; 0 with --quick)")
    parser.add_argument("--scan-repeats", type=int, default=1,
                        help="compilations per scan_compile point (the minimum is kept)")
    parser.add_argument("--scan-steps", type=int, default=3,
                        help="train steps timed per scan_compile point (scanned vs unrolled "
                             "step time; 0: none)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-worker timeout (s)")
    parser.add_argument("--json", action="store_true", help="print a JSON object as last line")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and single steps: checks the plumbing in little time")
    opts = parser.parse_args(argv)
    opts.parts = [p.strip() for p in opts.only.split(",") if p.strip()]
    unknown = [p for p in opts.parts if p not in PARTS]
    if unknown or not opts.parts:
        parser.error(f"--only: unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    if opts.steps is None:
        opts.steps = 1 if opts.quick else 10
    if opts.warmup is None:
        opts.warmup = 1 if opts.quick else 2
    if opts.quiet_wait is None:
        opts.quiet_wait = 0.0 if opts.quick else 120.0
    if opts.steps < 1 or opts.warmup < 1 or opts.scan_repeats < 1:
        parser.error("--steps, --warmup and --scan-repeats must be >= 1")
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.quick:
        t5_lora_step.use_quick_shapes()  # every part reads its shapes from there
    parts: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for name in opts.parts:
        print(f"[suite] {name} ...", file=sys.stderr, flush=True)
        try:
            parts[name] = PART_RUNNERS[name](opts)
            if parts[name].get("error"):  # a part that ran but reports its own failure
                errors[name] = str(parts[name]["error"])
        except Exception as e:  # one broken part must not sink the suite's other figures
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"[suite] {name} FAILED:\n{traceback.format_exc()}", file=sys.stderr,
                  flush=True)
    summary = suite_summary(parts, errors, opts)
    print_figures(summary)
    if opts.json:
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
