"""Synthetic multi-task skill suite: string skills, task definitions and example generation.

Every task maps a random lowercase string (3..8 letters) to a transformed string by applying a
sequence of *skills* left to right. The frozen base model is pretrained on the single-skill
tasks (`PRETRAIN_TASKS`); parameter-efficient methods are then trained on the compositions
(`SUITE_TASKS`), whose overlap in skills (`skill_overlap`) is the ground truth that learned
routing can be compared against. `HELDOUT_TASKS` combine seen skills in new ways and are never
trained on: zero-shot evaluation only.

Every task also has a short English description (`DESCRIPTIONS`, built by `describe` from the
skill words the base model saw as task prefixes), for description-conditioned generators: the
held-out tasks' descriptions are new texts. And every task can be posed in several *languages*
(`LANGUAGES`): a language is a letter cipher in which the answer is written (the input stays
plain, so only the language id tells the languages apart), language 0 ("plain") being the task
itself. `HELDOUT_LANGUAGE_PAIRS` are (suite task,
language) pairs never trained on, whose task and language are each trained on in other pairs.

This module is pure Python + NumPy on purpose (no seqio / TensorFlow), so model and analysis
code can read the task tables cheaply. The seqio registrations live in `tasks/synthetic.py`.

Examples are a deterministic function of `(task, split, index, language)`: they are generated in
blocks of `EXAMPLES_PER_BLOCK` from a NumPy generator seeded by `(stable_int(key), split, block)`,
where the key is the task name (plain) or "<task>__<language>". Train and validation are disjoint
by *content*, not only by seed: a letter string belongs to validation iff its crc32 falls in one
of `HELDOUT_BUCKETS` buckets, for every task and language. Seed disjointness alone would not do,
since the train stream covers all 26**3 three-letter strings.
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


# ----------------------------------------------------------------------------- descriptions --
# Phrases reuse the skill words of the pretraining task prefixes ("reverse", "shift", "upper",
# "double", "copy"). The first skill names its object; later ones refer back to it, which keeps
# three-skill descriptions under MAX_DESCRIPTION_BYTES.
_FIRST_PHRASES = {
    "reverse": "reverse the letters",
    "shift": "shift the letters by one",
    "upper": "upper-case the letters",
    "double": "double each letter",
}
_LATER_PHRASES = {
    "reverse": "reverse them",
    "shift": "shift them by one",
    "upper": "upper-case them",
    "double": "double them",
}
COPY_DESCRIPTION = "copy the letters"
# Descriptions are tokenised by the byte vocabulary with inputs_length 64, EOS included.
MAX_DESCRIPTION_BYTES = 63


def describe(skills: Sequence[str]) -> str:
    """A short English description of applying `skills` left to right.

    () -> "copy the letters"; ("reverse", "shift") -> "reverse the letters, then shift them by
    one"; three skills -> "A, B, then C".
    """
    unknown = [s for s in skills if s not in SKILLS]
    if unknown:
        raise ValueError(f"Unknown skills {unknown}; known skills: {list(SKILLS)}.")
    if not skills:
        return COPY_DESCRIPTION
    phrases = [_FIRST_PHRASES[skills[0]], *(_LATER_PHRASES[s] for s in skills[1:])]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + ", then " + phrases[-1]


DESCRIPTIONS: dict[str, str] = {task: describe(skills) for task, skills in ALL_TASKS.items()}
_TOO_LONG = {t: d for t, d in DESCRIPTIONS.items() if len(d.encode()) > MAX_DESCRIPTION_BYTES}
if _TOO_LONG:  # Caught at import, before a truncated description reaches a generator.
    raise ValueError(
        f"Descriptions over {MAX_DESCRIPTION_BYTES} bytes: {_TOO_LONG}; shorten the phrases."
    )

# -------------------------------------------------------------------------------- languages --
# Append only: language ids index learned language embeddings. Language 0 is the plain task.
PLAIN = "plain"
LANGUAGES: dict[str, int] = {PLAIN: 0, "atbash": 1, "rot13": 2}
NUM_LANGUAGE_IDS = len(LANGUAGES)

_LOWER_UPPER = ALPHABET + ALPHABET.upper()
_ATBASH_TABLE = str.maketrans(_LOWER_UPPER, ALPHABET[::-1] + ALPHABET.upper()[::-1])
_ROT13_TABLE = str.maketrans(
    _LOWER_UPPER, ALPHABET[13:] + ALPHABET[:13] + ALPHABET.upper()[13:] + ALPHABET.upper()[:13]
)


def atbash(text: str) -> str:
    """Mirrors the alphabet, keeping case: a <-> z, b <-> y, ..., A <-> Z. Its own inverse."""
    return text.translate(_ATBASH_TABLE)


def rot13(text: str) -> str:
    """Caesar shift by 13, keeping case: a <-> n, ..., Z <-> M. Its own inverse."""
    return text.translate(_ROT13_TABLE)


def plain(text: str) -> str:
    """The plain language: no cipher."""
    return text


CIPHERS: dict[str, Callable[[str], str]] = {PLAIN: plain, "atbash": atbash, "rot13": rot13}

# (suite task, language) pairs never trained on: two per non-plain language, different tasks for
# different languages, so each pair's task (in other languages) and language (with other tasks)
# are trained on. Only the answer is ciphered, and the input is the same in every language, so
# a model can only answer in the right language from the language id (a cipher of the input too
# would commute with most skills: e.g. rot13 with all of them, atbash with all but shift).
HELDOUT_LANGUAGE_PAIRS: tuple[tuple[str, str], ...] = (
    ("reverse_shift", "atbash"),
    ("shift_upper_double", "atbash"),
    ("reverse_upper", "rot13"),
    ("shift_double", "rot13"),
)
LANGUAGE_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (task, language) for task in SUITE_TASKS for language in LANGUAGES
)
TRAIN_LANGUAGE_PAIRS: tuple[tuple[str, str], ...] = tuple(
    pair for pair in LANGUAGE_PAIRS if pair not in HELDOUT_LANGUAGE_PAIRS
)


def _check_task(task: str) -> None:
    if task not in ALL_TASKS:
        close = difflib.get_close_matches(task, ALL_TASKS, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"Unknown synthetic task {task!r}.{hint} Known tasks: {list(ALL_TASKS)}.")


def _check_split(split: str) -> None:
    if split not in _SPLIT_INTS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"Unknown language {language!r}; expected one of {list(LANGUAGES)}.")


def cipher(language: str, text: str) -> str:
    """`text` written in `language` (its letter cipher; every cipher here is its own inverse)."""
    _check_language(language)
    return CIPHERS[language](text)


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


def example_for(task: str, letters: str, language: str = PLAIN) -> Example:
    """The example of `task` on plain `letters`, answered in `language`.

    Input `f"{task}: {letters}"` (as the plain task's), target `cipher(transform(task,
    letters))`: the language is the script of the answer, told only by the language id.
    """
    _check_language(language)
    return Example(input_text(task, letters), CIPHERS[language](transform(task, letters)))


def stream_key(task: str, language: str = PLAIN) -> str:
    """The name that seeds a (task, language)'s examples: the task itself when plain."""
    return task if language == PLAIN else f"{task}__{language}"


def _block_letters(task: str, split: str, block: int, language: str) -> list[str]:
    """Plain letters of one block (validation: the held-out letter strings)."""
    rng = np.random.default_rng([stable_int(stream_key(task, language)), _SPLIT_INTS[split], block])
    want_heldout = split == "validation"
    # Draw enough candidates per round that one round nearly always suffices.
    per_round = EXAMPLES_PER_BLOCK * (2 * HELDOUT_BUCKETS if want_heldout else 2)
    letters: list[str] = []
    while len(letters) < EXAMPLES_PER_BLOCK:
        letters += [
            s for s in random_letters(rng, per_round) if is_heldout(s) == want_heldout
        ]
    return letters[:EXAMPLES_PER_BLOCK]


def make_block(task: str, split: str, block: int, language: str = PLAIN) -> list[Example]:
    """Examples `[block * EXAMPLES_PER_BLOCK, (block + 1) * EXAMPLES_PER_BLOCK)` of a split.

    Written in `language` (see `example_for`).
    """
    _check_task(task)
    _check_split(split)
    _check_language(language)
    if block < 0:
        raise ValueError(f"block must be >= 0, got {block}.")
    return [
        example_for(task, letters, language)
        for letters in _block_letters(task, split, block, language)
    ]


def make_examples(
    task: str, split: str, start: int, count: int, language: str = PLAIN
) -> list[Example]:
    """Examples `[start, start + count)` of `split`; a pure function of its arguments."""
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}.")
    first, last = start // EXAMPLES_PER_BLOCK, (start + count - 1) // EXAMPLES_PER_BLOCK
    blocks = [ex for b in range(first, last + 1) for ex in make_block(task, split, b, language)]
    offset = start - first * EXAMPLES_PER_BLOCK
    return blocks[offset : offset + count]


def make_example(task: str, split: str, index: int, language: str = PLAIN) -> Example:
    """Example number `index` of `split`."""
    return make_examples(task, split, index, 1, language)[0]


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
