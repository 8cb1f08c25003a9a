"""Every PEFT method on the offline suite, side by side, written into bench/RESULTS.md.

    python bench/compare_methods.py --steps 1000            # all methods (about an hour, 2 cores)
    python bench/compare_methods.py --steps 100 --only lora,ia3 --no-write   # a quick look

Each entry is a config in `configs/` trained with `peftjax train` and scored with `peftjax eval`
(exact match and token accuracy per task by greedy decoding, beside the frozen base), in its own
process so its peak memory (max RSS) is its own. All entries share `configs/suite.py`: the same
frozen base, data, batch, optimizer and number of steps, set here with `--steps`. Step time is the
median of the logged `perf/step_seconds` (compilation excluded). Sparse fine-tuning picks its mask
from the full fine-tuning run, so `full` runs first.

The table goes between the `methods` markers of bench/RESULTS.md (replaced on every run), with
the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

from common import machine  # noqa: E402

# (name, config spec, extra overrides). Order matters: `sparse` reads the `full` run.
ENTRIES: list[tuple[str, str, tuple[str, ...]]] = [
    ("full", "configs/full.py", ()),
    ("lora (shared, r=8)", "configs/lora.py", ()),
    ("lora (per task, r=8)", "configs/lora.py:per_task", ()),
    ("lora (shared, r=64)", "configs/lora_high_rank.py", ()),
    ("rslora", "configs/rslora.py", ()),
    ("dora", "configs/dora.py", ()),
    ("lora+", "configs/lora_plus.py", ()),
    ("asymmetric lora", "configs/asymmetric_lora.py", ()),
    ("houlsby", "configs/houlsby.py", ()),
    ("houlsby (per task)", "configs/houlsby.py:per_task", ()),
    ("pfeiffer", "configs/pfeiffer.py", ()),
    ("parallel", "configs/parallel.py", ()),
    ("compacter", "configs/compacter.py", ()),
    ("compacter++", "configs/compacter_pp.py", ()),
    ("phm", "configs/phm.py", ()),
    ("ia3", "configs/ia3.py", ()),
    ("prompt tuning", "configs/prompt_tuning.py", ()),
    ("prefix tuning", "configs/prefix_tuning.py", ()),
    ("ln tuning", "configs/ln_tuning.py", ()),
    ("road", "configs/road.py", ()),
    ("sparse", "configs/sparse.py", ("--config.peft.sparse_mask_from={runs}/full",)),
]
BEGIN, END = "<!-- methods:begin -->", "<!-- methods:end -->"


def slug(name: str) -> str:
    """A workdir name; distinct entries get distinct names ("compacter++" is not "compacter")."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("+", "_plus")).strip("_")


