"""Preemption-safe training: catch SIGTERM / SIGINT and agree on the step to stop at.

A preempted run finishes the step in flight, saves a checkpoint at that step and stops, so the
same command resumes it (`peftjax.train.loop.train` raises `Preempted`; `peftjax train` prints
where it saved and exits 0). `PreemptionWatch` is what the loop asks after every step:

    with PreemptionWatch() as preemption:
        for step in range(start + 1, total + 1):
            state = train_step(state, ...)
            if preemption.should_stop(step):
                save(step); break

* One process: a signal handler sets a flag, and asking reads it (no device sync, no cost).
* Several processes (a TPU pod's hosts get the notice at different times, and all of them must
  save the same step), or any run started by `jax.distributed.initialize()`: JAX's preemption
  sync point (`jax.experimental.multihost_utils.reached_preemption_sync_point`), run by the
  coordination service that `initialize()` starts. Asking is a call into C++, no device sync.
  The service listens for SIGTERM with a C++ handler that a Python one would replace, so the
  watch leaves SIGTERM alone there and forwards SIGINT to it. With the service disabled
  (`jax_enable_preemption_service=False`) the hosts share their flags with a small all-gather
  every `agree_every` steps instead.

Handlers are installed on entering the `with` block and the previous ones put back on leaving
it, so tests and notebooks that call `train()` in-process keep their own. Ctrl-C twice raises
KeyboardInterrupt at once. SIGKILL cannot be caught: such a run resumes from its last periodic
checkpoint (`config.train.checkpoint_every`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import types

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):  # noqa: N818 (what happened, like KeyboardInterrupt)
    """`train()` stopped on a preemption signal after saving a checkpoint at `step` in
    `directory`; calling it again with the same config and workdir resumes from there."""

    def __init__(self, step: int, directory: str, reason: str = "preempted"):
        self.step, self.directory, self.reason = step, directory, reason
        super().__init__(f"{reason}: saved a checkpoint at step {step} in {directory}; run the "
                         "same command (same config and workdir) again to resume from it.")


class PreemptionWatch:
    """Context manager that catches SIGTERM / SIGINT while training; see the module docstring.

    `should_stop(step)` must be called after every step, with increasing steps, by every
    process; all of them get the same answer for the same step.
    """

    def __init__(self, *, agree_every: int = 1):
        self.agree_every = max(1, int(agree_every))
        self.signal_name: str | None = None  # the first signal this process received
        self._previous: dict[int, object] = {}
        self._answers: dict[int, bool] = {}
        self._mode = "single"
        self._counter = 0  # the last step given to JAX's sync point

    def __enter__(self) -> PreemptionWatch:
        if jax.distributed.is_initialized():  # also one process started that way (a launcher)
            if _jax_sync_available():
                self._mode = "jax_sync"
            elif jax.process_count() > 1:
                self._mode = "allgather"
        if threading.current_thread() is not threading.main_thread():
            log.warning("train() runs outside the main thread, where Python cannot catch "
                        "signals: SIGTERM / SIGINT will not save a checkpoint before stopping.")
            return self
        for sig in SIGNALS:
            if self._mode == "jax_sync" and sig == signal.SIGTERM:
                continue  # JAX's own handler turns it into the agreed sync point
            if signal.getsignal(sig) is None:  # set outside Python: could not be put back
                log.warning("%s has a handler from outside Python; leaving it in place, so it "
                            "will not save a checkpoint before stopping.", sig.name)
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """Whether this process received a preemption signal (not an agreed decision)."""
        return self.signal_name is not None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without a checkpoint
        self.signal_name = signal.Signals(signum).name
        when = "the step in flight" if self._mode == "single" else "the step all processes agree on"
        # os.write, not print: a handler may run in the middle of another write to stderr.
        os.write(2, f"\n{self.signal_name}: saving a checkpoint after {when}, then stopping "
                    "(Ctrl-C again to stop at once).\n".encode())
        if self._mode == "jax_sync":  # SIGINT → JAX's SIGTERM listener, which tells every host
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step` (the number of steps done). Asking again for
        the same step gives the same answer, except that in a single process a signal that came
        since counts (so a finished run can still skip its final eval)."""
        if self._mode == "single":
            return self.requested
        if step not in self._answers:
            self._answers = {step: self._jax_sync(step) if self._mode == "jax_sync"
                             else self._allgather(step)}
        return self._answers[step]

    def _jax_sync(self, step: int) -> bool:
        # JAX's sync point is the fastest host's last step + 1 when the notice went round; a
        # resumed run starts past 0, and a notice during its setup sets the point before its
        # first step. Going through every skipped step (cheap calls into C++, no sync) makes
        # sure no point is missed; all hosts do the same, so they all stop together.
        reached = False
        for k in range(self._counter + 1, step + 1):
            reached = multihost_utils.reached_preemption_sync_point(k) or reached
        self._counter = max(self._counter, step)
        return reached

    def _allgather(self, step: int) -> bool:
        if step % self.agree_every:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))


def _jax_sync_available() -> bool:
    """Whether JAX's preemption sync service runs (it does after `jax.distributed.initialize()`
    unless `jax_enable_preemption_service` is off)."""
    try:
        multihost_utils.reached_preemption_sync_point(0)  # step 0 never is the sync point
    except RuntimeError:
        if jax.process_count() > 1:
            log.warning("JAX's preemption service is off (jax_enable_preemption_service=False):"
                        " hosts agree on preemption only every `agree_every` steps "
                        "(train.log_every in `peftjax train`).")
        return False
    return True
