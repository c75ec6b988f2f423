"""What a run reports: progress bar, metrics.jsonl (and its trackers), memory, loss plot.

The trainer reads device values only at log steps (`jax.device_get` of the
few scalars kept since the last log), so the host never waits for the device
in between: the loop dispatches step after step and the bar moves when a
log step arrives. Only the primary process writes anything.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from blox_scale.parallel.distributed import is_primary
from blox_scale.training.disk import WriteFailed, write_failed, writing

METRICS_FILE = 'metrics.jsonl'
PLOT_FILE = 'loss.png'


def _plain(value: Any) -> Any:
  """numpy/jax scalars -> JSON numbers (floats keep every bit: json writes repr)."""
  if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them readable
  return value


class MetricsWriter:
  """Appends one JSON object per line to `<workdir>/metrics.jsonl` (primary only).

  Appending (not truncating) keeps the history of a resumed run in one
  file; a resumed run re-logs the steps after its checkpoint, so readers
  take the last line per step (`read_metrics` does). A failed write (disk
  full) raises `WriteFailed` naming the file, the errno and the fix.

  `trackers` (training/trackers.py: TensorBoard, W&B) receive every record
  written, after its JSON line.
  """

  def __init__(self, workdir: str | Path, enabled: bool = True, trackers: Sequence[Any] = ()):
    self.path = Path(workdir) / METRICS_FILE
    self.enabled = enabled
    self.trackers = list(trackers) if enabled else []
    self._file = None
    self._failed = False
    if enabled:
      with writing(self.path, 'the metrics'):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open('a', buffering=1)  # line-buffered: tail -f works
        if self._file.tell() and not self.path.read_bytes().endswith(b'\n'):
          self._file.write('\n')  # a process killed mid-line: start the next record on its own line

  def write(self, record: dict[str, Any]) -> None:
    plain = {k: _plain(v) for k, v in record.items()}
    try:
      if self._file is not None:
        with writing(self.path, 'the metrics'):
          self._file.write(json.dumps(plain) + '\n')
      for tracker in self.trackers:
        tracker.write(plain)
    except WriteFailed:
      self._failed = True  # `close` then reports nothing more
      raise

  def close(self) -> None:
    trackers, self.trackers = self.trackers, []
    try:
      for tracker in trackers:
        tracker.close()
    except WriteFailed:
      if not self._failed:  # after a failed metrics write, that one is the error reported
        raise
    finally:
      self._close_file()

  def _close_file(self) -> None:
    if self._file is not None:
      file, self._file = self._file, None
      try:
        file.close()  # flushes what a failed write left in the buffer: fails again on a full disk
      except OSError as e:
        if not self._failed:
          raise write_failed(self.path, 'the metrics', e) from e


def read_metrics(workdir: str | Path, kind: str | None = 'train') -> list[dict[str, Any]]:
  """The records of `metrics.jsonl` of a kind ('train', 'eval', 'start', None = all), last per step wins."""
  path = Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  records = []
  for line in path.read_text(errors='replace').splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue  # blank, or the last line of a process killed while writing it
  if kind is not None:
    records = [r for r in records if r.get('kind') == kind]
  if kind in ('train', 'eval'):
    by_step = {r['step']: r for r in records}
    return [by_step[s] for s in sorted(by_step)]
  return records


class Progress:
  """A tqdm bar over optimizer steps: loss, tokens/s, MFU, ETA (primary only)."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.bar = None
    if enabled:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, initial=initial, desc='train', unit='step', dynamic_ncols=True,
                      smoothing=0.1)

  def update(self, step: int, record: dict[str, Any] | None = None) -> None:
    if self.bar is None:
      return
    self.bar.n = step
    if record is not None:
      self.bar.set_postfix(
          loss=f"{record['loss']:.4f}",
          tok_s=f"{record['tokens_per_sec']:,.0f}",
          mfu=f"{100 * record['mfu']:.1f}%",
          refresh=False)
    self.bar.refresh()

  def write(self, message: str) -> None:
    """Prints above the bar (or plainly without one)."""
    if self.bar is not None:
      self.bar.write(message)
    elif is_primary():
      print(message, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class Throughput:
  """Wall time between log steps -> step_time_s, tokens_per_sec, mfu.

  Measured on the host between two points where the device was synced (the
  log steps read the metrics), so it is the true sustained rate, compile and
  eval time excluded (`pause()`/`resume()` around them).
  """

  def __init__(self, tokens_per_step: int, flops_per_token: float, mfu: Callable[[float], float]):
    """mfu: tokens/s -> model FLOPs utilisation of all devices (`blox_scale.flops.mfu`)."""
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.mfu = mfu
    self._start = time.perf_counter()
    self._steps = 0
    self._excluded = 0.0

  def tick(self) -> None:
    self._steps += 1

  def pause(self) -> float:
    return time.perf_counter()

  def resume(self, paused_at: float) -> None:
    # A read during the pause (a save flushes the metrics) starts a new window: exclude only the part after it.
    self._excluded += time.perf_counter() - max(paused_at, self._start)

  def read(self) -> dict[str, float]:
    """Rates since the last read; resets the window."""
    now = time.perf_counter()
    elapsed = max(1e-9, now - self._start - self._excluded)
    steps = max(1, self._steps)
    tokens_per_sec = self.tokens_per_step * steps / elapsed
    achieved = tokens_per_sec * self.flops_per_token
    self._start, self._steps, self._excluded = now, 0, 0.0
    return {
        'step_time_s': elapsed / steps,
        'tokens_per_sec': tokens_per_sec,
        'flops_per_sec': achieved,
        'mfu': float(self.mfu(tokens_per_sec)),
    }


def memory_report(compiled: Any | None) -> dict[str, float]:
  """Bytes the compiled step needs (XLA's analysis) and device memory in use, if known."""
  out: dict[str, float] = {}
  analysis = None
  try:
    analysis = compiled.memory_analysis() if compiled is not None else None
  except Exception:  # some backends do not implement it  # noqa: BLE001
    analysis = None
  if analysis is not None:
    for name in ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
                 'generated_code_size_in_bytes', 'alias_size_in_bytes'):
      value = getattr(analysis, name, None)
      if value is not None:
        out[f'step_{name.replace("_size_in_bytes", "_bytes")}'] = float(value)
  stats = jax.local_devices()[0].memory_stats() or {}
  for name in ('bytes_in_use', 'peak_bytes_in_use', 'bytes_limit'):
    if name in stats:
      out[f'device_{name}'] = float(stats[name])
  return out


