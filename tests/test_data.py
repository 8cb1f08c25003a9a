"""peftjax.data: synthetic skills and tasks, task-id-aware packing, metrics, batch pipeline."""

import importlib
import itertools

import numpy as np
import pytest
import seqio
import tensorflow as tf

from peftjax.data import features, metrics, pipeline, synthetic

LENGTHS = dict(inputs_length=32, targets_length=24)


@pytest.fixture(scope="module")
def registered():
    """The `tasks.synthetic` module, imported the way the training loop does it."""
    pipeline.import_task_modules(["tasks.synthetic"])
    return importlib.import_module("tasks.synthetic")


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def segments(tokens, segment_ids):
    """{segment id: decoded text} of one packed row."""
    vocab = seqio.ByteVocabulary()
    return {
        int(s): vocab.decode(tokens[segment_ids == s].tolist())
        for s in np.unique(segment_ids)
        if s > 0
    }


def task_of_input(text):
    """Splits a model input into (task, letters): reverse_shift: abc -> (reverse_shift, abc)."""
    task, letters = text.split(": ")
    return task, letters


# ------------------------------------------------------------------------------ skills --


@pytest.mark.parametrize(
    "skill, text, expected",
    [
        ("reverse", "abc", "cba"),
        ("shift", "abyz", "bcza"),
        ("shift", "AZ", "BA"),
        ("upper", "abc", "ABC"),
        ("double", "abc", "aabbcc"),
        ("double", "", ""),
    ],
)
def test_skills_on_known_strings(skill, text, expected):
    assert synthetic.SKILLS[skill](text) == expected


@pytest.mark.parametrize(
    "task, letters, expected",
    [
        ("copy", "abc", "abc"),
        ("reverse_shift", "abz", "acb"),  # reverse "zba", then shift
        ("reverse_upper", "abc", "CBA"),
        ("reverse_double", "ab", "bbaa"),
        ("shift_upper", "xyz", "YZA"),
        ("shift_double", "az", "bbaa"),
        ("upper_double", "ab", "AABB"),
        ("reverse_shift_upper", "abc", "DCB"),
        ("shift_upper_double", "az", "BBAA"),
    ],
)
def test_compositions_apply_left_to_right(task, letters, expected):
    assert synthetic.transform(task, letters) == expected


def test_task_tables():
    assert all(name == "_".join(skills) for name, skills in synthetic.SUITE_TASKS.items())
    assert all(len(skills) >= 2 for skills in synthetic.SUITE_TASKS.values())
    assert synthetic.PRETRAIN_TASKS["copy"] == ()
    assert all(set(s) <= set(synthetic.SKILLS) for s in synthetic.ALL_TASKS.values())


def test_task_ids_are_fixed_and_unique():
    # Pinned: ids index learned task embeddings and routing analyses.
    assert synthetic.TASK_IDS == {
        "copy": 0,
        "reverse": 1,
        "shift": 2,
        "upper": 3,
        "double": 4,
        "reverse_shift": 5,
        "reverse_upper": 6,
        "reverse_double": 7,
        "shift_upper": 8,
        "shift_double": 9,
        "upper_double": 10,
        "reverse_shift_upper": 11,
        "shift_upper_double": 12,
        "reverse_shift_double": 13,
        "reverse_upper_double": 14,
    }
    assert synthetic.NUM_TASK_IDS == 15
    assert sorted(synthetic.TASK_IDS.values()) == list(range(synthetic.NUM_TASK_IDS))


def test_skill_overlap():
    overlap = synthetic.skill_overlap()
    ids = synthetic.TASK_IDS
    assert overlap.shape == (15, 15)
    np.testing.assert_array_equal(overlap, overlap.T)
    np.testing.assert_array_equal(np.diag(overlap), 1.0)
    assert overlap[ids["copy"], ids["reverse"]] == 0.0
    assert overlap[ids["reverse_shift"], ids["reverse_upper"]] == pytest.approx(1 / 3)
    assert overlap[ids["shift_upper"], ids["shift_upper_double"]] == pytest.approx(2 / 3)
    sub = synthetic.skill_overlap(["upper_double", "reverse_shift"])
    np.testing.assert_array_equal(sub, [[1.0, 0.0], [0.0, 1.0]])


