"""A seqio encoder-decoder feature converter that carries per-token task ids.

Task datasets carry a scalar int32 `task_id` feature (added by `add_task_id`). The converter
emits, besides seqio's standard encoder-decoder features, the per-token features

  encoder_task_ids  int32 [inputs_length]   aligned with encoder_input_tokens
  decoder_task_ids  int32 [targets_length]  aligned with decoder_target_tokens (not shifted)

where each token carries the id of the example (packed segment) it came from, and padding is 0.
Task id 0 is a real task, so padding must be told apart with the segment ids / loss weights.

Under packing the ids are packed *alongside* the tokens: the scalar id is expanded to sequences
as long as `inputs` and `targets`, and seqio's packer moves them together with the tokens.
seqio's packer takes a sequence's length to be its number of non-zero entries, so ids are packed
shifted by one (id + 1 >= 1) and shifted back afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import seqio
import tensorflow as tf

TASK_ID_KEY = "task_id"
_SHIFTED_IDS = {"inputs": "inputs_task_ids", "targets": "targets_task_ids"}

_Spec = seqio.FeatureConverter.FeatureSpec


def add_task_id(dataset: tf.data.Dataset, task_id: int) -> tf.data.Dataset:
    """seqio preprocessor: adds the scalar int32 feature `task_id` to every example."""
    if task_id < 0:
        raise ValueError(f"task ids must be >= 0, got {task_id}.")
    constant = tf.constant(task_id, dtype=tf.int32)
    return dataset.map(lambda ex: {**ex, TASK_ID_KEY: constant})


def task_id_preprocessor(task_id: int) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """`add_task_id` bound to one id, for a seqio Task's `preprocessors` list."""
    return functools.partial(add_task_id, task_id=task_id)


def _expand_task_id(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Adds `inputs_task_ids` / `targets_task_ids`: (task_id + 1) repeated once per token."""
    task_id = tf.cast(ex[TASK_ID_KEY], tf.int32)
    tf.debugging.assert_non_negative(task_id, message="task_id must be >= 0")
    # The scalar is consumed here (the packer would drop it anyway, with a warning).
    out = {k: v for k, v in ex.items() if k != TASK_ID_KEY}
    for feature, key in _SHIFTED_IDS.items():
        out[key] = tf.fill(tf.shape(ex[feature]), task_id + 1)
    return out


def _unshift(shifted_ids: tf.Tensor) -> tf.Tensor:
    # Padding is 0 in the shifted ids; it maps to -1 and is clipped back to 0.
    return tf.maximum(shifted_ids - 1, 0)


class TaskAwareEncDecFeatureConverter(seqio.EncDecFeatureConverter):
    """`seqio.EncDecFeatureConverter` plus per-token `encoder_task_ids` / `decoder_task_ids`.

    Input: examples with int32 `inputs` [<= inputs_length], `targets` [<= targets_length] and a
    scalar int32 `task_id`. Output (all int32):

      encoder_input_tokens, encoder_task_ids                         [inputs_length]
      decoder_target_tokens, decoder_input_tokens,
      decoder_loss_weights, decoder_task_ids                         [targets_length]
      pack=True only: encoder_segment_ids, encoder_positions         [inputs_length]
                      decoder_segment_ids, decoder_positions         [targets_length]

    `task_feature_lengths` stays {"inputs": ..., "targets": ...}, as for the base class, so the
    converter drops into `seqio.get_dataset`. Mixtures drop non-output features by default:
    pass `passthrough_features=["task_id"]` to `Mixture.get_dataset`.
    """

    MODEL_FEATURES = {
        **seqio.EncDecFeatureConverter.MODEL_FEATURES,
        "encoder_task_ids": _Spec(dtype=tf.int32),
        "decoder_task_ids": _Spec(dtype=tf.int32),
    }

    def _convert_features(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        if TASK_ID_KEY not in ds.element_spec:
            raise ValueError(
                f"{type(self).__name__} needs a scalar int32 '{TASK_ID_KEY}' feature, but the "
                f"dataset only has {sorted(ds.element_spec)}. Add "
                "peftjax.data.features.task_id_preprocessor(id) to the task's preprocessors, and "
                f"for a mixture pass passthrough_features=['{TASK_ID_KEY}'] to get_dataset."
            )
        if ds.element_spec[TASK_ID_KEY].shape.rank != 0:
            raise ValueError(
                f"'{TASK_ID_KEY}' must be a scalar per example, got shape "
                f"{ds.element_spec[TASK_ID_KEY].shape}."
            )
        ds = ds.map(_expand_task_id, num_parallel_calls=tf.data.AUTOTUNE)
        lengths = dict(task_feature_lengths)
        for feature, key in _SHIFTED_IDS.items():
            lengths[key] = task_feature_lengths[feature]
        ds = self._pack_or_pad(ds, lengths)
        return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = dict(super()._convert_example(features))
        out["encoder_task_ids"] = _unshift(features[_SHIFTED_IDS["inputs"]])
        out["decoder_task_ids"] = _unshift(features[_SHIFTED_IDS["targets"]])
        return out

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
        lengths["encoder_task_ids"] = task_feature_lengths["inputs"]
        lengths["decoder_task_ids"] = task_feature_lengths["targets"]
        return lengths