def format_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if abs(n) < 1024 or unit == 'TiB':
      return f'{n:.1f} {unit}'
    n /= 1024
  return f'{n:.1f} TiB'


def plot_losses(workdir: str | Path, unigram_entropy: float | None = None, out: str | Path | None = None) -> Path | None:
  """Writes `<out or workdir>/loss.png`: train loss (and eval loss) against step."""
  train = read_metrics(workdir, 'train')
  if not train:
    return None
  import matplotlib
  matplotlib.use('Agg')  # no display on servers; must precede pyplot
  import matplotlib.pyplot as plt

  evals = read_metrics(workdir, 'eval')
  fig, ax = plt.subplots(figsize=(7, 4))
  steps = [r['step'] for r in train]
  ax.plot(steps, [float(r['loss']) for r in train], label='train loss', lw=1)
  if evals:
    ax.plot([r['step'] for r in evals], [float(r['eval_loss']) for r in evals], 'o-', label='eval loss')
  if unigram_entropy is not None:
    ax.axhline(unigram_entropy, color='gray', ls='--', lw=1, label=f'unigram entropy {unigram_entropy:.2f}')
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats/token)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = Path(out or workdir) / PLOT_FILE
  try:
    with writing(path, 'the loss plot'):
      fig.savefig(path, dpi=100)
  finally:
    plt.close(fig)
  return path