def test_examples_are_deterministic_and_well_formed():
    for split in synthetic.SPLITS:
        # Crosses a block boundary, so it also checks index -> block bookkeeping.
        examples = synthetic.make_examples("shift_double", split, 250, 12)
        assert examples == synthetic.make_examples("shift_double", split, 250, 12)
        assert examples[7] == synthetic.make_example("shift_double", split, 257)
        for ex in examples:
            task, letters = task_of_input(ex.inputs)
            assert task == "shift_double"
            assert 3 <= len(letters) <= 8 and letters.isalpha() and letters.islower()
            assert ex.targets == synthetic.transform(task, letters)
    # Different tasks draw different letters.
    assert synthetic.make_example("copy", "train", 0) != synthetic.make_example("upper", "train", 0)


def test_train_and_validation_are_disjoint():
    def letters(task, split, count):
        return {
            task_of_input(ex.inputs)[1] for ex in synthetic.make_examples(task, split, 0, count)
        }

    validation = set().union(*(letters(t, "validation", 256) for t in synthetic.ALL_TASKS))
    train = set().union(*(letters(t, "train", 1024) for t in synthetic.ALL_TASKS))
    assert validation.isdisjoint(train)
    assert all(synthetic.is_heldout(s) for s in validation)


# ------------------------------------------------------------------------ registration --


def test_registration_is_idempotent(registered):
    registered.register()
    importlib.reload(registered)  # Re-running the module body must not raise either.
    for task, task_id in synthetic.TASK_IDS.items():
        name = f"synthetic_{task}"
        assert pipeline.task_id_of(name) == task_id
        assert isinstance(pipeline.resolve(name), seqio.Task)
    assert pipeline.task_names("synthetic_pretrain") == sorted(
        f"synthetic_{t}" for t in synthetic.PRETRAIN_TASKS
    )
    suite = pipeline.resolve("synthetic_suite")
    assert pipeline.task_names("synthetic_suite") == sorted(
        f"synthetic_{t}" for t in synthetic.SUITE_TASKS
    )
    assert all(suite.get_rate(task) == 1.0 for task in suite.tasks)
    assert pipeline.task_names("synthetic_heldout") == sorted(
        f"synthetic_{t}" for t in synthetic.HELDOUT_TASKS
    )
    assert not set(synthetic.HELDOUT_TASKS) & set(synthetic.SUITE_TASKS)
    task = pipeline.resolve("synthetic_reverse")
    assert task.metric_fns == [metrics.exact_match, metrics.token_accuracy]
    assert isinstance(pipeline.vocabulary("synthetic_suite"), seqio.ByteVocabulary)


def test_task_id_registry_rejects_conflicts(registered):
    pipeline.register_task_id("synthetic_copy", 0)  # Same id again: fine.
    with pytest.raises(ValueError, match="already has id 0"):
        pipeline.register_task_id("synthetic_copy", 99)
    with pytest.raises(ValueError, match="already used by 'synthetic_reverse'"):
        pipeline.register_task_id("some_new_task", 1)
    with pytest.raises(ValueError, match="is a mixture"):
        pipeline.task_id_of("synthetic_suite")


def test_unknown_names_suggest_close_matches(registered):
    with pytest.raises(ValueError) as info:
        pipeline.resolve("synthetic_suit")
    message = str(info.value)
    assert "'synthetic_suite'" in message and "task_modules" in message
    with pytest.raises(ValueError, match="synthetic_reverse_shift"):
        pipeline.task_id_of("synthetic_revers_shift")
    with pytest.raises(ModuleNotFoundError, match="tasks.no_such_module"):
        pipeline.import_task_modules(["tasks.no_such_module"])


# -------------------------------------------------------------------- feature converter --


