"""tasks.glue: GLUE and SuperGLUE as seqio tasks over TFDS in T5's text-to-text format, their
metrics (peftjax.data.glue_metrics), mixing rates (peftjax.data.mixing) and a tiny Compacter run.

Offline: the TFDS builders are the real glue / super_glue ones, fed random examples by
`tfds.testing.mock_data` (no download, no prepared data); the vocabulary is seqio's bundled test
SentencePiece model. Mocked TFDS datasets have no split sizes (their split table is empty, as for
an unprepared dataset), so the mixing rates read sizes patched into
`seqio.TfdsDataSource.num_input_examples`: T5's published training-set sizes (TRAIN_SIZES).
The patch replaces the method on the class, so seqio's memoised TFDS builders are never asked.
"""

import importlib
import json
import math
import os
from unittest import mock

import numpy as np
import pytest
import scipy.stats
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from peftjax.data import glue_metrics as gm
from peftjax.data import mixing, pipeline

# The task table the brief fixes: GLUE 16..24, SuperGLUE 25..32, in this order.
GLUE_IDS = {f"glue_{t}": 16 + i for i, t in enumerate(
    ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"])}
SUPER_GLUE_IDS = {f"super_glue_{t}": 25 + i for i, t in enumerate(
    ["boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc"])}
TASK_IDS = {**GLUE_IDS, **SUPER_GLUE_IDS}
HYPERFORMER_GLUE = [f"glue_{t}" for t in ["rte", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli",
                                          "cola"]]
# Standard metrics per task (T5's GLUE_METRICS / SUPERGLUE_METRICS, our names).
METRICS = {
    "glue_cola": {"matthews_corrcoef"},
    "glue_sst2": {"accuracy"},
    "glue_mrpc": {"f1", "accuracy"},
    "glue_qqp": {"f1", "accuracy"},
    "glue_stsb": {"pearson_corrcoef", "spearman_corrcoef"},
    "glue_mnli": {"accuracy"},
    "glue_qnli": {"accuracy"},
    "glue_rte": {"accuracy"},
    "glue_wnli": {"accuracy"},
    "super_glue_boolq": {"accuracy"},
    "super_glue_cb": {"macro_f1", "accuracy"},
    "super_glue_copa": {"accuracy"},
    "super_glue_multirc": {"f1a", "exact_match"},
    "super_glue_record": {"exact_match", "f1"},
    "super_glue_rte": {"accuracy"},
    "super_glue_wic": {"accuracy"},
    "super_glue_wsc": {"accuracy"},
}
TRAIN_SIZES = {  # T5's glue_utils weights (= train sizes); ReCoRD counted in queries
    "glue/cola": 8_551, "glue/sst2": 67_349, "glue/mrpc": 3_668, "glue/qqp": 363_849,
    "glue/stsb": 5_749, "glue/mnli": 392_702, "glue/qnli": 104_743, "glue/rte": 2_490,
    "glue/wnli": 635, "super_glue/boolq": 9_427, "super_glue/cb": 250, "super_glue/copa": 400,
    "super_glue/multirc": 27_243, "super_glue/record": 100_730, "super_glue/rte": 2_490,
    "super_glue/wic": 5_428, "super_glue/wsc.fixed": 554,
}
MOCK_EXAMPLES = 6


def spm_test_model() -> str:
    return os.path.join(os.path.dirname(seqio.__file__), "test_data", "sentencepiece",
                        "sentencepiece.model")


@pytest.fixture(scope="module")
def glue():
    """tasks.glue, (re-)registered with seqio's test SentencePiece model."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFTJAX_SPM_MODEL", spm_test_model())
        patch.delenv("PEFTJAX_SPM_EXTRA_IDS", raising=False)
        module = importlib.import_module("tasks.glue")
        module.register()  # in case another test imported it under other settings
        yield module


def _mock_size(source: seqio.TfdsDataSource, split: str) -> int:
    return TRAIN_SIZES[source.tfds_dataset.name.split(":")[0]] if split == "train" else 100


@pytest.fixture(scope="module")
def mocked(glue):
    """Random examples through the real TFDS builders, and T5's train sizes for the rates."""
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES), \
            mock.patch.object(seqio.TfdsDataSource, "num_input_examples", _mock_size):
        yield glue


def run(preprocessor, *examples):
    """The preprocessor's output on hand-made examples, as python values (strings decoded)."""
    ds = tf.data.Dataset.from_tensors(examples[0])
    for example in examples[1:]:
        ds = ds.concatenate(tf.data.Dataset.from_tensors(example))

    def decode(v):
        if isinstance(v, bytes):
            return v.decode()
        if isinstance(v, np.ndarray):
            return [decode(x) for x in v.tolist()]
        return v.item() if isinstance(v, np.generic) else v

    return [{k: decode(v) for k, v in ex.items()} for ex in preprocessor(ds).as_numpy_iterator()]


# --------------------------------------------------------------------------- registry --


def test_tasks_ids_and_mixtures_are_registered(glue):
    pipeline.import_task_modules(["tasks.synthetic"])  # both suites side by side: no id clash
    assert {s.name: s.task_id for s in glue.TASK_SPECS} == TASK_IDS
    for name, task_id in TASK_IDS.items():
        assert pipeline.task_id_of(name) == task_id
        task = seqio.get_mixture_or_task(name)
        assert set(task.splits) == {"train", "validation"}
    synthetic = importlib.import_module("peftjax.data.synthetic")
    assert max(synthetic.TASK_IDS.values()) < 15 < min(TASK_IDS.values())
    assert pipeline.task_names("glue_temperature") == sorted(HYPERFORMER_GLUE)
    assert pipeline.task_names("glue_proportional") == sorted(HYPERFORMER_GLUE)
    assert pipeline.task_names("super_glue_temperature") == sorted(SUPER_GLUE_IDS)
    assert pipeline.task_names("super_glue_proportional") == sorted(SUPER_GLUE_IDS)
    mnli = seqio.get_mixture_or_task("glue_mnli").source
    assert mnli.tfds_dataset.name == "glue/mnli:2.0.0"
    assert mnli.tfds_dataset._map_split("validation") == "validation_matched"
    assert seqio.get_mixture_or_task("super_glue_wsc").source.tfds_dataset.name == \
        "super_glue/wsc.fixed:1.0.2"
    glue.register()  # idempotent
    assert pipeline.task_id_of("glue_cola") == 16


def test_vocabulary_comes_from_the_environment(glue, monkeypatch):
    vocab = pipeline.vocabulary("glue_cola")
    assert vocab.sentencepiece_model_file == spm_test_model()
    assert vocab.vocab_size == 26
    monkeypatch.setenv("PEFTJAX_SPM_EXTRA_IDS", "100")
    assert glue.vocabulary().vocab_size == 126
    monkeypatch.delenv("PEFTJAX_SPM_MODEL")
    monkeypatch.delenv("PEFTJAX_SPM_EXTRA_IDS")
    default = glue.vocabulary()  # not opened: registration stays offline
    assert default.sentencepiece_model_file == glue.DEFAULT_SPM_MODEL
    monkeypatch.setenv("PEFTJAX_SPM_MODEL", "/nonexistent/sentencepiece.model")
    with pytest.raises(OSError, match="set \\$PEFTJAX_SPM_MODEL"):
        glue.vocabulary().vocab_size  # noqa: B018 (the first use reads the file)
    monkeypatch.setenv("PEFTJAX_SPM_EXTRA_IDS", "many")
    with pytest.raises(ValueError, match="PEFTJAX_SPM_EXTRA_IDS"):
        glue.vocabulary()


def test_label_names_and_fields_match_the_tfds_builders(glue):
    """Label ids index TFDS's ClassLabel names; fields are T5's (sorted field names, except
    MultiRC and WiC, which T5 orders by hand)."""
    glue_configs = tfds.text.glue.Glue.builder_configs
    for task, names in glue.GLUE_LABELS.items():
        assert list(names) == list(glue_configs[task].label_classes)
        assert glue.GLUE_FIELDS[task] == tuple(sorted(glue_configs[task].text_features))
    super_configs = tfds.text.super_glue.SuperGlue.builder_configs
    for task, names in glue.SUPER_GLUE_LABELS.items():
        config = super_configs["wsc.fixed" if task == "wsc" else task]
        assert list(names) == list(config.label_classes)
    for task, fields in glue.SUPER_GLUE_FIELDS.items():
        text = [f for f in super_configs[task].features if not f.startswith(("start", "end"))]
        assert fields == (("sentence1", "sentence2", "word") if task == "wic"
                          else tuple(sorted(text)))


# ---------------------------------------------------------------------------- formats --


def test_glue_classification_format(glue):
    spec = {s.name: s for s in glue.TASK_SPECS}
    cola = run(spec["glue_cola"].preprocessor,
               {"sentence": "The book was read.", "label": 1, "idx": 7},
               {"sentence": "Book the read.", "label": 0, "idx": 8},
               {"sentence": "Unlabelled.", "label": -1, "idx": 9})
    assert cola == [
        {"inputs": "cola sentence: The book was read.", "targets": "acceptable", "idx": 7},
        {"inputs": "cola sentence: Book the read.", "targets": "unacceptable", "idx": 8},
        {"inputs": "cola sentence: Unlabelled.", "targets": "<unk>", "idx": 9},
    ]
    [mnli] = run(spec["glue_mnli"].preprocessor,
                 {"premise": "A man sleeps.", "hypothesis": "A man runs.", "label": 2, "idx": 0})
    assert mnli["inputs"] == "mnli hypothesis: A man runs. premise: A man sleeps."
    assert mnli["targets"] == "contradiction"
    [qqp] = run(spec["glue_qqp"].preprocessor,
                {"question1": "Why?", "question2": "How?", "label": 1, "idx": 3})
    assert (qqp["inputs"], qqp["targets"]) == ("qqp question1: Why? question2: How?", "duplicate")


def test_stsb_rounds_to_a_fifth_with_one_decimal(glue):
    examples = [{"sentence1": "A cat.", "sentence2": "A dog.", "label": np.float32(v), "idx": i}
                for i, v in enumerate([3.83, 0.0, 4.91, 2.5, 1.1])]
    out = run(glue.stsb, *examples)
    # 3.83*5=19.15 -> 19 -> 3.8; 4.91 -> 24.55 -> 25 -> 5.0; 2.5 -> 12.5 -> 12 (half to even);
    # 1.1 -> 5.5 -> 6 -> 1.2.
    assert [o["targets"] for o in out] == ["3.8", "0.0", "5.0", "2.4", "1.2"]
    assert out[0]["inputs"] == "stsb sentence1: A cat. sentence2: A dog."


def test_superglue_classification_formats(glue):
    spec = {s.name: s for s in glue.TASK_SPECS}
    [copa] = run(spec["super_glue_copa"].preprocessor,
                 {"premise": "The man broke his toe.", "question": "cause",
                  "choice1": "He dropped a hammer.", "choice2": "He got a hole in his sock.",
                  "label": 0, "idx": 1})
    assert copa["inputs"] == ("copa choice1: He dropped a hammer. choice2: He got a hole in his "
                              "sock. premise: The man broke his toe. question: cause")
    assert copa["targets"] == "choice1"
    [wic] = run(spec["super_glue_wic"].preprocessor,
                {"word": "bank", "sentence1": "A river bank.", "sentence2": "A bank loan.",
                 "start1": 8, "start2": 2, "end1": 12, "end2": 6, "label": 0, "idx": 4})
    assert wic["inputs"] == "wic sentence1: A river bank. sentence2: A bank loan. word: bank"
    assert wic["targets"] == "False"
    [boolq] = run(spec["super_glue_boolq"].preprocessor,
                  {"question": "is it?", "passage": "It is.", "label": 1, "idx": 0})
    assert (boolq["inputs"], boolq["targets"]) == ("boolq passage: It is. question: is it?",
                                                   "True")


def test_multirc_strips_html_and_keeps_the_question_key(glue):
    [ex] = run(glue.multirc, {
        "paragraph": "Sent 1: <b>Tom</b> ran.<br>Sent 2: He won.",
        "question": "Who ran?", "answer": "Tom", "label": 1,
        "idx": {"paragraph": 3, "question": 5, "answer": 11}})
    assert ex == {
        "inputs": "multirc question: Who ran? answer: Tom paragraph: Sent 1: Tom ran. Sent 2: "
                  "He won.",
        "targets": "True", "idx/paragraph": 3, "idx/question": 5, "idx/answer": 11}


def test_wsc_marks_noun_and_pronoun(glue):
    out = run(glue.wsc,
              # T5's own docstring example of its wsc preprocessor.
              {"text": "This is a test sentence .", "span1_text": "test", "span1_index": 3,
               "span2_text": "This", "span2_index": 0, "label": 0, "idx": 0},
              {"text": "The trophy doesn't fit into the brown suitcase because it is too large .",
               "span1_text": "the brown suitcase", "span1_index": 5, "span2_text": "it",
               "span2_index": 9, "label": 1, "idx": 1})
    assert [(o["inputs"], o["targets"]) for o in out] == [
        ("wsc text: # This # is a * test * sentence .", "False"),
        ("wsc text: The trophy doesn't fit into * the brown suitcase * because # it # is too "
         "large .", "True"),
    ]


def test_record_one_example_per_answer(glue):
    passage = "Obama was born in Hawaii.\n@highlight\nHe was president\n@highlight\nHe lives in DC"
    out = run(glue.record,
              {"passage": passage, "query": "@placeholder was born in Hawaii",
               "entities": ["Obama", "Hawaii", "DC"], "answers": ["Obama", "Barack Obama"],
               "idx": {"passage": 2, "query": 7}},
              {"passage": "P.", "query": "Q @placeholder", "entities": ["E"],
               "answers": tf.constant([], tf.string), "idx": {"passage": 3, "query": 8}})
    inputs = ("record query: @placeholder was born in Hawaii entities: Obama, Hawaii, DC "
              "passage: Obama was born in Hawaii. He was president. He lives in DC")
    assert out == [
        {"inputs": inputs, "targets": "Obama", "answers": ["Obama", "Barack Obama"],
         "idx/passage": 2, "idx/query": 7},
        {"inputs": inputs, "targets": "Barack Obama", "answers": ["Obama", "Barack Obama"],
         "idx/passage": 2, "idx/query": 7},
        {"inputs": "record query: Q @placeholder entities: E passage: P.", "targets": "<unk>",
         "answers": [], "idx/passage": 3, "idx/query": 8},
    ]


def test_postprocessors(glue):
    spec = {s.name: s for s in glue.TASK_SPECS}
    cola = spec["glue_cola"].postprocess_fn
    assert [cola(t) for t in ["unacceptable", "acceptable", "acceptable.", ""]] == [0, 1, -1, -1]
    assert spec["super_glue_cb"].postprocess_fn(b"neutral", is_target=True) == 2
    stsb = spec["glue_stsb"].postprocess_fn
    assert [stsb("3.8"), stsb("5"), stsb("three"), stsb("")] == [3.8, 5.0, -1.0, -1.0]
    example = {"idx/paragraph": np.int32(3), "idx/question": np.int32(5), "answers":
               np.array([b"Obama", b"Barack Obama"], dtype=object), "idx/passage": np.int32(2),
               "idx/query": np.int32(7)}
    multirc = spec["super_glue_multirc"].postprocess_fn
    assert multirc("True", example=example, is_target=True) == {"group": (3, 5), "value": 1}
    assert multirc("Maybe", example=None, is_target=False) == -1
    record = spec["super_glue_record"].postprocess_fn
    assert record("Obama", example=example, is_target=True) == {
        "group": (2, 7), "answers": ["Obama", "Barack Obama"]}
    assert record("Obama") == "Obama"
    with pytest.raises(ValueError, match="is_target=True"):
        record("Obama", example=None, is_target=True)


# ---------------------------------------------------------------------------- metrics --


def test_classification_metrics_by_hand():
    assert gm.accuracy([0, 1, 1, 2], [0, 1, 0, -1]) == {"accuracy": 0.5}
    # -1 (invalid) for a positive target counts as a false negative:
    # effective predictions [1, 0, 1, 0, 0] -> tp 1, fp 1, fn 2 -> F1 = 2 / 5.
    assert gm.f1([1, 1, 0, 0, 1], [1, 0, 1, 0, -1]) == {"f1": pytest.approx(0.4)}
    # tp 2, tn 2, fp 1, fn 1 -> (4 - 1) / sqrt(3^4) = 1/3, the Pearson r of the 0/1 vectors.
    targets, predictions = [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]
    mcc = gm.matthews_corrcoef(targets, predictions)["matthews_corrcoef"]
    assert mcc == pytest.approx(1 / 3)
    assert mcc == pytest.approx(np.corrcoef(targets, predictions)[0, 1])
    assert gm.matthews_corrcoef(targets, [1, 1, -1, 0, 0, 1])["matthews_corrcoef"] == \
        pytest.approx(1 / 3)
    assert gm.matthews_corrcoef(targets, [1] * 6) == {"matthews_corrcoef": 0.0}
    assert gm.matthews_corrcoef([0, 1], [1, 0]) == {"matthews_corrcoef": -1.0}
    # class 0: tp 1 fp 1 fn 1 -> 1/2; class 1: tp 1 fp 1 fn 1 -> 1/2; class 2: tp 1 fn 1 -> 2/3.
    assert gm.macro_f1([0, 0, 1, 2, 2, 1], [0, 1, 1, 2, -1, 0]) == {
        "macro_f1": pytest.approx((0.5 + 0.5 + 2 / 3) / 3)}


def test_correlations_by_hand_and_against_scipy():
    # Deviations (-1.5, -.5, .5, 1.5) vs (-1.5, .5, -.5, 1.5): r = 4 / 5; one swapped pair:
    # rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    assert gm.pearson_corrcoef([1, 2, 3, 4], [1, 3, 2, 4]) == {
        "pearson_corrcoef": pytest.approx(0.8)}
    assert gm.spearman_corrcoef([1, 2, 3, 4], [1, 3, 2, 4]) == {
        "spearman_corrcoef": pytest.approx(0.8)}
    rng = np.random.default_rng(0)
    t, p = rng.uniform(0, 5, 20), rng.uniform(0, 5, 20)
    p[3] = -1.0  # an unparsable prediction
    assert gm.pearson_corrcoef(t, p)["pearson_corrcoef"] == pytest.approx(
        scipy.stats.pearsonr(t, p)[0])
    assert gm.spearman_corrcoef(t, p)["spearman_corrcoef"] == pytest.approx(
        scipy.stats.spearmanr(t, p)[0])
    assert gm.pearson_corrcoef(t, [-1.0] * 20) == {"pearson_corrcoef": 0.0}  # no NaN


