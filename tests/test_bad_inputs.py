"""Malformed inputs to blox-train, blox-sample and blox-plan: each is one line naming the key or path.

Every case runs the tool's `main(argv)` in this process (no compile is reached: the
checks run first) and asserts: exit status 2, `tool: error: ...` on at most two lines
naming the key or path, no traceback, and no file written (neither in the working
directory nor the workdir). A few cases go through a real subprocess as well.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from blox_scale.cli import plan as plan_cli
from blox_scale.cli import sample as sample_cli
from blox_scale.cli import train as train_cli
from blox_scale.training.config import Config, to_yaml

REPO = Path(__file__).resolve().parents[1]
TOOLS = {'blox-train': train_cli.main, 'blox-sample': sample_cli.main, 'blox-plan': plan_cli.main}


def _files(tmp: Path) -> dict[str, Path]:
  """The fixtures the cases point at (made once per test; tiny)."""
  f = {}
  f['empty'] = tmp / 'empty.txt'
  f['empty'].write_text('')
  f['tiny'] = tmp / 'tiny.txt'
  f['tiny'].write_text('0123456789')
  f['odd'] = tmp / 'odd.bin'
  f['odd'].write_bytes(b'\x01\x00\x02')
  f['one'] = tmp / 'one.bin'
  np.array([7], np.uint16).tofile(f['one'])
  f['big_ids'] = tmp / 'big_ids.bin'
  np.array([1, 2, 300, 4] * 400, np.uint16).tofile(f['big_ids'])
  f['bad_yaml'] = tmp / 'bad.yaml'
  f['bad_yaml'].write_text('model:\n  d_model: [1, 2\n')
  f['list_yaml'] = tmp / 'list.yaml'
  f['list_yaml'].write_text('- 1\n- 2\n')
  f['dup_yaml'] = tmp / 'dup.yaml'
  f['dup_yaml'].write_text('model:\n  d_model: 64\n  d_model: 32\n')
  f['a_file'] = tmp / 'a_file'
  f['a_file'].write_text('x')
  f['dir'] = tmp / 'a_dir'
  f['dir'].mkdir()
  # A run's workdir with its config: resuming it with other shapes, or with a garbage config.yaml.
  f['run'] = tmp / 'run'
  f['run'].mkdir()
  (f['run'] / 'config.yaml').write_text(to_yaml(Config()))
  f['garbage_run'] = tmp / 'garbage_run'
  f['garbage_run'].mkdir()
  (f['garbage_run'] / 'config.yaml').write_text('model: {d_model: [\x00')
  return f


# (id, tool, argv (with {placeholders}), text the one line must contain)
CASES = [
    # -- blox-train: config file and override syntax
    ('unknown_key', 'blox-train', ['model.nmu_layers=2'], 'model.nmu_layers'),
    ('bad_int', 'blox-train', ['train.steps=many'], 'train.steps'),
    ('set_twice', 'blox-train', ['train.steps=5', 'train.steps=6'], 'train.steps'),
    ('no_equals', 'blox-train', ['train.steps'], 'train.steps'),
    ('bad_yaml_value', 'blox-train', ['model.remat_names=[a'], 'model.remat_names'),
    ('missing_preset', 'blox-train', ['--config', 'configs/nope.yaml'], 'configs/nope.yaml'),
    ('preset_bad_yaml', 'blox-train', ['--config', '{bad_yaml}'], '{bad_yaml}'),
    ('preset_is_list', 'blox-train', ['--config', '{list_yaml}'], '{list_yaml}'),
    ('preset_dup_key', 'blox-train', ['--config', '{dup_yaml}'], 'd_model'),
    ('preset_is_dir', 'blox-train', ['--config', '{dir}'], '{dir}'),
    ('unknown_flag', 'blox-train', ['--nope'], '--nope'),
    # -- blox-train: ranges
    ('log_every_0', 'blox-train', ['train.log_every=0'], 'train.log_every'),
    ('warmup_negative', 'blox-train', ['optimizer.warmup_steps=-5'], 'optimizer.warmup_steps'),
    ('workers_negative', 'blox-train', ['data.worker_count=-1'], 'data.worker_count'),
    ('keep_0', 'blox-train', ['checkpoint.keep=0'], 'checkpoint.keep'),
    ('every_negative', 'blox-train', ['checkpoint.every=-1'], 'checkpoint.every'),
    ('lr_negative', 'blox-train', ['optimizer.learning_rate=-1'], 'optimizer.learning_rate'),
    ('b2_above_1', 'blox-train', ['optimizer.b2=1.5'], 'optimizer.b2'),
    ('eps_0', 'blox-train', ['optimizer.eps=0'], 'optimizer.eps'),
    ('d_model_0', 'blox-train', ['model.d_model=0'], 'model.d_model'),
    ('dropout_1_5', 'blox-train', ['model.dropout_rate=1.5'], 'model.dropout_rate'),
    ('seed_negative', 'blox-train', ['train.seed=-1'], 'train.seed'),
    ('steps_0', 'blox-train', ['train.steps=0'], 'train.steps'),
    ('heartbeat_0', 'blox-train', ['distributed.heartbeat_timeout=0'], 'distributed.heartbeat_timeout'),
    ('divergence_factor_half', 'blox-train', ['train.divergence_factor=0.5'], 'train.divergence_factor'),
    ('eval_fraction_1', 'blox-train', ['data.eval_fraction=1.0'], 'data.eval_fraction'),
    # -- blox-train: names owned by other modules
    ('remat_name', 'blox-train', ['model.remat=foo'], 'model.remat'),
    ('activation_name', 'blox-train', ['model.mlp_activation=relu'], 'model.mlp_activation'),
    ('norm_name', 'blox-train', ['model.norm=batchnorm'], 'model.norm'),
    ('position_name', 'blox-train', ['model.position=alibi'], 'model.position'),
    ('schedule_name', 'blox-train', ['optimizer.schedule=step'], 'optimizer.schedule'),
    ('source_name', 'blox-train', ['data.source=web'], 'data.source'),
    ('tokenizer_name', 'blox-train', ['data.tokenizer=gpt2'], 'data.tokenizer'),
    ('token_dtype', 'blox-train', ['data.token_dtype=int8'], 'data.token_dtype'),
    ('dtype_int', 'blox-train', ['model.dtype=int8'], 'model.dtype'),
    ('save_names_without_names', 'blox-train', ['model.remat=save_names'], 'model.remat_names'),
    # -- blox-train: cross-field rules
    ('eval_without_batches', 'blox-train', ['train.eval_every=1', 'train.eval_batches=0'], 'train.eval_batches'),
    ('eval_without_holdout', 'blox-train', ['train.eval_every=10', 'data.eval_fraction=0'], 'data.eval_fraction'),
    ('seq_len_above_max', 'blox-train', ['data.seq_len=512'], 'data.seq_len'),
    ('heads_vs_width', 'blox-train', ['model.num_heads=3'], 'model.num_heads'),
    ('kv_heads', 'blox-train', ['model.num_kv_heads=3'], 'model.num_kv_heads'),
    ('vocab_below_bytes', 'blox-train', ['model.vocab_size=100'], 'model.vocab_size'),
    ('accum_vs_batch', 'blox-train', ['optimizer.grad_accum_steps=3'], 'data.batch_size'),
    ('max_bytes_0', 'blox-train', ['data.max_bytes=0'], 'data.max_bytes'),
    # -- blox-train: paths
    ('workdir_empty', 'blox-train', ['train.workdir='], 'train.workdir'),
    ('workdir_is_file', 'blox-train', ['train.workdir={a_file}'], 'train.workdir'),
    ('text_without_path', 'blox-train', ['data.source=text'], 'data.path'),
    ('text_no_match', 'blox-train', ['data.source=text', 'data.path={tmp}/nomatch*.txt'], 'data.path'),
    ('text_empty_file', 'blox-train', ['data.source=text', 'data.path={empty}'], 'data.path'),
    ('text_too_short', 'blox-train', ['data.source=text', 'data.path={tiny}'], 'data.path'),
    ('tokens_odd_size', 'blox-train', ['data.source=tokens', 'data.path={odd}'], 'data.path'),
    ('tokens_one_id', 'blox-train', ['data.source=tokens', 'data.path={one}'], 'data.path'),
    ('tokens_above_vocab', 'blox-train', ['data.source=tokens', 'data.path={big_ids}', 'data.seq_len=16'], 'model.vocab_size'),
    ('tokens_path_is_dir', 'blox-train', ['data.source=tokens', 'data.path={dir}'], 'data.path'),
    # -- blox-train: devices (8 fake CPU devices here), checked before any compile
    ('mesh_vs_devices', 'blox-train', ['mesh.data=3'], 'mesh.data=3'),
    ('mesh_two_fills', 'blox-train', ['mesh.data=-1', 'mesh.fsdp=-1'], 'mesh.fsdp=-1'),
    ('mesh_zero', 'blox-train', ['mesh.tensor=0'], 'mesh.tensor'),
    ('mesh_rule_axis', 'blox-train', ['mesh.rules.batch=foo'], 'mesh.rules.batch'),
    ('batch_vs_shards', 'blox-train', ['data.batch_size=4'], 'data.batch_size'),
    ('param_vs_mesh', 'blox-train', ['mesh.data=1', 'mesh.tensor=8'], 'Param lm/'),
    # -- blox-train: resuming a workdir
    ('resume_other_shapes', 'blox-train', ['train.workdir={run}', 'model.num_layers=2'], 'model.num_layers'),
    ('resume_garbage_config', 'blox-train', ['train.workdir={garbage_run}'], 'config.yaml'),
    # -- blox-sample
    ('sample_no_args', 'blox-sample', [], '--checkpoint'),
    ('sample_missing_dir', 'blox-sample', ['--checkpoint', '{tmp}/nope', '--prompt', 'x'], '--checkpoint'),
    ('sample_not_a_run', 'blox-sample', ['--checkpoint', '{dir}', '--prompt', 'x'], '--checkpoint'),
    ('sample_tokens_0', 'blox-sample', ['--checkpoint', '{run}', '--prompt', 'x', '--max-new-tokens', '0'], '--max-new-tokens'),
    ('sample_tokens_text', 'blox-sample', ['--checkpoint', '{run}', '--prompt', 'x', '--max-new-tokens', 'ten'], '--max-new-tokens'),
    ('sample_temperature', 'blox-sample', ['--checkpoint', '{run}', '--prompt', 'x', '--temperature', '-1'], '--temperature'),
    ('sample_top_p', 'blox-sample', ['--checkpoint', '{run}', '--prompt', 'x', '--top-p', '0'], '--top-p'),
    ('sample_top_k', 'blox-sample', ['--checkpoint', '{run}', '--prompt', 'x', '--top-k', '-3'], '--top-k'),
    ('sample_empty_prompt', 'blox-sample', ['--checkpoint', '{run}', '--prompt', ''], '--prompt'),
    # -- blox-plan
    ('plan_devices_0', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', '0'], '--devices'),
    ('plan_devices_huge', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', '100000'], '--devices'),
    ('plan_devices_text', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', 'many'], '--devices'),
    ('plan_no_config', 'blox-plan', ['--devices', '8'], '--config'),
    ('plan_missing_config', 'blox-plan', ['--config', 'configs/nope.yaml', '--devices', '8'], 'configs/nope.yaml'),
    ('plan_seq_len', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', '8', '--seq-len', '100000'], 'data.seq_len'),
    ('plan_batch_negative', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', '8', '--batch-size', '-1'], '--batch-size'),
    ('plan_batch_vs_shards', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', '8', '--batch-size', '3'], 'data.batch_size'),
    ('plan_hbm', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', '8', '--hbm', '-1'], '--hbm'),
    ('plan_time_limit', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', '8', '--time-limit', '-5'], '--time-limit'),
    ('plan_remat', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', '8', '--remat', 'full,foo'], '--remat'),
    ('plan_mesh_syntax', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', '8', '--mesh', 'data=x'], '--mesh'),
    ('plan_mesh_axis', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', '8', '--mesh', 'pipe=2'], '--mesh'),
    ('plan_mesh_vs_devices', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', '8', '--mesh', 'data=3'], 'mesh.data=3'),
    ('plan_override', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', '8', 'model.num_heads=3'], 'model.num_heads'),
    ('plan_unknown_key', 'blox-plan', ['--config', 'configs/tiny.yaml', '--devices', '8', 'model.layers=3'], 'model.layers'),
]
assert len(CASES) >= 50


def _fill(items, files, tmp):
  subs = {k: str(v) for k, v in files.items()} | {'tmp': str(tmp)}
  return [item.format(**subs) for item in items]


def _snapshot(root: Path) -> set[tuple[str, int]]:
  return {(str(p.relative_to(root)), p.stat().st_size) for p in root.rglob('*')}


@pytest.mark.parametrize('name,tool,argv,needle', CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_key(name, tool, argv, needle, tmp_path, monkeypatch, capsys):
  files = _files(tmp_path)
  argv, needle = _fill(argv, files, tmp_path), _fill([needle], files, tmp_path)[0]
  workdir = tmp_path / 'workdir'
  if tool == 'blox-train' and not any(a.startswith('train.workdir=') for a in argv):
    argv = [*argv, f'train.workdir={workdir}']
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(REPO)  # presets are given relative to the repository
  before = _snapshot(tmp_path)
  monkeypatch.delenv('BLOX_DEBUG', raising=False)
  code = TOOLS[tool](argv)
  out, err = capsys.readouterr()
  assert code == 2, (code, out, err)
  lines = err.strip().splitlines()
  assert 1 <= len(lines) <= 2 and lines[0].startswith(f'{tool}: error: '), err
  assert needle in err, (needle, err)
  assert 'Traceback' not in out + err
  assert _snapshot(tmp_path) == before, 'a file was written'
  assert not workdir.exists()


def test_debug_shows_the_traceback(monkeypatch, capsys, tmp_path):
  monkeypatch.setenv('BLOX_DEBUG', '1')
  assert train_cli.main(['train.log_every=0', f'train.workdir={tmp_path}/w']) == 2
  err = capsys.readouterr().err
  assert 'Traceback' in err and err.strip().splitlines()[-1].startswith('blox-train: error: train.log_every=0')


@pytest.mark.parametrize('module,argv,needle', [
    ('train', ['train.log_every=0'], 'train.log_every=0'),
    ('plan', ['--config', 'configs/tiny.yaml', '--devices', '100000'], '--devices=100000'),
    ('sample', ['--checkpoint', 'nope', '--prompt', 'x'], '--checkpoint=nope'),
])
def test_bad_input_through_the_real_command(module, argv, needle, tmp_path):
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  env.pop('BLOX_DEBUG', None)
  args = argv + ([f'train.workdir={tmp_path}/w'] if module == 'train' else [])
  proc = subprocess.run([sys.executable, '-m', f'blox_scale.cli.{module}', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [l for l in proc.stderr.strip().splitlines() if l.startswith('blox-')]
  assert needle in proc.stderr and 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w').exists()