def test_converter_packs_task_ids_with_their_tokens():
    # Three examples fit one packed row exactly; id 0 is a real task id (the packer treats
    # zeros as padding, which the converter must work around).
    rows = [
        ([7, 8, 1], [3, 1], 0),
        ([4, 5, 6, 1], [9, 9, 1], 5),
        ([2, 1], [4, 1], 12),
    ]
    ds = tf.data.Dataset.from_generator(
        lambda: ({"inputs": i, "targets": t, "task_id": k} for i, t, k in rows),
        output_signature={
            "inputs": tf.TensorSpec([None], tf.int32),
            "targets": tf.TensorSpec([None], tf.int32),
            "task_id": tf.TensorSpec([], tf.int32),
        },
    )
    converter = features.TaskAwareEncDecFeatureConverter(pack=True)
    (out,) = converter(ds, {"inputs": 10, "targets": 7}).as_numpy_iterator()
    np.testing.assert_array_equal(out["encoder_input_tokens"], [7, 8, 1, 4, 5, 6, 1, 2, 1, 0])
    np.testing.assert_array_equal(out["encoder_segment_ids"], [1, 1, 1, 2, 2, 2, 2, 3, 3, 0])
    np.testing.assert_array_equal(out["encoder_task_ids"], [0, 0, 0, 5, 5, 5, 5, 12, 12, 0])
    np.testing.assert_array_equal(out["decoder_target_tokens"], [3, 1, 9, 9, 1, 4, 1])
    np.testing.assert_array_equal(out["decoder_segment_ids"], [1, 1, 2, 2, 2, 3, 3])
    np.testing.assert_array_equal(out["decoder_task_ids"], [0, 0, 5, 5, 5, 12, 12])
    np.testing.assert_array_equal(out["decoder_input_tokens"], [0, 3, 0, 9, 9, 0, 4])

    unpacked = features.TaskAwareEncDecFeatureConverter(pack=False)
    first = next(unpacked(ds.skip(1), {"inputs": 6, "targets": 4}).as_numpy_iterator())
    np.testing.assert_array_equal(first["encoder_task_ids"], [5, 5, 5, 5, 0, 0])
    np.testing.assert_array_equal(first["decoder_task_ids"], [5, 5, 5, 0])
    assert "encoder_segment_ids" not in first


def test_converter_requires_task_id():
    ds = tf.data.Dataset.from_tensors({"inputs": [3, 1], "targets": [4, 1]})
    with pytest.raises(ValueError, match="task_id_preprocessor"):
        features.TaskAwareEncDecFeatureConverter(pack=True)(ds, {"inputs": 4, "targets": 4})


# ----------------------------------------------------------------------------- batches --


@pytest.fixture(scope="module")
def packed_suite_batches(registered):
    kwargs = dict(batch_size=8, inputs_length=64, targets_length=48, pack=True, seed=3)
    return take(pipeline.train_batches("synthetic_suite", **kwargs), 3)


def test_task_ids_survive_packing(packed_suite_batches):
    """Every token's id is the id of the example whose tokens sit there (checked from text)."""
    rows_mixing_tasks = 0
    for batch in packed_suite_batches:
        assert all(v.dtype == np.int32 and v.shape[0] == 8 for v in batch.values())
        assert batch["encoder_task_ids"].shape == (8, 64)
        assert batch["decoder_task_ids"].shape == (8, 48)
        for row in range(8):
            enc_seg, dec_seg = batch["encoder_segment_ids"][row], batch["decoder_segment_ids"][row]
            enc_ids, dec_ids = batch["encoder_task_ids"][row], batch["decoder_task_ids"][row]
            inputs = segments(batch["encoder_input_tokens"][row], enc_seg)
            targets = segments(batch["decoder_target_tokens"][row], dec_seg)
            assert inputs.keys() == targets.keys()  # Segment k of inputs pairs with k of targets.
            for seg, text in inputs.items():
                task, letters = task_of_input(text)
                assert task in synthetic.SUITE_TASKS
                assert targets[seg] == synthetic.transform(task, letters)
                assert np.all(enc_ids[enc_seg == seg] == synthetic.TASK_IDS[task])
                assert np.all(dec_ids[dec_seg == seg] == synthetic.TASK_IDS[task])
            assert np.all(enc_ids[enc_seg == 0] == 0) and np.all(dec_ids[dec_seg == 0] == 0)
            np.testing.assert_array_equal(batch["decoder_loss_weights"][row], dec_seg > 0)
            rows_mixing_tasks += len(set(enc_ids[enc_seg > 0].tolist())) > 1
    assert rows_mixing_tasks > 0  # Otherwise the test would not exercise mixed packing.


def test_unpacked_rows_carry_constant_ids(registered):
    kwargs = dict(batch_size=16, pack=False, seed=0, **LENGTHS)
    (batch,) = take(pipeline.train_batches("synthetic_pretrain", **kwargs), 1)
    assert "encoder_segment_ids" not in batch
    vocab = seqio.ByteVocabulary()
    for row in range(16):
        task, _ = task_of_input(vocab.decode(batch["encoder_input_tokens"][row].tolist()))
        enc_real = batch["encoder_input_tokens"][row] > 0
        dec_real = batch["decoder_target_tokens"][row] > 0
        np.testing.assert_array_equal(
            batch["encoder_task_ids"][row], np.where(enc_real, synthetic.TASK_IDS[task], 0)
        )
        np.testing.assert_array_equal(
            batch["decoder_task_ids"][row], np.where(dec_real, synthetic.TASK_IDS[task], 0)
        )