def test_multirc_metrics_by_hand():
    targets = [{"group": "q1", "value": 1}, {"group": "q1", "value": 0},
               {"group": "q2", "value": 1},
               {"group": "q3", "value": 0}, {"group": "q3", "value": 0}]
    predictions = [1, 0, 0, 0, 1]  # q1 all right; q2 and q3 one wrong each
    assert gm.group_exact_match(targets, predictions) == {"exact_match": pytest.approx(1 / 3)}
    assert gm.f1a(targets, predictions) == {"f1a": pytest.approx(0.5)}  # tp 1, fp 1, fn 1


def test_record_metric_by_hand():
    targets = [{"group": "a", "answers": ["Barack Obama", "Obama"]},
               {"group": "a", "answers": ["Barack Obama", "Obama"]},  # the copy: not rescored
               {"group": "b", "answers": ["the White House"]},
               {"group": "c", "answers": ["New York City"]}]
    predictions = ["obama", "obama", "White House.", "York City hall"]
    # a: exact; b: equal after normalisation; c: 2 of 3 tokens each way -> F1 2/3, EM 0.
    assert gm.record(targets, predictions) == {
        "exact_match": pytest.approx(2 / 3), "f1": pytest.approx((1 + 1 + 2 / 3) / 3)}
    assert gm.normalize_answer("The  Big, Apple!") == "big apple"
    assert gm.token_f1("", "") == 1.0 and gm.token_f1("x", "") == 0.0


