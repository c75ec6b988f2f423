"""bs.hf and blox-convert for Mixtral checkpoints, against a NumPy forward written from HF's tensor names.

The checkpoint is written here in Hugging Face's layout (tiny random Mixtral:
2 layers, 4 experts, top-2, grouped-query attention); `mixtral_reference`
(test_hf's Llama reference with `moe_mlp`) follows transformers'
modeling_mixtral.py (MixtralSparseMoeBlock: softmax over all experts, top-k,
renormalised; experts w2(silu(w1 x) * w3 x)) without any of the project's
conversion code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import blox_scale as bs
from blox_scale.cli import convert
from blox_scale.parallel.sharding import make_mesh, rules_from_config
from blox_scale.training.checkpoint import load_for_inference
from blox_scale.training.config import MeshConfig
import test_hf
from helpers import REPO, run_tool
from test_hf import _read_all, _softmax

VOCAB, D, LAYERS, HEADS, KV, HD, FFN, E, K, POS = 64, 32, 2, 4, 2, 8, 48, 4, 2, 32
MOE = 'model.layers.{i}.block_sparse_moe.'


def write_mixtral(path: Path, *, seed: int = 0, vocab: int = VOCAB, **extra) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
  t = {'model.embed_tokens.weight': w(vocab, D), 'model.norm.weight': 1 + w(D), 'lm_head.weight': w(vocab, D)}
  for i in range(LAYERS):
    p = f'model.layers.{i}.'
    t.update({p + 'self_attn.q_proj.weight': w(HEADS * HD, D), p + 'self_attn.k_proj.weight': w(KV * HD, D),
              p + 'self_attn.v_proj.weight': w(KV * HD, D), p + 'self_attn.o_proj.weight': w(D, HEADS * HD),
              p + 'input_layernorm.weight': 1 + w(D), p + 'post_attention_layernorm.weight': 1 + w(D),
              MOE.format(i=i) + 'gate.weight': w(E, D) * 5})  # spread router logits: no near-ties in the top-2
    for e in range(E):
      x = MOE.format(i=i) + f'experts.{e}.'
      t.update({x + 'w1.weight': w(FFN, D), x + 'w3.weight': w(FFN, D), x + 'w2.weight': w(D, FFN)})
  config = {'architectures': ['MixtralForCausalLM'], 'model_type': 'mixtral', 'vocab_size': vocab, 'hidden_size': D,
            'intermediate_size': FFN, 'num_hidden_layers': LAYERS, 'num_attention_heads': HEADS,
            'num_key_value_heads': KV, 'hidden_act': 'silu', 'max_position_embeddings': POS, 'rms_norm_eps': 1e-5,
            'rope_theta': 1e6, 'tie_word_embeddings': False, 'sliding_window': None, 'num_local_experts': E,
            'num_experts_per_tok': K, 'router_aux_loss_coef': 0.02, 'output_router_logits': False,
            'torch_dtype': 'float32', **extra}
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(json.dumps(config))
  save_file(t, str(path / 'model.safetensors'), metadata={'format': 'pt'})
  return t


def moe_mlp(t: dict[str, np.ndarray], p: str, h: np.ndarray) -> np.ndarray:
  """MixtralSparseMoeBlock of layer prefix p, token by token: h [T, d] float64 -> [T, d]."""
  silu = lambda x: x / (1 + np.exp(-x))
  probs = _softmax(h @ t[p + 'block_sparse_moe.gate.weight'].T)                  # [T, E] over all experts
  out = np.zeros_like(h)
  for tok in range(h.shape[0]):
    top = np.argsort(-probs[tok])[:K]
    weights = probs[tok, top] / probs[tok, top].sum()                             # renormalised top-k
    for e, wt in zip(top, weights):
      x = p + f'block_sparse_moe.experts.{e}.'
      hidden = silu(h[tok] @ t[x + 'w1.weight'].T) * (h[tok] @ t[x + 'w3.weight'].T)
      out[tok] += wt * (hidden @ t[x + 'w2.weight'].T)
  return out


def mixtral_reference(t: dict[str, np.ndarray], ids: np.ndarray, window: int = 0) -> np.ndarray:
  """float64 logits [T, vocab]: Llama's attention, norms and RoPE (test_hf.llama_reference), MoE MLPs."""
  assert (HEADS, KV, HD, LAYERS) == (test_hf.HEADS, test_hf.KV, test_hf.HD, test_hf.LAYERS)
  return test_hf.llama_reference(t, ids, theta=1e6, mlp=moe_mlp, window=window)


