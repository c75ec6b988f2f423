"""Trackers: TensorBoard event files and W&B logs hold the metrics.jsonl scalars; train.profile writes a trace.

One short blox-train process does all three, with a stand-in `wandb` module
first on its PYTHONPATH (it records its calls in a JSON file): W&B is not a
dependency and nothing is sent anywhere. The event files are read back with
TensorBoard's own reader (the `tensorboard` package, in the test extra).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from blox_scale.training.config import ConfigError, load_config
from blox_scale.training.metrics import read_metrics
from helpers import xla_flags

REPO = Path(__file__).resolve().parents[1]
TINY = ['model.d_model=32', 'model.num_layers=1', 'model.num_heads=2', 'model.mlp_dim=64', 'model.remat=none',
        'model.max_seq_len=32', 'data.seq_len=32', 'data.batch_size=8', 'data.max_bytes=50000',
        'train.progress=false', 'train.plot=false', 'train.sample_tokens=0', 'checkpoint.every=0']

FAKE_WANDB = '''
import json, os
LOG = os.environ['FAKE_WANDB_LOG']

class Run:
  def log(self, values, step):
    with open(LOG, 'a') as f:
      f.write(json.dumps({'call': 'log', 'values': values, 'step': step}) + '\\n')
  def finish(self):
    with open(LOG, 'a') as f:
      f.write(json.dumps({'call': 'finish'}) + '\\n')

def init(**kwargs):
  with open(LOG, 'a') as f:
    f.write(json.dumps({'call': 'init', 'project': kwargs['project'], 'id': kwargs['id'],
                        'config_steps': kwargs['config']['train']['steps']}) + '\\n')
  return Run()
'''


def tensorboard_scalars(directory):
  """{tag: {step: value}} read with TensorBoard's EventAccumulator."""
  events = EventAccumulator(str(directory), size_guidance={'scalars': 0})  # 0: keep every event
  events.Reload()
  return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()['scalars']}


def _numeric(record):
  return {k: v for k, v in record.items()
          if k not in ('kind', 'step', 'time') and isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.mark.slow
def test_tensorboard_wandb_and_profile_trace(tmp_path):
  fake = tmp_path / 'fake'
  fake.mkdir()
  (fake / 'wandb.py').write_text(FAKE_WANDB)
  workdir, log = tmp_path / 'run', tmp_path / 'wandb_calls.jsonl'
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(fake), str(REPO)]), 'FAKE_WANDB_LOG': str(log),
         'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags(1)}
  cmd = [sys.executable, '-m', 'blox_scale.cli.train', *TINY, f'train.workdir={workdir}', 'train.steps=4',
         'train.log_every=1', 'train.eval_every=2', 'train.eval_batches=1', 'train.profile=[1,3]',
         'train.wandb=true', 'train.wandb_project=test']
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  records = {kind: read_metrics(workdir, kind) for kind in ('train', 'eval', 'goodput')}
  assert [r['step'] for r in records['train']] == [1, 2, 3, 4] and [r['step'] for r in records['eval']] == [2, 4]
  records['goodput'] = list({r['step']: r for r in records['goodput']}.values())  # the last one per step
  assert [r['step'] for r in records['goodput']] == [0, 1, 2, 3, 4]
  tb = tensorboard_scalars(workdir / 'tensorboard')
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert calls[0]['call'] == 'init' and calls[0]['project'] == 'test' and calls[0]['config_steps'] == 4
  assert calls[-1]['call'] == 'finish'
  assert calls[0]['id'] == (workdir / 'wandb_run_id').read_text().strip()
  logged = {}  # what W&B received: {step: {tag: value}}
  for call in calls[1:-1]:
    logged.setdefault(call['step'], {}).update(call['values'])
  for kind in ('train', 'eval', 'goodput'):
    for record in records[kind]:
      for key, value in _numeric(record).items():
        tag = f'{kind}/{key}'
        assert tb[tag][record['step']] == pytest.approx(value, rel=1e-6, abs=1e-6), tag  # float32 in the file
        assert logged[record['step']][tag] == value, tag
  assert set(tb['train/loss']) == {1, 2, 3, 4} and set(tb['eval/eval_loss']) == {2, 4}

  traces = list((workdir / 'profile').rglob('*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_wandb_not_installed_is_a_config_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` raises ImportError
  with pytest.raises(ConfigError, match=r"^train\.wandb=True: needs the wandb package.*pip install wandb"):
    load_config(None, [f'train.workdir={tmp_path}', 'train.wandb=true'])
  with pytest.raises(ConfigError, match=r'^train\.profile=\[3, 3\]: must be \[start, stop\]'):
    load_config(None, [f'train.workdir={tmp_path}', 'train.profile=[3,3]'])
