"""What every router shares: recording without changing the model, and training in mixed-task
packed batches under jit on a mesh whose `model` axis splits the skills / experts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from peftjax.models import T5, preset
from peftjax.peft import PeftConfig, apply_peft
from peftjax.routing import RoutingWeights, capture
from peftjax.routing.record import entropy, mean_entropy
from peftjax.sharding import DEFAULT_RULES
from peftjax.train import build
from tests.helpers import single_and_sharded_step


def tokens(batch=2, length=5, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.integers(1, 200, (batch, length)), jnp.int32),
            jnp.asarray(rng.integers(1, 200, (batch, length)), jnp.int32))


def test_recording_needs_capture_and_leaves_the_model_unchanged():
    model = T5(preset("tiny"), rngs=nnx.Rngs(0))
    apply_peft(model, PeftConfig(method="molora", targets=r".*attention\.q"), num_tasks=3,
               rngs=nnx.Rngs(1))
    enc, dec = tokens()
    before = nnx.graphdef(model)
    plain = model(encoder_input_tokens=enc, decoder_input_tokens=dec)
    assert nnx.graphdef(model) == before  # nothing sown outside a capture
    assert not nnx.to_flat_state(nnx.state(model, RoutingWeights))

    @jax.jit
    def run(state):
        merged = nnx.merge(nnx.graphdef(model), state)
        return capture(lambda m, **kw: m(**kw))(merged, encoder_input_tokens=enc,
                                                decoder_input_tokens=dec)

    logits, weights, aux = run(nnx.state(model))
    np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)  # recording changes nothing
    # One router per attention q: encoder self, decoder self and cross, per layer.
    config = model.config
    assert len(weights) == config.num_encoder_layers + 2 * config.num_decoder_layers
    key = "encoder.layers.0.self_attention.q/weights"
    assert weights[key].shape == (*enc.shape, 4)  # [batch, length, experts]
    np.testing.assert_allclose(np.sum(weights[key], -1), 1.0, rtol=1e-6)
    assert float(aux) > 0.0  # the load-balancing term


def test_entropy_of_known_distributions():
    w = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    np.testing.assert_allclose(entropy(w), [0.0, np.log(4), np.log(2)], rtol=1e-6)
    assert float(mean_entropy({"a": w[:1], "b": w[1:2]})) == pytest.approx(np.log(4) / 2)
    assert float(mean_entropy({})) == 0.0


ROUTED_AXES = (("skills", "model"), ("experts", "model"))


@pytest.mark.parametrize("method, changes", [("mhr", {"num_splits": 4}), ("molora", {})])
def test_router_trains_sharded_in_mixed_task_packed_rows(method, changes):
    assert jax.device_count() == 4
    config = tiny.get_config()
    config.peft.method = method
    config.peft.targets = r".*attention\.(q|v)"
    config.peft.update(changes)
    config.data.pack = True  # rows mix tasks: per-token task ids
    config.data.inputs_length, config.data.targets_length = 64, 32  # room for 2-3 examples
    config.optim.warmup_steps = 0
    config.mesh.shape = {"data": 1, "fsdp": 2, "model": 2}
    # The skills / experts axis splits over `model` (replicated by default).
    config.mesh.rules = tuple(r for r in DEFAULT_RULES if r[0] not in ("skills", "experts")) \
        + ROUTED_AXES
    exp = build(config)
    specs = [v.sharding.spec for _, v in nnx.to_flat_state(exp.trainable)
             if v.get_metadata().get("axes") and set(v.get_metadata()["axes"])
             & {"skills", "experts"}]
    assert specs and all("model" in tuple(s) for s in specs), specs
    optimizer = optax.sgd(0.5)
    single, state, sharded, batch = single_and_sharded_step(exp, config, optimizer)
    np.testing.assert_allclose(float(single["loss_sum"]), float(sharded["loss_sum"]), rtol=1e-5)
    assert float(sharded["routing_entropy"]) > 0.0
    if method == "molora":
        assert float(sharded["aux_loss"]) > 0.0
    # Something trained (SGD on a fresh router moves at least the routing or the adapters).
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.trainable,
                         exp.trainable)
    assert max(jax.tree.leaves(moved)) > 0.0