IDS = np.array([[3, 17, 42, 5, 63, 0, 9, 28, 11, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], np.int32)


def _values(params) -> dict:
  return {p: np.asarray(v.value) for p, v in params.items() if p[-1] != 'seed'}


def test_mixtral_logits_match_numpy_and_config_is_dropless(tmp_path):
  t = write_mixtral(tmp_path / 'hf')
  model, params = bs.hf.load(tmp_path / 'hf', dtype='float32')
  c = model.config
  assert (c.num_kv_heads, c.mlp_dim, c.rope_theta, c.tie_embeddings) == (KV, FFN, 1e6, False)
  assert dataclasses.asdict(c.moe) == {'num_experts': E, 'top_k': K, 'every_n_layers': 1, 'mlp_dim': 0,
                                       'capacity_factor': 1.25, 'dispatch': 'dropless', 'routing': 'topk_softmax',
                                       'aux_loss_weight': 0.02 * K, 'z_loss_weight': 0.0}
  gate = params[('lm', 'layers', 'block', 'moe', 'wi_gate')].value
  assert gate.shape == (LAYERS, E, D, FFN)
  np.testing.assert_array_equal(np.asarray(gate[1, 3]), t[MOE.format(i=1) + 'experts.3.w1.weight'].T)
  logits, _ = jax.jit(model.__call__)(params, IDS)
  assert logits.shape == (2, IDS.shape[1], VOCAB) and logits.dtype == np.float32
  for b in range(2):
    np.testing.assert_allclose(np.asarray(logits[b]), mixtral_reference(t, IDS[b]), rtol=2e-5, atol=2e-5)


def test_mixtral_save_then_load_is_bitwise(tmp_path):
  t = write_mixtral(tmp_path / 'hf')
  model, params = bs.hf.load(tmp_path / 'hf')
  out = bs.hf.save(model, params, tmp_path / 'out', max_shard_size=40_000)  # several shards + index
  assert (out / 'model.safetensors.index.json').exists()
  saved, _ = _read_all(out)
  assert saved.keys() == t.keys()
  for k, v in t.items():
    assert saved[k].dtype == v.dtype and np.array_equal(saved[k], v), k
  config = json.loads((out / 'config.json').read_text())
  assert (config['architectures'], config['num_local_experts'], config['num_experts_per_tok'],
          config['intermediate_size'], config['router_aux_loss_coef']) == (['MixtralForCausalLM'], E, K, FFN, 0.02)
  model2, params2 = bs.hf.load(out)
  assert model2.config == model.config
  got, want = _values(params2), _values(params)
  assert got.keys() == want.keys() and all(got[p].dtype == want[p].dtype and np.array_equal(got[p], want[p])
                                           for p in want)


def test_mixtral_load_onto_expert_mesh_equals_one_device(tmp_path):
  write_mixtral(tmp_path / 'hf')
  mesh_cfg = MeshConfig(data=1, fsdp=2, expert=2, tensor=2)
  _, sharded = bs.hf.load(tmp_path / 'hf', mesh=make_mesh(mesh_cfg), rules=rules_from_config(mesh_cfg))
  _, single = bs.hf.load(tmp_path / 'hf')
  wo = sharded[('lm', 'layers', 'block', 'moe', 'wo')].value
  assert wo.sharding.spec[1] == 'expert'  # each device reads only its experts' tensors
  got, want = _values(sharded), _values(single)
  assert all(np.array_equal(got[p], want[p]) for p in want)


def hf_to_blox_to_hf(tmp_path: Path, t: dict[str, np.ndarray]):
  """blox-convert hf-to-blox of tmp_path/hf (params equal bs.hf.load's), then blox-to-hf into tmp_path/out
  (tensors equal `t`, bitwise); returns the workdir's Config."""
  run_tool('convert', 'hf-to-blox', str(tmp_path / 'hf'), str(tmp_path / 'wd'), '--no-progress', cwd=REPO)
  config, _, params = load_for_inference(tmp_path / 'wd')
  _, reference = bs.hf.load(tmp_path / 'hf')
  got, want = _values(params), _values(reference)
  assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
  assert convert.main(['blox-to-hf', str(tmp_path / 'wd'), str(tmp_path / 'out'), '--no-progress']) == 0
  saved, _ = _read_all(tmp_path / 'out')
  assert saved.keys() == t.keys() and all(np.array_equal(saved[k], t[k]) for k in t)
  return config


def test_mixtral_hf_to_blox_then_blox_to_hf_is_bitwise(tmp_path):
  t = write_mixtral(tmp_path / 'hf', seed=3, vocab=256)  # the byte tokenizer's vocab
  config = hf_to_blox_to_hf(tmp_path, t)
  assert config.model.moe.num_experts == E and config.model.moe.dispatch == 'dropless'


def test_mixtral_bad_tensors_and_config_are_all_listed(tmp_path, capsys):
  t = write_mixtral(tmp_path / 'hf')
  del t[MOE.format(i=1) + 'experts.3.w2.weight']                                        # missing expert tensor
  t[MOE.format(i=0) + 'gate.weight'] = np.zeros((E + 1, D), np.float32)                  # misshaped router
  t[MOE.format(i=0) + f'experts.{E}.w1.weight'] = np.zeros((FFN, D), np.float32)         # one expert too many
  save_file(t, str(tmp_path / 'hf' / 'model.safetensors'))
  assert convert.main(['hf-to-blox', str(tmp_path / 'hf'), str(tmp_path / 'wd'), '--no-progress']) == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert sorted(lines) == sorted([
      f'blox-convert: error: model.layers.1.block_sparse_moe.experts.3.w2.weight: missing; expected shape [{D}, {FFN}] '
      f'for mixtral with num_layers={LAYERS}; check the checkpoint is complete and config.json matches',
      f'blox-convert: error: model.layers.0.block_sparse_moe.gate.weight: shape [{E + 1}, {D}], expected [{E}, {D}]; '
      'config.json and the tensors disagree',
      f'blox-convert: error: model.layers.0.block_sparse_moe.experts.{E}.w1.weight: unexpected; expert index beyond '
      f'num_experts={E} in config.json; remove it or fix config.json'])
  assert not (tmp_path / 'wd').exists()

  write_mixtral(tmp_path / 'hf2', sliding_window=0, router_jitter_noise=0.1)
  with pytest.raises(bs.hf.UnsupportedConfig) as e:
    bs.hf.load(tmp_path / 'hf2')
  assert {k for k, _, _ in e.value.problems} == {'config.json/sliding_window', 'config.json/router_jitter_noise'}
  # A pattern of dense and MoE layers (or softmax_topk routing) has no Mixtral layout: export names why.
  c = bs.hf.read_config(tmp_path / 'hf')[1]
  with pytest.raises(bs.hf.UnsupportedConfig, match='moe.every_n_layers=2'):
    bs.hf.hf_config(dataclasses.replace(c, moe=dataclasses.replace(c.moe, every_n_layers=2)))
