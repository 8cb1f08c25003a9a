"""Routing analysis: exporting routers' weights from run directories (API and `peftjax routing`),
the analysis helpers, and `notebooks/routing_analysis` executed top to bottom on real runs.

Two tiny runs are trained once for the file (Poly and MoLoRA, a few steps at a high learning
rate so the routers move away from their init) through the CLI, as users make them.
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from peftjax.analysis import routing as analysis
from peftjax.config import to_json
from tests.helpers import REPO, run_peftjax, shared_compile_cache

EXAMPLES = 2  # eval examples per task that token routers run on
# Fewer adapted modules than the configs' every projection (faster to compile): self and cross
# attention q and v (cross v is a decoder router on encoder positions) and the FFN output.
TARGETS = r".*(attention\.(q|v)|mlp\.wo)"
NUM_ROUTERS = 3 * 3 + 3 * 5  # 3 encoder layers x (q, v, wo), 3 decoder layers x 5
SHORT = [f"--config.peft.targets={TARGETS}", "--config.train.steps=4", "--config.train.log_every=1",
         "--config.train.checkpoint_every=4", "--config.train.progress=False",
         "--config.data.batch_size=8", "--config.data.eval_batch_size=8",
         "--config.data.eval_examples=2", "--config.optim.warmup_steps=0",
         "--config.optim.learning_rate=0.03"]
NOTEBOOK = os.path.join(REPO, "notebooks", "routing_analysis")


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """Subprocesses (runs, the notebook's kernel) on one CPU device, not the 4 that conftest
    forces for the sharding tests: a quarter of the compile and step time. This process's
    devices are fixed already (`jax.devices()` initialises them first). They share a
    compilation cache: `peftjax routing` and the notebook run the same Poly forward."""
    import jax

    jax.devices()
    with (pytest.MonkeyPatch.context() as patch,
          shared_compile_cache(tmp_path_factory.mktemp("jax_cache"))):
        patch.setenv("XLA_FLAGS", "")
        yield


def _train(config: str, workdir: str) -> str:
    result = run_peftjax("train", "--config", os.path.join(REPO, "configs", config),
                         "--workdir", workdir, *SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_device):
    """{"poly": workdir, "molora": workdir}, trained side by side (separate processes)."""
    root = tmp_path_factory.mktemp("routing_runs")
    jobs = {"poly": "poly.py:quick", "molora": "molora.py:quick"}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(_train, config, str(root / name))
                   for name, config in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def poly_weights(runs):
    return analysis.routing_weights(runs["poly"], examples=EXAMPLES)


@pytest.fixture(scope="module")
def molora_weights(runs):
    return analysis.routing_weights(runs["molora"], examples=EXAMPLES)


def _run_config(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------ task routers --


def test_task_weights_are_the_trained_routers_per_layer_and_module(runs, poly_weights):
    from peftjax.peft import module_paths
    from peftjax.peft.runs import load_trained, read_config

    config = read_config(runs["poly"])
    exp, model = load_trained(runs["poly"], config)
    keys = [k for k in poly_weights if k.endswith("/task_weights")]
    assert sorted(k.rsplit("/", 1)[0] for k in keys) == sorted(exp.adapted_paths)
    assert len(keys) == NUM_ROUTERS and "encoder.layers.0.self_attention.q/task_weights" in keys
    assert "decoder.layers.1.cross_attention.v/task_weights" in keys
    modules = module_paths(model)
    fresh = module_paths(_fresh_model(config))
    in_run = poly_weights["tasks_in_run"]
    for key in keys:
        path = key.rsplit("/", 1)[0]
        got = poly_weights[key]
        assert got.shape == (exp.num_task_ids, 1, 4) and got.dtype == np.float32
        # Eval-time Poly weights in float64: sigmoid of the restored logits, normalised.
        logits = np.asarray(modules[path].router_logits.value, np.float64)
        want = 1 / (1 + np.exp(-logits))
        want /= want.sum(-1, keepdims=True)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
        # Trained, not the init: the run's tasks moved, ids outside the run did not.
        init = np.asarray(fresh[path].task_weights())
        assert np.abs(got[in_run] - init[in_run]).max() > 1e-3
        outside = np.setdiff1d(np.arange(exp.num_task_ids), in_run)
        np.testing.assert_allclose(got[outside], init[outside], atol=1e-6)
    names = poly_weights["task_names"]
    assert names.shape == (exp.num_task_ids,)
    assert [names[i] for i in in_run] == [n for n, _ in sorted(exp.task_ids.items(),
                                                                 key=lambda kv: kv[1])]
    assert names[0] == "synthetic_copy"  # a pretraining task: registered, not in the run
    assert sorted(in_run.tolist()) == sorted(exp.task_ids.values())
    assert not any(k.startswith("tokens/") for k in poly_weights)  # no token routers there


def _fresh_model(config):
    from flax import nnx

    from peftjax.train import build

    exp = build(config)
    return nnx.merge(exp.graphdef, exp.trainable, exp.frozen)


# ----------------------------------------------------------------------- token routers --


def test_token_weights_are_the_gates_on_each_token(runs, molora_weights):
    from peftjax.models import Context
    from peftjax.peft.runs import load_trained, read_config

    config = read_config(runs["molora"])
    w = molora_weights
    tasks = len(w["tasks_in_run"])
    n = EXAMPLES * tasks
    inputs_length, targets_length = config.data.inputs_length, config.data.targets_length
    keys = [k for k in w if k.endswith("/token_weights")]
    assert len(keys) == NUM_ROUTERS and not any(k.endswith("/task_weights") for k in keys)
    for key in keys:
        path = key.rsplit("/", 1)[0]
        length = inputs_length if analysis.token_key(path) == "tokens/encoder" else targets_length
        gates = w[key]
        assert gates.shape == (n, length, config.peft.num_experts), key
        np.testing.assert_allclose(gates.sum(-1), 1.0, atol=1e-5)
        assert ((gates > 0).sum(-1) == config.peft.top_k).all()  # top-2 of 4
    assert w["tokens/encoder"].shape == (n, inputs_length)
    assert w["tokens/decoder"].shape == w["tokens/decoder_targets"].shape == (n, targets_length)
    np.testing.assert_array_equal(w["tokens/decoder"][:, 1:], w["tokens/decoder_targets"][:, :-1])
    assert sorted(np.unique(w["task_ids"]).tolist()) == sorted(w["tasks_in_run"].tolist())
    assert np.all(np.bincount(w["task_ids"])[w["tasks_in_run"]] == EXAMPLES)
    assert analysis.token_key("decoder.layers.0.cross_attention.k") == "tokens/encoder"
    assert analysis.token_key("decoder.layers.0.cross_attention.q") == "tokens/decoder"

    # Per-task mean routing over each task's real tokens, every router side by side.
    profiles = analysis.token_task_profiles(w)
    assert profiles.shape == (len(w["task_names"]), NUM_ROUTERS * config.peft.num_experts)
    np.testing.assert_allclose(profiles[w["tasks_in_run"]].sum(1), NUM_ROUTERS, rtol=1e-5)
    outside = np.setdiff1d(np.arange(len(w["task_names"])), w["tasks_in_run"])
    assert not profiles[outside].any()
    task = w["tasks_in_run"][3]
    real = (w["task_ids"] == task)[:, None] & (w["tokens/decoder_targets"] > 0)
    path = analysis.router_paths(w, "token_weights")[-1]  # a decoder router, decoder positions
    assert analysis.token_key(path) == "tokens/decoder"
    np.testing.assert_allclose(profiles[task, -config.peft.num_experts:],
                               w[f"{path}/token_weights"][real].mean(0), rtol=1e-5)

    # The first encoder router in float64: top-2 of softmax(norm(embed(tokens)) W_g).
    _, model = load_trained(runs["molora"], config)
    tokens = w["tokens/encoder"]
    ctx = Context(np.asarray(w["task_ids"]), None)
    layer = model.encoder.layers[0]
    x = np.asarray(layer.attention_norm(model.shared(tokens), ctx), np.float64)
    logits = x @ np.asarray(layer.self_attention.q.router_kernel.value, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    kth = np.sort(p, -1)[..., -config.peft.top_k][..., None]
    want = np.where(p >= kth, p, 0.0)
    want /= want.sum(-1, keepdims=True)
    got = w["encoder.layers.0.self_attention.q/token_weights"]
    np.testing.assert_allclose(got, want, atol=2e-5)


# ---------------------------------------------------------------------------------- CLI --


def test_cli_writes_the_same_arrays(runs, poly_weights, tmp_path, one_device):
    out = tmp_path / "sub" / "poly.npz"
    result = run_peftjax("routing", "--workdir", runs["poly"], "--out", str(out),
                         f"--examples={EXAMPLES}")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = analysis.load_npz(str(out))
    assert list(saved) == list(poly_weights)
    for key, value in poly_weights.items():
        np.testing.assert_array_equal(saved[key], value)
    lines = result.stdout.strip().splitlines()
    assert "encoder.layers.0.self_attention.q/task_weights (13, 1, 4)" in lines
    assert "tasks_in_run (8,)" in lines and lines[-1] == f"Wrote {out}"


def test_a_run_without_routers_is_refused_with_the_methods_that_have_them(tmp_path):
    from configs import lora

    workdir = tmp_path / "lora"
    workdir.mkdir()
    (workdir / "config.json").write_text(to_json(lora.get_config("quick")))
    with pytest.raises(ValueError, match=r"method='lora', which has no routers; .*poly/mhr/"
                                         r"molora/smora or compose fusion/molora/arrow"):
        analysis.routing_weights(str(workdir))
    with pytest.raises(FileNotFoundError, match="holds no trained run"):
        analysis.routing_weights(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------- analysis helpers --


def test_rank_correlation_hand_cases():
    a = np.array([[1, 0.9, 0.5, 0.1], [0.9, 1, 0.3, 0.2], [0.5, 0.3, 1, 0.4],
                  [0.1, 0.2, 0.4, 1]])
    monotone = np.exp(3 * a) - 7  # same order of pairs, other values
    assert analysis.rank_correlation(a, monotone) == pytest.approx(1.0)
    assert analysis.rank_correlation(a, -a) == pytest.approx(-1.0)
    # The diagonal is ignored: changing it changes nothing.
    b = a.copy()
    np.fill_diagonal(b, -5)
    assert analysis.rank_correlation(a, b) == pytest.approx(1.0)
    # Ties get average ranks, as scipy's spearmanr (upper triangle, by hand).
    x, y = np.array([1, 2, 2, 3, 5, 5.0]), np.array([2, 1, 4, 3, 6, 5.0])
    rx, ry = np.array([1, 2.5, 2.5, 4, 5.5, 5.5]), np.array([2, 1, 4, 3, 6, 5.0])
    want = np.corrcoef(rx, ry)[0, 1]
    assert analysis.rank_correlation(x, y) == pytest.approx(want)
    assert np.isnan(analysis.rank_correlation(x, np.ones(6)))
    with pytest.raises(ValueError, match="one shape"):
        analysis.rank_correlation(a, a[:3, :3])


def test_skill_overlap_and_task_similarity():
    names = ["synthetic_reverse_shift", "reverse_upper", "shift_upper", "reverse_shift_upper"]
    overlap = analysis.skill_overlap(names)
    assert overlap[0, 1] == pytest.approx(1 / 3)  # {r, s} vs {r, u}
    assert overlap[0, 3] == pytest.approx(2 / 3)  # {r, s} vs {r, s, u}
    assert overlap[2, 3] == pytest.approx(2 / 3)
    np.testing.assert_allclose(np.diag(overlap), 1.0)
    with pytest.raises(ValueError, match="not a task of the synthetic suite"):
        analysis.skill_overlap(["glue_mrpc"])

    rng = np.random.default_rng(0)
    table = {f"m{i}/task_weights": rng.random((5, 2, 3)) for i in range(2)}
    ids = [4, 1, 2]
    vectors = np.concatenate([table[f"m{i}/task_weights"][ids].reshape(3, 6)
                              for i in range(2)], axis=1)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(analysis.task_similarity(table, ids), unit @ unit.T)
    centred = vectors - vectors.mean(0)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    np.testing.assert_allclose(analysis.task_similarity(table, ids, center=True),
                               centred @ centred.T)
    np.testing.assert_allclose(analysis.task_similarity(table["m0/task_weights"], ids),
                               analysis.task_similarity({"m0/task_weights":
                                                         table["m0/task_weights"]}, ids))
    with pytest.raises(ValueError, match="task-routed run"):
        analysis.task_similarity({"tokens/encoder": np.zeros((2, 3))}, [0])


def test_routing_entropy_history(runs, tmp_path):
    steps, entropy = analysis.routing_entropy_history(runs["poly"])
    assert steps.tolist() == [1, 2, 3, 4]
    assert np.all((entropy > 0) & (entropy <= np.log(4) + 1e-6))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"hparams": {}}\n')
    assert analysis.routing_entropy_history(str(tmp_path))[0].size == 0
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        analysis.routing_entropy_history(str(tmp_path / "missing"))


def test_npz_round_trip(poly_weights, tmp_path):
    analysis.save_npz(poly_weights, str(tmp_path / "w"))  # no ".npz" appended
    loaded = analysis.load_npz(str(tmp_path / "w"))
    assert list(loaded) == list(poly_weights)
    assert loaded["task_names"].dtype.kind == "U"


# ----------------------------------------------------------------------------- notebook --


def test_committed_notebook_matches_its_jupytext_source():
    import jupytext
    import nbformat

    source = jupytext.read(NOTEBOOK + ".py")
    committed = nbformat.read(NOTEBOOK + ".ipynb", as_version=4)

    def cells(nb):
        return [(c.cell_type, c.source) for c in nb.cells]

    assert cells(committed) == cells(source), (
        "notebooks/routing_analysis.ipynb is out of date: regenerate it with "
        "`jupytext --to ipynb notebooks/routing_analysis.py`")
    assert all(not c.get("outputs") for c in committed.cells), "commit the notebook unexecuted"


@pytest.mark.slow  # a kernel, two restores and the figures: ~20 s
def test_notebook_runs_top_to_bottom(runs, tmp_path, monkeypatch, one_device):
    import jupytext
    import nbclient

    figures = tmp_path / "figures"
    monkeypatch.setenv("RUN_DIR", runs["poly"])
    monkeypatch.setenv("TOKEN_RUN_DIR", runs["molora"])
    monkeypatch.setenv("FIG_DIR", str(figures))
    monkeypatch.setenv("EXAMPLES", str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", REPO)
    notebook = jupytext.read(NOTEBOOK + ".py")
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": REPO}}).execute()
    assert sorted(os.listdir(figures)) == ["expert_usage.png", "routing_entropy.png",
                                           "task_similarity.png", "task_skill_heatmaps.png",
                                           "token_routing.png"]
    text = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert "Spearman(routing similarity, skill overlap)" in text
