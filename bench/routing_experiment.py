"""Is routing worth it? Task routers on the offline suite, whose tasks share known skills.

    python bench/routing_experiment.py --steps 500                 # about 25 min on 2 cores
    python bench/routing_experiment.py --steps 50 --no-write       # a quick look

1. Trains, on the frozen base, data, batch, optimizer and budget of `bench/compare_methods.py`
   (`configs/suite.py`): Poly and MHR (learned task x skill routing), the same inventory with
   uniform routing (mu), one LoRA per task (task-id adapters), one shared LoRA of the inventory's
   size (rank K x r), a shared rank-64 LoRA, and MoLoRA (task-free token routing).
2. Reads a task x task similarity from each run: for Poly / MHR / MoLoRA from their routing (cosine
   of the tasks' routing vectors over every layer, `peftjax.analysis.routing`), for the per-task
   LoRAs from their weight updates (cosine of the tasks' flattened `A_t B_t` over every site). It
   scores each against the true skill overlap of the tasks (Jaccard of their skill sets) by
   Spearman rank correlation over the 28 task pairs.
3. Evaluates zero-shot on the held-out tasks (new combinations of seen skills, never trained on):
   Arrow routing over the per-task LoRA library, the library's uniform average (Arrow with every
   expert and a flat softmax), the shared LoRA, and the frozen base.

Tables go between the `routing` markers of bench/RESULTS.md, with the command and the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, REPO)

from common import machine  # noqa: E402
from compare_methods import experiment_parser, mean, run_entry, slug, spawn, write_results  # noqa: E402

NUM_SKILLS, RANK = 4, 8  # configs/poly.py's inventory: K LoRA skills of rank r per site
# (name, config spec, extra overrides). The per-task LoRA run doubles as Arrow's library.
TRAINED: list[tuple[str, str, tuple[str, ...]]] = [
    ("poly", "configs/poly.py", ()),
    ("mhr", "configs/mhr.py", ()),
    ("uniform routing (mu)", "configs/poly.py:uniform", ()),
    ("lora (per task, r=8)", "configs/lora.py:per_task", ()),
    (f"lora (shared, r={NUM_SKILLS * RANK}, matched)", "configs/lora.py",
     (f"--config.peft.rank={NUM_SKILLS * RANK}", f"--config.peft.alpha={NUM_SKILLS * RANK}.0")),
    ("lora (shared, r=64)", "configs/lora_high_rank.py", ()),
    ("molora", "configs/molora.py", ()),
]
LIBRARY = "lora (per task, r=8)"
SHARED = "lora (shared, r=8)"
HELDOUT = "synthetic_heldout"
BEGIN, END = "<!-- routing:begin -->", "<!-- routing:end -->"


def routing_vectors(workdir: str) -> tuple[np.ndarray, list[str]]:
    """Each suite task's routing over every router of the run `[tasks, features]`, and names.

    Task routers (Poly, MHR): the eval-time task x (head x) skill weights. Token routers
    (MoLoRA): the task's mean token routing on a sample of its validation examples.
    """
    from peftjax.analysis.routing import routing_weights, task_vectors, token_task_profiles

    weights = routing_weights(workdir)
    names = [str(n) for n in weights["task_names"]]
    in_run = [int(i) for i in weights["tasks_in_run"]]
    if any(k.endswith("/task_weights") for k in weights):
        return task_vectors(weights, in_run), [names[i] for i in in_run]
    return token_task_profiles(weights)[in_run], [names[i] for i in in_run]


def task_adapter_vectors(workdir: str) -> tuple[np.ndarray, list[str]]:
    """Each task's LoRA updates `A_t B_t`, flattened over every adapted site, and the names."""
    from peftjax.peft import module_paths
    from peftjax.peft.lora import LoRADense
    from peftjax.peft.runs import load_trained, read_config

    exp, model = load_trained(workdir, read_config(workdir))
    ids = sorted(exp.task_ids.values())
    names = [exp.names_by_id()[i] for i in ids]
    rows = [[] for _ in ids]
    for module in module_paths(model).values():
        if isinstance(module, LoRADense) and module.per_task:
            a, b = np.asarray(module.lora_a.value), np.asarray(module.lora_b.value)
            for row, task_id in zip(rows, ids, strict=True):
                row.append((a[task_id] @ b[task_id]).ravel())
    return np.stack([np.concatenate(r) for r in rows]).astype(np.float64), names


def cosine(vectors: np.ndarray, *, center: bool) -> np.ndarray:
    """`[T, T]` cosine similarity of the rows; `center` removes what all tasks share first."""
    v = vectors - vectors.mean(axis=0, keepdims=True) if center else vectors
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
    return v @ v.T


def skill_rank_correlations(vectors: np.ndarray, names: list[str]) -> tuple[float, float]:
    """Spearman correlation with the true skill overlap: (raw cosine, centred cosine)."""
    from peftjax.analysis.routing import rank_correlation, skill_overlap

    truth = skill_overlap(names)
    return (rank_correlation(cosine(vectors, center=False), truth),
            rank_correlation(cosine(vectors, center=True), truth))


def heldout_eval(name: str, spec: str, extra: tuple[str, ...], workdir: str, runs: str,
                 resume: bool) -> dict:
    """Exact match / token accuracy of a trained run on the held-out tasks, in a copy of it."""
    target = os.path.join(runs, "heldout", slug(name))
    metrics_file = os.path.join(target, "eval", "metrics.json")
    if not (resume and os.path.exists(metrics_file)):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(workdir, target, ignore=shutil.ignore_patterns("eval"))
        spawn(["eval", "--config", spec, "--workdir", target, f"--config.data.mixture={HELDOUT}",
               *extra])
    with open(metrics_file) as f:
        return json.load(f)


