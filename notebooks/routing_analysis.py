# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Routing analysis: what did the routers learn?
#
# The synthetic suite's tasks compose string skills (`reverse_shift` = reverse, then shift), so
# we know which tasks *should* share parameters: those sharing skills. This notebook reads the
# routers of trained runs and asks whether they found that structure.
#
# * a **task router** run (Poly / MHR, `RUN_DIR`): each task mixes an inventory of LoRA skills
#   with weights `[tasks, splits, skills]` per adapted projection;
# * optionally a **token router** run (MoLoRA, SMoRA, or a fusion / molora / arrow composition,
#   `TOKEN_RUN_DIR`): every token picks its experts.
#
# Train the runs first, then run this notebook in Jupyter, or headless (figures go to
# `FIG_DIR`; `pip install -e ".[notebook]"` for the tools):
#
#     peftjax train --config configs/poly.py --workdir runs/poly
#     peftjax train --config configs/molora.py --workdir runs/molora
#     RUN_DIR=runs/poly TOKEN_RUN_DIR=runs/molora jupyter execute notebooks/routing_analysis.ipynb
#
# This file, `routing_analysis.py`, is the source: edit it, then regenerate the paired notebook
# with `jupytext --to ipynb notebooks/routing_analysis.py` (it also runs as a plain script). The
# same arrays come from the command line: `peftjax routing --workdir runs/poly --out
# routing.npz`.

# %% Parameters (environment variables; paths relative to the repository root)
import os
import sys

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.cluster import hierarchy  # noqa: E402
from scipy.spatial.distance import squareform  # noqa: E402

if os.path.basename(os.getcwd()) == "notebooks":  # Jupyter starts kernels beside the notebook
    os.chdir("..")
sys.path.insert(0, os.getcwd())  # the runs' config.data.task_modules (tasks.synthetic)

from peftjax import analysis  # noqa: E402

RUN_DIR = os.environ.get("RUN_DIR", "runs/poly")
TOKEN_RUN_DIR = os.environ.get("TOKEN_RUN_DIR", "")
FIG_DIR = os.environ.get("FIG_DIR", "notebooks/figures")
EXAMPLES = int(os.environ.get("EXAMPLES", "4"))  # eval examples per task for token routers
os.makedirs(FIG_DIR, exist_ok=True)


def short(name: str) -> str:
    return str(name).removeprefix("synthetic_")


