"""Conditioning data: language ids through packing, the id and description registries, the
multilingual (cipher) synthetic suite and its mixtures."""

import importlib
import itertools

import numpy as np
import pytest
import seqio
import tensorflow as tf

import peftjax.data as data
from peftjax.data import descriptions, features, pipeline, synthetic


@pytest.fixture(scope="module")
def registered():
    """The `tasks.synthetic` module, imported the way the training loop does it."""
    pipeline.import_task_modules(["tasks.synthetic"])
    return importlib.import_module("tasks.synthetic")


def id_dataset(rows, *, with_language=True):
    """A tf.data dataset of hand-made (inputs, targets, task_id[, language_id]) examples."""
    signature = {
        "inputs": tf.TensorSpec([None], tf.int32),
        "targets": tf.TensorSpec([None], tf.int32),
        "task_id": tf.TensorSpec([], tf.int32),
    }
    if with_language:
        signature["language_id"] = tf.TensorSpec([], tf.int32)

    def generate():
        for inputs, targets, task_id, language_id in rows:
            ex = {"inputs": inputs, "targets": targets, "task_id": task_id}
            if with_language:
                ex["language_id"] = language_id
            yield ex

    return tf.data.Dataset.from_generator(generate, output_signature=signature)


def segments(tokens, segment_ids):
    """{segment id: decoded text} of one packed row."""
    vocab = seqio.ByteVocabulary()
    return {
        int(s): vocab.decode(tokens[segment_ids == s].tolist())
        for s in np.unique(segment_ids)
        if s > 0
    }


# -------------------------------------------------------------------- feature converter --

# Language 0 and task 0 are real ids; the packer treats zeros as padding.
TWO_ROWS = [([7, 8, 1], [3, 1], 0, 2), ([4, 5, 6, 1], [9, 9, 1], 5, 0)]


