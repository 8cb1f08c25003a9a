"""Natural-language task descriptions: a registry from seqio task name to text.

Description-conditioned generators (Text-to-LoRA style, config.peft.hyper_condition =
'description') build a task's adapter from an embedding of its description, so a task is
zero-shot reachable exactly when it has one. The module that registers a seqio task registers its
description next to its task id (`register_description`), and a description, once registered,
never changes: adapters generated from it, and results reported for it, depend on the exact text.

Pure Python on purpose (no seqio / TensorFlow), like `peftjax.data.synthetic`.
"""

from __future__ import annotations

from collections.abc import Iterable

_DESCRIPTIONS: dict[str, str] = {}


def register_description(task_name: str, text: str) -> None:
    """Records the description of a seqio task. Idempotent; a different text raises."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"The description of {task_name!r} must be a non-empty string, got {text!r}."
        )
    previous = _DESCRIPTIONS.get(task_name)
    if previous is not None and previous != text:
        raise ValueError(
            f"Task {task_name!r} already has the description {previous!r}; refusing to change it "
            f"to {text!r} (generated adapters depend on the exact text). Register the new text "
            "under a new task name instead."
        )
    _DESCRIPTIONS[task_name] = text


def description_of(task_name: str) -> str:
    """The registered description of a seqio task."""
    if task_name not in _DESCRIPTIONS:
        raise ValueError(
            f"seqio task {task_name!r} has no description. Register one with "
            f"peftjax.data.register_description({task_name!r}, <text>) where the task is "
            "registered; a description-conditioned generator "
            "(config.peft.hyper_condition='description') needs one for every task."
        )
    return _DESCRIPTIONS[task_name]


def missing_descriptions(task_names: Iterable[str]) -> list[str]:
    """The names among `task_names` that have no description, in the order given."""
    return [name for name in task_names if name not in _DESCRIPTIONS]