@pytest.mark.parametrize("fn", [gm.accuracy, gm.f1, gm.matthews_corrcoef, gm.macro_f1,
                                gm.pearson_corrcoef, gm.spearman_corrcoef, gm.f1a,
                                gm.group_exact_match, gm.record])
def test_metrics_refuse_empty_and_misaligned_inputs(fn):
    with pytest.raises(ValueError, match="no examples"):
        fn([], [])
    with pytest.raises(ValueError, match="aligned"):
        fn([0], [0, 1])


# ------------------------------------------------------------------------ mixing rates --


class FakeTask:
    def __init__(self, name, size):
        self.name, self.size = name, size

    def num_input_examples(self, split):
        assert split == "train"
        if isinstance(self.size, Exception):
            raise self.size
        return self.size


def test_rate_functions_follow_their_formulas():
    sizes = {"a": 100, "b": 2_500, "c": 400_000}
    tasks = [FakeTask(n, s) for n, s in sizes.items()]
    assert [mixing.examples_proportional(None)(t) for t in tasks] == [100, 2_500, 400_000]
    assert [mixing.examples_proportional(10_000)(t) for t in tasks] == [100, 2_500, 10_000]
    # HyperFormer: p_i = (n_i / N)^(1/T) / sum_j (n_j / N)^(1/T), N = sum_j n_j, T = 10.
    total = sum(sizes.values())
    expected = np.array([(n / total) ** 0.1 for n in sizes.values()])
    expected /= expected.sum()
    rates = np.array([mixing.temperature_scaled(10.0)(t) for t in tasks])
    np.testing.assert_allclose(rates / rates.sum(), expected, rtol=1e-12)
    capped = [mixing.temperature_scaled(2.0, maximum=10_000)(t) for t in tasks]
    np.testing.assert_allclose(capped, [10.0, 50.0, 100.0])
    assert mixing.temperature_scaled(1.0)(tasks[1]) == 2_500


