"""blox-report: what happened in a blox-train workdir, read from its metrics.jsonl.

    blox-report runs/tiny
    blox-report runs/tiny --plots-to /tmp/report    # plots elsewhere (e.g. a read-only workdir)

Prints the run's segments (one per blox-train process: a run killed and
resumed twice has three), with the step each started from, the last step it
logged and how it ended. Then the goodput split of the whole run
(training/goodput.py), with the time lost to restarts, and a loss and
throughput summary. Writes `loss.png` (train and eval loss) and
`throughput.png` (tokens/s per log step, restarts marked) beside
metrics.jsonl, or into --plots-to.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blox_scale.cli.common import ArgumentParser, UsageError, run_cli
from blox_scale.training import goodput
from blox_scale.training.metrics import METRICS_FILE, plot_losses, read_metrics

THROUGHPUT_PLOT = 'throughput.png'


def _parser() -> ArgumentParser:
  parser = ArgumentParser(prog='blox-report', description='Segments, goodput, loss and throughput of a blox-train run.')
  parser.add_argument('workdir', help='The train.workdir of a run (it holds metrics.jsonl).')
  parser.add_argument('--plots-to', metavar='DIR', default=None,
                      help='Directory for loss.png and throughput.png (default: the workdir).')
  parser.add_argument('--no-plots', action='store_true', help='Print only.')
  parser.add_argument('--debug', action='store_true', help='Print the traceback of an error (also BLOX_DEBUG=1).')
  return parser


def check_workdir(workdir: Path) -> None:
  """A directory holding a metrics.jsonl with at least one record, else a one-line UsageError."""
  if not workdir.is_dir():
    what = 'does not exist' if not workdir.exists() else 'is not a directory'
    raise UsageError(f'{workdir}: {what}; pass the train.workdir of a blox-train run (e.g. blox-report runs/tiny)')
  if not (workdir / METRICS_FILE).is_file():
    raise UsageError(f'{workdir}: holds no {METRICS_FILE}, so it is not a blox-train workdir (or no run has started '
                     'in it yet); pass the train.workdir of a run')


def _median(values: list[float]) -> float:
  return statistics.median(values) if values else float('nan')


def report(workdir: Path) -> tuple[list[str], list[goodput.Segment]]:
  """The report's lines and the run's segments."""
  records = read_metrics(workdir, None)
  segs = goodput.segments(records)
  if not segs:
    raise UsageError(f'{workdir / METRICS_FILE}: has no start record (no run got past compiling the step); '
                     'run blox-train with train.workdir=' + str(workdir))
  breakdown = goodput.run_breakdown(segs)
  restarts = breakdown['restarts'] if breakdown else sum(s.ended != 'done' for s in segs[:-1])
  lines = [f'run {workdir}: {len(segs)} segment(s), {restarts} restart(s), step {segs[0].start_step} -> '
           f'{segs[-1].end_step}']
  lines.append(f'  {"#":>2s} {"from step":>9s} {"to step":>8s} {"wall s":>8s} {"goodput":>8s}  ended')
  for i, s in enumerate(segs, 1):
    wall = f'{s.wall_s:.1f}' if s.seconds else '-'
    share = f'{100 * s.seconds["step"] / s.wall_s:.1f}%' if s.seconds and s.wall_s > 0 else '-'
    ending = 'killed (no end record)' if s.ended == 'running' and i < len(segs) else goodput.ENDINGS.get(s.ended, s.ended)
    lines.append(f'  {i:>2d} {s.start_step:>9d} {s.end_step:>8d} {wall:>8s} {share:>8s}  {ending}')
  if breakdown:
    lines.append(goodput.summary_line(breakdown))
    if breakdown['lost_s'] > 0:
      lines.append(f'  lost: {breakdown["lost_gap_s"]:.1f} s between processes, {breakdown["lost_recompute_s"]:.1f} s '
                   f'recomputing {breakdown["recomputed_steps"]} step(s) past the last checkpoint')
    if breakdown['idle_s'] > 0:
      lines.append(f'  not counted: {breakdown["idle_s"]:.1f} s between a finished segment and the next one')
  else:
    lines.append('goodput: not recorded (metrics.jsonl from a blox-train without goodput records)')
  train, evals = read_metrics(workdir, 'train'), read_metrics(workdir, 'eval')
  if train:
    best = min(train, key=lambda r: float(r['loss']))
    lines.append(f'loss: {float(train[0]["loss"]):.4f} at step {train[0]["step"]} -> {float(train[-1]["loss"]):.4f} at '
                 f'step {train[-1]["step"]} (lowest {float(best["loss"]):.4f} at step {best["step"]})')
  if evals:
    lines.append(f'eval loss: {float(evals[-1]["eval_loss"]):.4f} at step {evals[-1]["step"]}')
  rates = [float(r['tokens_per_sec']) for r in train if isinstance(r.get('tokens_per_sec'), (int, float))]
  if rates:
    mfu = [float(r['mfu']) for r in train if isinstance(r.get('mfu'), (int, float))]
    step_time = [float(r['step_time_s']) for r in train if isinstance(r.get('step_time_s'), (int, float))]
    lines.append(f'throughput: median {_median(rates):,.0f} tokens/s (min {min(rates):,.0f}, max {max(rates):,.0f}) '
                 f'over {len(rates)} log steps; step time median {_median(step_time):.4f} s; '
                 f'mfu median {100 * _median(mfu):.1f}%')
  return lines, segs


def plot_throughput(workdir: Path, out: Path, segs: list[goodput.Segment]) -> Path | None:
  """`throughput.png`: tokens/s at each log step, a dashed line where each later segment resumed."""
  train = [r for r in read_metrics(workdir, 'train') if isinstance(r.get('tokens_per_sec'), (int, float))]
  if not train:
    return None
  import matplotlib
  matplotlib.use('Agg')  # no display on servers; must precede pyplot
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot([r['step'] for r in train], [r['tokens_per_sec'] for r in train], lw=1, label='tokens/s')
  for i, s in enumerate(segs[1:]):
    ax.axvline(s.start_step, color='gray', ls='--', lw=1, label='resumed' if i == 0 else None)
  ax.set_xlabel('step')
  ax.set_ylabel('tokens/s')
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = out / THROUGHPUT_PLOT
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  workdir = Path(args.workdir)
  check_workdir(workdir)
  lines, segs = report(workdir)
  print('\n'.join(lines))
  if not args.no_plots:
    out = Path(args.plots_to) if args.plots_to else workdir
    out.mkdir(parents=True, exist_ok=True)
    starts = [r for s in segs for r in s.records if r.get('kind') == 'start']
    loss = plot_losses(workdir, starts[-1].get('unigram_entropy'), out=out)
    throughput = plot_throughput(workdir, out, segs)
    written = [str(p) for p in (loss, throughput) if p is not None]
    if written:
      print('plots: ' + ', '.join(written))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """`blox-report WORKDIR [--plots-to DIR] [--no-plots]`; returns the exit status."""
  return run_cli('blox-report', _main, argv)


if __name__ == '__main__':
  sys.exit(main())
