"""blox-train fine-tune mode: a tiny pretrained run, then LoRA on it (base bitwise unchanged, loss falls)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blox as bx
import blox_scale as bs
from blox_scale.cli.train import train
from blox_scale.training import finetune
from blox_scale.training.checkpoint import load_for_inference, save_config
from blox_scale.training.config import Config, ConfigError, load_config
from blox_scale.training.metrics import read_metrics

SMALL = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4', 'model.mlp_dim=64', 'model.max_seq_len=32',
         'data.seq_len=32', 'data.batch_size=8', 'data.max_bytes=200000', 'train.sample_tokens=0',
         'train.plot=false', 'train.progress=false', 'train.log_every=5']


def test_model_comes_from_the_source_and_a_conflict_names_the_key(tmp_path):
  source = load_config(None, SMALL + [f'train.workdir={tmp_path}'])
  save_config(tmp_path, source)  # config.yaml alone: resolving reads no weights
  cfg = finetune.resolve(load_config(None, [f'finetune.init_from={tmp_path}', 'finetune.lora.rank=4',
                                            'model.remat=none', 'finetune.base_dtype=bfloat16']))
  assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.remat) == (32, 2, 'none')
  assert cfg.model.param_dtype == 'bfloat16'
  with pytest.raises(ConfigError, match=r'model\.d_model=64 conflicts .*d_model=32'):
    finetune.resolve(load_config(None, [f'finetune.init_from={tmp_path}', 'model.d_model=64']))
  with pytest.raises(ConfigError, match='finetune.quant.*finetune.lora.rank=0'):
    load_config(None, [f'finetune.init_from={tmp_path}', 'finetune.quant=int8'])
  with pytest.raises(ConfigError, match='finetune.lora.rank.*init_from is empty'):
    load_config(None, ['finetune.lora.rank=4'])


@pytest.mark.slow
def test_lora_run_leaves_the_base_bitwise_unchanged_and_learns(tmp_path):
  source, run = tmp_path / 'source', tmp_path / 'lora'
  assert train(load_config(None, SMALL + ['train.steps=20', f'train.workdir={source}', 'checkpoint.every=20', 'train.eval_every=20',
                                         'optimizer.learning_rate=1e-2', 'optimizer.warmup_steps=2'])) == 0
  cfg = load_config('configs/tiny_lora.yaml', SMALL + [
      f'finetune.init_from={source}', f'train.workdir={run}', 'train.steps=30', 'checkpoint.every=30',
      'optimizer.learning_rate=1e-2', 'optimizer.warmup_steps=2', 'train.eval_every=30'])
  assert train(cfg) == 0

  [start] = read_metrics(run, 'start')
  assert start['trainable_params'] == 2 * (2 * 8 * (32 + 32) + 3 * 8 * (32 + 64))   # q, v; wi_gate, wi_up, wo
  assert start['opt_state_bytes'] < 0.25 * start['full_finetune_opt_state_bytes']
  # The held-out loss (the same eval windows in both runs) falls below the base model's.
  [base_eval], [lora_eval] = read_metrics(source, 'eval'), read_metrics(run, 'eval')
  assert lora_eval['eval_loss'] < base_eval['eval_loss'] - 0.05, (base_eval, lora_eval)

  _, _, base = load_for_inference(source)
  config, model, params = load_for_inference(run)
  for path, p in base.items():
    if p.dtype != jnp.uint32 and 'rng' not in path:
      np.testing.assert_array_equal(np.asarray(params[path].value), np.asarray(p.value), err_msg='/'.join(path))
  assert any(float(jnp.abs(p.value).max()) > 0 for k, p in params.items() if k[-1].endswith('lora_b'))

  # Sampling from the LoRA run, and its merged export, which the plain model reads.
  [new] = bs.generate(model, params, [[ord('d'), ord('e'), ord('f')]], max_new_tokens=4, temperature=0.0)
  assert len(new) == 4
  tokens = jnp.asarray([[ord(c) for c in 'def main():\n  ret']], jnp.int32)
  on_the_fly, _ = model(params, tokens)
  plain = bs.DecoderLM(bx.Graph('lm'), config.model)
  merged, _ = plain(bs.finetune.merge(model, params), tokens)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(on_the_fly), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_stopped_lora_run_resumes_bitwise_equal_to_an_uninterrupted_one(tmp_path):
  import shutil

  source, run, stopped = tmp_path / 'source', tmp_path / 'lora', tmp_path / 'stopped'
  assert train(load_config(None, SMALL + ['train.steps=4', f'train.workdir={source}', 'checkpoint.every=4',
                                         'train.eval_every=0', 'train.tensorboard=false'])) == 0
  every_step = [o for o in SMALL if not o.startswith('train.log_every=')] + ['train.log_every=1']
  lora = lambda workdir: load_config('configs/tiny_lora.yaml', every_step + [
      f'finetune.init_from={source}', f'train.workdir={workdir}', 'train.steps=8', 'checkpoint.every=4',
      'train.eval_every=0', 'finetune.lora.dropout=0.1', 'finetune.quant=int8',
      'train.tensorboard=false'])
  assert train(lora(run)) == 0
  # The state of a run killed after its save at step 4: checkpoint 8 and the records after step 4 gone.
  shutil.copytree(run, stopped)
  shutil.rmtree(stopped / 'checkpoints' / '8')
  records = (stopped / 'metrics.jsonl').read_text().splitlines()
  (stopped / 'metrics.jsonl').write_text(''.join(l + '\n' for l in records if '"step": 4,' in l or
                                                 '"kind": "start"' in l or any(f'"step": {s},' in l for s in (1, 2, 3))))
  assert train(lora(stopped)) == 0
  assert read_metrics(stopped, 'start')[-1]['step'] == 4  # resumed, not restarted from the source
  want, got = read_metrics(run, 'train'), read_metrics(stopped, 'train')
  assert [r['loss'] for r in got] == [r['loss'] for r in want]  # bitwise: same state, same data, same dropout keys
  _, _, a = load_for_inference(run)
  _, _, b = load_for_inference(stopped)
  raw = lambda v: np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v)
  assert a.keys() == b.keys()
  for path in a.keys():
    np.testing.assert_array_equal(raw(a[path].value), raw(b[path].value), err_msg='/'.join(path))
  size = lambda d: sum(f.stat().st_size for f in d.rglob('*') if f.is_file())
  ckpt, base = size(run / 'checkpoints' / '8'), size(source / 'checkpoints' / '4')
  print(f'MEASURED lora checkpoint {ckpt:,} bytes (int8 base + adapters + their Adam state); '
        f'source checkpoint {base:,} bytes (f32 params + Adam state)')