def test_converter_packs_language_ids_with_their_tokens():
    ds = id_dataset(TWO_ROWS)
    converter = features.TaskAwareEncDecFeatureConverter(pack=True)
    (out,) = converter(ds, {"inputs": 9, "targets": 6}).as_numpy_iterator()
    np.testing.assert_array_equal(out["encoder_input_tokens"], [7, 8, 1, 4, 5, 6, 1, 0, 0])
    np.testing.assert_array_equal(out["encoder_segment_ids"], [1, 1, 1, 2, 2, 2, 2, 0, 0])
    np.testing.assert_array_equal(out["encoder_language_ids"], [2, 2, 2, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["encoder_task_ids"], [0, 0, 0, 5, 5, 5, 5, 0, 0])
    np.testing.assert_array_equal(out["decoder_target_tokens"], [3, 1, 9, 9, 1, 0])
    np.testing.assert_array_equal(out["decoder_segment_ids"], [1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(out["decoder_language_ids"], [2, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["decoder_task_ids"], [0, 0, 5, 5, 5, 0])
    assert all(v.dtype == np.int32 for v in out.values())

    unpacked = features.TaskAwareEncDecFeatureConverter(pack=False)
    first, second = unpacked(ds, {"inputs": 5, "targets": 4}).as_numpy_iterator()
    np.testing.assert_array_equal(first["encoder_language_ids"], [2, 2, 2, 0, 0])
    np.testing.assert_array_equal(first["decoder_language_ids"], [2, 2, 0, 0])
    np.testing.assert_array_equal(second["encoder_language_ids"], [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(second["encoder_task_ids"], [5, 5, 5, 5, 0])
    np.testing.assert_array_equal(second["decoder_language_ids"], [0, 0, 0, 0])
    assert "encoder_segment_ids" not in first


def test_converter_without_language_id_emits_zeros():
    rows = [([7, 8, 1], [3, 1], 4, None), ([4, 1], [9, 9, 1], 5, None)]
    ds = id_dataset(rows, with_language=False)
    for pack in (True, False):
        converter = features.TaskAwareEncDecFeatureConverter(pack=pack)
        for out in converter(ds, {"inputs": 6, "targets": 6}).as_numpy_iterator():
            assert out["encoder_language_ids"].shape == (6,)
            assert out["decoder_language_ids"].shape == (6,)
            np.testing.assert_array_equal(out["encoder_language_ids"], 0)
            np.testing.assert_array_equal(out["decoder_language_ids"], 0)
            real = out["encoder_input_tokens"] > 0
            assert set(out["encoder_task_ids"][real].tolist()) <= {4, 5}
            assert out["encoder_task_ids"][real].min() >= 4  # The task ids are still there.


def test_converter_rejects_non_scalar_language_id():
    ds = tf.data.Dataset.from_tensors(
        {"inputs": [3, 1], "targets": [4, 1], "task_id": 1, "language_id": [1, 1]}
    )
    with pytest.raises(ValueError, match="'language_id' must be a scalar"):
        features.TaskAwareEncDecFeatureConverter(pack=True)(ds, {"inputs": 4, "targets": 4})


def test_converter_feature_tables():
    converter = features.TaskAwareEncDecFeatureConverter(pack=True)
    lengths = converter.get_model_feature_lengths({"inputs": 11, "targets": 7})
    assert lengths["encoder_language_ids"] == 11 and lengths["encoder_task_ids"] == 11
    assert lengths["decoder_language_ids"] == 7 and lengths["decoder_task_ids"] == 7
    for key in ("encoder_language_ids", "decoder_language_ids"):
        assert converter.MODEL_FEATURES[key].dtype == tf.int32
    assert features.LANGUAGE_ID_KEY == data.LANGUAGE_ID_KEY == "language_id"


def test_add_task_id_adds_both_ids_and_validates():
    ds = tf.data.Dataset.from_tensors({"inputs": [3, 1]})
    (ex,) = features.task_id_preprocessor(6, language_id=2)(ds).as_numpy_iterator()
    assert ex["task_id"] == 6 and ex["language_id"] == 2
    assert ex["task_id"].dtype == np.int32 and ex["language_id"].dtype == np.int32
    (ex,) = features.add_task_id(ds, 3).as_numpy_iterator()
    assert ex["language_id"] == 0
    with pytest.raises(ValueError, match="language ids must be >= 0"):
        features.task_id_preprocessor(1, language_id=-1)
    with pytest.raises(ValueError, match="language ids must be >= 0"):
        features.add_task_id(ds, 1, language_id=-2)
    with pytest.raises(ValueError, match="task ids must be >= 0"):
        features.add_task_id(ds, -1)


# ------------------------------------------------------------------------- id registry --


def test_task_ids_may_repeat_across_languages(registered):
    pipeline.register_task_id("cond_test_task", 1000)  # Two-argument form: language 0.
    pipeline.register_task_id("cond_test_task__fr", 1000, language_id=1)
    pipeline.register_task_id("cond_test_task__fr", 1000, 1)  # Same pair again: fine.
    assert pipeline.task_id_of("cond_test_task__fr") == pipeline.task_id_of("cond_test_task")
    assert data.language_id_of("cond_test_task") == 0
    assert data.language_id_of("cond_test_task__fr") == 1
    with pytest.raises(ValueError, match="already used by 'cond_test_task__fr'"):
        pipeline.register_task_id("cond_test_other", 1000, language_id=1)
    with pytest.raises(ValueError, match=r"already has id 1000 \(language id 1\)"):
        pipeline.register_task_id("cond_test_task__fr", 1000, language_id=2)
    with pytest.raises(ValueError, match=r"already has id 1000 \(language id 0\)"):
        pipeline.register_task_id("cond_test_task", 1001)
    with pytest.raises(ValueError, match="Language id for 'cond_test_x' must be an int >= 0"):
        pipeline.register_task_id("cond_test_x", 1002, language_id=-1)
    with pytest.raises(ValueError, match="is a mixture"):
        pipeline.language_id_of("synthetic_multilingual")
    # A seqio task registered without ids: language_id_of must say how to fix it.
    seqio.TaskRegistry.add(
        "cond_test_no_ids",
        source=seqio.FunctionDataSource(lambda split, shuffle_files: None, splits=["train"]),
        output_features={},
    )
    try:
        with pytest.raises(ValueError, match=r"register_task_id\('cond_test_no_ids', <id>\)"):
            pipeline.language_id_of("cond_test_no_ids")
    finally:
        seqio.TaskRegistry.remove("cond_test_no_ids")


def test_synthetic_language_tasks_have_their_ids(registered):
    for task, language in synthetic.LANGUAGE_PAIRS:
        name = registered.seqio_name(task, language)
        assert pipeline.task_id_of(name) == synthetic.TASK_IDS[task]
        assert pipeline.language_id_of(name) == synthetic.LANGUAGES[language]
    assert pipeline.language_id_of("synthetic_reverse_shift__atbash") == 1
    assert pipeline.task_id_of("synthetic_reverse_shift__rot13") == 5
    assert pipeline.language_id_of("synthetic_reverse_shift__rot13") == 2
    assert pipeline.language_id_of("synthetic_copy") == 0  # Pretraining tasks are plain.


# ------------------------------------------------------------------ description registry --


def test_description_registry():
    descriptions.register_description("cond_test_desc", "reverse the letters")
    descriptions.register_description("cond_test_desc", "reverse the letters")  # Idempotent.
    assert data.description_of("cond_test_desc") == "reverse the letters"
    with pytest.raises(ValueError, match="already has the description 'reverse the letters'"):
        descriptions.register_description("cond_test_desc", "copy the letters")
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="non-empty"):
            descriptions.register_description("cond_test_empty", empty)
    with pytest.raises(ValueError) as info:
        descriptions.description_of("cond_test_undescribed")
    message = str(info.value)
    assert "'cond_test_undescribed'" in message
    assert "peftjax.data.register_description(" in message
    assert "hyper_condition='description'" in message
    assert data.missing_descriptions(
        ["cond_test_undescribed", "cond_test_desc", "cond_test_zzz"]
    ) == ["cond_test_undescribed", "cond_test_zzz"]


def test_every_synthetic_task_has_its_description(registered):
    names = [
        *(registered.seqio_name(task) for task in synthetic.ALL_TASKS),
        *(registered.seqio_name(t, lang) for t, lang in synthetic.LANGUAGE_PAIRS),
    ]
    assert descriptions.missing_descriptions(names) == []
    description = descriptions.description_of("synthetic_reverse_shift__atbash")
    assert description == synthetic.DESCRIPTIONS["reverse_shift"]
    registered.register()  # Re-registering the same texts is fine.


def test_descriptions_name_the_skills_in_order():
    assert set(synthetic.DESCRIPTIONS) == set(synthetic.ALL_TASKS)
    assert synthetic.DESCRIPTIONS["copy"] == "copy the letters"
    assert synthetic.DESCRIPTIONS["reverse"] == "reverse the letters"
    assert synthetic.DESCRIPTIONS["reverse_shift"] == "reverse the letters, then shift them by one"
    assert synthetic.DESCRIPTIONS["reverse_upper_double"] == (
        "reverse the letters, upper-case them, then double them"
    )
    assert synthetic.describe(("double", "reverse")) == "double each letter, then reverse them"
    assert len(set(synthetic.DESCRIPTIONS.values())) == len(synthetic.DESCRIPTIONS)
    for task, skills in synthetic.ALL_TASKS.items():
        text = synthetic.DESCRIPTIONS[task]
        assert len(text.encode("utf-8")) <= synthetic.MAX_DESCRIPTION_BYTES < 64, text
        positions = [text.index(skill) for skill in skills]
        assert positions == sorted(positions), text
    with pytest.raises(ValueError, match="Unknown skills"):
        synthetic.describe(("rotate",))


# --------------------------------------------------------------------------- languages --


@pytest.mark.parametrize(
    "language, text, expected",
    [
        ("plain", "abcXYZ", "abcXYZ"),
        ("atbash", "abcxyz", "zyxcba"),
        ("atbash", "Hello", "Svool"),
        ("atbash", "mN", "nM"),
        ("rot13", "Hello", "Uryyb"),
        ("rot13", "amnz", "nzam"),
        ("rot13", "AZ", "NM"),
    ],
)
def test_ciphers_on_known_strings(language, text, expected):
    assert synthetic.cipher(language, text) == expected


def test_ciphers_are_case_preserving_involutions():
    assert synthetic.LANGUAGES == {"plain": 0, "atbash": 1, "rot13": 2}
    assert synthetic.NUM_LANGUAGE_IDS == 3
    letters = synthetic.ALPHABET + synthetic.ALPHABET.upper()
    for language in synthetic.LANGUAGES:
        ciphered = synthetic.cipher(language, letters)
        assert sorted(ciphered) == sorted(letters)  # A bijection on letters...
        assert ciphered[:26].islower() and ciphered[26:].isupper()  # ...keeping case.
        assert synthetic.cipher(language, ciphered) == letters
    with pytest.raises(ValueError, match="Unknown language 'klingon'"):
        synthetic.cipher("klingon", "abc")


@pytest.mark.parametrize(
    "task, letters, language, inputs, targets",
    [
        ("reverse_shift", "abz", "plain", "reverse_shift: abz", "acb"),
        ("reverse_shift", "abz", "atbash", "reverse_shift: abz", "zxy"),  # atbash("acb")
        ("shift_upper", "xyz", "rot13", "shift_upper: xyz", "LMN"),  # rot13("YZA")
        ("upper_double", "ab", "atbash", "upper_double: ab", "ZZYY"),  # atbash("AABB")
    ],
)
def test_example_for_ciphers_input_and_target(task, letters, language, inputs, targets):
    assert synthetic.example_for(task, letters, language) == synthetic.Example(inputs, targets)


def test_multilingual_examples_answer_in_the_language():
    for task, language in [("reverse_shift", "atbash"), ("shift_double", "rot13")]:
        for split in synthetic.SPLITS:
            examples = synthetic.make_examples(task, split, 250, 10, language)
            assert examples == synthetic.make_examples(task, split, 250, 10, language)
            for ex in examples:
                prefix, letters = ex.inputs.split(": ")
                assert prefix == task
                assert synthetic.is_heldout(letters) == (split == "validation")
                assert ex.targets == synthetic.cipher(language, synthetic.transform(task, letters))
                # The same input has another answer in the plain language.
                assert ex.targets != synthetic.transform(task, letters)
    # Each (task, language) draws its own letters.
    ex = synthetic.make_example("reverse_shift", "train", 0, "atbash")
    plain = synthetic.make_example("reverse_shift", "train", 0)
    assert plain.inputs != ex.inputs


def test_plain_language_is_the_existing_task():
    # Pinned from before languages existed: language 0 must not change a single example.
    assert synthetic.make_example("reverse_shift", "train", 0) == synthetic.Example(
        "reverse_shift: qukmbm", "ncnlvr"
    )
    for split in synthetic.SPLITS:
        assert synthetic.make_block("shift_upper", split, 1, "plain") == synthetic.make_block(
            "shift_upper", split, 1
        )


# ---------------------------------------------------------------------------- mixtures --


def test_multilingual_mixtures(registered):
    heldout = set(synthetic.HELDOUT_LANGUAGE_PAIRS)
    assert heldout <= set(synthetic.LANGUAGE_PAIRS)
    assert all(language != synthetic.PLAIN for _, language in heldout)
    for language in synthetic.LANGUAGES:
        if language != synthetic.PLAIN:
            assert sum(lang == language for _, lang in heldout) == 2
    heldout_tasks = [task for task, _ in heldout]
    assert len(set(heldout_tasks)) == len(heldout_tasks)  # Different tasks per language.

    train = set(synthetic.TRAIN_LANGUAGE_PAIRS)
    assert train == set(synthetic.LANGUAGE_PAIRS) - heldout
    assert len(train) == len(synthetic.SUITE_TASKS) * 3 - 4
    for task, language in heldout:
        assert any(t == task for t, _ in train)  # The task is trained in another language...
        assert any(lang == language for _, lang in train)  # ...and the language on other tasks.

    name = registered.seqio_name
    assert pipeline.task_names("synthetic_multilingual") == sorted(name(*p) for p in train)
    assert pipeline.task_names("synthetic_multilingual_heldout") == sorted(
        name(*p) for p in heldout
    )
    assert "synthetic_reverse_shift__atbash" in pipeline.task_names(
        "synthetic_multilingual_heldout"
    )
    assert "synthetic_reverse_shift" in pipeline.task_names("synthetic_multilingual")
    assert "synthetic_reverse_shift__atbash" not in pipeline.task_names("synthetic_multilingual")
    mixture = pipeline.resolve("synthetic_multilingual")
    assert all(mixture.get_rate(task) == 1.0 for task in mixture.tasks)
    # The existing mixtures are unchanged.
    assert pipeline.task_names("synthetic_suite") == sorted(name(t) for t in synthetic.SUITE_TASKS)


def _stream_lookup(pairs, seed, blocks):
    """(input text, target text) -> {(task_id, language_id)} over the first train blocks."""
    lookup = {}
    first = synthetic.first_train_block(seed)
    for task, language in pairs:
        ids = (synthetic.TASK_IDS[task], synthetic.LANGUAGES[language])
        for block in range(first, first + blocks):
            for ex in synthetic.make_block(task, "train", block, language):
                lookup.setdefault((ex.inputs, ex.targets), set()).add(ids)
    return lookup


def test_language_ids_in_packed_multilingual_batches(registered):
    kwargs = dict(batch_size=8, inputs_length=64, targets_length=48, pack=True, seed=1)
    batches = list(itertools.islice(pipeline.train_batches("synthetic_multilingual", **kwargs), 2))
    # seqio's shuffle buffer (1000) draws each task's first examples from its first ~4 blocks.
    lookup = _stream_lookup(synthetic.TRAIN_LANGUAGE_PAIRS, seed=1, blocks=5)
    languages_seen, rows_mixing_languages = set(), 0
    for batch in batches:
        assert batch["encoder_language_ids"].shape == (8, 64)
        assert batch["decoder_language_ids"].shape == (8, 48)
        for row in range(8):
            enc_seg, dec_seg = batch["encoder_segment_ids"][row], batch["decoder_segment_ids"][row]
            enc_lang = batch["encoder_language_ids"][row]
            dec_lang = batch["decoder_language_ids"][row]
            enc_task = batch["encoder_task_ids"][row]
            inputs = segments(batch["encoder_input_tokens"][row], enc_seg)
            targets = segments(batch["decoder_target_tokens"][row], dec_seg)
            assert inputs.keys() == targets.keys()
            for seg, text in inputs.items():
                (language_id,) = set(enc_lang[enc_seg == seg].tolist())
                assert set(dec_lang[dec_seg == seg].tolist()) == {language_id}
                (task_id,) = set(enc_task[enc_seg == seg].tolist())
                # The segment's (task, language) ids are those of the seqio task it came from.
                assert (task_id, language_id) in lookup[(text, targets[seg])], text
                languages_seen.add(language_id)
            assert np.all(enc_lang[enc_seg == 0] == 0) and np.all(dec_lang[dec_seg == 0] == 0)
            rows_mixing_languages += len(set(enc_lang[enc_seg > 0].tolist())) > 1
    assert languages_seen == {0, 1, 2}
    assert rows_mixing_languages > 0


def test_eval_batches_of_a_language_task(registered):
    name = "synthetic_reverse_shift__atbash"
    expected = synthetic.make_examples("reverse_shift", "validation", 0, 5, "atbash")
    ((batch, texts),) = pipeline.eval_batches(
        name, batch_size=8, inputs_length=32, targets_length=24, num_examples=5
    )
    assert texts == [ex.targets for ex in expected]
    vocab = seqio.ByteVocabulary()
    decoded = [vocab.decode(row.tolist()) for row in batch["encoder_input_tokens"][:5]]
    assert decoded == [ex.inputs for ex in expected]
    real = batch["encoder_input_tokens"] > 0
    np.testing.assert_array_equal(batch["encoder_language_ids"], np.where(real, 1, 0))
    np.testing.assert_array_equal(batch["encoder_task_ids"], np.where(real, 5, 0))
    dec_real = batch["decoder_target_tokens"] > 0
    np.testing.assert_array_equal(batch["decoder_language_ids"], np.where(dec_real, 1, 0))
