"""The GLUE and SuperGLUE metrics as seqio metric functions: `fn(targets, predictions)`.

Every function returns `{name: value}` with values as fractions (accuracy 0.85, not 85), as the
other peftjax metrics (`exact_match`); GLUE leaderboards and the T5 paper print 100x these.
Correlations (Matthews, Pearson, Spearman) lie in [-1, 1].

Inputs are what the tasks' postprocessors (tasks/glue.py) return:

  classification   class ids (int); a prediction that is no label name is -1
  STS-B            floats; an unparsable prediction is -1.0, outside the [0, 5] label range
  MultiRC          targets {"group": question key, "value": class id}, predictions class ids
  ReCoRD           targets {"group": query key, "answers": [str, ...]}, predictions str

Invalid predictions (-1) count as wrong everywhere: accuracy never matches them, and the binary
metrics (F1, Matthews) score them as the class opposite to the target, as T5's
`f1_score_with_invalid` does, so a model cannot gain from emitting garbage.

Like peftjax.data.metrics, every function raises ValueError on an empty evaluation set or on
targets and predictions of different lengths.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats


def _check(targets: Sequence[Any], predictions: Sequence[Any], name: str) -> None:
    if len(targets) != len(predictions):
        raise ValueError(
            f"{name}: got {len(targets)} targets but {len(predictions)} predictions; "
            "they must be aligned one to one."
        )
    if not len(targets):
        raise ValueError(
            f"{name}: no examples to score. Check that the eval split is non-empty and that "
            "config.data.eval_examples is > 0."
        )


def _safe_ratio(numerator: float, denominator: float) -> float:
    # sklearn's zero_division=0 convention: an undefined score (no positives at all) is 0.
    return float(numerator / denominator) if denominator else 0.0


# -------------------------------------------------------------------- classification --


def accuracy(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """{"accuracy": fraction of predictions equal to their target}."""
    _check(targets, predictions, "accuracy")
    hits = sum(t == p for t, p in zip(targets, predictions, strict=True))
    return {"accuracy": hits / len(targets)}


def _binary(targets: Sequence[int], predictions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """int arrays; predictions other than 0/1 become the wrong class (1 - target)."""
    t = np.asarray(targets, dtype=np.int64)
    p = np.asarray(predictions, dtype=np.int64)
    if not np.isin(t, (0, 1)).all():
        raise ValueError(f"Binary metrics need 0/1 targets, got {sorted(set(t.tolist()))}.")
    return t, np.where(np.isin(p, (0, 1)), p, 1 - t)


def _confusion(t: np.ndarray, p: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, tn, fp, fn) of binary arrays, class 1 positive."""
    return (int(np.sum((t == 1) & (p == 1))), int(np.sum((t == 0) & (p == 0))),
            int(np.sum((t == 0) & (p == 1))), int(np.sum((t == 1) & (p == 0))))


def f1(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """{"f1": F1 of the positive class (label id 1)}: MRPC "equivalent", QQP "duplicate"."""
    _check(targets, predictions, "f1")
    tp, _, fp, fn = _confusion(*_binary(targets, predictions))
    return {"f1": _safe_ratio(2 * tp, 2 * tp + fp + fn)}


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """{"matthews_corrcoef": (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))} (CoLA).

    0 when a marginal is empty (all predictions, or all targets, in one class), as sklearn.
    """
    _check(targets, predictions, "matthews_corrcoef")
    tp, tn, fp, fn = _confusion(*_binary(targets, predictions))
    denominator = float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return {"matthews_corrcoef": _safe_ratio(tp * tn - fp * fn, np.sqrt(denominator))}


def macro_f1(
    targets: Sequence[int], predictions: Sequence[int], *, num_classes: int = 3
) -> dict[str, float]:
    """{"macro_f1": unweighted mean over classes 0..num_classes-1 of each class's F1} (CB: 3).

    An invalid prediction (-1) is a false negative of its target's class and a false positive
    of none. A class absent from both targets and predictions scores 0 (sklearn's convention).
    """
    _check(targets, predictions, "macro_f1")
    t = np.asarray(targets, dtype=np.int64)
    p = np.asarray(predictions, dtype=np.int64)
    scores = []
    for c in range(num_classes):
        tp = np.sum((t == c) & (p == c))
        fp = np.sum((t != c) & (p == c))
        fn = np.sum((t == c) & (p != c))
        scores.append(_safe_ratio(2 * tp, 2 * tp + fp + fn))
    return {"macro_f1": float(np.mean(scores))}


# ------------------------------------------------------------------------ regression --


def _correlation(targets: Sequence[float], predictions: Sequence[float], name: str,
                 fn: Any) -> dict[str, float]:
    _check(targets, predictions, name)
    t = np.asarray(targets, dtype=np.float64)
    p = np.asarray(predictions, dtype=np.float64)
    if len(t) < 2 or np.ptp(t) == 0 or np.ptp(p) == 0:
        # Undefined (scipy would return NaN): constant predictions carry no information about
        # the ranking, so they score as no correlation rather than poisoning the task mean.
        return {name: 0.0}
    return {name: float(fn(t, p)[0])}


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    """{"pearson_corrcoef": Pearson's r} (STS-B); 0 if either side is constant."""
    return _correlation(targets, predictions, "pearson_corrcoef", scipy.stats.pearsonr)


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    """{"spearman_corrcoef": Spearman's rho} (STS-B); 0 if either side is constant."""
    return _correlation(targets, predictions, "spearman_corrcoef", scipy.stats.spearmanr)


# -------------------------------------------------------------------------- MultiRC --


def f1a(targets: Sequence[Mapping[str, Any]], predictions: Sequence[int]) -> dict[str, float]:
    """{"f1a": binary F1 over all answer options} (MultiRC's F1a, "True" positive)."""
    _check(targets, predictions, "f1a")
    return {"f1a": f1([t["value"] for t in targets], predictions)["f1"]}


def group_exact_match(targets: Sequence[Mapping[str, Any]],
                      predictions: Sequence[Any]) -> dict[str, float]:
    """{"exact_match": fraction of groups whose predictions are all right} (MultiRC's EM).

    A group is one question: it counts as right only if every one of its answer options is
    classified correctly. Targets carry the group key in "group" and the label in "value".
    """
    _check(targets, predictions, "group_exact_match")
    right: dict[Hashable, bool] = {}
    for t, p in zip(targets, predictions, strict=True):
        right[t["group"]] = right.get(t["group"], True) and t["value"] == p
    return {"exact_match": sum(right.values()) / len(right)}


# --------------------------------------------------------------------------- ReCoRD --

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD's bag-of-tokens F1 between two normalised strings (both empty: 1)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def record(targets: Sequence[Mapping[str, Any]], predictions: Sequence[str]) -> dict[str, float]:
    """{"exact_match", "f1"}: SQuAD EM and token F1, max over each query's gold answers.

    ReCoRD's tasks repeat a query once per gold answer (training gets one target per answer); the
    copies share their "group" and are scored once (the first), so every query weighs the same.
    """
    _check(targets, predictions, "record")
    seen: set[Hashable] = set()
    em, f1_scores = [], []
    for t, p in zip(targets, predictions, strict=True):
        if t["group"] in seen:
            continue
        seen.add(t["group"])
        answers = list(t["answers"]) or [""]
        em.append(max(float(normalize_answer(p) == normalize_answer(a)) for a in answers))
        f1_scores.append(max(token_f1(p, a) for a in answers))
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1_scores))}
