"""Mistral checkpoints and Mistral/Mixtral sliding windows, against test_hf's NumPy forward with the window mask.

Hugging Face lets query i attend key j iff i - sliding_window < j <= i
(transformers' masking_utils.sliding_window_causal_mask_function); the
references below apply exactly that mask (test_hf._causal_attention). The
window (5) is well below the sequence (16), so a full-causal model fails them.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import blox as bx
import blox_scale as bs
from blox_scale.interop.families import family_for_hf
from blox_scale.models import DecoderLM
from blox_scale.models.generate import generate
from test_hf import _read_all, llama_reference, write_llama
from test_hf_mixtral import _values, hf_to_blox_to_hf, mixtral_reference, write_mixtral

WINDOW = 5
MISTRAL = {'architectures': ['MistralForCausalLM'], 'model_type': 'mistral', 'sliding_window': WINDOW}
IDS = np.random.default_rng(7).integers(0, 64, (2, 16)).astype(np.int32)


def _check_windowed_logits(model, params, reference):
  """blox logits == the windowed reference (f32), and != the full-causal one beyond the window."""
  logits = np.asarray(jax.jit(model.__call__)(params, IDS)[0])
  for b in range(2):
    want, full = reference(IDS[b], WINDOW), reference(IDS[b], 0)
    np.testing.assert_allclose(logits[b], want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(want[:WINDOW], full[:WINDOW], rtol=1e-9)  # the window hides nothing there
    assert np.abs(logits[b, WINDOW:] - full[WINDOW:]).max() > 0.1          # but changes every later position


def test_mistral_window_logits_match_numpy_and_greedy_decoding_keeps_the_window(tmp_path):
  t = write_llama(tmp_path / 'hf', head_dim=8, **MISTRAL)
  model, params = bs.hf.load(tmp_path / 'hf', dtype='float32')
  assert (model.config.sliding_window, model.config.head_dim, model.config.use_bias) == (WINDOW, 8, False)
  _check_windowed_logits(model, params, lambda ids, w: llama_reference(t, ids, window=w))

  # KV-cache decoding (generate: prefill + steps) equals argmax of the windowed full forward, step by step;
  # the prompts and continuations are longer than the window, and the same weights without one decode otherwise.
  prompts, steps = [IDS[0, :9].tolist(), IDS[1, :6].tolist()], 8
  got = generate(model, params, prompts, max_new_tokens=steps)
  fwd = jax.jit(lambda p, x: model(p, x)[0])
  seqs = [list(p) for p in prompts]
  for _ in range(steps):
    tokens = np.zeros((2, 9 + steps), np.int32)  # right padding: causality hides it
    for b, s in enumerate(seqs):
      tokens[b, :len(s)] = s
    logits = np.asarray(fwd(params, tokens))
    for b, s in enumerate(seqs):
      s.append(int(np.argmax(logits[b, len(s) - 1])))
  assert got == [s[len(p):] for s, p in zip(seqs, prompts)]
  assert all(len(set(row)) > 2 for row in got), f'degenerate continuations make this test vacuous: {got}'
  full = DecoderLM(bx.Graph('lm'), dataclasses.replace(model.config, sliding_window=0))
  assert generate(full, params, prompts, max_new_tokens=steps) != got


def test_mistral_save_load_bitwise_and_export_family_follows_the_window(tmp_path):
  t = write_llama(tmp_path / 'hf', **MISTRAL)
  model, params = bs.hf.load(tmp_path / 'hf')
  out = bs.hf.save(model, params, tmp_path / 'out')
  saved, _ = _read_all(out)
  assert saved.keys() == t.keys() and all(saved[k].dtype == t[k].dtype and np.array_equal(saved[k], t[k]) for k in t)
  config = json.loads((out / 'config.json').read_text())
  assert (config['architectures'], config['model_type'], config['sliding_window']) == (
      ['MistralForCausalLM'], 'mistral', WINDOW)
  assert 'attention_bias' not in config and 'rope_scaling' not in config  # LlamaConfig's keys, not MistralConfig's
  model2, params2 = bs.hf.load(out)
  assert model2.config == model.config
  got, want = _values(params2), _values(params)
  assert got.keys() == want.keys() and all(got[p].dtype == want[p].dtype and np.array_equal(got[p], want[p])
                                           for p in want)
  # Without a window the same model is a Llama (LlamaForCausalLM has none); Llama never takes a window.
  assert bs.hf.hf_config(dataclasses.replace(model.config, sliding_window=0))['model_type'] == 'llama'
  with pytest.raises(bs.hf.UnsupportedConfig, match="config.json/sliding_window.*model_type 'mistral'"):
    family_for_hf({'model_type': 'llama'}).from_hf({**config, 'model_type': 'llama'})


@pytest.mark.parametrize('window, max_pos, want', [
    (None, 32, 0), (32, 32, 0), (31, 32, 31), ('missing', 8192, 4096), ('missing', 4096, 0)])
def test_mistral_config_window_mapping(window, max_pos, want):
  """null, or a window covering max_position_embeddings, is full causal; a missing key is MistralConfig's 4096."""
  hf = {'model_type': 'mistral', 'vocab_size': 64, 'hidden_size': 32, 'intermediate_size': 48,
        'num_hidden_layers': 2, 'num_attention_heads': 4, 'max_position_embeddings': max_pos}
  if window != 'missing':
    hf['sliding_window'] = window
  assert family_for_hf(hf).from_hf(hf).sliding_window == want


def test_mistral_and_mixtral_bad_windows_are_named():
  base = {'vocab_size': 64, 'hidden_size': 32, 'intermediate_size': 48, 'num_hidden_layers': 2,
          'num_attention_heads': 4, 'num_local_experts': 4}
  for model_type in ('mistral', 'mixtral'):
    for bad in (0, -3, 2.5, True):
      hf = {**base, 'model_type': model_type, 'sliding_window': bad, 'attention_bias': True}
      with pytest.raises(bs.hf.UnsupportedConfig) as e:
        family_for_hf(hf).from_hf(hf)
      assert {k for k, _, _ in e.value.problems} == {'config.json/sliding_window', 'config.json/attention_bias'}


def test_mistral_hf_to_blox_then_blox_to_hf_is_bitwise(tmp_path):
  t = write_llama(tmp_path / 'hf', seed=3, vocab=256, **MISTRAL)  # the byte tokenizer's vocab
  assert hf_to_blox_to_hf(tmp_path, t).model.sliding_window == WINDOW
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())['sliding_window'] == WINDOW


def test_mixtral_window_logits_match_numpy_and_export_keeps_it(tmp_path):
  t = write_mixtral(tmp_path / 'hf', sliding_window=WINDOW)
  model, params = bs.hf.load(tmp_path / 'hf', dtype='float32')
  assert model.config.sliding_window == WINDOW and model.config.moe.num_experts == 4
  _check_windowed_logits(model, params, lambda ids, w: mixtral_reference(t, ids, window=w))
  config = bs.hf.hf_config(model.config)
  assert (config['model_type'], config['sliding_window']) == ('mixtral', WINDOW)
  assert bs.hf.hf_config(dataclasses.replace(model.config, sliding_window=0))['sliding_window'] is None