@pytest.mark.parametrize("size", [KeyError("splits is empty"), None, math.inf, 0])
def test_rates_need_a_known_train_size(size):
    with pytest.raises(ValueError, match="tfds build"):
        mixing.temperature_scaled(10.0)(FakeTask("glue_cola", size))


def test_rate_arguments_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        mixing.temperature_scaled(0.0)
    with pytest.raises(ValueError, match="maximum"):
        mixing.examples_proportional(0)


def test_registered_mixture_rates(mocked):
    def expected(tasks, rate):
        sizes = {t: TRAIN_SIZES[seqio.get_mixture_or_task(t).source.tfds_dataset.name
                                .split(":")[0]] for t in tasks}
        raw = {t: rate(n) for t, n in sizes.items()}
        return {t: pytest.approx(r / sum(raw.values()), rel=1e-9) for t, r in raw.items()}

    K, T = 2**19, 10.0  # noqa: N806 (the papers' symbols)
    for prefix, tasks in [("glue", HYPERFORMER_GLUE), ("super_glue", list(SUPER_GLUE_IDS))]:
        temperature = mixing.normalized_rates(seqio.get_mixture_or_task(f"{prefix}_temperature"))
        assert temperature == expected(tasks, lambda n: n ** (1 / T))
        proportional = mixing.normalized_rates(
            seqio.get_mixture_or_task(f"{prefix}_proportional"))
        assert proportional == expected(tasks, lambda n: min(n, K))
    # Temperature 10 lifts the smallest GLUE task, RTE (0.26% of the examples), to
    # 2490^0.1 / (2490^0.1 + 67349^0.1 + ... + 8551^0.1) = 2.186 / 22.75 = 9.6%.
    assert mixing.normalized_rates(seqio.get_mixture_or_task("glue_temperature"))["glue_rte"] \
        == pytest.approx(0.0961, abs=5e-4)


