"""Divergence guard: the tests of a bad step, and the record that keeps the last good checkpoint through rotation.

A run that diverges does not always do so at once: a loss can jump by orders of magnitude and stay finite for
many steps, and meanwhile every save writes a diverged state and rotation deletes the older, good ones, so the
run ends with nothing worth resuming from. Three tests flag a bad step before anything turns non-finite, from
the first step on: `blowup` (one update larger than `max_update_ratio` times the parameters it changes),
`above_start` (a loss far above the run's first losses) and `spike` (far above the recent ones).

The update test is the one rule that sees a contrastive pre-training blow up: once an update has thrown the
weights far from where they were, the embeddings collapse and the NT-Xent loss sits at chance, log(2B - 1),
about where it started, so no loss-based rule can tell the wreck from an untrained start. A collapse without
such an update is a finding about the representation (`collapsed` in summary.json), not a divergence.

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
# Parameter blow-up (config field guard.max_update_ratio): see `blowup`.
MAX_UPDATE_RATIO = 10.0
FIRST_LOSSES = 3  # how many of a run's first losses anchor `above_start`


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
    try:
      with open(tmp, "w") as f:
        json.dump({"step": self.step, "bad_step": self.bad_step}, f)
      os.replace(tmp, self.path)  # atomic: a reader never sees half a record
    except OSError:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise


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


def unpin_missing(mngr: ocp.CheckpointManager) -> None:
  """After a save that failed: a pin on a step that does not exist moves to the newest step that does (and comes
  before the first bad step). Where even that record cannot be written (a disk still full), it is removed: no
  record names a missing checkpoint."""
  pin = _PINS.get(mngr)
  if pin is None or pin.step is None:
    return
  steps = [s for s in mngr.all_steps() if pin.bad_step is None or s < pin.bad_step]
  if pin.step in steps:
    return
  pin.step = max(steps, default=None)
  try:
    pin.write()
  except OSError:
    if pin.path and os.path.exists(pin.path):
      os.remove(pin.path)


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


def above_start(loss: float, first: Sequence[float], factor: float = SPIKE_FACTOR) -> bool:
  """Whether `loss` is far above the run's first losses: the spike test for the steps before `spike` has a window.

  True when `loss` exceeds the largest of `first` by more than `factor` times their largest magnitude, taken as
  at least 1 so that a loss starting near zero (SimSiam's -cosine, bounded by 1) does not make its own noise
  the bound. A blow-up in the first steps would otherwise become the baseline `spike` measures against.
  """
  first = [x for x in first if math.isfinite(x)]
  if not first:
    return False
  return loss - max(first) > factor * max(1.0, max(abs(x) for x in first))


def blowup(update_ratio: float | None, max_ratio: float = MAX_UPDATE_RATIO) -> bool:
  """Whether one optimiser update moved the parameters by more than `max_ratio` times their own norm.

  Ordinary steps move them by a small fraction of it (Adam: about the learning rate over the parameters' RMS,
  0.02-0.2 at usual rates); a step that moves them by ten times their size has thrown the network away, whatever
  its loss does next. None (a step that reports no ratio) or `max_ratio` <= 0 gives no verdict.
  """
  return update_ratio is not None and max_ratio > 0 and not float(update_ratio) <= max_ratio


class GoodStepTracker:
  """The divergence guard of a run: the bad-step tests, and the pin on the last checkpoint before the first bad step.

  Per step, `observe(step, loss, update_ratio)` says why the step is bad, if it is (non-finite loss, `blowup`,
  `above_start`, `spike`; the loss tests are off with factor 0), and records the first bad step with the
  manager (`mark_bad`), from when on rotation keeps the newest checkpoint older than it; per save,
  `saved(step)` pins the checkpoint (`mark_good`) while no bad step has been seen. Either way rotation never
  deletes the last checkpoint taken before the first bad step. Both records live in `good_step.json` beside
  the checkpoints: a run resumed from a checkpoint at or after the bad step (it descends from the spike) keeps
  them; one resumed from before it starts afresh. `check` is the per-step verdict both training loops use.
  """
  def __init__(self, mngr: ocp.CheckpointManager | None, start_step: int, factor: float = SPIKE_FACTOR,
               window: int = SPIKE_WINDOW, max_update_ratio: float = MAX_UPDATE_RATIO, first: Sequence[float] = ()):
    if not factor >= 0 or int(window) < 1 or not max_update_ratio >= 0:
      raise UsjaxError(f"config.guard: loss_spike_factor and max_update_ratio must be positive (0 = off) and window "
                       f"at least 1, got {factor}, {max_update_ratio} and {window}")
    self.mngr, self.factor, self.window = mngr, float(factor), int(window)
    self.max_update_ratio = float(max_update_ratio)
    # Without a manager (a stacked run keeps no checkpoints) the tests run alone and nothing is pinned.
    self.pin = _pin(mngr) if mngr is not None else Pinned()
    self.first = [float(x) for x in first][:FIRST_LOSSES]  # the run's first losses; a resumed run passes them on
    self.history: list[float] = []
    self.first_bad: int | None = None
    self.bad_steps = 0
    if self.pin.bad_step is not None:
      if self.pin.bad_step <= start_step:
        self.first_bad = self.pin.bad_step
      else:
        self.pin.bad_step = None
        self.pin.write()

  @classmethod
  def from_config(cls, g, mngr: ocp.CheckpointManager | None, start_step: int = 0,
                  first: Sequence[float] = ()) -> GoodStepTracker:
    """The guard that `config.guard` (`g`) asks for."""
    return cls(mngr, start_step, g.loss_spike_factor, g.window, g.get("max_update_ratio", MAX_UPDATE_RATIO), first)

  def verdict(self, loss: float, update_ratio: float | None = None) -> str | None:
    """Why a step with this loss and update is bad; None if it is not. Pure: records nothing."""
    if not math.isfinite(loss):
      return f"non-finite loss ({loss})"
    if blowup(update_ratio, self.max_update_ratio):
      return (f"parameter blow-up (one update {float(update_ratio):.3g}x the parameters' norm, over "
              f"config.guard.max_update_ratio={self.max_update_ratio:g})")
    if self.factor > 0 and above_start(loss, self.first, self.factor):
      return (f"loss spike (loss={loss:.4g}, over {self.factor:g}x the run's first losses "
              f"{', '.join(f'{x:.4g}' for x in self.first)}; config.guard)")
    if self.factor > 0 and spike(loss, self.history, self.factor, self.window):
      return f"loss spike (loss={loss:.4g}, over {self.factor:g}x the recent median and spread; config.guard)"
    return None

  def observe(self, step: int, loss: float, update_ratio: float | None = None) -> str | None:
    """Records the loss of `step`; why the step is bad (see `verdict`), or None. Bad steps stay out of the history."""
    loss = float(loss)
    why = self.verdict(loss, update_ratio)
    if why is None:
      if len(self.first) < FIRST_LOSSES:
        self.first.append(loss)
      self.history.append(loss)
      del self.history[:-self.window]
      return None
    self.bad_steps += 1
    if self.first_bad is None:
      self.first_bad = step
      if self.mngr is not None:
        mark_bad(self.mngr, step)
        before = [s for s in self.mngr.all_steps() if s < step]
        kept = f"checkpoint step {max(before)} is kept" if before else "no checkpoint before it"
        logging.warning("%s at step %d; %s in %s (no later checkpoint replaces it)", why, step, kept,
                        self.mngr.directory)
    return why

  def check(self, step: int, metrics: Sequence[dict]) -> tuple[int, str] | None:
    """`observe` over the host metrics of the steps that end at `step`, in order: (the first bad step, why), or
    None. A step whose loss, gradient or update is not finite (`metrics['finite']`, from the train step) is bad
    whatever its loss says."""
    for i, m in enumerate(metrics):
      at = step - len(metrics) + 1 + i
      why = self.observe(at, float(m["loss"]), m.get("update_ratio"))
      if not m["finite"]:
        why = f"non-finite loss, gradient or update (loss={m['loss']})"
      if why:
        return at, why
    return None

  def saved(self, step: int) -> None:
    """Call after each `save`: pins `step` while the run has seen no bad step."""
    if self.first_bad is None and self.mngr is not None:
      mark_good(self.mngr, step)

  @property
  def good_step(self) -> int | None:
    return self.pin.step