def arrow_entry(name: str, library: str, runs: str, resume: bool, *extra: str) -> dict:
    """A zero-step Arrow run over the per-task LoRA library, evaluated on the held-out tasks."""
    sources = f"--config.peft.sources=('{library}',)"
    return run_entry(name, "configs/arrow.py", (sources, *extra), 0, runs, resume)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |",
            "|---|" + "---:|" * (len(header) - 1),
            *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(trained: list[dict], correlations: dict[str, tuple[float, float]],
             heldout: list[tuple[str, dict]], command: str, seen_line: str) -> str:
    def rho(name: str) -> list[str]:
        if name not in correlations:
            return ["", ""]
        return [f"{c:+.3f}" for c in correlations[name]]

    info = machine()
    rows = []
    for r in trained:
        counts, adapted = r["counts"], r["metrics"]["adapted"]
        rows.append([r["name"], f"{counts['trainable']:,}",
                     f"{100 * counts['trainable'] / counts['total']:.2f}",
                     f"{mean(adapted, 'exact_match'):.3f}",
                     f"{mean(adapted, 'token_accuracy'):.3f}", *rho(r["name"]),
                     f"{1000 * r['step_s']:.0f} ms"])
    tasks = sorted(heldout[0][1]["base"])
    zero_shot = [["frozen base", *(f"{heldout[0][1]['base'][t]['exact_match']:.3f} / "
                                   f"{heldout[0][1]['base'][t]['token_accuracy']:.3f}"
                                   for t in tasks)]]
    zero_shot += [[name, *(f"{m['adapted'][t]['exact_match']:.3f} / "
                           f"{m['adapted'][t]['token_accuracy']:.3f}" for t in tasks)]
                  for name, m in heldout]
    lines = [
        BEGIN,
        "## Routing on the offline suite: does the routing find the shared skills?",
        "",
        f"**Command:** `{command}` ({info.get('cpu_model', '?')}, {os.cpu_count()} CPUs). "
        "Same base, data, batch, optimizer and steps as the method table (`configs/suite.py`). "
        "rho = Spearman correlation, over the 28 pairs of suite tasks, between the task similarity "
        "read from the run (routing vectors for routers, weight updates for per-task LoRAs) and "
        "the true skill overlap (Jaccard of the tasks' skill sets); centred: after removing the "
        "mean over tasks (what every task shares). EM / acc: exact match and "
        "token accuracy by greedy decoding, means over the 8 suite tasks.",
        "",
        *table(["method", "trainable", "trainable %", "EM", "acc", "rho", "rho (centred)",
                "step"], rows),
        "",
        "Zero-shot on the held-out tasks (never trained on; EM / token accuracy per task):",
        "",
        *table(["method", *(t.removeprefix("synthetic_") for t in tasks)], zero_shot),
        "",
        seen_line,
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    args = experiment_parser(__doc__, steps=500, runs="/tmp/peftjax_routing").parse_args()
    results = {}
    for name, spec, extra in [*TRAINED, (SHARED, "configs/lora.py", ())]:
        print(f"{name}: training {args.steps} steps ...", file=sys.stderr, flush=True)
        results[name] = run_entry(name, spec, extra, args.steps, args.runs, args.resume)
    workdir = {name: os.path.join(args.runs, slug(name)) for name in results}

    correlations = {name: skill_rank_correlations(*routing_vectors(workdir[name]))
                    for name in ("poly", "mhr", "molora")}
    correlations[LIBRARY] = skill_rank_correlations(*task_adapter_vectors(workdir[LIBRARY]))
    print(json.dumps({"rank_correlation": correlations}), flush=True)

    library = workdir[LIBRARY]
    arrow = arrow_entry("arrow", library, args.runs, args.resume)
    average = arrow_entry("library average", library, args.runs, args.resume,
                          "--config.peft.top_k=8", "--config.peft.arrow_temperature=1e6")
    # The routing's sanity check: on the tasks the library was trained on, does Arrow find
    # (roughly) each task's own LoRA?
    seen = arrow_entry("arrow on seen tasks", library, args.runs, args.resume,
                       "--config.data.mixture=synthetic_suite")
    shared = heldout_eval(SHARED, "configs/lora.py", (), workdir[SHARED], args.runs, args.resume)
    heldout = [("arrow over the per-task LoRAs (top-2)", arrow["metrics"]),
               ("uniform average of the same library", average["metrics"]),
               ("shared LoRA (r=8)", shared)]
    for name, metrics in heldout:
        print(json.dumps({"heldout": name, "em": round(mean(metrics["adapted"], "exact_match"), 4),
                          "acc": round(mean(metrics["adapted"], "token_accuracy"), 4)}),
              flush=True)
    command = "python bench/routing_experiment.py " + " ".join(sys.argv[1:])
    seen_line = (f"Arrow over the same library on the 8 suite tasks it was built from: EM "
                 f"{mean(seen['metrics']['adapted'], 'exact_match'):.3f}, token accuracy "
                 f"{mean(seen['metrics']['adapted'], 'token_accuracy'):.3f} (the per-task LoRAs "
                 f"picked by task id: EM "
                 f"{mean(results[LIBRARY]['metrics']['adapted'], 'exact_match'):.3f}).")
    section = markdown([results[n] for n, _, _ in TRAINED] + [results[SHARED]], correlations,
                       heldout, command.strip(), seen_line)
    if args.no_write:
        print(section)
    else:
        write_results(section, os.path.join(REPO, "bench", "RESULTS.md"), (BEGIN, END))


if __name__ == "__main__":
    main()
