"""Guards of a run: a loss-spike rule, and what a resumed run may change.

`LossSpikeGuard` watches the logged losses (host floats, no device sync of
its own) and reports divergence: the loss above `factor` times the median of
the recent healthy log steps for `patience` log steps in a row. Beside the
non-finite check it catches the runs that blow up without a NaN (a loss of
1e5, or one stuck at ln(vocab) with zero gradients).

`config_changes(old, new)` lists the keys whose values differ between the
config a workdir was written with and the one resuming it; the trainer
refuses the ones that change the train state's shapes and records the rest.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from blox_scale.training.config import to_dict


class DivergenceError(RuntimeError):
  """The loss stayed far above its running median; the run stops before checkpointing."""


class LossSpikeGuard:
  """`update(step, loss)` raises DivergenceError when the rule fires.

  factor: a log step is a spike when `loss > factor * median` (0 disables).
  patience: consecutive spikes that stop the run.
  window: healthy log steps the median is taken over (spikes are not added).
  warmup: healthy log steps needed before the rule applies.
  """

  def __init__(self, factor: float, patience: int, window: int = 50, warmup: int = 3):
    self.factor, self.patience, self.warmup = factor, patience, warmup
    self.history: collections.deque[float] = collections.deque(maxlen=window)
    self.spikes: list[tuple[int, float]] = []

  def extend(self, losses: list[float]) -> None:
    """Seeds the history (a resumed run: the losses logged before its checkpoint)."""
    self.history.extend(l for l in losses if np.isfinite(l))

  def update(self, step: int, loss: float) -> None:
    if not self.factor or not np.isfinite(loss):
      return  # non-finite values are the non-finite guard's
    if len(self.history) >= self.warmup:
      median = float(np.median(self.history))
      if loss > self.factor * median:
        self.spikes.append((step, loss))
        if len(self.spikes) >= self.patience:
          first = self.spikes[0][0]
          raise DivergenceError(
              f'train.divergence_factor={self.factor:g}: the loss diverged: {loss:.4g} at step {step}, above '
              f'{self.factor:g} x its running median {median:.4g} for {len(self.spikes)} log steps since step {first}; '
              'the run stops before checkpointing it. Lower optimizer.learning_rate or raise '
              'optimizer.warmup_steps, then resume from the last good checkpoint, or start fresh with '
              'checkpoint.resume=false or a new train.workdir')
        return
    self.spikes.clear()
    self.history.append(loss)


def flat(config: Any) -> dict[str, Any]:
  """`{'model.d_model': 128, ...}` of a config dataclass."""
  out: dict[str, Any] = {}

  def walk(prefix: str, value: Any) -> None:
    if isinstance(value, dict) and prefix.count('.') < 1:
      for k, v in value.items():
        walk(f'{prefix}.{k}' if prefix else k, v)
    else:
      out[prefix] = value

  walk('', to_dict(config) if dataclasses.is_dataclass(config) else config)
  return out


# Where a run lives is not part of what it computes: a moved or copied workdir resumes silently.
IGNORED_CHANGES = ('train.workdir',)


def config_changes(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
  """`{key: (old value, new value)}` for every key that differs (but `IGNORED_CHANGES`)."""
  a, b = flat(old), flat(new)
  keys = sorted((set(a) | set(b)) - set(IGNORED_CHANGES))
  return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
  return ', '.join(f'{k}={old!r} -> {new!r}' for k, (old, new) in changes.items())
