"""Where a run's scalars go besides metrics.jsonl: TensorBoard, W&B; and the profiler trace.

`MetricsWriter` (training/metrics.py) hands every record it writes to each
tracker's `write(record)`; only the primary process builds trackers. Records of
kind 'train', 'eval' and 'goodput' become scalars `<kind>/<field>` at the
record's `step` (every numeric field but `step` and `time`). Both trackers
buffer on the host: TensorBoard's writer flushes from its own thread, so a log
step costs a few microseconds, never a device sync.

    train.tensorboard=true   <workdir>/tensorboard/events.out.tfevents.*  (tensorboardX; the default)
    train.wandb=true         wandb.init(project=train.wandb_project, dir=<workdir>), one W&B run per workdir
    train.profile=[5,8]      a jax.profiler trace of steps 5, 6, 7 in <workdir>/profile
"""

from __future__ import annotations

import threading
import traceback
import uuid
from pathlib import Path
from typing import Any

import jax

from blox_scale.training.disk import write_failed, writing

TENSORBOARD_DIR = 'tensorboard'
PROFILE_DIR = 'profile'
WANDB_ID_FILE = 'wandb_run_id'  # the W&B run a resumed process continues
SCALAR_KINDS = ('train', 'eval', 'goodput')


def scalars(record: dict[str, Any]) -> dict[str, float]:
  """{'<kind>/<field>': value} of a record's numeric fields ({} for kinds that are not scalars)."""
  if record.get('kind') not in SCALAR_KINDS:
    return {}
  return {f"{record['kind']}/{k}": float(v) for k, v in record.items()
          if k not in ('kind', 'step', 'time') and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
  """TensorBoard event files in `<workdir>/tensorboard` (tensorboardX's SummaryWriter).

  tensorboardX writes from its own thread and flushes every 2 minutes: a failed
  write there (disk full) would print a traceback, end the thread and leave later
  writes blocked on its queue. So each `write` (a log step) flushes the file
  itself, where a failure raises `WriteFailed` (one line: the directory, the
  errno, the fix), and a failure in the thread is kept and raised at the next
  `write` or at `close`.
  """

  def __init__(self, workdir: str | Path):
    from tensorboardX import SummaryWriter
    self.directory = Path(workdir) / TENSORBOARD_DIR
    self.error: BaseException | None = None
    with writing(self.directory, WHAT):
      self._writer = SummaryWriter(str(self.directory))
    previous = threading.excepthook

    def hook(args: Any) -> None:  # tensorboardX's writer thread failed: keep the error for the main thread
      if self.error is None and isinstance(args.exc_value, OSError) and raised_in_tensorboardx(args.exc_traceback):
        self.error = args.exc_value
      else:
        previous(args)

    threading.excepthook = hook

  def _raise_kept_error(self) -> None:
    if self.error is not None:
      raise write_failed(self.directory, WHAT, self.error) from self.error

  def write(self, record: dict[str, Any]) -> None:
    self._raise_kept_error()
    with writing(self.directory, WHAT):
      for tag, value in scalars(record).items():
        self._writer.add_scalar(tag, value, global_step=record['step'], walltime=record.get('time'))
      self._writer.flush()

  def close(self) -> None:
    self._raise_kept_error()  # (closing would wait forever for the ended thread)
    with writing(self.directory, WHAT):
      self._writer.close()


WHAT = 'the TensorBoard events'


def raised_in_tensorboardx(tb: Any) -> bool:
  return any('tensorboardX' in frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb))


class WandB:
  """Weights & Biases: one run per workdir (its id kept in `<workdir>/wandb_run_id`, resumed after a restart).

  `wandb` is not a blox dependency: `train.wandb=true` without it installed is
  a config error at load (training/validation.py). W&B drops scalars at a step
  lower than one it has seen, so the steps a resumed run recomputes are kept
  only in metrics.jsonl and TensorBoard.
  """

  def __init__(self, workdir: str | Path, project: str, config: dict[str, Any]):
    import wandb
    id_file = Path(workdir) / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + '\n')
    self._run = wandb.init(project=project, dir=str(workdir), id=run_id, resume='allow', config=config,
                           name=Path(workdir).name)

  def write(self, record: dict[str, Any]) -> None:
    values = scalars(record)
    if values:
      self._run.log(values, step=int(record['step']))

  def close(self) -> None:
    self._run.finish()


def make_trackers(workdir: str | Path, train_config: Any, config: dict[str, Any]) -> list[Any]:
  """The trackers `train.tensorboard` / `train.wandb` ask for (call on the primary process only)."""
  trackers: list[Any] = []
  if train_config.tensorboard:
    trackers.append(TensorBoard(workdir))
  if train_config.wandb:
    trackers.append(WandB(workdir, train_config.wandb_project, config))
  return trackers


class Profile:
  """`train.profile = [start, stop]`: a `jax.profiler` trace of steps `[start, stop)` into `directory`.

  The trainer calls `before(step, state)` before each step (and once at the
  end): the trace starts before step `start` runs and stops, after the state
  of step `stop - 1` is ready (the one sync, only while tracing), before step
  `stop`. `stop()` ends a trace still open (an error or an early exit). Each
  trace is a new `plugins/profile/<time>/` directory (TensorBoard's profile
  plugin, or Perfetto, opens its `*.xplane.pb`). The range is checked at config
  load (training/validation.py).
  """

  def __init__(self, directory: str | Path, steps: tuple[int, ...] | list[int], enabled: bool = True):
    self.directory = Path(directory)
    self.steps = tuple(steps) if enabled else ()
    self.active = False

  def before(self, step: int, state: Any) -> None:
    if not self.steps:
      return
    start, stop = self.steps
    if self.active and step >= stop:
      jax.block_until_ready(state)
      self.stop()
      self.steps = ()  # one trace per process
    elif not self.active and start <= step < stop:
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory))
      self.active = True

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