def save(fig, name: str) -> None:
    path = os.path.join(FIG_DIR, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print("wrote", path)


# %% [markdown]
# ## The task router's weights
#
# `routing_weights` rebuilds the run, restores its checkpoint and reads every router's
# eval-time weights. Rows of task ids outside the run's mixture (`tasks_in_run`) were never
# trained, so only the run's tasks are shown.

# %%
weights = analysis.routing_weights(RUN_DIR, examples=EXAMPLES)
task_ids = weights["tasks_in_run"]
names = [short(n) for n in weights["task_names"][task_ids]]
paths = analysis.router_paths(weights)
splits, skills = weights[f"{paths[0]}/task_weights"].shape[1:]
print(f"{RUN_DIR}: {len(paths)} task routers, {len(names)} tasks, {splits} split(s) x "
      f"{skills} skills")


# %% [markdown]
# ### Task x skill weights, layer by layer
#
# One panel per (layer, module): rows are tasks, columns skills (grouped by MHR head when there
# are several splits). Colours show each weight's departure from uniform routing, `w - 1/skills`
# (one colour scale for all panels): a router still at its init is blank, and a router that
# learned the suite's structure gives tasks that share a skill similar rows.

# %%
def layer_and_module(path: str) -> tuple[str, str]:
    parts = path.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        return ".".join(parts[:3]), ".".join(parts[3:])
    return path, ""


layers = list(dict.fromkeys(layer_and_module(p)[0] for p in paths))
modules = list(dict.fromkeys(layer_and_module(p)[1] for p in paths))
show_layers = [layers[i] for i in np.unique(np.linspace(0, len(layers) - 1, 4).round().astype(int))]
show_modules = modules[:3]
keys = {(layer, module): f"{layer}.{module}/task_weights" if module else f"{layer}/task_weights"
        for layer in show_layers for module in show_modules}
keys = {where: key for where, key in keys.items() if key in weights}
limit = max(np.abs(weights[key][task_ids] - 1 / skills).max() for key in keys.values())
fig, axes = plt.subplots(len(show_layers), len(show_modules), squeeze=False,
                         figsize=(3.2 * len(show_modules), 2.6 * len(show_layers)))
for row, layer in enumerate(show_layers):
    for col, module in enumerate(show_modules):
        ax = axes[row, col]
        if (layer, module) not in keys:
            ax.axis("off")
            continue
        table = weights[keys[layer, module]][task_ids].reshape(len(task_ids), splits * skills)
        image = ax.imshow(table - 1 / skills, vmin=-limit, vmax=limit, cmap="RdBu_r",
                          aspect="auto")
        ax.set_title(f"{layer.replace('.layers.', ' ')}\n{module}", fontsize=8)
        ax.set_yticks(range(len(names)), names if col == 0 else [""] * len(names), fontsize=6)
        ax.set_xticks(range(splits * skills),
                      [f"h{h}s{k}" if splits > 1 else f"s{k}" for h in range(splits)
                       for k in range(skills)], fontsize=6, rotation=90)
        for h in range(1, splits):
            ax.axvline(h * skills - 0.5, color="white", lw=0.8)
        fig.colorbar(image, ax=ax, fraction=0.046)
fig.suptitle(f"Task x skill routing weights (eval) minus 1/{skills}")
fig.tight_layout()
save(fig, "task_skill_heatmaps.png")


# %% [markdown]
# ### Which tasks route alike?
#
# Each task's routing vector concatenates its weights over every layer, module and head. Left:
# cosine similarity of those vectors; middle: the ground truth, the Jaccard overlap of the
# tasks' skill sets; right: tasks clustered by routing (average linkage on `1 - similarity`).
# Spearman's rank correlation over task pairs measures the agreement (1 = same ordering of
# pairs). The centred variant subtracts the mean routing first, so a skill every task uses does
# not make all pairs look alike.

# %%
similarity = analysis.task_similarity(weights, task_ids)
overlap = analysis.skill_overlap(weights["task_names"][task_ids])
rho = analysis.rank_correlation(similarity, overlap)
rho_centred = analysis.rank_correlation(
    analysis.task_similarity(weights, task_ids, center=True), overlap)
print(f"Spearman(routing similarity, skill overlap) = {rho:.3f} (centred: {rho_centred:.3f})")

fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
off_diagonal = ~np.eye(len(names), dtype=bool)
for ax, matrix, title in ((axes[0], similarity, f"routing cosine similarity (rho={rho:.2f})"),
                          (axes[1], overlap, "skill overlap (Jaccard)")):
    # Routing weights are positive, so cosines crowd near 1: stretch the colours over the pairs.
    image = ax.imshow(matrix, cmap="magma", vmin=matrix[off_diagonal].min(), vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
distance = np.clip(1.0 - similarity, 0.0, None)
np.fill_diagonal(distance, 0.0)
linkage = hierarchy.linkage(squareform((distance + distance.T) / 2, checks=False), "average")
hierarchy.dendrogram(linkage, labels=names, ax=axes[2], orientation="right")
axes[2].set_title("tasks clustered by routing")
axes[2].set_xlabel("1 - cosine similarity")
fig.tight_layout()
save(fig, "task_similarity.png")


# %% [markdown]
# ## Routing entropy during training
#
# The train loop logs the mean entropy (nats) of every router's weights at each log step
# (`metrics.jsonl`). It starts near `log(skills)` (uniform routing) and falls as routers
# commit to fewer skills / experts. Training noise (Poly's relaxed Bernoulli) adds to it.

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for label, run in (("task router", RUN_DIR), ("token router", TOKEN_RUN_DIR)):
    if not run:
        continue
    steps, entropy = analysis.routing_entropy_history(run)
    ax.plot(steps, entropy, marker="o", ms=3, label=f"{label}: {os.path.basename(run)}")
ax.axhline(np.log(skills), color="gray", ls="--", lw=0.8,
           label=f"log {skills}: uniform over the task router's skills")
ax.set_xlabel("step")
ax.set_ylabel("routing entropy (nats)")
ax.legend(fontsize=8)
fig.tight_layout()
save(fig, "routing_entropy.png")

# %% [markdown]
# ## Token routers: which expert does each token use?
#
# For a token-routed run (`TOKEN_RUN_DIR`), `routing_weights` runs the model on a few eval
# examples per task (teacher-forced) and records each router's weights per token. Below: the
# weights over experts (rows) for every non-padding token (columns) of two examples, at the
# first encoder router and the last decoder router; then the mean weight each task gives each
# expert at those routers (a router that specialises by task shows distinct rows).

# %%
if TOKEN_RUN_DIR:
    tokens = analysis.routing_weights(TOKEN_RUN_DIR, examples=EXAMPLES)
    token_paths = analysis.router_paths(tokens, "token_weights")
    shown = [p for p in token_paths if analysis.token_key(p) == "tokens/encoder"][:1]
    shown += [p for p in token_paths if analysis.token_key(p) == "tokens/decoder"][-1:]
    rows = [0, len(tokens["task_ids"]) // 2]  # the first example of two different tasks
    token_names = tokens["task_names"]
    fig, axes = plt.subplots(len(rows), len(shown), squeeze=False,
                             figsize=(6.5 * len(shown), 2.4 * len(rows)))
    for col, path in enumerate(shown):
        key = analysis.token_key(path)
        for row, example in enumerate(rows):
            ids = tokens[key][example]
            if key == "tokens/decoder":  # positions that predict a target token
                keep = tokens["tokens/decoder_targets"][example] > 0
                labels = ["<start>"] + analysis.token_strings(TOKEN_RUN_DIR, ids[keep][1:])
            else:
                keep = ids > 0
                labels = analysis.token_strings(TOKEN_RUN_DIR, ids[keep])
            gates = tokens[f"{path}/token_weights"][example][keep]  # [tokens, experts]
            ax = axes[row, col]
            ax.imshow(gates.T, vmin=0, vmax=1, cmap="Blues", aspect="auto")
            ax.set_xticks(range(len(labels)), labels, fontsize=7)
            ax.set_yticks(range(gates.shape[1]), [f"e{e}" for e in range(gates.shape[1])],
                          fontsize=7)
            task = short(token_names[tokens["task_ids"][example]])
            ax.set_title(f"{path} | {task}", fontsize=8)
    fig.tight_layout()
    save(fig, "token_routing.png")

    fig, axes = plt.subplots(1, len(shown), squeeze=False, figsize=(4.5 * len(shown), 3.6))
    run_ids = tokens["tasks_in_run"]
    for col, path in enumerate(shown):
        key = analysis.token_key(path)
        valid = (tokens["tokens/decoder_targets"] if key == "tokens/decoder"
                 else tokens[key]) > 0  # [n, length]
        gates = tokens[f"{path}/token_weights"]
        usage = np.stack([gates[(tokens["task_ids"] == t)[:, None] & valid].mean(axis=0)
                          for t in run_ids])  # [tasks, experts]
        ax = axes[0, col]
        image = ax.imshow(usage, cmap="Blues", vmin=0, aspect="auto")
        ax.set_yticks(range(len(run_ids)), [short(token_names[t]) for t in run_ids], fontsize=7)
        ax.set_xticks(range(usage.shape[1]), [f"e{e}" for e in range(usage.shape[1])])
        ax.set_title(f"mean expert weight by task\n{path}", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    save(fig, "expert_usage.png")
else:
    print("TOKEN_RUN_DIR not set: no token-router figures.")
