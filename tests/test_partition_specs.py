"""Golden partition specs of the mesh presets: what shards where, snapshotted.

For each preset of `config.mesh.preset` on the 4 forced CPU devices (dp: data 4; fsdp: fsdp 4;
fsdp_tp: fsdp 2 x model 2 with the default tensor_parallel=2), a tiny T5 whose every dimension
divides by 4 (vocabulary 260, 4 tasks / skills / experts, bottleneck 4, ...) gets a
representative set of PEFT methods, and the PartitionSpec of every variable is compared with
`tests/golden/partition_specs.json`: `{preset: {"mesh": shape, "base": {"frozen": {path:
spec}}, method: {"trainable": {...}, "frozen": {...}}}}`. The base weights are listed once per
preset ("base"); a method's "frozen" holds its own frozen variables (a sparse mask, ...).
Shapes only (`nnx.eval_shape`): nothing is allocated. A change of the rules table, of a
method's axis names or of a preset's shape fails with a readable diff.

After an intended change, regenerate the file and review its diff:

    PEFTJAX_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_partition_specs.py

A last test builds a run under each preset with `peftjax.train.build` (placement as the golden
file says) and checks that one train step gives the single-device loss and update.
"""

import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from peftjax import data
from peftjax.hyper import ConditionData
from peftjax.models import T5, preset
from peftjax.peft import PeftConfig, apply_peft, trainable_filter
from peftjax.sharding import DEFAULT_RULES, mesh_from_config, state_shardings
from peftjax.train import build
from peftjax.train.loop import put_batch
from peftjax.train.step import init_train_state, make_train_step
from tests.helpers import first_batch, host, tiny_config

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "partition_specs.json")
UPDATE = os.environ.get("PEFTJAX_UPDATE_GOLDEN") == "1"
PRESETS = ("dp", "fsdp", "fsdp_tp")
NUM_TASKS = 4
VOCAB = 260  # 259 (the tiny preset's) divides by nothing: the vocabulary would never shard

# Representative methods: per-task tables, routers over skills / experts, hypernetwork heads,
# prefixes through an MLP, a frozen mask.
METHODS = {
    "lora_per_task": PeftConfig(method="lora", mode="per_task", targets=".*"),  # every Dense
    "houlsby": PeftConfig(method="houlsby"),
    "poly": PeftConfig(method="poly"),
    "molora": PeftConfig(method="molora"),
    "hyperformer_pp": PeftConfig(method="hyperformer_pp"),
    "prefix_tuning": PeftConfig(method="prefix_tuning", mode="per_task", prefix_projection=True),
    "sparse": PeftConfig(method="sparse", targets=r".*mlp\.wo", sparse_mask_from="unused"),
}


