"""Elastic resume: a run saved by P processes x D devices continues on P' x D' (and another mesh shape).

Four blox-train runs of a tiny model on this machine (launch/local.sh joins two
processes over 127.0.0.1), all with the same global batch of 8 rows:

  reference  1 process x 4 devices, mesh fsdp=4, steps 1-8 uninterrupted (checkpoints at 4 and 8)
  2x2 -> 1x4 2 processes x 2 devices, mesh data=2 x fsdp=2, steps 1-4; then 1 x 4, mesh fsdp=4, steps 5-8
  1x4 -> 2x2 the reference's checkpoint 4, resumed by 2 processes x 2 devices, mesh data=2 x fsdp=2, steps 5-8

The resumed steps must give the reference's losses (the reduction order differs between meshes and
between Gloo and in-process collectives: rtol 1e-5) and read exactly its global batches: every process
logs a hash of each row it loads, by global batch index (`data.log_hashes`), and the rows of all
processes of a run, put together, must be the reference's, batch for batch.

The constant learning rate keeps `train.steps` (8 for the reference, 4 then 8 for the others) out of
the schedule. Cost: the runs start in pairs, and the resumed runs find their train step (the mesh and
process count of the other direction's first run) in a shared JAX compilation cache.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blox_scale.cli.train import main
from blox_scale.training.metrics import read_metrics
from helpers import xla_flags

ROOT = Path(__file__).resolve().parents[1]
LOCAL = str(ROOT / 'launch' / 'local.sh')
TINY = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=2', 'model.mlp_dim=64', 'model.remat=none',
        'model.max_seq_len=16', 'data.seq_len=16', 'data.batch_size=8', 'data.max_bytes=20000', 'data.log_hashes=true',
        'optimizer.schedule=constant', 'optimizer.warmup_steps=0', 'optimizer.learning_rate=1e-2',
        'train.progress=false', 'train.plot=false', 'train.sample_tokens=0', 'train.eval_every=0', 'train.log_every=1',
        'train.tensorboard=false', 'checkpoint.every=4', 'checkpoint.keep=10']


def _args(*overrides: str) -> list[str]:
  """TINY, then `overrides` (later values replace earlier ones: the CLI forbids a key twice)."""
  return [f'{k}={v}' for k, v in dict(item.split('=', 1) for item in (*TINY, *overrides)).items()]


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('BLOX_', 'JAX_COMPILATION')) and k != 'XLA_FLAGS'}
  return {**env, 'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': str(CACHE),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', **extra}


CACHE = Path()  # the module's JAX compilation cache, set by the `runs` fixture


def _start(processes: int, devices: int, workdir: Path, steps: int, mesh: str) -> subprocess.Popen:
  args = [sys.executable, '-m', 'blox_scale.cli.train',
          *_args(f'train.workdir={workdir}', f'train.steps={steps}', *(f'mesh.{kv}' for kv in mesh.split(',')))]
  if processes == 1:
    cmd, env = args, _env(XLA_FLAGS=xla_flags(devices))
  else:
    cmd, env = [LOCAL, str(processes), *args], _env(BLOX_DEVICES_PER_PROCESS=str(devices), XLA_FLAGS=xla_flags())
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(*procs: subprocess.Popen) -> None:
  for proc in procs:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]


def _losses(workdir: Path) -> dict[int, float]:
  return {r['step']: r['loss'] for r in read_metrics(workdir, 'train')}


def _rows(workdir: Path) -> list[tuple[int, int, str]]:
  """(global batch, row, hash) of every row any process of any run in `workdir` loaded, sorted."""
  out = []
  for path in sorted((workdir / 'data_hashes').glob('process_*.jsonl')):
    for line in path.read_text().splitlines():
      r = json.loads(line)
      out.extend((r['global_batch'], r['first_row'] + i, h) for i, h in enumerate(r['rows']))
  return sorted(out)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  global CACHE
  tmp = tmp_path_factory.mktemp('elastic')
  CACHE = tmp / 'jax_cache'
  ref, a = tmp / 'reference', tmp / 'from_2x2'
  _wait(_start(1, 4, ref, 8, 'data=1,fsdp=4'), _start(2, 2, a, 4, 'data=2,fsdp=2'))
  b = tmp / 'from_1x4'  # the reference's workdir as it was at its checkpoint 4
  b.mkdir()
  shutil.copy(ref / 'config.yaml', b / 'config.yaml')
  shutil.copytree(ref / 'checkpoints' / '4', b / 'checkpoints' / '4')
  _wait(_start(1, 4, a, 8, 'data=1,fsdp=4'), _start(2, 2, b, 8, 'data=2,fsdp=2'))
  return ref, a, b


@pytest.mark.slow
def test_2x2_to_1x4_on_another_mesh_sees_the_same_global_batches_and_losses(runs):
  ref, a, _ = runs
  want, got = _losses(ref), _losses(a)
  assert sorted(want) == sorted(got) == list(range(1, 9))
  assert len(set(want.values())) == 8  # it trains: every step's loss differs
  starts = read_metrics(a, 'start')
  assert [(s['step'], s['num_devices']) for s in starts] == [(0, 4), (4, 4)]
  # Steps 1-4 on two processes (data 2 x fsdp 2), 5-8 resumed on one (fsdp 4): the reference's losses.
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)], rtol=1e-5)
  rows = _rows(a)
  assert rows == _rows(ref) and len(rows) == 8 * 8  # each global batch once, identical row for row
  print(f'MEASURED 2x2->1x4 max relative loss difference: '
        f'{max(abs(got[s] - want[s]) / abs(want[s]) for s in want):.2e}')


@pytest.mark.slow
def test_1x4_to_2x2_sees_the_same_global_batches_and_losses(runs):
  ref, _, b = runs
  want, got = _losses(ref), _losses(b)
  assert sorted(got) == list(range(5, 9))
  np.testing.assert_allclose([got[s] for s in range(5, 9)], [want[s] for s in range(5, 9)], rtol=1e-5)
  assert _rows(b) == [r for r in _rows(ref) if r[0] >= 4]  # global batches 4..7, from both processes
  print(f'MEASURED 1x4->2x2 max relative loss difference: '
        f'{max(abs(got[s] - want[s]) / abs(want[s]) for s in got):.2e}')


@pytest.mark.slow
@pytest.mark.parametrize('change, key, old', [('data.batch_size=16', 'batch_size', 8), ('data.seq_len=8', 'seq_len', 16),
                                              ('data.shuffle_seed=1', 'shuffle_seed', 0)])
def test_a_resume_that_changes_the_global_batches_is_refused(runs, tmp_path, capsys, change, key, old):
  ref, _, _ = runs
  work = tmp_path / 'run'
  shutil.copytree(ref, work)
  before = (work / 'config.yaml').read_text()
  # This test process has 8 devices: a mesh of 8 is fine (it may change), the data key may not.
  args = _args(f'train.workdir={work}', 'train.steps=12', 'mesh.data=2', 'mesh.fsdp=4', change)
  assert main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  value = change.split('=')[1]
  assert err == [f'blox-train: error: data.{key}={old!r} -> {int(value)!r}: the run in {work} was trained with '
                 f'data.{key}={old!r} and a resumed run must see the global batches it would have seen; resume with '
                 f'data.{key}={old!r} (processes, devices and the mesh may change), or start fresh with '
                 'checkpoint.resume=false or a new train.workdir'], err
  assert (work / 'config.yaml').read_text() == before  # refused before anything was written
  # Without config.yaml the checkpoint's own record refuses it (after reading the checkpoint, before training).
  if key == 'batch_size':
    (work / 'config.yaml').unlink()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"data.batch_size=8 -> 16: the run in {work / 'checkpoints' / '8'} was trained with data.batch_size=8" in err
    assert max(_losses(work)) == 8 and not (work / 'config.yaml').exists()
