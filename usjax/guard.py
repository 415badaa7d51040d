"""Divergence guard: the loss-spike test, and the record that keeps the last good checkpoint through rotation.

A run that diverges does not always do so at once: a loss can jump by orders of magnitude and stay finite for
many steps, and meanwhile every save writes a diverged state and rotation deletes the older, good ones, so the
run ends with nothing worth resuming from. `spike` flags such a step before anything turns non-finite;
`GoodStepTracker` records the first bad step of a run and pins the last checkpoint saved before it, and the
preservation policy (`Pinned`, which `checkpoint.manager` combines with keep-the-newest) never deletes that
checkpoint however long the run goes on. Both records live in `good_step.json` beside the checkpoints, so a
resumed run keeps honouring them. This module knows nothing of saving or restoring: `checkpoint` builds on it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import weakref
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from usjax import UsjaxError

GOOD_STEP_FILE = "good_step.json"
# Loss-spike guard defaults (config fields guard.loss_spike_factor and guard.window): see `spike`.
SPIKE_FACTOR = 10.0
SPIKE_WINDOW = 50


# ---------------------------------------------------------------------------------------------------- rotation
@dataclasses.dataclass
class Pinned(ocp.checkpoint_managers.PreservationPolicy):
  """Preserves the step pinned by `mark_good` and, once a bad step is recorded, the newest step before it.

  The second rule holds even where the pinned save never completed (a crash during an async save) or no step
  was marked. Combined with LatestN, which keeps the newest.
  """
  step: int | None = None
  bad_step: int | None = None
  path: str | None = None  # where the pin is recorded, so a resumed run keeps honouring it

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    keep = {self.step} - {None}
    before_bad = [c.step for c in checkpoints if self.bad_step is not None and c.step < self.bad_step]
    if before_bad:
      keep.add(max(before_bad))
    return [c.step in keep for c in checkpoints]

  def write(self) -> None:
    if self.path is None or jax.process_index() != 0:
      return
    tmp = f"{self.path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump({"step": self.step, "bad_step": self.bad_step}, f)
    os.replace(tmp, self.path)  # atomic: a reader never sees half a record


def read_pin(directory: str) -> Pinned:
  """The pin recorded in `directory` (a checkpoint directory); an empty one if none is recorded yet."""
  pin = Pinned(path=os.path.join(directory, GOOD_STEP_FILE))
  try:
    with open(pin.path) as f:
      rec = json.load(f)
    pin.step, pin.bad_step = rec.get("step"), rec.get("bad_step")
  except (OSError, ValueError, AttributeError):  # none yet, or damaged: nothing is pinned
    pass
  return pin


_PINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # manager -> its pin (also in its options)


def attach(mngr: ocp.CheckpointManager, pin: Pinned) -> None:
  """Records `pin` as the policy of `mngr`, so that `mark_good`, `mark_bad` and `good_step` find it."""
  _PINS[mngr] = pin


def _pin(mngr: ocp.CheckpointManager) -> Pinned:
  pin = _PINS.get(mngr)
  if pin is None:
    raise UsjaxError(f"{mngr.directory}: not a manager made by checkpoint.manager (no pinned step)")
  return pin


def mark_good(mngr: ocp.CheckpointManager, step: int) -> None:
  """Pins `step` (saved, or being saved, by `mngr`) so that rotation keeps it; it replaces the previous pin."""
  pin = _pin(mngr)
  pin.step = int(step)
  pin.write()


def good_step(mngr: ocp.CheckpointManager) -> int | None:
  """The pinned step (`mark_good`), kept by rotation; None if none."""
  return _pin(mngr).step


def mark_bad(mngr: ocp.CheckpointManager, step: int) -> None:
  """Records the first bad step of a run: from then on rotation keeps the newest checkpoint from before it."""
  pin = _pin(mngr)
  pin.bad_step = int(step)
  pin.write()


# ---------------------------------------------------------------------------------------------------- spikes
def spike(loss: float, history: Sequence[float], factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW) -> bool:
  """Whether `loss` is far above the recent losses: a sign of divergence before anything turns non-finite.

  True when `loss` is not finite, or exceeds the median m of the last `window` finite losses of `history` by
  more than `factor` times the larger of |m| and the losses' spread (1.4826 x their median absolute deviation).
  The |m| term makes it a ratio test where the loss is far from zero; the spread term keeps a loss that
  fluctuates about zero, or is negative (SimSiam's -cosine), from firing on ordinary noise. With fewer than
  min(window, 10) finite losses in `history` it gives no verdict (False).

  The default factor 10 needs a loss 11x the median of a positive loss: batch-to-batch noise and the ups of a
  warm-up stay far below that (NT-Xent / InfoNCE are bounded by about log(2B) + 2/T, Dice + BCE of a sane
  network by a few units), while a blow-up passes it by orders of magnitude.
  """
  if not math.isfinite(loss):
    return True
  recent = [x for x in history if math.isfinite(x)][-window:] if window > 0 else []
  if len(recent) < min(window, 10) or not recent:
    return False
  m = float(np.median(recent))
  spread = 1.4826 * float(np.median(np.abs(np.asarray(recent) - m)))
  return loss - m > factor * max(abs(m), spread, 1e-12)


class GoodStepTracker:
  """The divergence guard of a run: loss-spike watch, and the pin on the last checkpoint before the first bad step.

  Per step, `observe(step, loss)` says whether the step is bad (`spike`) and records the first bad step with
  the manager (`mark_bad`), from when on rotation keeps the newest checkpoint older than it; per save,
  `saved(step)` pins the checkpoint (`mark_good`) while no bad step has been seen. Either way rotation never
  deletes the last checkpoint taken before the first bad step. Both records live in `good_step.json` beside
  the checkpoints: a run resumed from a checkpoint at or after the bad step (it descends from the spike) keeps
  them; one resumed from before it starts afresh.
  """
  def __init__(self, mngr: ocp.CheckpointManager, start_step: int, factor: float = SPIKE_FACTOR,
               window: int = SPIKE_WINDOW):
    if not factor > 0 or int(window) < 1:
      raise UsjaxError(f"config.guard: loss_spike_factor must be positive and window at least 1, got {factor} and "
                       f"{window}")
    self.mngr, self.factor, self.window = mngr, float(factor), int(window)
    self.pin = _pin(mngr)
    self.history: list[float] = []
    self.first_bad: int | None = None
    self.bad_steps = 0
    if self.pin.bad_step is not None:
      if self.pin.bad_step <= start_step:
        self.first_bad = self.pin.bad_step
      else:
        self.pin.bad_step = None
        self.pin.write()

  def observe(self, step: int, loss: float) -> bool:
    """Records the loss of `step`; True if it is a spike (or not finite). Spikes stay out of the history."""
    loss = float(loss)
    bad = spike(loss, self.history, self.factor, self.window)
    if not bad:
      self.history.append(loss)
      del self.history[:-self.window]
      return False
    self.bad_steps += 1
    if self.first_bad is None:
      self.first_bad = step
      mark_bad(self.mngr, step)
      recent = [x for x in self.history if math.isfinite(x)][-self.window:]
      median = float(np.median(recent)) if recent else float("nan")
      before = [s for s in self.mngr.all_steps() if s < step]
      kept = f"checkpoint step {max(before)} is kept" if before else "no checkpoint before it"
      logging.warning(
          "loss spike at step %d: loss %.4g against a median of %.4g over the last %d steps; %s in %s "
          "(no later checkpoint replaces it)", step, loss, median, len(recent), kept, self.mngr.directory)
    return True

  def saved(self, step: int) -> None:
    """Call after each `save`: pins `step` while the run has seen no bad step."""
    if self.first_bad is None:
      mark_good(self.mngr, step)

  @property
  def good_step(self) -> int | None:
    return self.pin.step
