"""Goodput: where a run's wall time goes, per process and across restarts.

A run is one or more *segments*: the blox-train processes that worked in one
workdir, each starting from the newest checkpoint. Each segment accounts for
all of its wall time, from the start of `train()`, with a `Clock`. Each
`lap(category)` gives the time since the previous lap to one category:

    step        the train steps: dispatch and the wait at log steps (the productive time)
    compile     compiling the train step (every candidate with model.remat=auto)
    data        host time fetching the next batch and copying it to the devices
    checkpoint  save time the loop waits on (the finiteness check and the device-to-host copy
                of an async save; the whole write of a synchronous one; the final wait)
    eval        eval passes, their first compile included
    other       start-up (config, mesh, model, restore, data), samples and plots at the end

The laps sit where the loop already waits for the device (the log-step
metrics read, and before eval and checkpoint saves, which wait for the step
anyway). So the categories add no sync and add up to the segment's wall time.
Data time is host time: while the device is busy it overlaps device work, so
it is an upper bound on the time the device waited for data.

The trainer writes the cumulative split as a `goodput` record of
metrics.jsonl at every log step, and an `end` record when a segment ends
cleanly. `run_breakdown` then combines the segments of a workdir. Time lost to
restarts is the gap between a segment's last goodput record and the next
segment's start, plus the steps the next segment recomputes: it resumes at
its checkpoint, behind the last step already done. Those steps are moved from
`step` to lost time at the previous segment's mean step time.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

CATEGORIES = ('step', 'compile', 'data', 'checkpoint', 'eval', 'other')
ENDINGS = {'done': 'finished', 'stopped': 'stopped by a signal (checkpoint saved)',
           'nonfinite': 'stopped: non-finite loss', 'diverged': 'stopped: loss diverged', 'error': 'failed',
           'killed': 'killed (no end record)', 'running': 'running, or killed (no end record yet)'}


class Clock:
  """One segment's wall time, split into `CATEGORIES` by laps (host clock only, no device sync)."""

  def __init__(self) -> None:
    self._t0 = self._last = time.perf_counter()
    self.started = time.time()  # wall clock of the segment's start, comparable across processes
    self.seconds = dict.fromkeys(CATEGORIES, 0.0)

  def lap(self, category: str) -> None:
    """The time since the previous lap was spent on `category`."""
    now = time.perf_counter()
    self.seconds[category] += now - self._last
    self._last = now

  def record(self, step: int, start_step: int, category: str = 'step') -> dict[str, Any]:
    """The cumulative split (after a lap of `category`) as a metrics.jsonl `goodput` record."""
    self.lap(category)
    wall = self._last - self._t0
    return {'kind': 'goodput', 'step': step, 'time': self.started + wall, 'segment_start': self.started,
            'start_step': start_step, 'wall_s': wall, **{f'{c}_s': s for c, s in self.seconds.items()},
            'goodput': self.seconds['step'] / wall if wall > 0 else 0.0}


@dataclasses.dataclass
class Segment:
  """One process's part of a run, read back from metrics.jsonl."""
  start_step: int
  started: float | None  # wall-clock start (None: a run from before goodput records)
  end_step: int  # the last step logged
  ended: str  # a key of ENDINGS
  seconds: dict[str, float]  # cumulative split at its last goodput record ({} if none)
  wall_s: float = 0.0
  end_time: float | None = None  # wall clock of its last goodput record
  goodput_step: int = 0  # the step of that record
  records: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)


