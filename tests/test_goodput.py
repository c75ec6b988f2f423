"""Goodput accounting and blox-report: a run killed and resumed twice, and the arithmetic on hand-made records."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blox_scale.cli.report import main as report_main
from blox_scale.training import goodput
from blox_scale.training.metrics import read_metrics
from helpers import xla_flags

REPO = Path(__file__).resolve().parents[1]
TINY = ['model.d_model=32', 'model.num_layers=1', 'model.num_heads=2', 'model.mlp_dim=64', 'model.remat=none',
        'model.max_seq_len=32', 'data.seq_len=32', 'data.batch_size=4', 'data.max_bytes=50000',
        'train.progress=false', 'train.plot=false', 'train.sample_tokens=0', 'train.eval_every=0',
        'train.tensorboard=false', 'train.log_every=1', 'train.steps=24', 'checkpoint.every=5', 'checkpoint.keep=10']


def _segment(start_step, started, goodput_records, end=None):
  """Records of one segment: start, cumulative goodput records (step, wall, step_s, compile_s), an end record."""
  out = [{'kind': 'start', 'step': start_step, 'started': started}]
  for step, wall, step_s, compile_s in goodput_records:
    other = wall - step_s - compile_s
    out.append({'kind': 'train', 'step': step, 'loss': 1.0})
    out.append({'kind': 'goodput', 'step': step, 'time': started + wall, 'wall_s': wall, 'step_s': step_s,
                'compile_s': compile_s, 'data_s': 0.0, 'checkpoint_s': 0.0, 'eval_s': 0.0, 'other_s': other})
  if end:
    out.append({'kind': 'end', 'step': goodput_records[-1][0], 'reason': end})
  return out


def test_run_breakdown_by_hand():
  # Segment 1: steps 0 -> 10 in 10 s of step time (1 s/step), killed; its last record at t=112.
  # Segment 2 resumes from the checkpoint at step 6 at t=120 (gap 8 s; steps 7-10 recomputed: 4 s),
  # reaches step 20 and finishes at t=150. Segment 3 starts later at t=200 after the finished one: idle.
  records = [*_segment(0, 100.0, [(0, 2.0, 0.0, 1.0), (10, 12.0, 10.0, 1.0)]),
             *_segment(6, 120.0, [(6, 2.0, 0.0, 1.0), (20, 30.0, 14.0 * 2, 1.0)], end='done'),
             *_segment(20, 200.0, [(20, 1.0, 0.0, 0.5), (22, 5.0, 4.0, 0.5)], end='done')]
  segs = goodput.segments(records)
  assert [(s.start_step, s.end_step, s.ended) for s in segs] == [(0, 10, 'killed'), (6, 20, 'done'), (20, 22, 'done')]
  b = goodput.run_breakdown(segs)
  assert b['restarts'] == 1 and b['segments'] == 3
  assert b['recomputed_steps'] == 4 and b['lost_recompute_s'] == pytest.approx(4.0)
  assert b['lost_gap_s'] == pytest.approx(8.0) and b['lost_s'] == pytest.approx(12.0)
  assert b['idle_s'] == pytest.approx(50.0)
  assert b['wall_s'] == pytest.approx(205.0 - 100.0 - 50.0)
  assert b['step_s'] == pytest.approx(10.0 + 28.0 + 4.0 - 4.0)
  components = sum(b[f'{c}_s'] for c in goodput.CATEGORIES) + b['lost_s']
  assert components == pytest.approx(b['wall_s'])
  assert b['goodput'] == pytest.approx(38.0 / 55.0)
  assert goodput.summary_line(b).startswith('goodput 69.1%: step 38.0 s, compile 2.5 s,')


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
  assert report_main([str(tmp_path / 'missing')]) == 2
  assert report_main([str(tmp_path)]) == 2
  err = capsys.readouterr().err.splitlines()
  assert err == [f'blox-report: error: {tmp_path / "missing"}: does not exist; pass the train.workdir of a blox-train '
                 'run (e.g. blox-report runs/tiny)',
                 f'blox-report: error: {tmp_path}: holds no metrics.jsonl, so it is not a blox-train workdir (or no '
                 'run has started in it yet); pass the train.workdir of a run']


def _wait_for_step(proc, workdir, step, checkpoint, timeout=240):
  """Until `step` is logged and the checkpoint of step `checkpoint` is complete (orbax renames it into place)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'run ended (code {proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}')
    logged = max((r['step'] for r in read_metrics(workdir, 'train')), default=0)
    if logged >= step and (workdir / 'checkpoints' / str(checkpoint)).is_dir():
      return
    time.sleep(0.01)
  raise AssertionError(f'step {step} not reached in {timeout}s')


