"""Orbax checkpoints of a run's state tree (trainable state, optimizer state, step) + metadata.

The frozen base is never written: it is rebuilt from its source (HF checkpoint or seed), so a
checkpoint holds only what training changed. Each checkpoint carries a `meta` JSON item with the
run's fingerprint, so a workdir is never resumed with a different model or PEFT setup.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint belongs to another model or PEFT configuration."""


class Checkpoints:
    """Save / restore a state pytree + JSON metadata under `directory` (orbax CheckpointManager).

    Steps are explicit; the metadata carries the run fingerprint and the data position.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 2, create: bool = True):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def check_fingerprint(self, fingerprint: dict[str, Any], step: int | None = None) -> None:
        """Raise CheckpointMismatchError naming what differs from the stored run."""
        stored = self.read_meta(step).get("fingerprint", {})
        fingerprint = json.loads(json.dumps(fingerprint))  # as stored: tuples come back as lists
        diffs = [k for k in sorted(set(stored) | set(fingerprint))
                 if stored.get(k) != fingerprint.get(k)]
        if diffs:
            details = "; ".join(f"{k}: checkpoint has {stored.get(k)!r}, config has "
                                f"{fingerprint.get(k)!r}" for k in diffs[:4])
            raise CheckpointMismatchError(
                f"The checkpoint in {self.directory} belongs to a different model or PEFT setup "
                f"({details}). Use a new --workdir, or run with the config it was trained with "
                f"(saved as config.json beside it).")

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore into the structure, dtypes and shardings of `like` (e.g. a fresh state)."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
