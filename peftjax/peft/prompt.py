"""Prompt tuning (Lester et al., 2021): learned vectors prepended to the encoder's input embeddings.

As HF peft's `PROMPT_TUNING` for seq2seq models: only the encoder input is prompted, the prompt
positions are always visible (attention-mask ones) and take relative positions `0..p-1`, the real
tokens `p..p+s-1`; the decoder's cross-attention sees the prompt's encoder states too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.context import Context
from peftjax.models.layers import EmbeddingHook
from peftjax.peft.config import PROMPT_INITS, PeftConfig
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.variables import Adapter


def initial_prompt(key: jax.Array, shape: tuple[int, ...], init: str,
                   embedding_vd: jax.Array) -> jax.Array:
    """float32 prompt of `shape` = `[(tasks,) p, d]`.

    "vocab": embeddings of tokens drawn uniformly from the whole vocabulary (HF peft's
    SAMPLE_VOCAB; a fresh draw per task); "random": N(0, 1) (torch.nn.Embedding's init, which is
    HF peft's RANDOM).
    """
    if init == "vocab":
        tokens = jax.random.randint(key, shape[:-1], 0, embedding_vd.shape[0])
        return jnp.take(embedding_vd, tokens, axis=0).astype(jnp.float32)
    if init == "random":
        return jax.random.normal(key, shape, jnp.float32)
    raise ValueError(f"Unknown config.peft.prompt_init {init!r}; choose from {PROMPT_INITS}.")


class PromptTuning(nnx.Module):
    """Replaces `encoder.prompt`: prepends `prompt` `[(tasks,) p, d]` to every example.

    Per task, each example's prompt is gathered by its `[batch]` task id. Packed rows (segment ids
    or per-token task ids) are refused: a row holds several examples but has only one start.
    """

    def __init__(self, prompt_pd: jax.Array, *, per_task: bool):
        axes = ("tasks",) if per_task else ()
        self.prompt = Adapter(prompt_pd, axes=(*axes, "virtual_tokens", "embed"))
        self.per_task = per_task

    def prompts(self, batch: int, ctx: Context | None) -> jax.Array:
        """`[batch, p, d]`: the shared prompt, or each example's task's prompt."""
        table = self.prompt.value
        if not self.per_task:
            return jnp.broadcast_to(table, (batch, *table.shape))
        ids = None if ctx is None else ctx.task_ids
        if ids is None:
            raise ValueError("Per-task prompt tuning needs task ids: pass task_ids=[batch].")
        if ids.ndim != 1 or ids.shape[0] != batch:
            raise ValueError(f"Prompt tuning needs one task id per example ([batch]={batch}), got "
                             f"task ids of shape {ids.shape}; per-token ids come from packed "
                             "rows, which cannot hold a prompt per example: set "
                             "config.data.pack=False.")
        return jnp.take(table, ids, axis=0)

    def __call__(self, x_bsd: jax.Array, key_mask_bs: jax.Array, segment_ids: jax.Array | None,
                 ctx: Context | None = None) -> tuple[jax.Array, jax.Array, None]:
        """`[b, s, d]` embeddings → `[b, p + s, d]`, mask `[b, p + s]` (prompt always visible)."""
        if segment_ids is not None:
            raise ValueError("Prompt tuning cannot prepend a prompt to each example of a packed "
                             "row; set config.data.pack=False.")
        batch = x_bsd.shape[0]
        prompt_bpd = self.prompts(batch, ctx).astype(x_bsd.dtype)
        visible_bp = jnp.ones((batch, prompt_bpd.shape[1]), key_mask_bs.dtype)
        return (jnp.concatenate([prompt_bpd, x_bsd], axis=1),
                jnp.concatenate([visible_bp, key_mask_bs], axis=1), None)


def _build(hook: EmbeddingHook, site: Site, config: PeftConfig) -> PromptTuning:
    del hook
    lead = (site.num_tasks,) if site.num_tasks else ()
    shape = (*lead, config.num_virtual_tokens, site.model_config.d_model)
    embedding_vd = site.model.shared.embedding.value  # the frozen token embeddings (read only)
    prompt = initial_prompt(site.rngs.params(), shape, config.prompt_init, embedding_vd)
    return PromptTuning(prompt, per_task=bool(site.num_tasks))


SPECS = {"prompt_tuning": MethodSpec(
    kinds=(EmbeddingHook,), targets=r"encoder\.prompt", build=_build,
    where="the encoder's input embeddings: encoder.prompt",
    packing=False)}