def test_resume_with_start_batch_equals_uninterrupted_stream(registered):
    kwargs = dict(batch_size=4, pack=True, **LENGTHS)
    full = take(pipeline.train_batches("synthetic_suite", seed=11, **kwargs), 5)
    resumed = take(pipeline.train_batches("synthetic_suite", seed=11, start_batch=3, **kwargs), 2)
    for a, b in zip(full[3:], resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    (other_seed,) = take(pipeline.train_batches("synthetic_suite", seed=12, **kwargs), 1)
    assert not np.array_equal(other_seed["encoder_input_tokens"], full[0]["encoder_input_tokens"])


def test_shards_are_the_rows_of_one_global_batch(registered):
    """Process shards split the same global batches (whatever the process count)."""
    kwargs = dict(batch_size=8, pack=True, seed=0, **LENGTHS)
    whole = take(pipeline.train_batches("synthetic_suite", **kwargs), 2)
    shards = [take(pipeline.train_batches("synthetic_suite", shard_index=i, num_shards=4,
                                          **kwargs), 2) for i in range(4)]
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            np.testing.assert_array_equal(
                np.concatenate([shard[step][key] for shard in shards]), value, err_msg=key)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        pipeline.train_batches("synthetic_suite", shard_index=0, num_shards=3, **kwargs)


def test_eval_batches_are_ordered_padded_and_labelled(registered):
    name = "synthetic_reverse_shift_upper"
    expected = [
        ex.targets for ex in synthetic.make_examples("reverse_shift_upper", "validation", 0, 256)
    ]
    batches = list(pipeline.eval_batches(name, batch_size=100, **LENGTHS))
    assert [len(texts) for _, texts in batches] == [100, 100, 56]
    assert [t for _, texts in batches for t in texts] == expected
    for batch, texts in batches:
        assert batch["encoder_input_tokens"].shape == (100, 32)
        assert pipeline.decode_tokens(name, batch["decoder_target_tokens"][: len(texts)]) == texts
        np.testing.assert_array_equal(batch["encoder_task_ids"][: len(texts), 0], 11)
    last, texts = batches[-1]
    assert not last["decoder_loss_weights"][len(texts) :].any()
    assert not last["encoder_input_tokens"][len(texts) :].any()

    few = list(pipeline.eval_batches(name, batch_size=8, num_examples=3, **LENGTHS))
    assert (
        len(few) == 1 and few[0][1] == expected[:3] and few[0][0]["encoder_task_ids"].shape[0] == 8
    )
    with pytest.raises(ValueError, match="is a mixture"):
        pipeline.eval_batches("synthetic_suite", batch_size=8, **LENGTHS)


def test_decode_tokens_round_trip(registered):
    vocab = pipeline.vocabulary("synthetic_copy")
    texts = ["abc", "ZYX", ""]
    ids = np.zeros((3, 10), np.int32)
    for row, text in enumerate(texts):
        tokens = [*vocab.encode(text), 1]  # 1 = EOS
        ids[row, : len(tokens)] = tokens
    ids[0, 5:9] = vocab.encode("junk")  # After EOS: must be ignored.
    assert pipeline.decode_tokens("synthetic_copy", ids) == texts
    assert pipeline.decode_tokens("synthetic_copy", ids[1]) == ["ZYX"]


# ----------------------------------------------------------------------------- metrics --


def test_exact_match():
    assert metrics.exact_match(["ab", "cd"], ["ab", "cx"]) == {"exact_match": 0.5}
    assert metrics.exact_match(["ab"], ["ab "]) == {"exact_match": 0.0}


def test_token_accuracy():
    # (3/4 + 1/2) / 2: a short prediction loses the missing positions.
    assert metrics.token_accuracy(["abcd", "ab"], ["abxd", "a"]) == {"token_accuracy": 0.625}
    assert metrics.token_accuracy(["ab"], ["abzzz"])["token_accuracy"] == 1.0
    assert metrics.token_accuracy(["ab"], ["ba"])["token_accuracy"] == 0.0
    assert metrics.token_accuracy(["", ""], ["", "x"])["token_accuracy"] == 0.5
    # Bytes, not characters: "é" is two bytes, of which the first matches "è".
    assert metrics.token_accuracy(["é"], ["è"])["token_accuracy"] == 0.5


@pytest.mark.parametrize("fn", [metrics.exact_match, metrics.token_accuracy])
def test_metrics_reject_empty_and_misaligned_inputs(fn):
    with pytest.raises(ValueError, match="no examples"):
        fn([], [])
    with pytest.raises(ValueError, match="aligned"):
        fn(["a"], ["a", "b"])
