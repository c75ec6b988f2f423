"""LoRA fine-tuning of a Hugging Face Mixtral directory with blox-train, exported back with blox-convert.

The checkpoint is test_hf_mixtral's tiny synthetic Mixtral with a byte-level
tokenizer.json beside it (256 byte tokens, no merges, '</s>'), so the run
picks up the directory's tokenizer and the export ships it again.
"""

from __future__ import annotations

import json

import jax

import jax.numpy as jnp
import numpy as np
import pytest

import blox_scale as bs
from blox_scale.training import finetune
from blox_scale.training.config import ConfigError, load_config
from test_hf_mixtral import write_mixtral

VOCAB = 264  # the tokenizer's 257 ids, padded


def write_tokenizer(path):
  """A byte-level BPE tokenizer without merges: one token per byte, '</s>' = 256."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(['</s>'])
  tok.save(str(path))


def test_a_hf_directory_is_the_source_and_mlp_targets_name_the_experts(tmp_path):
  hf = tmp_path / 'hf'
  write_mixtral(hf, vocab=VOCAB)
  write_tokenizer(hf / 'tokenizer.json')
  cfg = finetune.resolve(load_config(None, [f'finetune.init_from={hf}', 'finetune.lora.rank=8']))  # no hf: prefix
  assert (cfg.model.moe.num_experts, cfg.model.vocab_size, cfg.data.tokenizer) == (4, VOCAB, str(hf))
  # How the experts run is the run's (unset: the source's); what they are is the source's.
  run = finetune.resolve(load_config(None, [f'finetune.init_from=hf:{hf}', 'finetune.lora.rank=8', 'data.tokenizer=byte',
                                            'model.moe.dispatch=capacity', 'model.moe.capacity_factor=2.0']))
  assert (run.model.moe.dispatch, run.model.moe.capacity_factor, run.model.moe.aux_loss_weight) == ('capacity', 2.0, 0.04)
  assert run.data.tokenizer == str(hf)  # 'byte' is the default: the directory's tokenizer is used
  with pytest.raises(ConfigError, match=r'model\.moe\.num_experts=8 conflicts .*num_experts=4'):
    finetune.resolve(load_config(None, [f'finetune.init_from={hf}', 'model.moe.num_experts=8']))
  # A bfloat16 base keeps the router float32, as the model creates it (a cast router failed the first call).
  bf16 = finetune.resolve(load_config(None, [f'finetune.init_from={hf}', 'finetune.lora.rank=8',
                                             'finetune.base_dtype=bfloat16']))
  stored = finetune.abstract_params(finetune.build_model(bf16.model, bf16.finetune), bf16.finetune)
  moe = ('lm', 'layers', 'block', 'moe')
  assert (stored[moe + ('router',)].dtype, stored[moe + ('wo',)].dtype) == (jnp.float32, jnp.bfloat16)
  with pytest.raises(ConfigError, match=r"\['mlp/\*'\] match no projection.*moe/wi_gate.*LoRA does not adapt experts"):
    finetune.build_model(cfg.model, cfg.finetune.__class__(lora=cfg.finetune.lora.__class__(rank=8, targets=('mlp/*',))))


@pytest.mark.slow
def test_lora_on_mixtral_trains_exports_and_samples(tmp_path, capsys):
  from blox_scale.cli import convert, sample
  from blox_scale.cli.train import train
  from blox_scale.training.checkpoint import load_for_inference

  hf, run, out = tmp_path / 'hf', tmp_path / 'lora', tmp_path / 'out'
  write_mixtral(hf, vocab=VOCAB, seed=2)
  write_tokenizer(hf / 'tokenizer.json')
  assert train(load_config(None, [
      f'finetune.init_from={hf}', 'finetune.lora.rank=8', 'finetune.lora.targets=[attn/*]', f'train.workdir={run}',
      'train.steps=8', 'checkpoint.every=8', 'train.eval_every=0', 'train.sample_tokens=0', 'train.plot=false',
      'train.progress=false', 'train.tensorboard=false', 'data.batch_size=8', 'data.seq_len=16',
      'data.max_bytes=50000', 'optimizer.learning_rate=0.05', 'optimizer.warmup_steps=0'])) == 0

  config, model, params = load_for_inference(run)
  _, base = bs.hf.load(hf)
  for path, p in base.items():  # the frozen base (router and experts included) is bitwise the checkpoint's
    if 'rng' not in path:
      np.testing.assert_array_equal(np.asarray(params[path].value), np.asarray(p.value), err_msg='/'.join(path))
  assert not any(k[-2] == 'moe' and 'lora' in k[-1] for k in params.keys())
  # The loss on the corpus's first windows falls from the base model's.
  from blox_scale.training.tokenizer import get_tokenizer
  from blox_scale.training.data import stdlib_documents
  ids = get_tokenizer(str(hf)).encode(stdlib_documents(4000)[0][:2000].decode())[:8 * 17]
  ids = jnp.asarray(np.asarray(ids, np.int32).reshape(8, 17))
  batch = {'inputs': ids[:, :-1], 'targets': ids[:, 1:], 'mask': jnp.ones((8, 16), jnp.float32)}
  plain = bs.hf.load(hf)[0]
  before = float(plain.loss(base, batch, is_training=False)[1][0]['loss'])
  after = float(model.loss(params, batch, is_training=False)[1][0]['loss'])
  print(f'loss on the first windows: base {before:.3f}, after LoRA {after:.3f}')
  assert after < before - 0.3, (before, after)

  assert convert.main(['blox-to-hf', str(run), str(out), '--no-progress']) == 0
  assert json.loads((out / 'config.json').read_text())['architectures'] == ['MixtralForCausalLM']
  assert (out / 'tokenizer.json').read_bytes() == (hf / 'tokenizer.json').read_bytes()
  plain_model, plain_params = bs.hf.load(out)
  want, _ = model(params, batch['inputs'])  # adapters applied on the fly
  got, _ = plain_model(plain_params, batch['inputs'])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  capsys.readouterr()
  assert sample.main(['--hf', str(out), '--prompt', 'def ', '--max-new-tokens', '4', '--temperature', '0']) == 0
  assert capsys.readouterr().out.startswith('def ')


@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
def test_int8_expert_kernels_equal_the_dequantized_f32_model(tmp_path, dispatch):
  import dataclasses
  import blox as bx

  t = write_mixtral(tmp_path / 'hf')
  plain, base = bs.hf.load(tmp_path / 'hf')
  config = dataclasses.replace(plain.config, moe=dataclasses.replace(plain.config.moe, dispatch=dispatch,
                                                                     capacity_factor=2.0))
  model = bs.DecoderLM(bx.Graph('lm'), config)
  bs.finetune.add_lora(model, ['attn/q'], rank=4, alpha=8)
  bs.finetune.add_int8_base(model, targets=())  # the experts only: attention stays f32 here
  params = bs.finetune.quantize(model, bs.finetune.freeze_base(bs.finetune.init_new_params(model, base, seed=0)))
  reference = dict(base.items())
  for name, hf_name, transpose in (('wi_gate', 'w1', True), ('wi_up', 'w3', True), ('wo', 'w2', True)):
    path = ('lm', 'layers', 'block', 'moe', name)
    q, scale = params[path], params[path[:-1] + (name + '_scale',)]
    assert q.dtype == jnp.int8 and not q.trainable and scale.value.shape == q.value.shape[:2] + q.value.shape[3:]
    w = np.asarray(q.value, np.float64) * np.asarray(scale.value, np.float64)[:, :, None, :]  # per expert, per output
    for i in range(2):
      for e in range(4):
        want = t[f'model.layers.{i}.block_sparse_moe.experts.{e}.{hf_name}.weight'].T
        s = np.asarray(scale.value)[i, e]
        np.testing.assert_allclose(s, np.abs(want).max(axis=0) / 127, rtol=1e-6)  # max |w| over the inputs
        assert np.all(np.abs(w[i, e] - want) <= s / 2 * (1 + 1e-6))  # rounding error at most half a step
    reference[path] = base[path].replace(value=jnp.asarray(w, jnp.float32))
  reference = bx.Params(reference, base.is_locked)
  # blox-train's finetune.quant=int8 stores the experts so too (attention's projections with Int8Base).
  from blox_scale.training.config import FinetuneConfig, LoRAConfig
  f = FinetuneConfig(init_from='hf', lora=LoRAConfig(rank=4), quant='int8')
  stored = finetune.abstract_params(finetune.build_model(config, f), f)
  moe, q = ('lm', 'layers', 'block', 'moe'), ('lm', 'layers', 'block', 'attn', 'q')
  assert (stored[moe + ('wo',)].dtype, stored[moe + ('wo_scale',)].shape, stored[q].dtype) == (jnp.int8, (2, 4, 32), jnp.int8)
  ids = jnp.asarray([[3, 17, 42, 5, 63, 0, 9, 28], [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
  got, _ = jax.jit(model.__call__)(params, ids)  # B = 0: the adapters add nothing yet
  want, _ = jax.jit(bs.DecoderLM(bx.Graph('lm'), config).__call__)(reference, ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  # merge (and blox-to-hf's one-kernel-at-a-time reader) give the dequantized experts, no scales.
  merged = bs.finetune.merge(model, params)
  read = bs.finetune.merged_reader(model, params, lambda p: np.asarray(params[p].value))
  assert not any(k[-1].endswith('_scale') for k in merged.keys())
  for k in reference.keys():
    if 'rng' not in k:
      np.testing.assert_array_equal(np.asarray(merged[k].value), np.asarray(reference[k].value), err_msg='/'.join(k))
      np.testing.assert_array_equal(read(k), np.asarray(merged[k].value), err_msg='/'.join(k))