def _key(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def by_path(tree) -> dict:
    """`{"encoder/layers/0/...": leaf}` with Variables (or shardings) as leaves."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {"/".join(_key(k) for k in path): leaf for path, leaf in leaves}


def specs(state: nnx.State, mesh, keep=lambda variable: True) -> dict[str, str]:
    """`{path: str(PartitionSpec)}` of the variables of `state` that `keep`, as `build` places
    them (`state_shardings` with the rules table)."""
    placed = by_path(state_shardings(state, DEFAULT_RULES, mesh))
    return {path: str(placed[path].spec) for path, variable in by_path(state).items()
            if keep(variable)}


def is_base(variable) -> bool:
    return type(variable) is nnx.Param


def abstract_model(peft: PeftConfig | None) -> nnx.Module:
    def construct():
        model = T5(preset("tiny", vocab_size=VOCAB), rngs=nnx.Rngs(0))
        if peft is not None:
            apply_peft(model, peft, num_tasks=NUM_TASKS, rngs=nnx.Rngs(1),
                       conditioning=ConditionData(NUM_TASKS))
        return model

    return nnx.eval_shape(construct)


def snapshot() -> dict:
    models = {name: abstract_model(peft) for name, peft in METHODS.items()}
    base = abstract_model(None)
    out = {}
    for name in PRESETS:
        mesh = mesh_from_config(tiny_config(mesh__preset=name))
        entry = {"mesh": dict(mesh.shape), "base": {"frozen": specs(nnx.state(base), mesh)}}
        for method, model in models.items():
            _, trainable, frozen = nnx.split(model, trainable_filter(METHODS[method].method), ...)
            entry[method] = {"trainable": specs(trainable, mesh),
                             "frozen": specs(frozen, mesh, keep=lambda v: not is_base(v))}
        out[name] = entry
    return out


def all_specs(entry: dict) -> dict[str, str]:
    return {f"{group}/{part}/{path}": spec for group, parts in entry.items() if group != "mesh"
            for part, table in parts.items() for path, spec in table.items()}


def flatten(snap: dict) -> dict[str, object]:
    """`{"preset :: group/part/path": spec, "preset :: mesh": shape}`."""
    out = {}
    for name, entry in snap.items():
        out[f"{name} :: mesh"] = entry["mesh"]
        out.update({f"{name} :: {key}": spec for key, spec in all_specs(entry).items()})
    return out


def diff(golden: dict, now: dict, limit: int = 60) -> str:
    """One line per changed, added or removed entry (first `limit`)."""
    old, new = flatten(golden), flatten(now)
    lines = [f"  changed {k}: {old[k]} -> {new[k]}" for k in sorted(old.keys() & new.keys())
             if old[k] != new[k]]
    lines += [f"  added   {k}: {new[k]}" for k in sorted(new.keys() - old.keys())]
    lines += [f"  removed {k}: {old[k]}" for k in sorted(old.keys() - new.keys())]
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


@pytest.fixture(scope="module")
def current():
    return snapshot()


def test_partition_specs_match_the_golden_file(current):
    if UPDATE:
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(current, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(GOLDEN) as f:
        golden = json.load(f)
    if golden != current:
        pytest.fail("Partition specs differ from tests/golden/partition_specs.json "
                    "(preset :: group/part/path):\n" + diff(golden, current)
                    + "\nIf the change is intended, regenerate the file with "
                    "PEFTJAX_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q "
                    "tests/test_partition_specs.py and review its diff.")


def test_the_snapshot_really_shards(current):
    """Dimensions divide, so each preset shards what it promises (else the golden file would
    prove nothing: every spec replicated)."""
    assert current["dp"]["mesh"] == {"data": 4, "fsdp": 1, "model": 1}
    assert current["fsdp"]["mesh"] == {"data": 1, "fsdp": 4, "model": 1}
    assert current["fsdp_tp"]["mesh"] == {"data": 1, "fsdp": 2, "model": 2}
    assert not [s for s in all_specs(current["dp"]).values() if "fsdp" in s or "model" in s]
    fsdp, tp = current["fsdp"], current["fsdp_tp"]
    q = "encoder/layers/0/self_attention/q/kernel"
    assert fsdp["base"]["frozen"][q] == "P('fsdp', None)"
    assert tp["base"]["frozen"][q] == "P('fsdp', 'model')"
    assert tp["base"]["frozen"]["lm_head/kernel"] == "P('fsdp', 'model')"  # vocab 260 / 2
    assert tp["base"]["frozen"]["shared/embedding"] == "P('model', 'fsdp')"
    # Adapters split along the dimensions they share with the base kernel; tasks replicate.
    lora = tp["lora_per_task"]["trainable"]
    assert lora["encoder/layers/0/self_attention/q/lora_a"] == "P(None, 'fsdp', None)"
    assert lora["encoder/layers/0/self_attention/q/lora_b"] == "P(None, None, 'model')"
    assert lora["encoder/layers/0/mlp/wo/lora_a"] == "P(None, 'model', None)"
    assert fsdp["houlsby"]["trainable"]["encoder/layers/0/post_ffn/down"] == "P('fsdp', None)"
    # The sparse mask places exactly like its phi (frozen state has PEFT entries too).
    wo = "encoder/layers/0/mlp/wo"
    assert tp["sparse"]["frozen"][f"{wo}/mask"] == tp["sparse"]["trainable"][f"{wo}/phi"] \
        == "P('model', 'fsdp')"
    for name in ("fsdp", "fsdp_tp"):
        for method in set(METHODS) - {"hyperformer_pp"}:
            trainable = current[name][method]["trainable"]
            assert trainable and any("fsdp" in s for s in trainable.values()), (name, method)
        # The hypernetwork's axes are replicated by the default rules (see DEFAULT_RULES).
        hyper = current[name]["hyperformer_pp"]["trainable"]
        assert hyper and not [s for s in hyper.values() if "fsdp" in s or "model" in s]
    for method in ("lora_per_task", "poly", "molora", "prefix_tuning", "sparse"):
        assert any("model" in s for s in tp[method]["trainable"].values()), method


# Two sites (a joined_kv and an mlp kernel): each preset's step compiles anew (~4 s of CPU).
STEP_TARGETS = r"encoder\.layers\.0\.self_attention\.q|decoder\.layers\.1\.mlp\.wo"


def step_config(mesh_preset: str):
    return tiny_config(mesh__preset=mesh_preset, model__vocab_size=VOCAB, peft__mode="per_task",
                       peft__targets=STEP_TARGETS, peft__num_tasks=16, optim__warmup_steps=0,
                       data__inputs_length=64, data__targets_length=32)


@pytest.mark.slow  # four compiles of the train step: ~20 s of CPU
def test_each_preset_places_as_the_golden_file_and_steps_like_one_device(current):
    """`build` under each preset places per-task LoRA and the base as the snapshot says, and one
    SGD step on a packed batch of mixed-task rows equals the single-device step."""
    config = step_config("")
    data.import_task_modules(list(config.data.task_modules))
    assert config.data.pack
    batch = first_batch(config)  # the batch of tests/test_routing.py, test_hyper.py's steps
    assert any(len(set(row[row > 0])) > 1 for row in batch["encoder_task_ids"])  # mixed rows
    optimizer = optax.sgd(0.5)  # updates linear in the gradients (see tests/test_train.py)
    reference = build(config)
    one = jax.devices()[0]
    step = make_train_step(reference.graphdef, optimizer, packed=True,
                           num_task_ids=reference.num_task_ids, donate=False)
    state, frozen = jax.device_put((init_train_state(reference.trainable, optimizer),
                                    reference.frozen), one)
    single_state, single = step(state, frozen, jax.device_put(batch, one), jax.random.key(0))
    single_update = by_path(host(single_state.trainable))
    for name in PRESETS:
        exp = build(step_config(name))
        assert dict(exp.mesh.shape) == current[name]["mesh"]
        golden = current[name]["lora_per_task"]["trainable"]
        placed = {p: str(v.sharding.spec) for p, v in by_path(exp.trainable).items()}
        assert placed and all(golden[p] == s for p, s in placed.items()), name
        base = {p.replace("/base/", "/"): str(v.sharding.spec)
                for p, v in by_path(exp.frozen).items() if is_base(v)}
        assert base == current[name]["base"]["frozen"], name
        step = make_train_step(exp.graphdef, optimizer, packed=True,
                               num_task_ids=exp.num_task_ids, donate=False)
        sharded_state, sharded = step(init_train_state(exp.trainable, optimizer), exp.frozen,
                                      put_batch(batch, exp), jax.random.key(0))
        np.testing.assert_allclose(float(sharded["loss_sum"]), float(single["loss_sum"]),
                                   rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(float(sharded["grad_norm"]), float(single["grad_norm"]),
                                   rtol=1e-4, err_msg=name)
        update = by_path(host(sharded_state.trainable))
        assert update.keys() == single_update.keys()
        for path, value in update.items():
            np.testing.assert_allclose(value.get_value(), single_update[path].get_value(),
                                       rtol=1e-5, atol=1e-6, err_msg=f"{name} {path}")
    assert any(np.abs(v.get_value()).max() > 0 for k, v in single_update.items()
               if k.endswith("lora_b"))  # the step moved B (from zeros)
