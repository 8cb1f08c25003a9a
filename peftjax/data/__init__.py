"""Data: the synthetic skill suite, the task/language-id-aware seqio feature converter, task
descriptions, metrics, batches.

The public names below are re-exported lazily: `import peftjax.data.synthetic` (task tables,
NUM_TASK_IDS) or `peftjax.data.descriptions` does not pull in TensorFlow/seqio; the first access
to a pipeline name does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftjax.data.descriptions import (
        description_of,
        missing_descriptions,
        register_description,
    )
    from peftjax.data.features import (
        LANGUAGE_ID_KEY,
        TASK_ID_KEY,
        TaskAwareEncDecFeatureConverter,
        add_task_id,
        task_id_preprocessor,
    )
    from peftjax.data.metrics import exact_match, token_accuracy
    from peftjax.data.pipeline import (
        decode_tokens,
        eval_batches,
        import_task_modules,
        language_id_of,
        register_task_id,
        resolve,
        task_id_of,
        task_names,
        train_batches,
        vocabulary,
    )
    from peftjax.data.synthetic import (
        ALL_TASKS,
        DESCRIPTIONS,
        HELDOUT_LANGUAGE_PAIRS,
        HELDOUT_TASKS,
        LANGUAGES,
        NUM_LANGUAGE_IDS,
        NUM_TASK_IDS,
        PRETRAIN_TASKS,
        SKILLS,
        SUITE_TASKS,
        TASK_IDS,
        TRAIN_LANGUAGE_PAIRS,
        Example,
        apply_skills,
        cipher,
        describe,
        example_for,
        make_example,
        make_examples,
        skill_overlap,
        transform,
    )

_EXPORTS = {
    "descriptions": ("description_of", "missing_descriptions", "register_description"),
    "features": (
        "LANGUAGE_ID_KEY",
        "TASK_ID_KEY",
        "TaskAwareEncDecFeatureConverter",
        "add_task_id",
        "task_id_preprocessor",
    ),
    "metrics": ("exact_match", "token_accuracy"),
    "pipeline": (
        "decode_tokens",
        "eval_batches",
        "import_task_modules",
        "language_id_of",
        "register_task_id",
        "resolve",
        "task_id_of",
        "task_names",
        "train_batches",
        "vocabulary",
    ),
    "synthetic": (
        "ALL_TASKS",
        "DESCRIPTIONS",
        "HELDOUT_LANGUAGE_PAIRS",
        "HELDOUT_TASKS",
        "LANGUAGES",
        "NUM_LANGUAGE_IDS",
        "NUM_TASK_IDS",
        "PRETRAIN_TASKS",
        "SKILLS",
        "SUITE_TASKS",
        "TASK_IDS",
        "TRAIN_LANGUAGE_PAIRS",
        "Example",
        "apply_skills",
        "cipher",
        "describe",
        "example_for",
        "make_example",
        "make_examples",
        "skill_overlap",
        "transform",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "ALL_TASKS",
    "DESCRIPTIONS",
    "HELDOUT_LANGUAGE_PAIRS",
    "HELDOUT_TASKS",
    "LANGUAGES",
    "LANGUAGE_ID_KEY",
    "NUM_LANGUAGE_IDS",
    "NUM_TASK_IDS",
    "PRETRAIN_TASKS",
    "SKILLS",
    "SUITE_TASKS",
    "TASK_IDS",
    "TASK_ID_KEY",
    "TRAIN_LANGUAGE_PAIRS",
    "Example",
    "TaskAwareEncDecFeatureConverter",
    "add_task_id",
    "apply_skills",
    "cipher",
    "decode_tokens",
    "describe",
    "description_of",
    "eval_batches",
    "exact_match",
    "example_for",
    "import_task_modules",
    "language_id_of",
    "make_example",
    "make_examples",
    "missing_descriptions",
    "register_description",
    "register_task_id",
    "resolve",
    "skill_overlap",
    "task_id_of",
    "task_id_preprocessor",
    "task_names",
    "token_accuracy",
    "train_batches",
    "transform",
    "vocabulary",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # Cache: later lookups skip __getattr__.
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
