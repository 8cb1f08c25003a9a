"""Hypernetworks on the offline suite: generated adapters vs trained ones, and zero-shot.

    python bench/hyper_experiment.py --steps 500                 # about 30 min on 2 cores
    python bench/hyper_experiment.py --steps 50 --no-write       # a quick look

On the frozen base, data, batch, optimizer and budget of `bench/compare_methods.py`
(`configs/suite.py`), trains and evaluates:
1. HyperFormer++ (one hypernetwork per stack) and HyperFormer (one per site) against the adapters
   they generate trained directly: one per task, and one shared by all tasks (Houlsby placement,
   biases and a layer norm on the output, GELU, width 16: the same adapter), with trainable
   parameters in all and per task.
2. Text-to-LoRA (LoRA generated from task descriptions) on the suite, and zero-shot on the two
   held-out tasks whose descriptions it never saw, beside a shared LoRA and the frozen base.
3. Hyper-X (task + language embeddings) on `synthetic_multilingual`, where the same input is
   answered in the language's cipher, evaluated on task x language pairs it never trained on,
   beside HyperFormer++ conditioned on the task alone.

Tables go between the `hyper` markers of bench/RESULTS.md, with the command and the machine.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, REPO)

from common import machine  # noqa: E402
from compare_methods import experiment_parser, mean, run_entry, write_results  # noqa: E402
from routing_experiment import table  # noqa: E402

ADAPTER = ("--config.peft.adapter_bias=True", "--config.peft.adapter_norm=True",
           "--config.peft.adapter_activation=gelu_new")
HELDOUT = ("--config.data.heldout=synthetic_heldout", "--config.data.inputs_length=64")
MULTILINGUAL = ("--config.data.mixture=synthetic_multilingual",
                "--config.data.heldout=synthetic_multilingual_heldout")
SUITE: list[tuple[str, str, tuple[str, ...]]] = [
    ("hyperformer++", "configs/hyperformer.py", ()),
    ("hyperformer (a hypernetwork per site)", "configs/hyperformer.py:per_layer", ()),
    ("adapters, one per task", "configs/houlsby.py:per_task", ADAPTER),
    ("adapter, one shared", "configs/houlsby.py", ADAPTER),
]
ZERO_SHOT: list[tuple[str, str, tuple[str, ...]]] = [
    ("text-to-lora (descriptions)", "configs/text_to_lora.py", ()),
    ("lora (shared, r=8)", "configs/lora.py", HELDOUT),
]
LANGUAGES: list[tuple[str, str, tuple[str, ...]]] = [
    ("hyper-x (task + language)", "configs/hyperformer.py:languages", ()),
    ("hyperformer++ (task only)", "configs/hyperformer.py", MULTILINGUAL),
]
BEGIN, END = "<!-- hyper:begin -->", "<!-- hyper:end -->"


def _scores(per_task: dict) -> list[str]:
    return [f"{mean(per_task, 'exact_match'):.3f}", f"{mean(per_task, 'token_accuracy'):.3f}"]


def suite_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        counts = r["counts"]
        per_task = counts["per_task_trainable"]
        rows.append([r["name"], f"{counts['trainable']:,}",
                     f"{per_task:,}" if per_task is not None else "0 (shared)",
                     f"{counts['trainable_percent_per_task']:.2f}%",
                     *_scores(r["metrics"]["adapted"]), f"{r['step_s'] * 1e3:.0f}"])
    return rows


def heldout_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        rows.append([r["name"], *_scores(r["metrics"]["adapted"]),
                     *_scores(r["metrics"]["heldout"])])
    base = results[0]["metrics"]
    rows.append(["frozen base", *_scores(base["base"]), *_scores(base["heldout_base"])])
    return rows


def per_task_heldout(results: list[dict]) -> list[str]:
    tasks = sorted(results[0]["metrics"]["heldout"])
    lines = []
    for r in results:
        cells = ", ".join(f"{t.removeprefix('synthetic_')} {v['exact_match']:.3f} / "
                          f"{v['token_accuracy']:.3f}"
                          for t, v in sorted(r["metrics"]["heldout"].items()) if t in tasks)
        lines.append(f"- {r['name']}: {cells}")
    return lines


def markdown(suite: list[dict], zero_shot: list[dict], languages: list[dict],
             command: str) -> str:
    info = machine()
    lines = [
        BEGIN,
        "## Hypernetworks on the offline suite",
        "",
        f"`{command}` on {info['cpu_model']} ({info['nproc']} cores), one seed, "
        f"{suite[0]['steps']} steps each on the quickstart base, the suite's data, batch and "
        "optimizer (configs/suite.py). Exact match (EM) and token accuracy: greedy decoding, mean "
        "over tasks. \"% per task\" = all trainable parameters / tasks / model size "
        "(`trainable_percent_per_task` of `peftjax params`), how HyperFormer reports its cost. "
        "Step times are medians of the logged intervals on a shared machine (indicative).",
        "",
        "### Generated vs trained adapters (8 suite tasks)",
        "",
        *table(["method", "trainable", "per task (rows)", "% per task", "EM", "token acc",
                "ms/step"], suite_rows(suite)),
        "",
        "### Zero-shot on held-out tasks (new skill combinations, new descriptions)",
        "",
        *table(["method", "suite EM", "suite acc", "held-out EM", "held-out acc"],
               heldout_rows(zero_shot)),
        "",
        "Per held-out task (EM / token accuracy):",
        "",
        *per_task_heldout(zero_shot),
        "",
        "### Hyper-X: unseen task x language pairs (answers in a letter cipher)",
        "",
        *table(["method", "trained pairs EM", "trained pairs acc", "held-out pairs EM",
                "held-out pairs acc"], heldout_rows(languages)),
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    args = experiment_parser(__doc__, steps=500, runs="/tmp/peftjax_hyper").parse_args()
    groups = []
    for entries in (SUITE, ZERO_SHOT, LANGUAGES):
        done = []
        for name, spec, extra in entries:
            print(f"{name}: training {args.steps} steps ...", file=sys.stderr, flush=True)
            done.append(run_entry(name, spec, extra, args.steps, args.runs, args.resume))
        groups.append(done)
    command = "python bench/hyper_experiment.py " + " ".join(sys.argv[1:])
    section = markdown(*groups, command.strip())
    if args.no_write:
        print(section)
    else:
        write_results(section, os.path.join(REPO, "bench", "RESULTS.md"), (BEGIN, END))


if __name__ == "__main__":
    main()
