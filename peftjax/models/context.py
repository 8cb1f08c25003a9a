"""The per-call context that travels with activations through the model.

The model is a pure function of (parameters, inputs, context): nothing in it holds random state or
task state. PEFT modules read the task ids from here; dropout reads its key from here.
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Context:
    """What a forward pass needs besides activations.

    Attributes:
      task_ids: int32 `[batch]` (one task per example) or `[batch, length]` (one per token, for
        packed rows that mix tasks), aligned with the activations this context travels with.
        None when no PEFT module needs it.
      dropout_key: PRNG key for dropout; None means deterministic (eval, decoding).
      language_ids: int32, shaped like `task_ids`: the example's language, for generators
        conditioned on task and language (Hyper-X); None when nothing reads it.
      generated: adapter weights made by a hypernetwork for this call (`peftjax.hyper`):
        `{site path: {name: [rows, ...]}}`, one row per task (or task x language) or per example.
      generated_ids: which row of `generated` each example (`[batch]`) or token (`[batch,
        length]`) uses, aligned with the activations like `task_ids`.
      layer_states: `{stack name: one layer's state, stacked on a leading layer axis}` for the
        scanned stacks (`peftjax.models.stacking`): the scans run on these instead of stacking
        the layers' own variables. None: every stack stacks its layers (or is unrolled).
    """

    task_ids: jax.Array | None = None
    dropout_key: jax.Array | None = None
    language_ids: jax.Array | None = None
    generated: dict[str, dict[str, jax.Array]] | None = None
    generated_ids: jax.Array | None = None
    layer_states: dict | None = None

    @property
    def deterministic(self) -> bool:
        return self.dropout_key is None

    def replace(self, **changes) -> Context:
        return dataclasses.replace(self, **changes)


def site_salt(name: str) -> int:
    """A stable integer for a dropout site, so every site draws an independent mask.

    The layer index of a path is left out (`encoder.layers.3.mlp.wo` salts as
    `encoder.layers.*.mlp.wo`): layers differ by their dropout key instead (`layer_context`),
    so every layer of a stack holds the same static data and the stack can run as one
    `jax.lax.scan` (`T5Config.scan_layers`).
    """
    return zlib.crc32(layer_path(name).encode()) & 0x7FFFFFFF


_LAYER_INDEX = re.compile(r"(?<![^.])layers\.\d+(?![^.])")


def layer_path(path: str) -> str:
    """`path` with its layer index starred (`encoder.layers.3.mlp` -> `encoder.layers.*.mlp`):
    the name a module inside a layer knows itself by, the same in every layer of a stack."""
    return _LAYER_INDEX.sub("layers.*", path)


def layer_context(ctx: Context, index: int | jax.Array,
                  generated: dict[str, dict[str, jax.Array]] | None = None) -> Context:
    """The context of layer `index` of a stack: its dropout key folded with the index (a Python
    int when the stack is unrolled, a traced one inside a scan: both give the same key), so
    layers draw different masks from the same per-site salts; and with `generated` (this
    layer's entry of `split_generated`), the layer's generated weights under their
    `layer_path`s."""
    if generated:
        ctx = ctx.replace(generated={**(ctx.generated or {}), **generated})
    if ctx.dropout_key is None:
        return ctx
    return ctx.replace(dropout_key=jax.random.fold_in(ctx.dropout_key, index))


def split_generated(ctx: Context, stack: str,
                    num_layers: int) -> tuple[Context, list[dict[str, dict]]]:
    """`ctx` without the generated weights of `stack`'s layers (`{stack}.{i}.<site>`), and
    those weights by layer: one `{layer_path: weights}` per layer (empty when the stack has
    none). Each layer's context then carries its own weights under names that do not depend on
    the layer (`layer_context(rest, i, per_layer[i])`), so a stack of hypernetwork sites can
    run as one scan, its weights stacked and sliced like the layers' parameters."""
    per_layer: list[dict[str, dict]] = [{} for _ in range(num_layers)]
    rest = {}
    for path, weights in (ctx.generated or {}).items():
        index, _, site = path.removeprefix(f"{stack}.").partition(".")
        if path.startswith(f"{stack}.") and index.isdigit():
            per_layer[int(index)][f"{stack}.*.{site}"] = weights
        else:
            rest[path] = weights
    return (ctx.replace(generated=rest) if any(per_layer) else ctx), per_layer


def dropout(x: jax.Array, rate: float, ctx: Context, salt: int) -> jax.Array:
    """Inverted dropout keyed by (ctx.dropout_key, salt); identity when deterministic."""
    if rate <= 0.0 or ctx.deterministic:
        return x
    key = jax.random.fold_in(ctx.dropout_key, salt)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