# -------------------------------------------------------------------------- pipelines --


def check_batch(batch, shape, ids):
    """Shapes, and every real token carries one of `ids` (task ids ride along the tokens)."""
    assert batch["encoder_input_tokens"].shape == shape[0]
    assert batch["decoder_target_tokens"].shape == shape[1]
    real_inputs, real_targets = batch["encoder_input_tokens"] > 0, batch["decoder_loss_weights"] > 0
    assert real_inputs.any(axis=1).all() and real_targets.any(axis=1).all()  # no empty rows
    seen = set(np.unique(batch["encoder_task_ids"][real_inputs]).tolist())
    assert seen <= set(ids)
    assert set(np.unique(batch["decoder_task_ids"][real_targets]).tolist()) == seen
    return seen


@pytest.mark.parametrize("name", sorted(TASK_IDS))
def test_every_task_yields_validation_batches(mocked, name):
    task_id = TASK_IDS[name]
    batches = list(pipeline.eval_batches(name, batch_size=2, inputs_length=48, targets_length=12,
                                         num_examples=3))
    assert [len(texts) for _, texts in batches] == [2, 1]
    check_batch(batches[0][0], [(2, 48), (2, 12)], {task_id})
    assert (batches[0][0]["encoder_task_ids"][:, 0] == task_id).all()
    assert (batches[1][0]["encoder_input_tokens"][1] == 0).all()  # the padding row
    targets = [t for _, texts in batches for t in texts]
    if name == "glue_stsb":
        assert all(isinstance(t, float) for t in targets)
        predictions = targets
    elif name == "super_glue_multirc":
        assert all(set(t) == {"group", "value"} and t["value"] in (0, 1) for t in targets)
        predictions = [t["value"] for t in targets]
    elif name == "super_glue_record":
        assert all(set(t) == {"group", "answers"} and t["answers"] for t in targets)
        predictions = [t["answers"][-1] for t in targets]
    else:
        task = name.removeprefix("super_glue_").removeprefix("glue_")
        labels = (mocked.GLUE_LABELS if name in GLUE_IDS else mocked.SUPER_GLUE_LABELS)[task]
        assert all(t in range(len(labels)) for t in targets)
        predictions = targets
    # The task's metrics score its postprocessed targets under the standard metric names.
    scores = {}
    for fn in pipeline.resolve(name).metric_fns:
        scores.update(fn(targets, predictions))
    assert set(scores) == METRICS[name]


