"""What a trained run's routers learned: export their weights, compare tasks, track entropy.

`routing_weights(workdir)` rebuilds a run, restores its checkpoint and returns every router's
mixing weights as NumPy arrays (what `peftjax routing --workdir DIR --out FILE.npz` writes):

  "<module path>/task_weights"   float32 `[tasks, splits, skills]`: a task router's (Poly, MHR)
                                 eval-time weights for every task id, rows summing to 1 over
                                 skills. The path names the layer and module, e.g.
                                 "encoder.layers.0.self_attention.q".
  "<module path>/token_weights"  float32 `[n, length, experts]`: a token router's (MoLoRA, SMoRA,
                                 AdapterFusion, Arrow) weights on each token of `n` eval examples
                                 (teacher-forced on the decoder side); zeros for experts a top-k
                                 router left out. Positions are the encoder's or the decoder's
                                 tokens (`token_key(path)` says which).
  "tokens/encoder", "tokens/decoder", "tokens/decoder_targets"
                                 int32 `[n, length]`: those examples' input ids, decoder inputs
                                 (targets shifted right) and targets; 0 = padding (only with
                                 token routers).
  "task_ids"                     int32 `[n]`: each example's task id (only with token routers).
  "task_names"                   str `[tasks]`: name of each task id ("" where none is known).
  "tasks_in_run"                 int32: the task ids of the run's mixture, sorted. Rows of the
                                 task weights for other ids were never trained (their init).

The helpers below (`task_similarity`, `token_task_profiles`, `skill_overlap`,
`rank_correlation`, `routing_entropy_history`) are what `notebooks/routing_analysis.py` and
`bench/routing_experiment.py` compute from those arrays. They need NumPy only (no SciPy).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

# Which runs have routers, by config (the error for a run without them names these).
TASK_ROUTED_METHODS = ("poly", "mhr")
TOKEN_ROUTED_METHODS = ("molora", "smora")
TOKEN_ROUTED_COMPOSE = ("fusion", "molora", "arrow")
TASK_WEIGHTS, TOKEN_WEIGHTS = "task_weights", "token_weights"


# ------------------------------------------------------------------------------ export --


def has_token_routers(config) -> bool:
    """Whether a run's config (`config.peft`) puts token routers in the model."""
    return (config.peft.method in TOKEN_ROUTED_METHODS
            or config.peft.compose in TOKEN_ROUTED_COMPOSE)


def check_has_routers(config, workdir: str) -> None:
    """ValueError, naming the run's method and what would have routers, unless it has some."""
    if config.peft.method in TASK_ROUTED_METHODS or has_token_routers(config):
        return
    what = f"method={config.peft.method!r}"
    if config.peft.compose != "none":
        what += f" and compose={config.peft.compose!r}"
    raise ValueError(
        f"{workdir} was trained with {what}, which has no routers; routing export needs method "
        f"{'/'.join(TASK_ROUTED_METHODS + TOKEN_ROUTED_METHODS)} or compose "
        f"{'/'.join(TOKEN_ROUTED_COMPOSE)} (config.peft.method / config.peft.compose).")


