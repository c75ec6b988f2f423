"""blox-convert: hf-to-blox -> blox-sample / blox-train, blox-to-hf back, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import blox_scale as bs
from blox_scale.cli import convert, sample
from blox_scale.training.checkpoint import load_for_inference
from test_hf import _read_all, write_gpt2, write_llama

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                        env={**__import__('os').environ, 'PYTHONPATH': str(ROOT)})


def _values(params) -> dict:
  return {p: np.asarray(v.value) for p, v in params.items() if p[-1] != 'seed'}


def test_hf_to_blox_samples_and_converts_back_bitwise(tmp_path, capsys):
  t = write_llama(tmp_path / 'hf', seed=3, vocab=256)  # the byte tokenizer's vocab
  r = _run('blox_scale.cli.convert', 'hf-to-blox', str(tmp_path / 'hf'), str(tmp_path / 'wd'), '--no-progress', cwd=ROOT)
  assert r.returncode == 0, r.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hf', 'wd']  # no temp directory left behind
  config, model, params = load_for_inference(tmp_path / 'wd')
  _, reference = bs.hf.load(tmp_path / 'hf')
  assert config.model == model.config
  got, want = _values(params), _values(reference)
  assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)

  sample.main(['--checkpoint', str(tmp_path / 'wd'), '--prompt', 'ab', '--max-new-tokens', '4', '--temperature', '0'])
  assert capsys.readouterr().out.startswith('ab')

  assert convert.main(['blox-to-hf', str(tmp_path / 'wd'), str(tmp_path / 'out'), '--max-shard-size', '20kB',
                       '--no-progress']) == 0
  saved, _ = _read_all(tmp_path / 'out')
  assert (tmp_path / 'out' / 'model.safetensors.index.json').exists()
  assert saved.keys() == t.keys() and all(np.array_equal(saved[k], t[k]) for k in t)
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())['architectures'] == ['LlamaForCausalLM']


def test_errors_list_every_offender_and_leave_no_output(tmp_path, capsys):
  t = write_gpt2(tmp_path / 'hf')
  del t['h.1.mlp.c_fc.bias']
  t['h.0.attn.c_attn.weight'] = t['h.0.attn.c_attn.weight'][:, :-1]
  t['h.0.attn.c_attn.weight_renamed'] = t['h.0.attn.c_proj.weight']
  from safetensors.numpy import save_file
  save_file(t, str(tmp_path / 'hf' / 'model.safetensors'))
  assert convert.main(['hf-to-blox', str(tmp_path / 'hf'), str(tmp_path / 'wd'), '--no-progress']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert [line.split(';')[0] for line in err] == [
      'blox-convert: error: h.0.attn.c_attn.weight: shape [32, 95], expected [32, 96]',
      'blox-convert: error: h.1.mlp.c_fc.bias: missing',
      'blox-convert: error: h.0.attn.c_attn.weight_renamed: unexpected',
  ]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hf']

  (tmp_path / 'taken').mkdir()
  (tmp_path / 'taken' / 'x').write_text('')
  assert convert.main(['hf-to-blox', str(tmp_path / 'hf'), str(tmp_path / 'taken'), '--no-progress']) == 2
  assert 'taken: exists and is not an empty directory' in capsys.readouterr().err


@pytest.mark.slow
def test_blox_train_resumes_from_a_converted_checkpoint(tmp_path):
  write_llama(tmp_path / 'hf', seed=4, vocab=256)
  assert convert.main(['hf-to-blox', str(tmp_path / 'hf'), str(tmp_path / 'wd'), '--no-progress']) == 0
  _, _, before = load_for_inference(tmp_path / 'wd')
  r = _run('blox_scale.cli.train', '--config', str(tmp_path / 'wd' / 'config.yaml'), 'train.steps=2',
           'train.eval_every=0', 'train.sample_tokens=0', 'train.plot=false', 'train.progress=false',
           'data.batch_size=8', 'data.seq_len=16', 'data.max_bytes=20000', cwd=ROOT)
  assert r.returncode == 0, r.stderr
  assert f"resumed from {tmp_path / 'wd' / 'checkpoints' / '0'}" in r.stdout
  _, _, after = load_for_inference(tmp_path / 'wd')
  q = ('lm', 'layers', 'block', 'attn', 'q')
  delta = np.abs(np.asarray(after[q].value) - np.asarray(before[q].value)).max()
  assert 0 < delta < 0.1  # trained on from the imported weights, not from a fresh init
  jax.clear_caches()


@pytest.mark.slow
def test_blox_to_hf_of_a_lora_run_exports_merged_weights(tmp_path):
  # LoRA on an int8 base of an imported checkpoint: the export dequantizes, folds the adapters in and
  # writes the base model's Hugging Face layout, whose logits equal the LoRA model's on the fly.
  import jax.numpy as jnp
  from blox_scale.cli.train import train
  from blox_scale.training.config import load_config

  write_llama(tmp_path / 'hf', seed=1, vocab=256)
  run = tmp_path / 'lora'
  cfg = load_config('configs/tiny_lora.yaml', [
      f'finetune.init_from=hf:{tmp_path / "hf"}', 'finetune.quant=int8', f'train.workdir={run}', 'train.steps=3',
      'checkpoint.every=3', 'train.eval_every=0', 'train.sample_tokens=0', 'train.plot=false', 'train.progress=false',
      'train.tensorboard=false', 'data.batch_size=8', 'data.seq_len=16', 'data.max_bytes=100000',
      'optimizer.learning_rate=0.05', 'optimizer.warmup_steps=0'])
  assert train(cfg) == 0
  config, model, params = load_for_inference(run)
  assert any(float(jnp.abs(p.value).max()) > 0 for k, p in params.items() if k[-1].endswith('lora_b'))
  assert any(p.value.dtype == jnp.int8 for p in params.values())

  assert convert.main(['blox-to-hf', str(run), str(tmp_path / 'out'), '--no-progress']) == 0
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())['architectures'] == ['LlamaForCausalLM']
  plain_model, plain_params = bs.hf.load(tmp_path / 'out')
  assert not any(k[-1].endswith(('lora_a', 'lora_b', 'kernel_scale')) for k in plain_params.keys())
  tokens = jnp.asarray([[ord(c) for c in 'def main():']], jnp.int32)
  want, _ = model(params, tokens)  # int8 dequantized and adapters applied on the fly
  got, _ = plain_model(plain_params, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # The same as merging in memory (bs.finetune.merge), bit for bit.
  merged = bs.finetune.merge(model, params)
  assert all(np.array_equal(np.asarray(plain_params[k].value), np.asarray(merged[k].value))
             for k in merged.keys() if k[-1] not in ('seed', 'counter'))