def spawn(args: list[str]) -> tuple[str, float]:
    """Run `peftjax ARGS`; returns (stdout, that process's peak RSS in MiB)."""
    with open(os.devnull, "w") as devnull:
        proc = subprocess.Popen([sys.executable, "-m", "peftjax.cli", *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=devnull, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"`peftjax {' '.join(args)}` failed with exit {proc.returncode}; "
                           "run it by hand to see the error.")
    return out, usage.ru_maxrss / 1024  # Linux reports KiB


def run_entry(name: str, spec: str, extra: tuple[str, ...], steps: int, runs: str,
              resume: bool) -> dict:
    workdir = os.path.join(runs, slug(name) if name != "full" else "full")
    done_file = os.path.join(workdir, "bench_entry.json")
    if resume and os.path.exists(done_file):
        with open(done_file) as f:
            result = json.load(f)
        if result.get("steps") == steps:
            return result
    overrides = [f"--config.train.steps={steps}", "--config.train.progress=False",
                 f"--config.train.checkpoint_every={max(steps, 1)}",
                 *(e.format(runs=runs) for e in extra)]
    counts = json.loads(spawn(["params", "--config", spec, *overrides])[0].strip().splitlines()[-1])
    start = time.perf_counter()
    _, train_rss = spawn(["train", "--config", spec, "--workdir", workdir, *overrides])
    train_s = time.perf_counter() - start
    _, eval_rss = spawn(["eval", "--config", spec, "--workdir", workdir, *overrides])
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    step_s = [r["perf/step_seconds"] for r in records if "perf/step_seconds" in r]
    result = dict(name=name, config=spec, steps=steps, counts=counts, metrics=metrics,
                  train_s=train_s, step_s=statistics.median(step_s) if step_s else float("nan"),
                  peak_rss_mib=max(train_rss, eval_rss))
    with open(done_file, "w") as f:
        json.dump(result, f)
    return result


def experiment_parser(doc: str, *, steps: int, runs: str) -> argparse.ArgumentParser:
    """The options every suite experiment script takes (its docstring's first line is the
    description)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--runs", default=runs, help="where the runs go")
    parser.add_argument("--no-write", action="store_true", help="print, do not edit RESULTS.md")
    parser.add_argument("--resume", action="store_true",
                        help="reuse runs already finished in --runs with the same --steps")
    return parser


def mean(per_task: dict[str, dict[str, float]], metric: str) -> float:
    return statistics.fmean(v[metric] for v in per_task.values())


def markdown(results: list[dict], command: str) -> str:
    base = results[0]["metrics"]["base"]
    full = next((r for r in results if r["name"] == "full"), None)
    full_em = mean(full["metrics"]["adapted"], "exact_match") if full else float("nan")
    info = machine()
    lines = [
        BEGIN,
        "## Every method on the offline suite",
        "",
        f"**Command:** `{command}` ({info.get('cpu_model', '?')}, {os.cpu_count()} CPUs).",
        "Same frozen base (`assets/quickstart_base`), data (8 tasks of `synthetic_suite`, batch 32,"
        " unpacked), optimizer and steps for every entry (`configs/suite.py`). EM = exact match by"
        " greedy decoding (64 examples per task), acc = token accuracy, both means over tasks."
        " Step time: median logged `perf/step_seconds`; memory: peak RSS of the train or eval"
        " process, whichever is larger.",
        "",
        "| method | trainable | trainable % | EM | acc | EM - base | EM - full FT | step | "
        "peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_em = mean(base, "exact_match")
    lines.append(f"| frozen base | 0 | 0 | {base_em:.3f} | {mean(base, 'token_accuracy'):.3f} | "
                 f"| {base_em - full_em:+.3f} | | |")
    for r in results:
        adapted, counts = r["metrics"]["adapted"], r["counts"]
        em = mean(adapted, "exact_match")
        trained = counts.get("trainable_effective", counts["trainable"])  # sparse: mask entries
        percent = 100 * trained / counts["total"]
        acc = mean(adapted, "token_accuracy")
        lines.append(
            f"| {r['name']} | {trained:,} | {percent:.3f} | {em:.3f} | {acc:.3f} | "
            f"{em - base_em:+.3f} | {em - full_em:+.3f} | {1000 * r['step_s']:.0f} ms | "
            f"{r['peak_rss_mib']:.0f} MiB |")
    tasks = sorted(base)

    def row(name: str, per_task: dict) -> str:
        cells = " | ".join(f"{per_task[t]['exact_match']:.2f}" for t in tasks)
        return f"| {name} | {cells} |"

    lines += ["", "Exact match per task:", "",
              "| method | " + " | ".join(t.removeprefix("synthetic_") for t in tasks) + " |",
              "|---|" + "---:|" * len(tasks), row("frozen base", base)]
    lines += [row(r["name"], r["metrics"]["adapted"]) for r in results]
    lines.append(END)
    return "\n".join(lines)


def write_results(section: str, path: str, markers: tuple[str, str] = (BEGIN, END)) -> None:
    """Put `section` (which starts and ends with `markers`) into `path`, replacing the old one."""
    begin, end = markers
    text = "# Benchmark results\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def main() -> None:
    parser = experiment_parser(__doc__, steps=1000, runs="/tmp/peftjax_compare")
    parser.add_argument("--only", default="", help="comma-separated entry names or config stems")
    args = parser.parse_args()
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    entries = [e for e in ENTRIES if not wanted or e[0] in wanted
               or os.path.basename(e[1]).split(".")[0] in wanted]
    results = []
    for name, spec, extra in entries:
        print(f"{name}: training {args.steps} steps ...", file=sys.stderr, flush=True)
        results.append(run_entry(name, spec, extra, args.steps, args.runs, args.resume))
        r = results[-1]
        print(json.dumps({"name": name, "trainable": r["counts"]["trainable_effective"],
                          "em": round(mean(r["metrics"]["adapted"], "exact_match"), 4),
                          "step_ms": round(1000 * r["step_s"], 1),
                          "peak_rss_mib": round(r["peak_rss_mib"])}), flush=True)
    command = "python bench/compare_methods.py " + " ".join(sys.argv[1:])
    section = markdown(results, command.strip())
    if args.no_write:
        print(section)
    else:
        write_results(section, os.path.join(REPO, "bench", "RESULTS.md"))


if __name__ == "__main__":
    main()
