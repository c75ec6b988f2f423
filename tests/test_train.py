"""blox-train end to end: learning, exact resume after SIGKILL, SIGTERM, non-finite stop, CLI errors."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from blox_scale.training import data as bd
from blox_scale.training.checkpoint import Checkpointer
from blox_scale.training.config import load_config
from blox_scale.training.metrics import read_metrics
from blox_scale.cli.train import EXIT_NONFINITE, main, train
from helpers import xla_flags

REPO = Path(__file__).resolve().parents[1]

# A model small enough for seconds per run; data.max_bytes keeps start-up short.
TINY = ['model.d_model=64', 'model.num_layers=2', 'model.num_heads=2', 'model.mlp_dim=128', 'model.remat=none',
        'model.max_seq_len=64', 'data.seq_len=64', 'data.batch_size=8', 'data.max_bytes=400000',
        'train.progress=false', 'train.plot=false', 'train.sample_tokens=0', 'train.eval_every=0']


def _args(*overrides):
  """TINY, then `overrides` (later values replace earlier ones: the CLI forbids a key twice)."""
  merged = dict(item.split('=', 1) for item in (*TINY, *overrides))
  return [f'{k}={v}' for k, v in merged.items()]


def _run(tmp_path, *overrides):
  return train(load_config(None, _args(f'train.workdir={tmp_path}', *overrides)))


@pytest.mark.slow
def test_loss_falls_well_below_the_unigram_entropy(tmp_path, capsys):
  code = _run(tmp_path, 'train.steps=400', 'optimizer.warmup_steps=20', 'optimizer.learning_rate=5e-3',
              'train.log_every=40', 'train.eval_every=400', 'train.eval_batches=4', 'checkpoint.every=200',
              'train.plot=true', 'train.sample_tokens=24', 'train.sample_prompt=import ')
  assert code == 0
  # The bar to beat, computed here from the corpus itself.
  cfg = load_config(None, TINY)
  entropy = bd.unigram_entropy(bd.load_tokens(cfg.data), 256)
  assert 2.5 < entropy < 4.5  # bytes of Python source: ~3.2 nats
  train_records = read_metrics(tmp_path, 'train')
  eval_records = read_metrics(tmp_path, 'eval')
  required = {'step', 'loss', 'learning_rate', 'grad_norm', 'tokens_per_sec', 'mfu', 'step_time_s'}
  assert all(required <= set(r) for r in train_records)
  assert [r['step'] for r in train_records] == list(range(40, 401, 40))
  assert train_records[0]['loss'] > entropy  # starts above (random init ~ log 256 = 5.5)
  assert eval_records[-1]['step'] == 400
  assert eval_records[-1]['eval_loss'] < 0.8 * entropy, (eval_records, entropy)
  assert train_records[-1]['loss'] < 0.8 * entropy
  start = read_metrics(tmp_path, 'start')[0]
  assert start['compile_time_s'] > 0 and 'step_temp_bytes' in start
  assert (tmp_path / 'loss.png').stat().st_size > 1000
  assert Checkpointer(tmp_path, load_config(None).checkpoint).all_steps() == [200, 400]
  out = capsys.readouterr().out
  assert 'sample ---' in out and '\nimport' in out


def test_nonfinite_loss_stops_before_checkpointing(tmp_path, capsys):
  # lr 1e20 with no warmup: the first update makes params ~1e20, the next logits overflow.
  code = _run(tmp_path, 'train.steps=20', 'optimizer.learning_rate=1e20', 'optimizer.warmup_steps=0',
              'optimizer.weight_decay=0', 'train.log_every=100', 'checkpoint.every=1', 'checkpoint.keep=100')
  assert code == EXIT_NONFINITE
  out = capsys.readouterr().err
  assert 'blox-train: error: non-finite loss or gradients at step' in out
  bad_step = int(out.split('non-finite loss or gradients at step ')[1].split()[0])
  ckpt = Checkpointer(tmp_path, load_config(None).checkpoint)
  steps = ckpt.all_steps()
  assert bad_step < 20 and all(s < bad_step for s in steps), (bad_step, steps)
  # Whatever was checkpointed is finite.
  for step in steps:
    from blox_scale.training.checkpoint import load_for_inference
    _, _, params = load_for_inference(tmp_path, step=step)
    assert all(np.isfinite(np.asarray(p.value)).all() for p in params.values() if p.trainable)
  ckpt.close()


def test_cli_config_errors_name_the_key(capsys):
  assert main(['model.nmu_layers=2']) == 2
  err = capsys.readouterr().err
  assert "model.nmu_layers" in err and "Did you mean 'model.num_layers'" in err
  assert main(['train.steps=many']) == 2
  assert 'train.steps' in capsys.readouterr().err
  assert main(['train.steps=5', 'train.steps=6']) == 2
  assert 'train.steps is set twice' in capsys.readouterr().err
  assert main(['--config', 'configs/nope.yaml']) == 2
  assert 'does not exist' in capsys.readouterr().err


# -- subprocess runs: SIGKILL + resume, SIGTERM ----------------------------------------------------------


def _command(workdir, *overrides):
  return [sys.executable, '-m', 'blox_scale.cli.train', *_args(f'train.workdir={workdir}', 'train.log_every=1',
          'data.batch_size=4', 'data.seq_len=32', 'model.max_seq_len=32', *overrides)]


def _env(devices=1):
  # One CPU device per process (the test session's 8 fake devices are not inherited).
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags(devices)}


def _losses(workdir):
  return {r['step']: r['loss'] for r in read_metrics(workdir, 'train')}


def _committed(workdir):
  """Complete checkpoints on disk (orbax renames a step dir into place only when it is complete)."""
  directory = Path(workdir) / 'checkpoints'
  return [p for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []


def _wait_for_step(proc, workdir, step, timeout=180, checkpointed=False):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'run ended (code {proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}')
    if max(_losses(workdir), default=0) >= step and (not checkpointed or _committed(workdir)):
      return
    time.sleep(0.01)
  raise AssertionError(f'step {step} not reached in {timeout}s')


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_identical_losses(tmp_path):
  steps = 40
  args = [f'train.steps={steps}', 'checkpoint.every=5']
  reference = tmp_path / 'reference'
  subprocess.run(_command(reference, *args), env=_env(), cwd=REPO, check=True, capture_output=True, timeout=300)
  want = _losses(reference)
  assert sorted(want) == list(range(1, steps + 1))

  # A random step, once at least one checkpoint is complete (an async save may still be in
  # flight when the kill lands: the resumed run then starts from the previous one).
  kill_at = random.Random().randint(7, 25)
  interrupted = tmp_path / 'interrupted'
  proc = subprocess.Popen(_command(interrupted, *args), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_step(proc, interrupted, kill_at, checkpointed=True)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  killed_after = max(_losses(interrupted))
  assert killed_after < steps, 'the run finished before the kill landed'
  subprocess.run(_command(interrupted, *args), env=_env(), cwd=REPO, check=True, capture_output=True, timeout=300)

  starts = read_metrics(interrupted, 'start')
  assert len(starts) == 2 and 0 < starts[1]['step'] <= killed_after, (starts, killed_after)
  got = _losses(interrupted)  # the resumed run re-logs the steps after its checkpoint; last line wins
  assert got == want, f'killed at step {killed_after}, resumed from {starts[1]["step"]}: {got} != {want}'


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes_on_more_devices(tmp_path):
  proc = subprocess.Popen(_command(tmp_path, 'train.steps=100000', 'checkpoint.every=100000'), env=_env(), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(proc, tmp_path, 3)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert 'SIGTERM at step' in out
  last = max(_losses(tmp_path))
  steps = Checkpointer(tmp_path, load_config(None).checkpoint).all_steps()
  assert steps and steps[-1] == last >= 3  # saved exactly where it stopped

  # Resume the 1-device checkpoint on a 2-device mesh (restored into the new shardings).
  subprocess.run(_command(tmp_path, f'train.steps={last + 2}', 'checkpoint.every=100000'), env=_env(devices=2),
                 cwd=REPO, check=True, capture_output=True, timeout=300)
  starts = read_metrics(tmp_path, 'start')
  assert [s['num_devices'] for s in starts] == [1, 2] and starts[1]['step'] == last
  assert max(_losses(tmp_path)) == last + 2