def segments(records: list[dict[str, Any]]) -> list[Segment]:
  """Splits all records of a metrics.jsonl (file order, `read_metrics(workdir, None)`) at its `start` records."""
  out: list[Segment] = []
  for r in records:
    kind = r.get('kind')
    if kind == 'start':
      out.append(Segment(start_step=int(r['step']), started=r.get('started'), end_step=int(r['step']),
                         ended='killed', seconds={}, goodput_step=int(r['step'])))
    if not out:
      continue  # a record before the first start (e.g. a config_change): it belongs to no segment yet
    seg = out[-1]
    seg.records.append(r)
    if kind in ('train', 'goodput') and 'step' in r:
      seg.end_step = max(seg.end_step, int(r['step']))
    if kind == 'goodput':
      seg.seconds = {c: float(r.get(f'{c}_s', 0.0)) for c in CATEGORIES}
      seg.wall_s, seg.end_time, seg.goodput_step = float(r['wall_s']), float(r['time']), int(r['step'])
    elif kind == 'end':
      seg.ended = r.get('reason', 'done')
  if out and out[-1].ended == 'killed':
    out[-1].ended = 'running'
  return out


def run_breakdown(segs: list[Segment]) -> dict[str, Any] | None:
  """The run's wall time split over CATEGORIES plus `lost` (restarts); None without goodput records.

  Keys: `<category>_s`, `lost_s` (= `lost_gap_s` + `lost_recompute_s`), `recomputed_steps`,
  `wall_s` (first start to last record, minus `idle_s`), `idle_s` (gaps after a segment that
  finished: the run was complete then, e.g. before a longer train.steps), `restarts`,
  `goodput` (step time / wall time).
  """
  if not segs or any(s.started is None or s.end_time is None for s in segs):
    return None
  total = dict.fromkeys(CATEGORIES, 0.0)
  gap = recompute = idle = 0.0
  recomputed_steps = restarts = 0
  for i, seg in enumerate(segs):
    for c in CATEGORIES:
      total[c] += seg.seconds.get(c, 0.0)
    if i == 0:
      continue
    prev = segs[i - 1]
    pause = max(0.0, seg.started - prev.end_time)
    if prev.ended == 'done':
      idle += pause
      continue
    restarts += 1
    gap += pause
    steps = max(0, prev.goodput_step - seg.start_step)  # done before the restart, done again after it
    per_step = prev.seconds.get('step', 0.0) / max(1, prev.goodput_step - prev.start_step)
    moved = min(steps * per_step, total['step'])
    total['step'] -= moved
    recompute += moved
    recomputed_steps += steps
  wall = segs[-1].end_time - segs[0].started - idle
  out = {f'{c}_s': v for c, v in total.items()}
  out.update(lost_s=gap + recompute, lost_gap_s=gap, lost_recompute_s=recompute, recomputed_steps=recomputed_steps,
             wall_s=wall, idle_s=idle, restarts=restarts, segments=len(segs),
             goodput=total['step'] / wall if wall > 0 else 0.0)
  return out


def summary_line(b: dict[str, Any]) -> str:
  """`goodput 87.3%: step 41.2 s, compile 3.1 s, ... lost to restarts 0.0 s (wall 49.0 s)`."""
  parts = ', '.join(f'{c} {b[f"{c}_s"]:.1f} s' for c in CATEGORIES)
  restarts = f' in {b["restarts"]} restart(s)' if b['restarts'] else ''
  return (f'goodput {100 * b["goodput"]:.1f}%: {parts}, lost to restarts {b["lost_s"]:.1f} s{restarts} '
          f'(wall {b["wall_s"]:.1f} s)')


def finish(writer: Any, clock: Clock, step: int, start_step: int, reason: str) -> str | None:
  """Ends a segment: its last `goodput` record, an `end` record with the run's breakdown; the summary line.

  None on a process that writes no metrics (not the primary one).
  """
  if not writer.enabled:
    return None
  from blox_scale.training.metrics import read_metrics

  writer.write(clock.record(step, start_step, 'other'))
  breakdown = run_breakdown(segments(read_metrics(writer.path.parent, None)))
  writer.write({'kind': 'end', 'step': step, 'time': time.time(), 'reason': reason, 'run': breakdown})
  return summary_line(breakdown) if breakdown else None