def test_every_task_yields_training_batches(mocked):
    """Through the two temperature mixtures (which hold every task but WNLI) and WNLI alone:
    64 unpacked rows of each mixture contain every one of its tasks."""
    lengths = dict(inputs_length=48, targets_length=12)
    for mixture, names in [("glue_temperature", HYPERFORMER_GLUE),
                           ("super_glue_temperature", list(SUPER_GLUE_IDS))]:
        batch = next(pipeline.train_batches(mixture, batch_size=64, pack=False, seed=0,
                                            **lengths))
        ids = {TASK_IDS[n] for n in names}
        assert check_batch(batch, [(64, 48), (64, 12)], ids) == ids
        # Unpacked: one example, so one task id, per row.
        rows = batch["encoder_task_ids"][:, :1]
        real = batch["encoder_input_tokens"] > 0
        assert (np.where(real, batch["encoder_task_ids"], rows) == rows).all()
    batch = next(pipeline.train_batches("glue_wnli", batch_size=2, pack=False, seed=0, **lengths))
    assert check_batch(batch, [(2, 48), (2, 12)], {24}) == {24}
    packed = next(pipeline.train_batches("glue_proportional", batch_size=4, pack=True, seed=1,
                                         inputs_length=256, targets_length=32))
    assert check_batch(packed, [(4, 256), (4, 32)], {TASK_IDS[n] for n in HYPERFORMER_GLUE})
    assert packed["encoder_segment_ids"].max() > 1  # several examples share a row


