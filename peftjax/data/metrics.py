"""seqio-style metric functions: `fn(targets, predictions) -> {name: value}`.

Both raise ValueError on an empty evaluation set (an empty eval is a configuration bug, and a
silent 0.0 would look like a real, terrible score) and on mismatched lengths.
"""

from __future__ import annotations

from collections.abc import Sequence


def _check(targets: Sequence[str], predictions: Sequence[str], name: str) -> None:
    if len(targets) != len(predictions):
        raise ValueError(
            f"{name}: got {len(targets)} targets but {len(predictions)} predictions; "
            "they must be aligned one to one."
        )
    if not targets:
        raise ValueError(
            f"{name}: no examples to score. Check that the eval split is non-empty and that "
            "num_examples (if set) is > 0."
        )


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """{"exact_match": fraction of predictions equal to their target string}."""
    _check(targets, predictions, "exact_match")
    hits = sum(t == p for t, p in zip(targets, predictions, strict=True))
    return {"exact_match": hits / len(targets)}


def _byte_accuracy(target: str, prediction: str) -> float:
    target_bytes, pred_bytes = target.encode("utf-8"), prediction.encode("utf-8")
    if not target_bytes:
        # Nothing to compare position-wise: score as exact match of the empty string.
        return float(not pred_bytes)
    # zip stops at the shorter sequence: positions past the end of the prediction are wrong.
    correct = sum(t == p for t, p in zip(target_bytes, pred_bytes, strict=False))
    return correct / len(target_bytes)


def token_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """{"token_accuracy": mean over examples of the fraction of target bytes predicted in place}.

    Tokens are UTF-8 bytes (the tokens of `seqio.ByteVocabulary`). For each example, position i
    of the target counts as correct iff the prediction has the same byte at position i; extra
    predicted bytes are not penalised (exact_match covers that). An empty target scores 1.0 if
    the prediction is empty too, else 0.0.
    """
    _check(targets, predictions, "token_accuracy")
    scores = [_byte_accuracy(t, p) for t, p in zip(targets, predictions, strict=True)]
    return {"token_accuracy": sum(scores) / len(scores)}
