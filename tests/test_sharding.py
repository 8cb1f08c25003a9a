"""Logical-axis rules: every parameter is named, specs follow the table, odd sizes replicate."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from peftjax.models import T5, preset
from peftjax.peft import PeftConfig, apply_peft
from peftjax.sharding import DEFAULT_RULES, logical_to_spec, make_mesh, state_shardings


def all_variables(model):
    return nnx.to_flat_state(nnx.state(model, nnx.Param))


def test_every_parameter_has_one_logical_axis_per_dimension():
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    apply_peft(model, PeftConfig(method="lora", mode="per_task", targets=".*"), num_tasks=3,
               rngs=nnx.Rngs(1))
    apply_peft(model, PeftConfig(method="houlsby", mode="shared"), num_tasks=None,
               rngs=nnx.Rngs(2))
    for path, variable in all_variables(model):
        axes = variable.get_metadata().get("axes")
        assert axes is not None and len(axes) == variable.value.ndim, path


def test_specs_follow_the_rules_table():
    mesh = make_mesh({"data": 1, "fsdp": 2, "model": 2})
    rules = DEFAULT_RULES
    assert logical_to_spec(("embed", "joined_kv"), (64, 64), rules, mesh) == P("fsdp", "model")
    assert logical_to_spec(("mlp", "embed"), (128, 64), rules, mesh) == P("model", "fsdp")
    # vocab 259 is not divisible by 2: replicated rather than failing to place.
    assert logical_to_spec(("vocab", "embed"), (259, 64), rules, mesh) == P(None, "fsdp")
    # one mesh axis at most once per array
    assert logical_to_spec(("embed", "embed"), (64, 64), rules, mesh) == P("fsdp", None)
    assert logical_to_spec(("tasks", "embed", "lora_rank"), (3, 64, 8), rules, mesh) == P(
        None, "fsdp", None)


def test_model_state_places_on_a_4_device_mesh():
    mesh = make_mesh({"data": -1, "fsdp": 2, "model": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "model": 2}
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    placed = jax.device_put(state, state_shardings(state, DEFAULT_RULES, mesh))
    q = placed["encoder"]["layers"][0]["self_attention"]["q"]["kernel"].value
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
