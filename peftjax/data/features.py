"""A seqio encoder-decoder feature converter that carries per-token task and language ids.

Task datasets carry the scalar int32 features `task_id` and `language_id` (both added by
`add_task_id`). The converter emits, besides seqio's standard encoder-decoder features, the
per-token features

  encoder_task_ids      int32 [inputs_length]   aligned with encoder_input_tokens
  encoder_language_ids  int32 [inputs_length]
  decoder_task_ids      int32 [targets_length]  aligned with decoder_target_tokens (not shifted)
  decoder_language_ids  int32 [targets_length]

where each token carries the ids of the example (packed segment) it came from, and padding is 0.
Task id 0 and language id 0 are real ids, so padding must be told apart with the segment ids /
loss weights. A dataset without `language_id` (a task registered before languages existed)
converts as if every example were in language 0.

Under packing the ids are packed *alongside* the tokens: each scalar id is expanded to sequences
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
LANGUAGE_ID_KEY = "language_id"
# Scalar id feature -> suffix of its per-token features (inputs_<suffix> while packing,
# encoder_<suffix> / decoder_<suffix> in the output).
_ID_SUFFIXES = {TASK_ID_KEY: "task_ids", LANGUAGE_ID_KEY: "language_ids"}
# Task feature -> model feature prefix of its per-token ids.
_SIDES = {"inputs": "encoder", "targets": "decoder"}

_Spec = seqio.FeatureConverter.FeatureSpec


def _check_id(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name}s must be >= 0, got {value}.")


def add_task_id(dataset: tf.data.Dataset, task_id: int, language_id: int = 0) -> tf.data.Dataset:
    """seqio preprocessor: adds the scalar int32 features `task_id` and `language_id`."""
    _check_id("task id", task_id)
    _check_id("language id", language_id)
    ids = {
        TASK_ID_KEY: tf.constant(task_id, dtype=tf.int32),
        LANGUAGE_ID_KEY: tf.constant(language_id, dtype=tf.int32),
    }
    return dataset.map(lambda ex: {**ex, **ids})


def task_id_preprocessor(
    task_id: int, language_id: int = 0
) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """`add_task_id` bound to one (task id, language id), for a seqio Task's `preprocessors`."""
    # Validate now, at registration, rather than when the dataset is first built.
    _check_id("task id", task_id)
    _check_id("language id", language_id)
    return functools.partial(add_task_id, task_id=task_id, language_id=language_id)


def _packed_key(feature: str, id_key: str) -> str:
    """The packed sequence of one id next to one task feature: inputs_task_ids, ..."""
    return f"{feature}_{_ID_SUFFIXES[id_key]}"


def _model_key(feature: str, id_key: str) -> str:
    """The output feature of one id next to one task feature: encoder_task_ids, ..."""
    return f"{_SIDES[feature]}_{_ID_SUFFIXES[id_key]}"


def _add_language_zero(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {**ex, LANGUAGE_ID_KEY: tf.constant(0, dtype=tf.int32)}


def _expand_ids(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Replaces each scalar id by `<feature>_<ids>`: (id + 1) repeated once per token."""
    # The scalars are consumed here (the packer would drop them anyway, with a warning).
    out = {k: v for k, v in ex.items() if k not in _ID_SUFFIXES}
    for id_key in _ID_SUFFIXES:
        value = tf.cast(ex[id_key], tf.int32)
        tf.debugging.assert_non_negative(value, message=f"{id_key} must be >= 0")
        for feature in _SIDES:
            out[_packed_key(feature, id_key)] = tf.fill(tf.shape(ex[feature]), value + 1)
    return out


def _unshift(shifted_ids: tf.Tensor) -> tf.Tensor:
    # Padding is 0 in the shifted ids; it maps to -1 and is clipped back to 0.
    return tf.maximum(shifted_ids - 1, 0)


def _check_scalar(ds: tf.data.Dataset, key: str) -> None:
    if ds.element_spec[key].shape.rank != 0:
        raise ValueError(
            f"'{key}' must be a scalar per example, got shape {ds.element_spec[key].shape}. "
            "Add it with peftjax.data.features.task_id_preprocessor(task_id, language_id)."
        )


class TaskAwareEncDecFeatureConverter(seqio.EncDecFeatureConverter):
    """`seqio.EncDecFeatureConverter` plus per-token task ids and language ids.

    Input: examples with int32 `inputs` [<= inputs_length], `targets` [<= targets_length], a
    scalar int32 `task_id` and optionally a scalar int32 `language_id` (missing: 0). Output (all
    int32):

      encoder_input_tokens, encoder_task_ids, encoder_language_ids   [inputs_length]
      decoder_target_tokens, decoder_input_tokens, decoder_loss_weights,
      decoder_task_ids, decoder_language_ids                         [targets_length]
      pack=True only: encoder_segment_ids, encoder_positions         [inputs_length]
                      decoder_segment_ids, decoder_positions         [targets_length]

    `task_feature_lengths` stays {"inputs": ..., "targets": ...}, as for the base class, so the
    converter drops into `seqio.get_dataset`. Mixtures drop non-output features by default:
    pass `passthrough_features=["task_id", "language_id"]` to `Mixture.get_dataset`.
    """

    MODEL_FEATURES = {
        **seqio.EncDecFeatureConverter.MODEL_FEATURES,
        **{
            _model_key(feature, id_key): _Spec(dtype=tf.int32)
            for id_key in _ID_SUFFIXES
            for feature in _SIDES
        },
    }

    def _convert_features(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        if TASK_ID_KEY not in ds.element_spec:
            raise ValueError(
                f"{type(self).__name__} needs a scalar int32 '{TASK_ID_KEY}' feature, but the "
                f"dataset only has {sorted(ds.element_spec)}. Add "
                "peftjax.data.features.task_id_preprocessor(id) to the task's preprocessors, and "
                f"for a mixture pass passthrough_features=['{TASK_ID_KEY}', '{LANGUAGE_ID_KEY}'] "
                "to get_dataset."
            )
        _check_scalar(ds, TASK_ID_KEY)
        if LANGUAGE_ID_KEY in ds.element_spec:
            _check_scalar(ds, LANGUAGE_ID_KEY)
        else:
            ds = ds.map(_add_language_zero)
        ds = ds.map(_expand_ids, num_parallel_calls=tf.data.AUTOTUNE)
        lengths = dict(task_feature_lengths)
        for id_key in _ID_SUFFIXES:
            for feature in _SIDES:
                lengths[_packed_key(feature, id_key)] = task_feature_lengths[feature]
        ds = self._pack_or_pad(ds, lengths)
        return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = dict(super()._convert_example(features))
        for id_key in _ID_SUFFIXES:
            for feature in _SIDES:
                out[_model_key(feature, id_key)] = _unshift(features[_packed_key(feature, id_key)])
        return out

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
        for id_key in _ID_SUFFIXES:
            for feature in _SIDES:
                lengths[_model_key(feature, id_key)] = task_feature_lengths[feature]
        return lengths
