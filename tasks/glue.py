"""seqio registrations of GLUE and SuperGLUE in T5's text-to-text format, read through TFDS.

Importing this module registers, idempotently (remove-then-add, like tasks/synthetic.py):

  glue_<name>        cola sst2 mrpc qqp stsb mnli qnli rte wnli    task ids 16..24, in this order
  super_glue_<name>  boolq cb copa multirc record rte wic wsc      task ids 25..32, in this order
  glue_proportional, glue_temperature                HyperFormer's 8 GLUE tasks (all but WNLI)
  super_glue_proportional, super_glue_temperature    the 8 SuperGLUE tasks

and every task's fixed id (peftjax.data.task_id_of); ids 0..14 are the synthetic suite's, 15 is
reserved. `*_proportional` mixes examples-proportionally with T5's size limit K =
PROPORTIONAL_MAXIMUM (rate min(n, K)); `*_temperature` samples as HyperFormer, p ∝ n^(1/T) with
T = TEMPERATURE (see peftjax.data.mixing). Both need the training-set sizes, which TFDS only knows
once a dataset is prepared: `tfds build glue/cola` etc., or any first `tfds.load`.

Data: seqio.TfdsDataSource over "glue/<config>:2.0.0" and "super_glue/<config>:1.0.2", with the
splits "train" and "validation" (MNLI: "validation" is validation_matched). TFDS downloads and
prepares a dataset on its first load (under TFDS_DATA_DIR, default ~/tensorflow_datasets).

Format (Raffel et al. 2020, App. D; written after T5's t5.data.preprocessors glue / stsb / wsc /
record, which this module does not import): the task name, then "<field>: <text>" per field, and
the label name as the target:

  cola sentence: <s>                                   -> "unacceptable" | "acceptable"
  mnli hypothesis: <h> premise: <p>                    -> "entailment" | "neutral" | ...
  stsb sentence1: <a> sentence2: <b>                   -> label rounded to 0.2, "%.1f" ("3.8")
  multirc question: <q> answer: <a> paragraph: <p>     -> "False" | "True"  (HTML <b>, <br> gone)
  record query: <q> entities: <e1>, <e2> passage: <p>  -> one example per gold answer
  wsc text: # He # told * Bob * ...                    -> "False" | "True"

Fields follow T5: sorted field names, except MultiRC (question, answer, paragraph) and WiC
(sentence1, sentence2, word; the word's character offsets are dropped). A label of -1 (unlabelled
test data) becomes the target "<unk>".

WSC: the binary formulation (T5's `wsc` preprocessor on wsc.fixed): the candidate noun phrase
(span 1) is wrapped in "*", the pronoun (span 2) in "#", the target says whether they co-refer.
T5's "wsc_simple" (generate the referent) is not used: scoring it needs the example when
postprocessing predictions, which peftjax's evaluation does not pass. The spans are marked by
word index (the text is split on whitespace and rejoined with single spaces), not with T5's
regular expression built from the span text.

ReCoRD: both splits get one example per gold answer, as T5's `record` (training sees every
answer as a target); each carries the full answer list and its (passage, query) key, and the
metric scores every query once against all its answers (max over answers, SQuAD EM and F1).

Eval targets / predictions are postprocessed as T5 does: label names -> class ids (-1 for a
prediction that is no label), STS-B strings -> float (INVALID_FLOAT for an unparsable one), MultiRC
targets -> {"group", "value"}, ReCoRD targets -> {"group", "answers"}. Metrics: see
peftjax.data.glue_metrics (fractions, not percent).

MNLI mismatched is not registered: it would need its own task id (the registry refuses MNLI's),
and a per-task adapter for that id is never trained, so its scores would be misleading. Score it
with MNLI's adapter once the registry can alias an eval task to a trained task's id.

Vocabulary: T5's SentencePiece model, read lazily by seqio (registration does not open it) from
the path in $PEFTJAX_SPM_MODEL, default DEFAULT_SPM_MODEL (T5 v1.1's 32,000 pieces + 100 extra
ids; a gs:// path needs GCS access, so copy it locally for offline use), with
$PEFTJAX_SPM_EXTRA_IDS extra ids appended (default 0: that file already holds them; use 100 with
the original T5's cc_all.32000 model). Both are read when this module registers its tasks (import
or `register()`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf

from peftjax.data import features, glue_metrics, mixing
from peftjax.data.pipeline import register_task_id

SPM_MODEL_ENV = "PEFTJAX_SPM_MODEL"
SPM_EXTRA_IDS_ENV = "PEFTJAX_SPM_EXTRA_IDS"
DEFAULT_SPM_MODEL = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
DEFAULT_EXTRA_IDS = 0

GLUE_VERSION = "2.0.0"
SUPER_GLUE_VERSION = "1.0.2"
UNKNOWN_LABEL = "<unk>"
INVALID_FLOAT = -1.0  # STS-B prediction that is no number: far below every label (0..5)

# HyperFormer's GLUE tasks, in its order (rabeehk/hyperformer configs): GLUE without WNLI.
GLUE_MIXTURE_TASKS = ("rte", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "cola")
SUPER_GLUE_MIXTURE_TASKS = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")
# T5's size limit K for examples-proportional mixing (T5 §3.5.2 tries 2^16..2^21). It binds no
# GLUE or SuperGLUE task (the largest, MNLI, has 392,702 examples), so *_proportional is exactly
# proportional, like T5's glue_v002_proportional; it matters once larger tasks join a mixture.
PROPORTIONAL_MAXIMUM = 2**19
TEMPERATURE = 10.0  # HyperFormer's T

_AUTOTUNE = tf.data.AUTOTUNE
_TRAIN_VALIDATION = {"train": "train", "validation": "validation"}

Example = Mapping[str, tf.Tensor]


# ------------------------------------------------------------------------ preprocessors --


def _join_fields(x: Example, prefix: str, fields: Sequence[str]) -> tf.Tensor:
    """"<prefix> <field>: <text> <field>: <text> ..." (T5's order: as listed)."""
    parts: list[Any] = [prefix]
    for field in fields:
        parts += [f"{field}:", x[field]]
    return tf.strings.join(parts, separator=" ")


def _label_text(label: tf.Tensor, label_names: Sequence[str]) -> tf.Tensor:
    """The label's name; "<unk>" for -1 (TFDS's label of unlabelled test examples)."""
    label = tf.cast(label, tf.int32)
    name = tf.gather(tf.constant(list(label_names)), tf.maximum(label, 0))
    return tf.where(label < 0, tf.constant(UNKNOWN_LABEL), name)


def text_classification(
    dataset: tf.data.Dataset, *, prefix: str, fields: Sequence[str], label_names: Sequence[str]
) -> tf.data.Dataset:
    """GLUE-style examples -> {"inputs": "<prefix> f1: .. f2: ..", "targets": label, "idx"}."""

    def convert(x: Example) -> dict[str, tf.Tensor]:
        return {
            "inputs": _join_fields(x, prefix, fields),
            "targets": _label_text(x["label"], label_names),
            "idx": x["idx"],
        }

    return dataset.map(convert, num_parallel_calls=_AUTOTUNE)


def stsb(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """STS-B: the score rounded to the nearest 0.2 and printed with one decimal ("3.8").

    Most labels already lie on that grid, so this makes STS-B a 26-way generation task (T5).
    Rounding is TensorFlow's (halves to even): 2.5 -> 12.5 / 5 -> "2.4".
    """

    def convert(x: Example) -> dict[str, tf.Tensor]:
        score = tf.round(tf.cast(x["label"], tf.float32) * 5.0) / 5.0
        return {
            "inputs": _join_fields(x, "stsb", ("sentence1", "sentence2")),
            "targets": tf.strings.as_string(score, precision=1),
            "idx": x["idx"],
        }

    return dataset.map(convert, num_parallel_calls=_AUTOTUNE)


def multirc(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """MultiRC: one example per answer option, HTML stripped, the question key kept for EM."""
    label_names = SUPER_GLUE_LABELS["multirc"]

    def convert(x: Example) -> dict[str, tf.Tensor]:
        inputs = _join_fields(x, "multirc", ("question", "answer", "paragraph"))
        inputs = tf.strings.regex_replace(inputs, "<br>", " ")
        inputs = tf.strings.regex_replace(inputs, "</?b>", "")
        return {
            "inputs": inputs,
            "targets": _label_text(x["label"], label_names),
            "idx/paragraph": x["idx"]["paragraph"],
            "idx/question": x["idx"]["question"],
            "idx/answer": x["idx"]["answer"],
        }

    return dataset.map(convert, num_parallel_calls=_AUTOTUNE)


def _mark_span(words: tf.Tensor, start: tf.Tensor, text: tf.Tensor, mark: str) -> tf.Tensor:
    """Puts `mark` before word `start` and after the span's last word (marks join the words, so
    indices of the other span stay valid)."""
    length = tf.size(tf.strings.split(text))
    position = tf.range(tf.size(words))
    words = tf.where(position == start, tf.strings.join([mark, words], separator=" "), words)
    last = start + tf.maximum(length, 1) - 1
    return tf.where(position == last, tf.strings.join([words, mark], separator=" "), words)


def wsc(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """WSC (binary): "wsc text: ..." with * around span 1 (noun), # around span 2 (pronoun)."""
    label_names = SUPER_GLUE_LABELS["wsc"]

    def convert(x: Example) -> dict[str, tf.Tensor]:
        words = tf.strings.split(x["text"])
        words = _mark_span(words, tf.cast(x["span1_index"], tf.int32), x["span1_text"], "*")
        words = _mark_span(words, tf.cast(x["span2_index"], tf.int32), x["span2_text"], "#")
        text = tf.strings.reduce_join(words, separator=" ")
        return {
            "inputs": tf.strings.join(["wsc text:", text], separator=" "),
            "targets": _label_text(x["label"], label_names),
            "idx": x["idx"],
        }

    return dataset.map(convert, num_parallel_calls=_AUTOTUNE)


def _record_inputs(x: Example) -> tf.Tensor:
    # "@highlight" lines are the article's bullet points: join them into sentences (as T5).
    passage = tf.strings.regex_replace(x["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
    passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
    entities = tf.strings.reduce_join(x["entities"], separator=", ")
    return tf.strings.join(
        ["record query:", x["query"], "entities:", entities, "passage:", passage], separator=" "
    )


def record(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """ReCoRD: one example per gold answer (one "<unk>" example if there is none), each with
    the full answer list ("answers") and the query key ("idx/passage", "idx/query")."""

    def expand(x: Example) -> dict[str, tf.Tensor]:
        answers = x["answers"]
        count = tf.size(answers)
        copies = tf.maximum(count, 1)
        targets = tf.cond(count > 0, lambda: answers, lambda: tf.constant([UNKNOWN_LABEL]))

        def repeat(value: tf.Tensor) -> tf.Tensor:
            return tf.broadcast_to(value, tf.concat([[copies], tf.shape(value)], axis=0))

        return {
            "inputs": repeat(_record_inputs(x)),
            "targets": targets,
            "answers": repeat(answers),
            "idx/passage": repeat(x["idx"]["passage"]),
            "idx/query": repeat(x["idx"]["query"]),
        }

    return dataset.map(expand, num_parallel_calls=_AUTOTUNE).unbatch()


# ----------------------------------------------------------------------- postprocessors --


def class_id(
    text: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False, *,
    label_names: Sequence[str]
) -> int:
    """The index of `text` in `label_names`; -1 if it is none of them (an invalid prediction)."""
    del example, is_target
    text = tf.compat.as_text(text)
    return label_names.index(text) if text in label_names else -1


def to_float(
    text: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> float:
    """STS-B: the number in `text`; INVALID_FLOAT if it is not one (scores as a bad guess)."""
    del example, is_target
    try:
        return float(tf.compat.as_text(text))
    except ValueError:
        return INVALID_FLOAT


def _needs_example(task: str, example: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if example is None:
        raise ValueError(
            f"{task} targets are postprocessed with their example (for its grouping keys); call "
            "postprocess_fn(text, example=example, is_target=True), as "
            "peftjax.data.eval_batches does."
        )
    return example


def multirc_postprocess(
    text: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> int | dict[str, Any]:
    """Prediction -> class id; target -> {"group": (paragraph, question), "value": class id}."""
    value = class_id(text, label_names=SUPER_GLUE_LABELS["multirc"])
    if not is_target:
        return value
    example = _needs_example("MultiRC", example)
    group = (int(example["idx/paragraph"]), int(example["idx/question"]))
    return {"group": group, "value": value}


def record_postprocess(
    text: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> str | dict[str, Any]:
    """Prediction -> the string; target -> {"group": (passage, query), "answers": [...]}."""
    if not is_target:
        return tf.compat.as_text(text)
    example = _needs_example("ReCoRD", example)
    return {
        "group": (int(example["idx/passage"]), int(example["idx/query"])),
        "answers": [tf.compat.as_text(a) for a in example["answers"]],
    }


# --------------------------------------------------------------------------- the tasks --

GLUE_LABELS: dict[str, tuple[str, ...]] = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
}
SUPER_GLUE_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("False", "True"),
    "cb": ("entailment", "contradiction", "neutral"),
    "copa": ("choice1", "choice2"),
    "multirc": ("False", "True"),
    "rte": ("entailment", "not_entailment"),
    "wic": ("False", "True"),
    "wsc": ("False", "True"),
}
# Text fields of the plain classification tasks, in input order.
GLUE_FIELDS: dict[str, tuple[str, ...]] = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("hypothesis", "premise"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
SUPER_GLUE_FIELDS: dict[str, tuple[str, ...]] = {
    "boolq": ("passage", "question"),
    "cb": ("hypothesis", "premise"),
    "copa": ("choice1", "choice2", "premise", "question"),
    "rte": ("hypothesis", "premise"),
    "wic": ("sentence1", "sentence2", "word"),
}

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
SUPER_GLUE_TASKS = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")
GLUE_FIRST_ID = 16
SUPER_GLUE_FIRST_ID = GLUE_FIRST_ID + len(GLUE_TASKS)  # 25

_GLUE_METRICS: dict[str, tuple[Callable[..., dict[str, float]], ...]] = {
    "cola": (glue_metrics.matthews_corrcoef,),
    "mrpc": (glue_metrics.f1, glue_metrics.accuracy),
    "qqp": (glue_metrics.f1, glue_metrics.accuracy),
    "stsb": (glue_metrics.pearson_corrcoef, glue_metrics.spearman_corrcoef),
}
_SUPER_GLUE_METRICS: dict[str, tuple[Callable[..., dict[str, float]], ...]] = {
    "cb": (functools.partial(glue_metrics.macro_f1, num_classes=3), glue_metrics.accuracy),
    "multirc": (glue_metrics.f1a, glue_metrics.group_exact_match),
    "record": (glue_metrics.record,),
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything that differs between the registered tasks."""

    name: str  # the seqio task name
    tfds_name: str
    task_id: int
    preprocessor: Callable[[tf.data.Dataset], tf.data.Dataset]
    postprocess_fn: Callable[..., Any]
    metric_fns: tuple[Callable[..., dict[str, float]], ...]
    splits: Mapping[str, str] = dataclasses.field(default_factory=lambda: _TRAIN_VALIDATION)


def glue_name(task: str) -> str:
    """cola -> glue_cola."""
    return f"glue_{task}"


def super_glue_name(task: str) -> str:
    """boolq -> super_glue_boolq."""
    return f"super_glue_{task}"


def _classification_parts(
    task: str, labels: Mapping[str, Sequence[str]], fields: Mapping[str, Sequence[str]]
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    preprocessor = functools.partial(
        text_classification, prefix=task, fields=fields[task], label_names=labels[task]
    )
    return preprocessor, functools.partial(class_id, label_names=labels[task])


def _glue_spec(task: str, task_id: int) -> TaskSpec:
    if task == "stsb":
        preprocessor, postprocess = stsb, to_float
    else:
        preprocessor, postprocess = _classification_parts(task, GLUE_LABELS, GLUE_FIELDS)
    return TaskSpec(
        name=glue_name(task),
        tfds_name=f"glue/{task}:{GLUE_VERSION}",
        task_id=task_id,
        preprocessor=preprocessor,
        postprocess_fn=postprocess,
        metric_fns=_GLUE_METRICS.get(task, (glue_metrics.accuracy,)),
        splits=(
            {"train": "train", "validation": "validation_matched"}
            if task == "mnli"
            else _TRAIN_VALIDATION
        ),
    )


def _super_glue_spec(task: str, task_id: int) -> TaskSpec:
    config = "wsc.fixed" if task == "wsc" else task  # wsc.fixed: spans match the text
    special = {
        "multirc": (multirc, multirc_postprocess),
        "record": (record, record_postprocess),
        "wsc": (wsc, functools.partial(class_id, label_names=SUPER_GLUE_LABELS["wsc"])),
    }
    if task in special:
        preprocessor, postprocess = special[task]
    else:
        preprocessor, postprocess = _classification_parts(
            task, SUPER_GLUE_LABELS, SUPER_GLUE_FIELDS
        )
    return TaskSpec(
        name=super_glue_name(task),
        tfds_name=f"super_glue/{config}:{SUPER_GLUE_VERSION}",
        task_id=task_id,
        preprocessor=preprocessor,
        postprocess_fn=postprocess,
        metric_fns=_SUPER_GLUE_METRICS.get(task, (glue_metrics.accuracy,)),
    )


TASK_SPECS: tuple[TaskSpec, ...] = (
    *(_glue_spec(t, GLUE_FIRST_ID + i) for i, t in enumerate(GLUE_TASKS)),
    *(_super_glue_spec(t, SUPER_GLUE_FIRST_ID + i) for i, t in enumerate(SUPER_GLUE_TASKS)),
)
TASK_IDS: dict[str, int] = {spec.name: spec.task_id for spec in TASK_SPECS}

MIXTURES: dict[str, tuple[str, ...]] = {
    "glue": tuple(glue_name(t) for t in GLUE_MIXTURE_TASKS),
    "super_glue": tuple(super_glue_name(t) for t in SUPER_GLUE_MIXTURE_TASKS),
}


def mixture_rates() -> dict[str, mixing.RateFn]:
    """Rate scheme suffix -> rate callable: `glue_proportional`, `glue_temperature`, ..."""
    return {
        "proportional": mixing.examples_proportional(PROPORTIONAL_MAXIMUM),
        "temperature": mixing.temperature_scaled(TEMPERATURE),
    }


# ------------------------------------------------------------------------- registration --


class T5Vocabulary(seqio.SentencePieceVocabulary):
    """seqio's SentencePieceVocabulary whose failure to read the model says how to fix it."""

    def _model_context(self):  # seqio's lazy loader: the first use of the vocabulary
        try:
            return super()._model_context()
        except (tf.errors.OpError, OSError) as e:
            raise OSError(
                f"Cannot read the SentencePiece model {self.sentencepiece_model_file!r} of the "
                f"GLUE / SuperGLUE tasks ({type(e).__name__}: {e}). Copy T5's model locally "
                f"(gsutil cp {DEFAULT_SPM_MODEL} .) and set ${SPM_MODEL_ENV} to its path before "
                "tasks.glue is imported (or call tasks.glue.register() again)."
            ) from e


def vocabulary() -> T5Vocabulary:
    """T5's SentencePiece vocabulary from $PEFTJAX_SPM_MODEL / $PEFTJAX_SPM_EXTRA_IDS (the file
    is opened on first use, not here)."""
    path = os.environ.get(SPM_MODEL_ENV) or DEFAULT_SPM_MODEL
    raw_extra_ids = os.environ.get(SPM_EXTRA_IDS_ENV) or str(DEFAULT_EXTRA_IDS)
    try:
        extra_ids = int(raw_extra_ids)
    except ValueError:
        extra_ids = -1
    if extra_ids < 0:
        raise ValueError(
            f"${SPM_EXTRA_IDS_ENV}={raw_extra_ids!r} is not a count of extra ids; set it to 0 "
            "for T5 v1.1's cc_all.32000.100extra model (it holds them) or 100 for cc_all.32000."
        )
    return T5Vocabulary(path, extra_ids=extra_ids)


def output_features() -> dict[str, seqio.Feature]:
    vocab = vocabulary()
    return {
        "inputs": seqio.Feature(vocabulary=vocab, add_eos=True),
        "targets": seqio.Feature(vocabulary=vocab, add_eos=True),
    }


def _register_task(spec: TaskSpec, features_: Mapping[str, seqio.Feature]) -> None:
    seqio.TaskRegistry.remove(spec.name)  # Remove-then-add: re-importing or reloading is harmless.
    seqio.TaskRegistry.add(
        spec.name,
        source=seqio.TfdsDataSource(tfds_name=spec.tfds_name, splits=dict(spec.splits)),
        output_features=features_,
        preprocessors=[
            spec.preprocessor,
            seqio.preprocessors.tokenize,
            features.task_id_preprocessor(spec.task_id),
            seqio.preprocessors.append_eos_after_trim,
        ],
        postprocess_fn=spec.postprocess_fn,
        metric_fns=list(spec.metric_fns),
    )
    register_task_id(spec.name, spec.task_id)


def _register_mixture(name: str, tasks: Sequence[str], rate: mixing.RateFn) -> None:
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, [(task, rate) for task in tasks])


def register() -> None:
    """(Re-)registers every task and mixture, reading the vocabulary settings from the
    environment now; safe to call any number of times."""
    features_ = output_features()
    for spec in TASK_SPECS:
        _register_task(spec, features_)
    for prefix, tasks in MIXTURES.items():
        for scheme, rate in mixture_rates().items():
            _register_mixture(f"{prefix}_{scheme}", tasks, rate)


register()
