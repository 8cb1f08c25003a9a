"""Synthetic multi-task skill suite: string skills, task definitions and example generation.

Every task maps a random lowercase string (3..8 letters) to a transformed string by applying a
sequence of *skills* left to right. The frozen base model is pretrained on the single-skill
tasks (`PRETRAIN_TASKS`); parameter-efficient methods are then trained on the compositions
(`SUITE_TASKS`), whose overlap in skills (`skill_overlap`) is the ground truth that learned
routing can be compared against. `HELDOUT_TASKS` combine seen skills in new ways and are never
trained on: zero-shot evaluation only.

This module is pure Python + NumPy on purpose (no seqio / TensorFlow), so model and analysis
code can read the task tables cheaply. The seqio registrations live in `tasks/synthetic.py`.

Examples are a deterministic function of `(task, split, index)`: they are generated in blocks of
`EXAMPLES_PER_BLOCK` from a NumPy generator seeded by `(stable_int(task), split, block)`.
Train and validation are disjoint by *content*, not only by seed: a letter string belongs to
validation iff its crc32 falls in one of `HELDOUT_BUCKETS` buckets, for every task. Seed
disjointness alone would not do, since the train stream covers all 26**3 three-letter strings.
"""

from __future__ import annotations

import difflib
import functools
import string
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

ALPHABET = string.ascii_lowercase
MIN_LETTERS = 3
MAX_LETTERS = 8
EXAMPLES_PER_BLOCK = 256
HELDOUT_BUCKETS = 16  # 1/16 of all letter strings are reserved for validation.
SPLITS = ("train", "validation")
# Each training seed reads its own region of the (practically infinite) train index space, so
# runs with different seeds see different examples, not a reshuffle of the same ones.
TRAIN_BLOCKS_PER_SEED = 2**20

_SPLIT_INTS = {"train": 0, "validation": 1}


# ----------------------------------------------------------------------------------- skills --


def reverse(text: str) -> str:
    """Reverses the string: abc -> cba."""
    return text[::-1]


_SHIFT_TABLE = str.maketrans(
    ALPHABET + ALPHABET.upper(),
    ALPHABET[1:] + ALPHABET[0] + ALPHABET.upper()[1:] + ALPHABET.upper()[0],
)


def shift(text: str) -> str:
    """Caesar shift by one, wrapping z -> a (and Z -> A, so `shift` commutes with `upper`)."""
    return text.translate(_SHIFT_TABLE)


def upper(text: str) -> str:
    """Upper-cases the string: abc -> ABC."""
    return text.upper()


def double(text: str) -> str:
    """Writes every character twice: abc -> aabbcc."""
    return "".join(char * 2 for char in text)


SKILLS: dict[str, Callable[[str], str]] = {
    "reverse": reverse,
    "shift": shift,
    "upper": upper,
    "double": double,
}

# ------------------------------------------------------------------------------------ tasks --
# The insertion order of these two dicts defines the task ids: never reorder or delete entries,
# only append (checkpoints and routing analyses key on the ids).

PRETRAIN_TASKS: dict[str, tuple[str, ...]] = {
    "copy": (),
    "reverse": ("reverse",),
    "shift": ("shift",),
    "upper": ("upper",),
    "double": ("double",),
}

SUITE_TASKS: dict[str, tuple[str, ...]] = {
    "reverse_shift": ("reverse", "shift"),
    "reverse_upper": ("reverse", "upper"),
    "reverse_double": ("reverse", "double"),
    "shift_upper": ("shift", "upper"),
    "shift_double": ("shift", "double"),
    "upper_double": ("upper", "double"),
    "reverse_shift_upper": ("reverse", "shift", "upper"),
    "shift_upper_double": ("shift", "upper", "double"),
}

# Never trained on: new combinations of seen skills, for zero-shot evaluation (Arrow routing over
# the suite's adapters, description-conditioned generators). Their ids follow the suite's.
HELDOUT_TASKS: dict[str, tuple[str, ...]] = {
    "reverse_shift_double": ("reverse", "shift", "double"),
    "reverse_upper_double": ("reverse", "upper", "double"),
}

ALL_TASKS: dict[str, tuple[str, ...]] = {**PRETRAIN_TASKS, **SUITE_TASKS, **HELDOUT_TASKS}
TASK_IDS: dict[str, int] = {name: i for i, name in enumerate(ALL_TASKS)}
NUM_TASK_IDS = len(TASK_IDS)


def _check_task(task: str) -> None:
    if task not in ALL_TASKS:
        close = difflib.get_close_matches(task, ALL_TASKS, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"Unknown synthetic task {task!r}.{hint} Known tasks: {list(ALL_TASKS)}.")


def _check_split(split: str) -> None:
    if split not in _SPLIT_INTS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")