def routing_weights(workdir: str, *, examples: int = 8,
                    split: str = "validation") -> dict[str, np.ndarray]:
    """Every router's weights in the trained run at `workdir` (see the module docstring).

    Args:
      workdir: a run directory written by `peftjax train` (config.json + checkpoints/).
      examples: token routers are run on the first `examples` examples of each task in the
        run's mixture (`n = examples x tasks` rows).
      split: which split those examples come from.

    Raises:
      FileNotFoundError: no trained run at `workdir`.
      ValueError: the run has no routers.
    """
    from peftjax.peft import module_paths
    from peftjax.peft.runs import load_trained, read_config

    if examples <= 0:
        raise ValueError(f"examples must be a positive number of examples per task, got "
                         f"{examples}.")
    config = read_config(workdir)
    check_has_routers(config, workdir)
    exp, model = load_trained(workdir, config)
    task_routers = {path: module for path, module in module_paths(model).items()
                    if callable(getattr(module, "task_weights", None))}
    out: dict[str, np.ndarray] = {
        f"{path}/{TASK_WEIGHTS}": np.asarray(module.task_weights(), np.float32)
        for path, module in sorted(task_routers.items(), key=lambda kv: _natural_key(kv[0]))}
    if has_token_routers(config):
        batch = sample_batch(exp, examples=examples, split=split)
        recorded = record_routing(model, batch)
        for key, weights in sorted(recorded.items(), key=lambda kv: _natural_key(kv[0])):
            path, name = key.rsplit("/", 1)
            if path in task_routers:  # their per-example records repeat task_weights()
                continue
            suffix = TOKEN_WEIGHTS if name == "weights" else f"{TOKEN_WEIGHTS}_{name}"
            out[f"{path}/{suffix}"] = weights
        out.update({"tokens/encoder": batch["encoder_input_tokens"],
                    "tokens/decoder": batch["decoder_input_tokens"],
                    "tokens/decoder_targets": batch["decoder_target_tokens"],
                    "task_ids": batch["encoder_task_ids"][:, 0]})
    if not any(f"/{TASK_WEIGHTS}" in k or f"/{TOKEN_WEIGHTS}" in k for k in out):
        raise ValueError(f"{workdir}: the restored model holds no router (no module with "
                         "task_weights() and nothing recorded under peftjax.routing.record."
                         "capture); check config.peft.targets matched any module.")
    rows = max([v.shape[0] for k, v in out.items() if k.endswith(TASK_WEIGHTS)]
               + [exp.num_task_ids])
    out["task_names"] = np.array(task_names_by_id(exp.task_ids, rows))
    out["tasks_in_run"] = np.array(sorted(exp.task_ids.values()), np.int32)
    return out


def task_names_by_id(run_task_ids: Mapping[str, int], rows: int) -> list[str]:
    """Name of each task id `0..rows-1`: the run's tasks, then any other registered task with
    an id (say, the pretraining tasks of the same suite), "" for ids nobody registered."""
    import seqio

    from peftjax import data

    names = [""] * rows
    for name in seqio.TaskRegistry.names():
        try:
            task_id = data.task_id_of(name)
        except ValueError:  # a registered task without a task id
            continue
        if task_id < rows:
            names[task_id] = name
    for name, task_id in run_task_ids.items():
        names[task_id] = name
    return names


def sample_batch(exp, *, examples: int, split: str) -> dict[str, np.ndarray]:
    """The first `examples` examples of `split` of every task of the run, unpacked, in task
    order: int32 features `[examples x tasks, length]` as the train and eval steps see them."""
    from peftjax import data

    lengths = {"inputs": int(exp.config.data.inputs_length),
               "targets": int(exp.config.data.targets_length)}
    converter = data.TaskAwareEncDecFeatureConverter(pack=False)
    parts = []
    for name in exp.task_names:
        task = data.resolve(name)
        if split not in task.splits:
            raise ValueError(f"Task {name!r} has no {split!r} split (it has "
                             f"{sorted(task.splits)}); pick another split.")
        ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1).take(examples)
        parts += list(converter(ds, lengths).as_numpy_iterator())
    if not parts:
        raise ValueError(f"The run's tasks {exp.task_names} have no {split!r} examples.")
    return {k: np.stack([p[k] for p in parts]).astype(np.int32) for k in parts[0]}


