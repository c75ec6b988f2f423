"""Fault injection on real blox-train processes: every fault ends with a clear exit and nothing good lost.

One short uninterrupted run (16 steps, a checkpoint every 4) is the reference; each
fault runs the same command in a copy of its workdir or a fresh one, and asserts the
exit status, the one-line message, and that the checkpoints that were good stay good:
a resumed run's losses equal the reference's, step for step. The runs share a JAX
compilation cache, so only the first one compiles.

(The killed peer of a multi-process run is in tests/test_multihost.py; SIGTERM inside
the loop and SIGKILL at a random step in tests/test_train.py.)
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blox_scale.training.metrics import read_metrics
from helpers import xla_flags

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 16
TINY = ['model.d_model=64', 'model.num_layers=2', 'model.num_heads=2', 'model.mlp_dim=128', 'model.remat=none',
        'model.max_seq_len=32', 'data.seq_len=32', 'data.batch_size=4', 'data.max_bytes=200000',
        'train.progress=false', 'train.plot=false', 'train.sample_tokens=0', 'train.eval_every=0',
        'train.log_every=1', f'train.steps={STEPS}', 'checkpoint.every=4', 'checkpoint.keep=10']


def _command(workdir, *overrides):
  merged = dict(item.split('=', 1) for item in (*TINY, f'train.workdir={workdir}', *overrides))
  return [sys.executable, '-m', 'blox_scale.cli.train', *[f'{k}={v}' for k, v in merged.items()]]


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp('jax_cache')
  base = {k: v for k, v in os.environ.items() if not k.startswith(('BLOX_', 'JAX_COMPILATION'))}
  return {**base, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags(1),
          'PYTHONPATH': str(REPO), 'JAX_COMPILATION_CACHE_DIR': str(cache),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'PYTHONUNBUFFERED': '1'}


def _run(env, workdir, *overrides, timeout=300):
  return subprocess.run(_command(workdir, *overrides), env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


def _losses(workdir):
  return {r['step']: r['loss'] for r in read_metrics(workdir, 'train')}


def _steps(workdir):
  d = Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _tree_bytes(path):
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob('*')) if p.is_file()}


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith('blox-train: error:')]


@pytest.fixture(scope='module')
def reference(tmp_path_factory, env):
  """The uninterrupted run: its workdir (checkpoints 4, 8, 12, 16) and its losses."""
  workdir = tmp_path_factory.mktemp('reference')
  proc = _run(env, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _steps(workdir) == [4, 8, 12, 16]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return workdir, losses


def test_sigkill_mid_save_then_resume_gives_identical_losses(reference, env, tmp_path):
  _, want = reference
  workdir = tmp_path / 'run'
  # A save at every step: the kill lands while some `<step>.orbax-checkpoint-tmp` directory exists.
  proc = subprocess.Popen(_command(workdir, 'checkpoint.every=1'), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  after = random.Random().randint(2, 8)
  deadline, killed_mid_save = time.time() + 240, None
  while time.time() < deadline and proc.poll() is None:
    ckpt = workdir / 'checkpoints'
    tmp = [p.name for p in ckpt.iterdir() if 'tmp' in p.name] if ckpt.exists() else []
    if tmp and len(_steps(workdir)) >= after:
      proc.send_signal(signal.SIGKILL)
      killed_mid_save = tmp
      break
    time.sleep(0.002)
  proc.wait(timeout=60)
  assert killed_mid_save, f'no save in flight was caught (exit {proc.returncode}): {proc.stderr.read()[-2000:]}'
  kept = _steps(workdir)
  assert kept and kept[-1] < STEPS
  resumed = _run(env, workdir, 'checkpoint.every=1')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert read_metrics(workdir, 'start')[-1]['step'] == kept[-1]  # resumed from the last complete save
  assert _losses(workdir) == want, f'killed during {killed_mid_save}, resumed from {kept[-1]}'
  print(f'MEASURED sigkill_mid_save: killed during {killed_mid_save}, resumed from {kept[-1]}, '
        f'{len(want)}/{len(want)} losses identical')


def test_signal_before_the_loop_stops_at_once_and_writes_nothing_half(env, tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(_command(workdir), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  first = proc.stdout.readline()  # 'mesh: ...': the run is starting, far from its first step
  assert first.startswith('mesh:'), first + proc.stderr.read()[-2000:]
  sent = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  print(f'MEASURED sigterm_before_loop: exit {proc.returncode} {time.monotonic() - sent:.1f}s after the signal')
  assert proc.returncode == 0, err[-2000:]
  assert 'blox-train: SIGTERM outside the training loop: stopped at once' in err
  assert 'Traceback' not in err and not _steps(workdir) and not _losses(workdir)
  leftovers = [p for p in workdir.rglob('*') if 'tmp' in p.name] if workdir.exists() else []
  assert not leftovers


def test_sigint_in_the_loop_saves_and_exits_0(env, tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(_command(workdir, 'train.steps=100000', 'checkpoint.every=100000'), env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while max(_losses(workdir), default=0) < 2 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert 'SIGINT at step' in out
  assert _steps(workdir) == [max(_losses(workdir))]


def _mount_tmpfs(path: Path, size: str) -> bool:
  path.mkdir()
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                        capture_output=True).returncode == 0


def test_disk_full_during_a_save_is_one_line_and_keeps_the_earlier_checkpoints(reference, env, tmp_path):
  ref, want = reference
  one = sum(p.stat().st_size for p in (ref / 'checkpoints' / '4').rglob('*') if p.is_file())
  disk = tmp_path / 'disk'
  if not _mount_tmpfs(disk, f'{(one * 3 // 2 + 256 * 1024) // 1024}k'):  # room for one checkpoint, not two
    pytest.skip('mounting a tmpfs needs root (CI runs as root)')
  try:
    workdir = disk / 'run'
    proc = _run(env, workdir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    [line] = _error_lines(proc.stderr) or [proc.stderr[-3000:]]
    print(f'MEASURED disk_full: exit {proc.returncode}: {line}')
    assert 'No space left on device (errno 28, ENOSPC)' in line and f'{workdir}/checkpoints/8' in line, line
    assert 'the earlier checkpoints (4) are intact' in line, line
    assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3, proc.stderr[-3000:]
    # Nothing good was lost: on a disk with room, the run resumes from step 4 and matches the reference.
    moved = tmp_path / 'moved'
    shutil.copytree(workdir, moved)
  finally:
    subprocess.run(['umount', str(disk)], check=False)
  assert _steps(moved) == [4]  # the half-written save of 8 stays a tmp directory, never listed
  resumed = _run(env, moved)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert read_metrics(moved, 'start')[-1]['step'] == 4
  assert _losses(moved) == want


def test_disk_full_on_a_metrics_write_is_one_line_naming_the_file(env, tmp_path):
  # Deterministic and without root: metrics.jsonl is /dev/full, where every write fails with ENOSPC.
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'metrics.jsonl').symlink_to('/dev/full')
  proc = _run(env, workdir)
  assert proc.returncode == 1, proc.stderr[-3000:]
  [line] = _error_lines(proc.stderr) or [proc.stderr[-3000:]]
  print(f'MEASURED disk_full_metrics: exit {proc.returncode}: {line}')
  assert f'{workdir}/metrics.jsonl: writing the metrics failed: No space left on device (errno 28, ENOSPC)' in line
  assert 'free space on that disk or set train.workdir to a disk with room' in line, line
  assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3, proc.stderr[-3000:]


def test_diverging_run_stops_before_checkpointing(reference, env, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference[0], workdir)
  before = _tree_bytes(workdir / 'checkpoints')
  # Resume the healthy run with a learning rate 300x too high: the loss jumps far above its median.
  proc = _run(env, workdir, 'train.steps=40', 'optimizer.learning_rate=1.0', 'optimizer.schedule=constant',
              'optimizer.warmup_steps=0')
  print(f'MEASURED diverging: exit {proc.returncode}: {_error_lines(proc.stderr)}')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'resuming with a changed config: optimizer.learning_rate=0.003 -> 1.0' in proc.stderr
  [line] = _error_lines(proc.stderr)
  assert 'train.divergence_factor=2: the loss diverged' in line and 'checkpoint.resume=false' in line, line
  assert 'Traceback' not in proc.stderr
  assert _steps(workdir) == [4, 8, 12, 16]  # nothing after the divergence was saved
  assert _tree_bytes(workdir / 'checkpoints') == before
  assert len(list((workdir / 'config_history').iterdir())) == 1  # the run's original config is kept


# -- corrupt checkpoints: set aside, the previous one restored ---------------------------------------


def _largest(directory: Path) -> Path:
  return max((p for p in directory.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path) -> None:
  f = _largest(step_dir / 'params')
  f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def _delete(step_dir: Path) -> None:
  _largest(step_dir / 'state').unlink()


def _flip(step_dir: Path) -> None:
  f = _largest(step_dir / 'params')
  raw = bytearray(f.read_bytes())
  middle = len(raw) // 2
  raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
  f.write_bytes(bytes(raw))


def _garbage_metadata(step_dir: Path) -> None:
  (step_dir / 'params' / '_METADATA').write_bytes(b'{"tree_metadata": \x00\x17 not json')


@pytest.mark.parametrize('corrupt', [_truncate, _delete, _flip, _garbage_metadata],
                         ids=['truncate', 'delete', 'bit_flip', 'garbage_metadata'])
def test_corrupt_latest_checkpoint_is_set_aside_and_the_previous_restored(corrupt, reference, env, tmp_path):
  ref, want = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref, workdir)
  corrupt(workdir / 'checkpoints' / '16')
  proc = _run(env, workdir)  # the same command: resumes at its latest checkpoint, which is bad
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [l for l in proc.stderr.splitlines() if 'checkpoint 16' in l]
  print(f'MEASURED corrupt_{corrupt.__name__}: exit {proc.returncode}: {warnings}')
  assert len(warnings) == 1 and f'{workdir}/checkpoints/16' in warnings[0], proc.stderr[-3000:]
  assert 'moved to' in warnings[0] and 'Traceback' not in proc.stderr
  assert (workdir / 'checkpoints.corrupt' / '16').is_dir()  # set aside, not deleted
  assert read_metrics(workdir, 'start')[-1]['step'] == 12
  assert _losses(workdir) == want  # steps 13-16 again, from checkpoint 12: identical
  assert _steps(workdir) == [4, 8, 12, 16]


def test_no_good_checkpoint_is_a_one_line_refusal(reference, env, tmp_path):
  ref, _ = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref, workdir)
  for step in (4, 8, 12, 16):
    _flip(workdir / 'checkpoints' / str(step))
  proc = _run(env, workdir)
  print(f'MEASURED no_good_checkpoint: exit {proc.returncode}: {_error_lines(proc.stderr)}')
  assert proc.returncode == 1, proc.stderr[-3000:]
  [line] = _error_lines(proc.stderr)
  assert 'no good checkpoint' in line and 'checkpoint.resume=false' in line, line
  assert sorted(p.name for p in (workdir / 'checkpoints.corrupt').iterdir()) == ['12', '16', '4', '8']
  again = _run(env, workdir)  # refuses again, rather than silently starting from scratch
  assert again.returncode == 1 and 'no good checkpoint' in again.stderr


def test_sample_falls_back_from_a_corrupt_checkpoint(reference, env, tmp_path):
  ref, _ = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref, workdir)
  _flip(workdir / 'checkpoints' / '16')
  sample = [sys.executable, '-m', 'blox_scale.cli.sample', '--prompt', 'def ', '--max-new-tokens', '8',
            '--temperature', '0']
  proc = subprocess.run([*sample, '--checkpoint', str(workdir)], env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'checkpoint 16' in proc.stderr and 'using checkpoint 12' in proc.stderr, proc.stderr[-3000:]
  assert (workdir / 'checkpoints' / '16').is_dir()  # sampling moves nothing
  pinned = subprocess.run([*sample, '--checkpoint', str(workdir / 'checkpoints' / '16')], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert pinned.returncode == 1, pinned.stderr[-3000:]
  [line] = [l for l in pinned.stderr.splitlines() if l.startswith('blox-sample: error:')]
  assert f'{workdir}/checkpoints/16' in line and 'fingerprint' in line, line