def apply_skills(skills: Sequence[str], text: str) -> str:
    """Applies `skills` to `text` left to right (the first skill is applied first)."""
    unknown = [s for s in skills if s not in SKILLS]
    if unknown:
        raise ValueError(f"Unknown skills {unknown}; known skills: {list(SKILLS)}.")
    return functools.reduce(lambda acc, skill: SKILLS[skill](acc), skills, text)


def transform(task: str, letters: str) -> str:
    """The target of `task` for the input `letters`."""
    _check_task(task)
    return apply_skills(ALL_TASKS[task], letters)


def input_text(task: str, letters: str) -> str:
    """The model input: a prefix naming the task, then the letters ("reverse: abc")."""
    return f"{task}: {letters}"


def skill_overlap(tasks: Sequence[str] | None = None) -> np.ndarray:
    """Task x task Jaccard overlap |A & B| / |A | B| of the tasks' skill *sets*.

    Args:
      tasks: task names; defaults to all tasks in task-id order, so that row `i` is task id `i`.

    Returns:
      float64 [len(tasks), len(tasks)], symmetric, in [0, 1]. Two tasks with no skills at all
      ("copy" with itself) count as identical (1.0).
    """
    names = list(ALL_TASKS) if tasks is None else list(tasks)
    for name in names:
        _check_task(name)
    sets = [frozenset(ALL_TASKS[name]) for name in names]
    out = np.empty((len(sets), len(sets)), dtype=np.float64)
    for i, a in enumerate(sets):
        for j, b in enumerate(sets):
            union = a | b
            out[i, j] = len(a & b) / len(union) if union else 1.0
    return out


# --------------------------------------------------------------------------------- examples --


class Example(NamedTuple):
    """One text-to-text example."""

    inputs: str
    targets: str


def stable_int(text: str) -> int:
    """A hash of `text` that is stable across processes (unlike `hash`, which is salted)."""
    return zlib.crc32(text.encode("utf-8"))


def is_heldout(letters: str) -> bool:
    """Whether a letter string is reserved for validation (for every task)."""
    return stable_int(letters) % HELDOUT_BUCKETS == 0


def random_letters(rng: np.random.Generator, n: int) -> list[str]:
    """`n` random lowercase strings with lengths uniform in [MIN_LETTERS, MAX_LETTERS]."""
    lengths = rng.integers(MIN_LETTERS, MAX_LETTERS + 1, size=n)
    codes = rng.integers(ord("a"), ord("z") + 1, size=(n, MAX_LETTERS), dtype=np.uint8)
    return [
        row[:length].tobytes().decode("ascii") for row, length in zip(codes, lengths, strict=True)
    ]


def _block_letters(task: str, split: str, block: int) -> list[str]:
    rng = np.random.default_rng([stable_int(task), _SPLIT_INTS[split], block])
    want_heldout = split == "validation"
    # Draw enough candidates per round that one round nearly always suffices.
    per_round = EXAMPLES_PER_BLOCK * (2 * HELDOUT_BUCKETS if want_heldout else 2)
    letters: list[str] = []
    while len(letters) < EXAMPLES_PER_BLOCK:
        letters += [s for s in random_letters(rng, per_round) if is_heldout(s) == want_heldout]
    return letters[:EXAMPLES_PER_BLOCK]


def make_block(task: str, split: str, block: int) -> list[Example]:
    """Examples `[block * EXAMPLES_PER_BLOCK, (block + 1) * EXAMPLES_PER_BLOCK)` of a split."""
    _check_task(task)
    _check_split(split)
    if block < 0:
        raise ValueError(f"block must be >= 0, got {block}.")
    return [
        Example(input_text(task, letters), transform(task, letters))
        for letters in _block_letters(task, split, block)
    ]


def make_examples(task: str, split: str, start: int, count: int) -> list[Example]:
    """Examples `[start, start + count)` of `split`; a pure function of its arguments."""
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}.")
    first, last = start // EXAMPLES_PER_BLOCK, (start + count - 1) // EXAMPLES_PER_BLOCK
    blocks = [ex for b in range(first, last + 1) for ex in make_block(task, split, b)]
    offset = start - first * EXAMPLES_PER_BLOCK
    return blocks[offset : offset + count]


def make_example(task: str, split: str, index: int) -> Example:
    """Example number `index` of `split`."""
    return make_examples(task, split, index, 1)[0]


def first_train_block(seed: int | None) -> int:
    """The block at which the train stream of `seed` starts (None reads the seed-0 region)."""
    seed = 0 if seed is None else int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    return seed * TRAIN_BLOCKS_PER_SEED


def columns(examples: Sequence[Example]) -> Mapping[str, list[str]]:
    """[Example] -> {"inputs": [...], "targets": [...]} (the layout tf.data wants)."""
    return {
        "inputs": [ex.inputs for ex in examples],
        "targets": [ex.targets for ex in examples],
    }