# ------------------------------------------------------------------------- end to end --


@pytest.mark.slow
@pytest.mark.parametrize("name, evaluate_again", [("compacter_glue", True),
                                                   ("hyperformer_glue", False)])
def test_glue_configs_quick_train_and_evaluate(name, evaluate_again, mocked, tmp_path):
    """Each config trains and its final eval scores every task under its standard metrics;
    `evaluate_run` (restore, adapted and base columns, metrics.json) runs for one of them: the
    other's columns would come from the same evaluation code (a second run costs ~15 s)."""
    import importlib

    from peftjax.checkpoint import Checkpoints
    from peftjax.train import evaluate_run, train

    config = importlib.import_module(f"configs.{name}").get_config("quick")
    assert config.data.mixture == "glue_temperature"
    assert config.peft.mode == "per_task" or config.peft.method == "hyperformer_pp"
    workdir = str(tmp_path / "run")
    # Save synchronously: mock_data's `as_dataset` briefly swaps in a process-wide mock file
    # system (tfds.testing.MockFs), which would capture the files orbax writes from its
    # background thread while the final evaluation loads the validation splits.
    save = Checkpoints.save
    with mock.patch.object(Checkpoints, "save",
                           lambda self, *a, **k: (save(self, *a, **k), self.wait())[0]):
        means = train(config, workdir)
    expected = set().union(*(METRICS[t] for t in HYPERFORMER_GLUE))
    assert set(means) == expected
    assert all(math.isfinite(v) for v in means.values())
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        (final,) = [r for r in map(json.loads, f) if any(k.startswith("eval/") for k in r)]
    for task in HYPERFORMER_GLUE:
        scores = {k.split("/")[1]: v for k, v in final.items() if k.endswith(f"/{task}")}
        assert set(scores) == METRICS[task], task
        assert all(-1.0 <= v <= 1.0 for v in scores.values()), task
    if not evaluate_again:
        return
    results = evaluate_run(config, workdir)
    assert os.path.isfile(os.path.join(workdir, "eval", "metrics.json"))
    for column in ("adapted", "base"):
        assert sorted(results[column]) == sorted(HYPERFORMER_GLUE)
        for task, scores in results[column].items():
            assert set(scores) == METRICS[task]
            assert all(-1.0 <= v <= 1.0 for v in scores.values())
