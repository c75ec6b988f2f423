"""Every preset in configs/ loads and trains one step, shrunk to tiny sizes; the docs reference is current."""

from pathlib import Path

import pytest

from blox_scale.training.config import load_config, read_config, reference_markdown
from blox_scale.training.metrics import read_metrics
from blox_scale.cli.train import train

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / 'configs').glob('*.yaml'))


def test_there_are_presets():
  assert PRESETS, 'configs/ holds no presets'


def shrink(path: Path, workdir: Path) -> list[str]:
  """Overrides that keep a preset's structure (norms, activations, dtypes, remat, rules,
  grad accumulation) but make it tiny: 2 layers of width 32 on a (2, 2, 2) mesh of the
  8 fake CPU devices, one step on a slice of the stdlib corpus."""
  preset = load_config(path)
  m = preset.model
  grouped = m.num_kv_heads not in (0, m.num_heads)
  accum = preset.optimizer.grad_accum_steps
  return [
      'model.d_model=32', 'model.num_layers=2', 'model.num_heads=4', f'model.num_kv_heads={2 if grouped else 0}',
      'model.head_dim=0', 'model.mlp_dim=64', 'model.vocab_size=256', 'model.max_seq_len=32',
      f'model.sliding_window={min(m.sliding_window, 8)}',
      'data.source=stdlib', 'data.tokenizer=byte', 'data.seq_len=16', f'data.batch_size={8 * accum}',
      'data.max_bytes=100000', 'data.worker_count=0',
      'mesh.data=-1', 'mesh.fsdp=1', 'mesh.tensor=1',
      'distributed.coordinator_address=', 'distributed.num_processes=0', 'distributed.process_id=-1',
      'distributed.local_device_count=0',
      'train.steps=1', 'train.log_every=1', 'train.eval_every=0', 'train.sample_tokens=0', 'train.plot=false',
      'train.progress=false', f'train.workdir={workdir}', 'checkpoint.every=0', 'checkpoint.resume=false',
  ]


FINETUNE_OFF = ['finetune.init_from=', 'finetune.lora.rank=0', 'finetune.quant=none', 'finetune.base_dtype=',
                'finetune.freeze=[]']


@pytest.mark.slow
@pytest.mark.parametrize('path', PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_runs_one_step(path, tmp_path):
  overrides = shrink(path, tmp_path)
  if load_config(path).finetune.init_from:  # a fine-tuning preset starts from a (shrunk) run of its base
    source = tmp_path / 'source'
    base = [o for o in shrink(path, source) if not o.startswith('checkpoint.every')]
    assert train(load_config(path, base + FINETUNE_OFF + ['checkpoint.every=1'])) == 0
    overrides += [f'finetune.init_from={source}']
  config = load_config(path, overrides)
  assert train(config) == 0
  [record] = read_metrics(tmp_path, 'train')
  assert record['step'] == 1 and record['loss'] > 0


def test_docs_hold_the_generated_config_reference():
  """docs/training.md embeds `reference_markdown()`; regenerate with `python docs/gen_reference.py`."""
  text = (REPO / 'docs' / 'training.md').read_text()
  assert reference_markdown().strip() in text, 'docs/training.md is stale: run python docs/gen_reference.py'


def _files(directory: Path) -> dict[str, bytes]:
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob('*')) if p.is_file()}


@pytest.mark.slow
def test_two_presets_back_to_back_never_touch_each_others_workdir(tmp_path, monkeypatch, capsys):
  # As a reader in a checkout: presets at configs/, no train.workdir anywhere (each preset's default).
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'configs').symlink_to(REPO / 'configs')
  brief = ['train.steps=2', 'train.log_every=1', 'train.eval_every=0', 'train.sample_tokens=0', 'train.plot=false',
           'train.progress=false', 'data.max_bytes=100000', 'data.seq_len=32', 'data.batch_size=8', 'model.num_layers=1']
  assert train(load_config('configs/tiny.yaml', brief)) == 0
  tiny = tmp_path / 'runs' / 'tiny'
  before = _files(tiny)
  assert (tiny / 'checkpoints' / '2').is_dir() and 'config.yaml' in before
  capsys.readouterr()
  gpt2_small = ['model.vocab_size=256', 'model.d_model=32', 'model.num_heads=2', 'model.mlp_dim=64',
                'model.max_seq_len=32']
  assert train(load_config('configs/gpt2_124m.yaml', brief + gpt2_small)) == 0
  assert 'resumed from' not in capsys.readouterr().out
  gpt2 = tmp_path / 'runs' / 'gpt2_124m'
  assert _files(tiny) == before  # not a byte of the first run changed
  assert sorted(p.name for p in (tmp_path / 'runs').iterdir()) == ['gpt2_124m', 'tiny']
  assert (gpt2 / 'checkpoints' / '2').is_dir()
  [start] = read_metrics(gpt2, 'start')
  assert start['step'] == 0  # a fresh run, not a resume of runs/tiny
  assert read_config(gpt2).model.position == 'learned' and read_config(tiny).model.position == 'rope'