def record_routing(model, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One teacher-forced, deterministic forward pass of `model` on `batch`, jitted, under
    `peftjax.routing.record.capture`: `{"<module path>/<name>": weights}` as NumPy arrays."""
    import jax
    from flax import nnx

    from peftjax.routing.record import capture

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, encoder_input_tokens, decoder_input_tokens, task_ids):
        def call(model, **inputs):
            return model(**inputs)

        _, weights, _ = capture(call)(nnx.merge(graphdef, state),
                                      encoder_input_tokens=encoder_input_tokens,
                                      decoder_input_tokens=decoder_input_tokens,
                                      task_ids=task_ids)
        return weights

    recorded = run(state, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                   batch["encoder_task_ids"][:, 0])
    out = {}
    for key, weights in jax.device_get(recorded).items():
        if isinstance(weights, tuple):  # a module called more than once: keep every call
            weights = np.stack(weights, axis=1)  # [n, calls, ...]
        out[key] = np.asarray(weights, np.float32)
    return out


def token_strings(workdir: str, ids: Sequence[int]) -> list[str]:
    """One label per token id in the vocabulary of the run at `workdir` (for plot axes):
    "<pad>" for 0, "</s>" for EOS, else the token's text."""
    from peftjax import data
    from peftjax.peft.runs import read_config

    config = read_config(workdir)
    data.import_task_modules(list(config.data.task_modules))
    vocab = data.vocabulary(config.data.mixture)
    special = {0: "<pad>", int(vocab.eos_id): "</s>"}
    return [special.get(int(i)) or vocab.decode([int(i)]) or f"<{int(i)}>" for i in ids]


def save_npz(weights: Mapping[str, np.ndarray], path: str) -> None:
    """Write `routing_weights`' arrays to `path` (an uncompressed .npz; names keep their "/")."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(f, **weights)


def load_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays `save_npz` (or `peftjax routing --out`) wrote, as a dict."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def router_paths(weights: Mapping[str, np.ndarray], kind: str = TASK_WEIGHTS) -> list[str]:
    """Module paths with `kind` ("task_weights" or "token_weights") arrays, in model order
    (encoder before decoder, layers by number)."""
    paths = [k.rsplit("/", 1)[0] for k in weights if k.rsplit("/", 1)[-1] == kind]
    return sorted(paths, key=_natural_key)


def token_key(path: str) -> str:
    """Which token array a token router's positions align with: "tokens/encoder" for encoder
    routers and the decoder's cross-attention keys / values (computed from the encoder's
    output), "tokens/decoder" for every other decoder router."""
    if path.startswith("encoder") or re.search(r"cross_attention\.(k|v)(\.|$)", path):
        return "tokens/encoder"
    return "tokens/decoder"


def _natural_key(path: str) -> list:
    # "encoder.layers.10" after "encoder.layers.9"; "encoder" before "decoder" as in the model.
    order = {"encoder": 0, "decoder": 1}
    return [(order.get(p, 2), int(p) if p.isdigit() else 0, p) for p in path.split(".")]


# ---------------------------------------------------------------------------- analysis --


def task_vectors(task_weights: Mapping[str, np.ndarray] | np.ndarray,
                 task_ids: Sequence[int]) -> np.ndarray:
    """Each task's routing over every router, concatenated: float64 `[len(task_ids), features]`.

    `task_weights`: the dict of `routing_weights` (its "*/task_weights" entries are used, in
    model order) or one array `[tasks, ...]`.
    """
    ids = np.asarray(task_ids, np.int64)
    if isinstance(task_weights, Mapping):
        paths = router_paths(task_weights)
        if not paths:
            raise ValueError("No '<path>/task_weights' arrays given: task similarity needs a "
                             "task-routed run (config.peft.method poly or mhr).")
        arrays = [np.asarray(task_weights[f"{p}/{TASK_WEIGHTS}"]) for p in paths]
    else:
        arrays = [np.asarray(task_weights)]
    return np.concatenate([a[ids].reshape(len(ids), -1) for a in arrays], axis=1
                          ).astype(np.float64)


def task_similarity(task_weights: Mapping[str, np.ndarray] | np.ndarray,
                    task_ids: Sequence[int], *, center: bool = False) -> np.ndarray:
    """Cosine similarity `[T, T]` of the tasks' routing vectors (`task_vectors`), T = len(ids).

    `center=True` subtracts the mean over the given tasks first, so routing every task shares
    (say, a skill all of them use) does not make every pair look alike.
    """
    v = task_vectors(task_weights, task_ids)
    if center:
        v = v - v.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = v / np.where(norms > 0, norms, 1.0)
    return v @ v.T


def token_task_profiles(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """Each task's mean token routing at every token router, concatenated (model order):
    float64 `[tasks, routers x experts]`, row = task id, averaged over the task's non-padding
    tokens (encoder or decoder positions, see `token_key`); zeros for ids with no examples.

    A token-routed run's counterpart of the task weights: `task_similarity(profiles, ids)`.
    """
    paths = router_paths(weights, TOKEN_WEIGHTS)
    if not paths:
        raise ValueError("No '<path>/token_weights' arrays given: token profiles need a token-"
                         "routed run (config.peft.method molora/smora or compose "
                         "fusion/molora/arrow).")
    task_ids = np.asarray(weights["task_ids"])
    rows = len(weights["task_names"])
    valid = {"tokens/encoder": np.asarray(weights["tokens/encoder"]) > 0,
             "tokens/decoder": np.asarray(weights["tokens/decoder_targets"]) > 0}
    one_hot_nk = (task_ids[:, None] == np.arange(rows)[None, :]).astype(np.float64)
    columns = []
    for path in paths:
        gates = np.asarray(weights[f"{path}/{TOKEN_WEIGHTS}"], np.float64)
        gates = gates.reshape(*gates.shape[:2], -1)  # [n, length, experts]
        mask_nl = valid[token_key(path)].astype(np.float64)
        sums_ke = np.einsum("nk,nl,nle->ke", one_hot_nk, mask_nl, gates)
        counts_k = one_hot_nk.T @ mask_nl.sum(axis=1)
        columns.append(sums_ke / np.maximum(counts_k, 1.0)[:, None])
    return np.concatenate(columns, axis=1)


def skill_task_name(name: str) -> str:
    """The synthetic-suite task of a task name: "synthetic_reverse_shift" -> "reverse_shift"."""
    from peftjax.data.synthetic import ALL_TASKS

    if name in ALL_TASKS:
        return name
    short = name.removeprefix("synthetic_")
    if short not in ALL_TASKS:
        raise ValueError(f"{name!r} is not a task of the synthetic suite "
                         f"(peftjax.data.synthetic.ALL_TASKS: {list(ALL_TASKS)}); skill overlap "
                         "is the ground truth of that suite only.")
    return short


def skill_overlap(task_names: Sequence[str]) -> np.ndarray:
    """Ground truth `[T, T]`: Jaccard overlap of the tasks' skill sets (synthetic suite; names
    with or without the seqio prefix "synthetic_")."""
    from peftjax.data.synthetic import skill_overlap as jaccard

    return jaccard([skill_task_name(n) for n in task_names])


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `x` `[n]`, ties sharing their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two `[T, T]` matrices over their upper triangles (diagonal
    excluded: a task's similarity to itself says nothing). 1-D inputs are compared whole.

    NaN when either side is constant (no ranking to compare).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rank_correlation needs matrices of one shape, got {a.shape} and "
                         f"{b.shape}.")
    if a.ndim == 2:
        if a.shape[0] != a.shape[1] or a.shape[0] < 3:
            raise ValueError(f"rank_correlation needs square [T, T] matrices with T >= 3 (at "
                             f"least 3 pairs), got {a.shape}.")
        upper = np.triu_indices(a.shape[0], k=1)
        a, b = a[upper], b[upper]
    elif a.ndim != 1:
        raise ValueError(f"rank_correlation takes [T, T] matrices or vectors, got {a.shape}.")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    return float(np.sum(ra * rb) / denominator) if denominator > 0 else float("nan")


def routing_entropy_history(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """`(steps, entropy)` from `workdir/metrics.jsonl`: the mean routing entropy (nats) the train
    loop logged at each log step. Empty arrays when the run logged none (no routers)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: routing entropy is logged there by "
                                f"`peftjax train --workdir {workdir}`; train the run first.")
    steps, values = [], []
    with open(path) as f:
        for line in f:
            record = json.loads(line) if line.strip() else {}
            if "routing_entropy" in record and "step" in record:
                steps.append(int(record["step"]))
                values.append(float(record["routing_entropy"]))
    return np.array(steps, np.int64), np.array(values, np.float64)
