"""What a hypernetwork conditions on: task (and language) embeddings, or task descriptions.

A `Conditioner` maps ids to conditioning vectors `[rows, c]`:

  task           a learned embedding per task id (HyperFormer);
  task_language  a learned task embedding and a learned language embedding, concatenated
                 (Hyper-X), so a task x language pair never trained on still has a vector;
  description    the frozen base encoder's mean-pooled embedding of each task's description
                 (Text-to-LoRA / Hypter), fixed, so a new description is a new task zero-shot.

Generating once per task enumerates every row (`all_rows`, task-major: row `t * L + l`);
generating per example gathers one row per example (`rows_for`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models.context import Context
from peftjax.peft.variables import Conditioning, HyperParam

EOS_ID = 1


@dataclasses.dataclass(frozen=True)
class ConditionData:
    """What the run's data gives a hypernetwork to condition on (built by `peftjax.train`).

    Attributes:
      num_tasks: rows of the task table (largest task id + 1, training and held-out tasks).
      num_languages: rows of the language table (1 when the data has only language 0).
      descriptions: `[num_tasks, d_model]` frozen embeddings of the task descriptions (rows of
        ids no task of the run uses are zero), or None when not conditioning on descriptions.
    """

    num_tasks: int
    num_languages: int = 1
    descriptions: jax.Array | None = None


def description_tokens(texts: dict[int, str], num_tasks: int, encode, length: int) -> np.ndarray:
    """`[num_tasks, length]` int32 tokens of each task id's description (+ EOS), zero-padded;
    ids without a text stay all padding. `encode` is the vocabulary's `str -> list[int]`."""
    tokens = np.zeros((num_tasks, length), np.int32)
    for task_id, text in texts.items():
        ids = [*encode(text), EOS_ID][:length]
        tokens[task_id, :len(ids)] = ids
    return tokens


def embed_descriptions(model, tokens_tl: jax.Array) -> jax.Array:
    """`[tasks, d_model]`: the model's encoder over each description, mean-pooled over its
    tokens. Call it on the frozen base, before PEFT is attached (no adapter may shape the
    embedding the adapters are generated from)."""
    tokens_tl = jnp.asarray(tokens_tl)
    encoded_tld, mask_tl = model.encode(tokens_tl, Context())
    mask = mask_tl.astype(jnp.float32)[..., None]
    total = jnp.sum(encoded_tld.astype(jnp.float32) * mask, axis=1)
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


class Conditioner(nnx.Module):
    """Ids → conditioning vectors. Embedding tables start ~ N(0, 1) (HyperFormer's
    `torch.randn` task embeddings)."""

    def __init__(self, kind: str, data: ConditionData, *, embed_dim: int, rngs: nnx.Rngs):
        self.kind = kind
        self.num_tasks = data.num_tasks
        self.num_languages = data.num_languages if kind == "task_language" else 1
        if kind == "description" and data.descriptions is None:
            raise ValueError("config.peft.hyper_condition='description' needs the tasks' "
                             "description embeddings (ConditionData.descriptions).")
        # Each attribute is assigned once, a Variable or None (NNX fixes its kind then).
        self.descriptions = Conditioning(
            jnp.asarray(data.descriptions, jnp.float32),
            axes=("tasks", "embed")) if kind == "description" else None
        self.task_embed = HyperParam(
            jax.random.normal(rngs.params(), (data.num_tasks, embed_dim), jnp.float32),
            axes=("tasks", "hyper_embed")) if kind != "description" else None
        self.language_embed = HyperParam(
            jax.random.normal(rngs.params(), (self.num_languages, embed_dim), jnp.float32),
            axes=("languages", "hyper_embed")) if kind == "task_language" else None

    @property
    def num_rows(self) -> int:
        return self.num_tasks * self.num_languages

    @property
    def dim(self) -> int:
        table = self.descriptions if self.descriptions is not None else self.task_embed
        extra = 0 if self.language_embed is None else self.language_embed.value.shape[1]
        return table.value.shape[1] + extra

    def _task_table(self) -> jax.Array:
        table = self.descriptions if self.descriptions is not None else self.task_embed
        return table.value

    def all_rows(self) -> jax.Array:
        """`[tasks * languages, c]`: every task (x language), row `t * languages + l`."""
        tasks = self._task_table()
        if self.language_embed is None:
            return tasks
        langs = self.language_embed.value
        n_tasks, n_langs = tasks.shape[0], langs.shape[0]
        return jnp.concatenate([jnp.repeat(tasks, n_langs, axis=0),
                                jnp.tile(langs, (n_tasks, 1))], axis=-1)

    def row_ids(self, task_ids: jax.Array, language_ids: jax.Array | None) -> jax.Array:
        """Each id's row of `all_rows`, or `num_rows` (out of the table) for an id outside it."""
        valid = (task_ids >= 0) & (task_ids < self.num_tasks)
        rows = task_ids
        if self.language_embed is not None:
            language_ids = self._need_languages(language_ids)
            valid &= (language_ids >= 0) & (language_ids < self.num_languages)
            rows = task_ids * self.num_languages + language_ids
        return jnp.where(valid, rows, self.num_rows).astype(jnp.int32)

    def rows_for(self, task_ids_b: jax.Array, language_ids_b: jax.Array | None) -> jax.Array:
        """`[batch, c]`: each example's vector; NaN for an id outside the tables (under jit,
        where it cannot raise, a bad id gives NaN outputs rather than another task's)."""
        def take(table, ids):
            # Out-of-table ids (negative ones too: `take` would wrap those) read the fill row.
            size = table.shape[0]
            ids = jnp.where((ids < 0) | (ids >= size), size, ids)
            return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)

        rows = take(self._task_table(), task_ids_b)
        if self.language_embed is not None:
            langs = take(self.language_embed.value, self._need_languages(language_ids_b))
            rows = jnp.concatenate([rows, langs], axis=-1)
        return rows

    def check(self, task_ids: jax.Array | None, language_ids: jax.Array | None) -> None:
        """Raise ValueError, naming the table and the config key, for concrete ids outside the
        tables (traced ids are checked by the NaN rows instead)."""
        checks = [("task", task_ids, self.num_tasks, "config.peft.num_tasks")]
        if self.language_embed is not None:
            checks.append(("language", self._need_languages(language_ids), self.num_languages,
                           "config.peft.num_languages"))
        for what, ids, size, key in checks:
            if ids is None or isinstance(ids, jax.core.Tracer):
                continue
            bad = np.asarray(ids)[(np.asarray(ids) < 0) | (np.asarray(ids) >= size)]
            if bad.size:
                raise ValueError(
                    f"{what} id {int(bad[0])} is outside the hypernetwork's {what} embedding "
                    f"table of {size} rows (ids 0..{size - 1}); set {key} to more than the "
                    f"largest {what} id the data has, or drop the examples with that id.")

    def _need_languages(self, language_ids: jax.Array | None) -> jax.Array:
        if language_ids is None:
            raise ValueError("This hypernetwork conditions on task and language "
                             "(config.peft.hyper_condition='task_language'), so every call needs "
                             "language_ids (the data's `language_id` feature).")
        return language_ids