@pytest.mark.slow
def test_killed_and_resumed_twice_then_blox_report(tmp_path):
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'blox_scale.cli.train', *TINY, f'train.workdir={workdir}']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags(1),
         'PYTHONPATH': str(REPO), 'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  for kill_after, checkpoint in ((8, 5), (16, 15)):  # past a checkpoint: some steps are done twice
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, workdir, kill_after, checkpoint)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.splitlines()[-1].startswith('goodput ')

  records = read_metrics(workdir, None)
  starts = [r for r in records if r['kind'] == 'start']
  assert len(starts) == 3 and 0 == starts[0]['step'] < starts[1]['step'] < starts[2]['step'] < 24
  segs = goodput.segments(records)
  assert [s.ended for s in segs] == ['killed', 'killed', 'done']
  assert [s.end_step for s in segs][2] == 24 and segs[0].end_step >= 8 and segs[1].end_step >= 16
  b = goodput.run_breakdown(segs)
  assert b['restarts'] == 2 and b['lost_gap_s'] > 0 and b['lost_s'] > 0
  # Wall time from the timestamps alone (first start to the last record) = the components + lost time.
  wall = max(r['time'] for r in records if 'time' in r) - starts[0]['started']
  components = sum(b[f'{c}_s'] for c in goodput.CATEGORIES) + b['lost_s']
  assert components == pytest.approx(wall, rel=0.01, abs=0.05), (components, wall, b)
  assert 0 < b['goodput'] < 1 and b['step_s'] > 0 and b['compile_s'] > 0
  assert not (workdir / 'tensorboard').exists()  # train.tensorboard=false

  out = subprocess.run([sys.executable, '-m', 'blox_scale.cli.report', str(workdir)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == f'run {workdir}: 3 segment(s), 2 restart(s), step 0 -> 24'
  table = [line.split() for line in lines[2:5]]
  assert [row[:3] for row in table] == [['1', '0', str(segs[0].end_step)], ['2', str(starts[1]['step']),
                                        str(segs[1].end_step)], ['3', str(starts[2]['step']), '24']]
  assert [' '.join(row[5:]) for row in table] == ['killed (no end record)', 'killed (no end record)', 'finished']
  assert lines[5] == goodput.summary_line(b)
  assert f'lost to restarts {b["lost_s"]:.1f} s in 2 restart(s)' in lines[5]
  assert (workdir / 'loss.png').stat().st_size > 0 and (workdir / 'throughput.png').stat().st_size > 0
  print('MEASURED ' + lines[5])


def test_throughput_excludes_a_pause_only_from_the_window_it_falls_in(monkeypatch):
  from blox_scale.training import metrics
  now = [0.0]
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: now[0])
  rate = metrics.Throughput(tokens_per_step=100, flops_per_token=1.0, mfu=lambda tokens_per_sec: 0.0)
  rate.tick()
  now[0] = 1.0
  paused = rate.pause()  # a checkpoint save at a step that is not a log step: its flush reads mid-pause
  now[0] = 1.5
  assert rate.read()['step_time_s'] == pytest.approx(1.5)  # the save's flush: 1 step in 1.5 s
  now[0] = 3.0
  rate.resume(paused)  # 1.5 s more of saving, in the new window
  rate.tick()
  rate.tick()
  now[0] = 5.0
  assert rate.read()['step_time_s'] == pytest.approx((5.0 - 1.5 - 1.5) / 2)
