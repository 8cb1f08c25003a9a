"""Logical-axis rules and mesh presets: every variable of every method is named, specs follow
the table, odd sizes replicate, unnamed variables are refused, presets resolve to the right
mesh and refuse what they would otherwise ignore."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from peftjax.config import ConfigError, validate
from peftjax.hyper import ConditionData
from peftjax.models import T5, preset
from peftjax.peft import METHODS, Adapter, PeftConfig, apply_peft, module_paths
from peftjax.peft.bottleneck import BottleneckAdapter
from peftjax.peft.compose import RULES, Source, attach, task_experts
from peftjax.peft.lora import LoRADense
from peftjax.peft.sparse import SparseDense
from peftjax.sharding import (
    DEFAULT_RULES,
    PRESETS,
    logical_to_spec,
    make_mesh,
    mesh_from_config,
    preset_shape,
    state_shardings,
)
from tests.helpers import tiny_config

CFG = preset("tiny")
NAMES = {name for name, _ in DEFAULT_RULES}
MESH = make_mesh({"data": 1, "fsdp": 2, "model": 2})

# ------------------------------------------------------------- every variable is named --

SHARED_ONLY = {"poly", "mhr", "molora", "smora"}  # they route by task id or token already
# Settings that create other variables than a method's defaults.
VARIANTS = {
    "lora": [dict(dora=True), dict(freeze_a=True), dict(rslora=True)],
    "houlsby": [dict(adapter_bias=True, adapter_norm=True)],
    "prefix_tuning": [dict(prefix_projection=True)],
    "prompt_tuning": [dict(prompt_init="random")],
    "road": [dict(road_variant="road_2"), dict(road_variant="road_4", road_group_size=8)],
    "mhr": [dict(num_splits=2)],
    "poly": [dict(router="uniform")],
    "hyperformer": [dict(hyper_condition="task_language"),
                    dict(hyper_condition="description")],
    "hyperformer_pp": [dict(hyper_condition="description"), dict(hyper_generate="per_example")],
    "text_to_lora": [dict(hyper_condition="description"),
                     dict(hyper_condition="task_language")],
    "sparse": [{}],
}
# Variable kinds each method must produce (besides what the base holds).
KINDS = {"none": set(), "full": set(), "lora": {"Adapter", "FrozenAdapter"},
         "sparse": {"Adapter", "FrozenAdapter"},
         **{m: {"Adapter", "Router"} for m in SHARED_ONLY},
         **{m: {"HyperParam", "Conditioning"} for m in ("hyperformer", "hyperformer_pp",
                                                       "text_to_lora")}}
CONDITIONING = ConditionData(3, 2, jnp.zeros((3, CFG.d_model)))


def abstract(build_fn):
    """The model `build_fn` makes, as shapes only (fast; nothing allocated)."""
    return nnx.eval_shape(build_fn)


def with_method(method: str, mode: str, **changes):
    def construct():
        model = T5(CFG, rngs=nnx.Rngs(0))
        if method == "sparse":  # shapes only: the mask is not read under eval_shape
            changes.setdefault("sparse_mask_from", "unused")
        apply_peft(model, PeftConfig(method=method, mode=mode, **changes), num_tasks=3,
                   rngs=nnx.Rngs(1), conditioning=CONDITIONING)
        return model

    return abstract(construct)


def unnamed(state) -> list[str]:
    """Paths of variables whose axes are missing, of the wrong length or not in the table."""
    bad = []
    for path, variable in nnx.to_flat_state(state):
        axes = variable.get_metadata().get("axes")
        if axes is None or len(axes) != variable.get_value().ndim or set(axes) - NAMES:
            bad.append(f"{'/'.join(map(str, path))}: {axes}")
    return bad


def kinds(model) -> set[str]:
    return {type(v).__name__ for _, v in nnx.to_flat_state(nnx.state(model))} - {"Param"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_variable_of_every_method_has_named_axes(method):
    """Trainable and frozen alike (routers, hypernetworks, frozen LoRA A, sparse masks,
    description embeddings), in both modes and with the settings that add variables."""
    seen = set()
    modes = ("shared",) if method in SHARED_ONLY else ("shared", "per_task")
    for mode in modes:
        for changes in [{}, *VARIANTS.get(method, [])]:
            model = with_method(method, mode, **changes)
            state = nnx.state(model)
            assert not unnamed(state), (mode, changes, unnamed(state)[:5])
            shardings = state_shardings(state, DEFAULT_RULES, MESH)  # and it places
            assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(state))
            seen |= kinds(model)
    assert seen >= KINDS.get(method, {"Adapter"}), seen


Q, V = "encoder.layers.0.self_attention.q", "decoder.layers.1.cross_attention.v"
FFN, FFN2 = "encoder.layers.1.post_ffn", "decoder.layers.0.post_ffn"


def lora_source(name, model, paths, tasks=None):
    current = module_paths(model)
    return Source(name, "lora", {
        p: LoRADense(getattr(current[p], "base", current[p]), rank=2, alpha=4.0,
                     num_tasks=len(tasks) + 1 if tasks else None, rngs=nnx.Rngs(0))
        for p in paths}, tasks=tasks or {})


def sparse_source(name, model, paths):
    current = module_paths(model)
    bases = {p: getattr(current[p], "base", current[p]) for p in paths}
    return Source(name, "sparse", {p: SparseDense(b, jnp.ones(b.kernel.get_value().shape, bool))
                                   for p, b in bases.items()})


def bottleneck_source(name, paths):
    return Source(name, "houlsby", {p: BottleneckAdapter(CFG.d_model, 8, rngs=nnx.Rngs(0))
                                    for p in paths})


def composed(compose, mode):
    """A tiny T5 with frozen in-memory sources under `compose` (and a new adapter)."""
    residual = compose in ("stack", "fusion")
    routed = compose in ("molora", "arrow")

    def construct():
        model = T5(CFG, rngs=nnx.Rngs(0))
        method = "houlsby" if residual else ("none" if routed else "lora")
        config = PeftConfig(method=method, mode=mode, compose=compose, top_k=1,
                            targets=None if residual else r".*self_attention\.q")
        adapted = apply_peft(model, config, num_tasks=3, rngs=nnx.Rngs(1))
        if residual:
            sources = [bottleneck_source("a", [FFN, FFN2]), bottleneck_source("b", [FFN])]
        elif compose == "arrow":  # a per-task LoRA run: one expert per task
            sources = task_experts(lora_source("p", model, [Q, V], tasks={"x": 0, "y": 1}))
        else:
            sources = [lora_source("a", model, [Q, V]), lora_source("b", model, [Q])]
            if not routed:
                sources.append(sparse_source("c", model, [V]))
        attach(model, config, sources, adapted, num_tasks=3, rngs=nnx.Rngs(2))
        return model

    return abstract(construct)


@pytest.mark.parametrize("compose", RULES)
def test_every_variable_of_every_composition_has_named_axes(compose):
    for mode in ("shared", "per_task"):
        if compose in ("molora", "arrow", "fusion") and mode == "per_task":
            continue  # nothing per task to attach (they refuse it)
        model = composed(compose, mode)
        state = nnx.state(model)
        assert not unnamed(state), (mode, unnamed(state)[:5])
        state_shardings(state, DEFAULT_RULES, MESH)
        assert "FrozenAdapter" in kinds(model)  # the sources


# ------------------------------------------------------------------ unnamed is refused --


class Extra(nnx.Module):
    def __init__(self, variable):
        self.extra = variable


@pytest.mark.parametrize("variable, message", [
    (Adapter(jnp.zeros((3, 64))), r"extra: Adapter of shape \(3, 64\) has no logical axes.*"
                                  r"axes=\("),
    (Adapter(jnp.zeros((3, 64)), axes=("tasks",)), r"extra: .*has axes \('tasks',\); give it "
                                                    "one logical axis name per dimension"),
    (Adapter(jnp.zeros((3, 64)), axes=("tasks", "width")),
     r"extra: .*'width' is not in config.mesh.rules. Add \('width', None\)"),
    (Adapter(jnp.zeros((3, 64)), axes=("tasks", None)), r"None is not in config.mesh.rules"),
])
def test_a_variable_the_rules_cannot_place_is_refused_by_name(variable, message):
    state = nnx.state(Extra(variable))
    with pytest.raises(ValueError, match=message):
        state_shardings(state, DEFAULT_RULES, MESH)


def test_a_name_missing_from_the_rules_names_the_path_and_the_count():
    model = with_method("lora", "per_task", targets=r".*self_attention\.q")
    rules = tuple(r for r in DEFAULT_RULES if r[0] != "lora_rank")
    with pytest.raises(ValueError, match=r"Cannot shard decoder/layers/0/self_attention/q/"
                                         r"lora_a: .*'lora_rank' is not in config.mesh.rules.*"
                                         r"\(7 more variable"):  # 4 sites x (A, B)
        state_shardings(nnx.state(model), rules, MESH)


def test_a_scalar_needs_no_axes_and_rules_must_name_mesh_axes():
    state = nnx.state(Extra(Adapter(jnp.zeros(()))))
    assert jax.tree.leaves(state_shardings(state, DEFAULT_RULES, MESH))[0].spec == P()
    with pytest.raises(ValueError, match=r"maps 'embed' to 'tensor'.*one of \('data', 'fsdp', "
                                         r"'model'\)"):
        state_shardings(state, (*DEFAULT_RULES, ("embed", "tensor")), MESH)
    config = tiny_config()
    config.mesh.rules = (*DEFAULT_RULES, ("tasks", ("fsdp", "model", "tensor")))
    with pytest.raises(ConfigError, match="'tensor'"):
        mesh_from_config(config)


# ----------------------------------------------------------------------- rules → specs --


def test_specs_follow_the_rules_table():
    rules = DEFAULT_RULES
    assert logical_to_spec(("embed", "joined_kv"), (64, 64), rules, MESH) == P("fsdp", "model")
    assert logical_to_spec(("mlp", "embed"), (128, 64), rules, MESH) == P("model", "fsdp")
    # vocab 259 is not divisible by 2: replicated rather than failing to place.
    assert logical_to_spec(("vocab", "embed"), (259, 64), rules, MESH) == P(None, "fsdp")
    # one mesh axis at most once per array
    assert logical_to_spec(("embed", "embed"), (64, 64), rules, MESH) == P("fsdp", None)
    assert logical_to_spec(("tasks", "embed", "lora_rank"), (3, 64, 8), rules, MESH) == P(
        None, "fsdp", None)


def test_model_state_places_on_a_4_device_mesh():
    mesh = make_mesh({"data": -1, "fsdp": 2, "model": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "model": 2}
    model = T5(CFG, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    placed = jax.device_put(state, state_shardings(state, DEFAULT_RULES, mesh))
    q = placed["encoder"]["layers"][0]["self_attention"]["q"]["kernel"].get_value()
    assert q.sharding.spec == P("fsdp", "model")
    assert len(q.addressable_shards) == 4 and q.addressable_shards[0].data.shape == (32, 32)


@pytest.mark.parametrize("shape, message", [
    ({"data": 3}, "needs 3 devices"),
    ({"data": -1, "model": -1}, "At most one"),
    ({"tensor": 2}, "unknown axes"),
])
def test_bad_mesh_shapes_name_the_fix(shape, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(shape)


# ----------------------------------------------------------------------------- presets --


@pytest.mark.parametrize("name, changes, shape", [
    ("", {}, {"data": 4, "fsdp": 1, "model": 1}),  # the default shape: data takes them all
    ("dp", {}, {"data": 4, "fsdp": 1, "model": 1}),
    ("fsdp", {}, {"data": 1, "fsdp": 4, "model": 1}),
    ("fsdp_tp", {}, {"data": 1, "fsdp": 2, "model": 2}),
    ("fsdp_tp", {"mesh__tensor_parallel": 4}, {"data": 1, "fsdp": 1, "model": 4}),
    ("fsdp_tp", {"mesh__tensor_parallel": 1}, {"data": 1, "fsdp": 4, "model": 1}),
])
def test_presets_resolve_to_their_mesh(name, changes, shape):
    config = validate(tiny_config(mesh__preset=name, **changes))
    assert dict(mesh_from_config(config).shape) == shape
    if name:
        assert preset_shape(name, 4, config.mesh.tensor_parallel) == shape


def test_without_a_preset_the_shape_is_used_as_given():
    config = tiny_config()
    config.mesh.shape = {"data": 2, "fsdp": -1, "model": 1}
    assert dict(mesh_from_config(config).shape) == {"data": 2, "fsdp": 2, "model": 1}


def test_preset_errors_name_the_keys_and_the_fix():
    with pytest.raises(ConfigError, match=r"'tp' is not a mesh preset; use one of \['dp', "
                                          r"'fsdp', 'fsdp_tp'\]"):
        mesh_from_config(tiny_config(mesh__preset="tp"))
    assert sorted(PRESETS) == ["dp", "fsdp", "fsdp_tp"]
    config = tiny_config(mesh__preset="fsdp")
    config.mesh.shape = {"data": 2, "fsdp": 2, "model": 1}
    with pytest.raises(ConfigError, match=r"preset='fsdp' sets the mesh shape, but "
                                          r"config.mesh.shape was also set.*preset=''"):
        mesh_from_config(config)
    with pytest.raises(ConfigError, match=r"tensor_parallel=3 does not divide the 4 device"):
        mesh_from_config(tiny_config(mesh__preset="fsdp_tp", mesh__tensor_parallel=3))
    with pytest.raises(ConfigError, match=r"tensor_parallel=4 is read by "
                                          r"config.mesh.preset='fsdp_tp' only"):
        mesh_from_config(tiny_config(mesh__preset="fsdp", mesh__tensor_parallel=4))


@pytest.mark.parametrize("name, key, message", [
    ("fsdp", "batch_size", r"batch_size=6 does not split evenly over 4 data-parallel shard\(s\) "
                           r"\(mesh data=1 x fsdp=4\).*multiple of 4"),
    ("fsdp_tp", "eval_batch_size", r"eval_batch_size=3 does not split evenly over 2 "
                                   r"data-parallel shard\(s\).*multiple of 2"),
])
def test_batch_sizes_must_split_over_the_data_parallel_shards(name, key, message):
    config = tiny_config(mesh__preset=name, **{f"data__{key}": 6 if name == "fsdp" else 3})
    with pytest.raises(ConfigError, match=message):
        mesh_from_config(config)
    config.data[key] = 12  # the model axis does not split the batch: 12 = 6 x 2 works on tp
    mesh_from_config(config)


def test_device_grid_keeps_tensor_parallel_groups_within_a_process(caplog):
    """Default arrangement: devices by (process, id), so `model` then `fsdp` fill a process's
    devices first; a `model` group spanning processes is reported with the fix."""
    from types import SimpleNamespace

    from peftjax.sharding.mesh import device_grid, model_axis_spread

    # Two hosts x 4 devices, listed interleaved (as no runtime promises an order).
    devices = [SimpleNamespace(platform="gpu", process_index=p, id=4 * p + i)
               for i in range(4) for p in (1, 0)]
    grid = device_grid((2, 2, 2), devices)
    assert [[d.process_index for d in row] for row in grid.reshape(-1, 2)] == [
        [0, 0], [0, 0], [1, 1], [1, 1]]
    assert [d.id for d in grid.reshape(-1)] == list(range(8))
    assert model_axis_spread(grid) == 1
    assert model_axis_spread(device_grid((1, 1, 8), devices)) == 2
    with caplog.at_level("WARNING", logger="peftjax.sharding.mesh"):
        make_mesh({"data": 2, "fsdp": 1, "model": 2})  # one process here: no warning
    assert "crossed" not in caplog.text and "processes" not in caplog.text
