"""bs.hf: Hugging Face checkpoints in and out, against NumPy forwards written from HF's tensor names.

The checkpoints are written here in Hugging Face's layout (safetensors +
config.json, tiny shapes); the reference forwards below read the HF tensors
by name and follow transformers' modeling_llama.py / modeling_gpt2.py math,
without any of the project's conversion code.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import blox_scale as bs
from blox_scale.parallel.sharding import make_mesh, rules_from_config
from blox_scale.training.config import MeshConfig

VOCAB, D, LAYERS, HEADS, KV, HD, MLP, POS = 64, 32, 2, 4, 2, 8, 48, 32


def write_llama(path: Path, *, tie: bool = False, seed: int = 0, vocab: int = VOCAB, **extra) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
  t = {'model.embed_tokens.weight': w(vocab, D), 'model.norm.weight': 1 + w(D)}
  for i in range(LAYERS):
    p = f'model.layers.{i}.'
    t.update({p + 'self_attn.q_proj.weight': w(HEADS * HD, D), p + 'self_attn.k_proj.weight': w(KV * HD, D),
              p + 'self_attn.v_proj.weight': w(KV * HD, D), p + 'self_attn.o_proj.weight': w(D, HEADS * HD),
              p + 'mlp.gate_proj.weight': w(MLP, D), p + 'mlp.up_proj.weight': w(MLP, D),
              p + 'mlp.down_proj.weight': w(D, MLP), p + 'input_layernorm.weight': 1 + w(D),
              p + 'post_attention_layernorm.weight': 1 + w(D)})
  if not tie:
    t['lm_head.weight'] = w(vocab, D)
  config = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': vocab, 'hidden_size': D,
            'intermediate_size': MLP, 'num_hidden_layers': LAYERS, 'num_attention_heads': HEADS,
            'num_key_value_heads': KV, 'hidden_act': 'silu', 'max_position_embeddings': POS,
            'rms_norm_eps': 1e-5, 'rope_theta': 500000.0, 'tie_word_embeddings': tie, 'torch_dtype': 'float32', **extra}
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(json.dumps(config))
  save_file(t, str(path / 'model.safetensors'), metadata={'format': 'pt'})
  return t


def write_gpt2(path: Path, seed: int = 1, vocab: int = VOCAB) -> dict[str, np.ndarray]:
  """The layout of the original `gpt2` repo: no 'transformer.' prefix, causal-mask buffers stored."""
  rng = np.random.default_rng(seed)
  w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
  t = {'wte.weight': w(vocab, D), 'wpe.weight': w(POS, D), 'ln_f.weight': 1 + w(D), 'ln_f.bias': w(D)}
  for i in range(LAYERS):
    p = f'h.{i}.'
    t.update({p + 'ln_1.weight': 1 + w(D), p + 'ln_1.bias': w(D), p + 'attn.c_attn.weight': w(D, 3 * D),
              p + 'attn.c_attn.bias': w(3 * D), p + 'attn.c_proj.weight': w(D, D), p + 'attn.c_proj.bias': w(D),
              p + 'ln_2.weight': 1 + w(D), p + 'ln_2.bias': w(D), p + 'mlp.c_fc.weight': w(D, 4 * D),
              p + 'mlp.c_fc.bias': w(4 * D), p + 'mlp.c_proj.weight': w(4 * D, D), p + 'mlp.c_proj.bias': w(D)})
  buffers = {f'h.{i}.attn.bias': np.tril(np.ones((POS, POS), np.float32))[None, None] for i in range(LAYERS)}
  config = {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': vocab, 'n_embd': D,
            'n_layer': LAYERS, 'n_head': HEADS, 'n_positions': POS, 'n_ctx': POS, 'n_inner': None,
            'activation_function': 'gelu_new', 'layer_norm_epsilon': 1e-5}
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(json.dumps(config))
  save_file({**t, **buffers}, str(path / 'model.safetensors'), metadata={'format': 'pt'})
  return t


# -- NumPy references (float64), straight from the HF names -------------------------------------------


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _causal_attention(q, k, v, window: int = 0):  # [n, T, hd] each; window > 0: query i sees keys i-window < j <= i
  scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
  T = q.shape[1]
  allowed = np.tril(np.ones((T, T), bool))
  if window:
    allowed &= ~np.tril(np.ones((T, T), bool), -window)  # HF masking_utils: kv_idx > q_idx - sliding_window
  scores = np.where(allowed, scores, -np.inf)
  return _softmax(scores) @ v


def _swiglu_mlp(t: dict[str, np.ndarray], p: str, h: np.ndarray) -> np.ndarray:  # LlamaMLP of layer prefix p
  gate, up = h @ t[p + 'mlp.gate_proj.weight'].T, h @ t[p + 'mlp.up_proj.weight'].T
  return (gate / (1 + np.exp(-gate)) * up) @ t[p + 'mlp.down_proj.weight'].T


def llama_reference(t: dict[str, np.ndarray], ids: np.ndarray, theta: float = 500000.0, eps: float = 1e-5,
                    mlp=_swiglu_mlp, window: int = 0) -> np.ndarray:
  """float64 logits [T, vocab] of one sequence; `mlp(t, layer_prefix, h)` is each layer's MLP (Mixtral: its experts);
  window > 0 is Mistral's sliding window (0: full causal, Llama)."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  rms = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w
  T = ids.shape[0]
  inv_freq = 1.0 / theta ** (np.arange(0, HD, 2) / HD)
  emb = np.concatenate([np.outer(np.arange(T), inv_freq)] * 2, axis=-1)       # [T, hd]
  cos, sin = np.cos(emb), np.sin(emb)
  rotate_half = lambda x: np.concatenate([-x[..., HD // 2:], x[..., :HD // 2]], axis=-1)
  x = t['model.embed_tokens.weight'][ids]
  for i in range(LAYERS):
    p = f'model.layers.{i}.'
    h = rms(x, t[p + 'input_layernorm.weight'])
    q = (h @ t[p + 'self_attn.q_proj.weight'].T).reshape(T, HEADS, HD).transpose(1, 0, 2)
    k = (h @ t[p + 'self_attn.k_proj.weight'].T).reshape(T, KV, HD).transpose(1, 0, 2)
    v = (h @ t[p + 'self_attn.v_proj.weight'].T).reshape(T, KV, HD).transpose(1, 0, 2)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, HEADS // KV, axis=0), np.repeat(v, HEADS // KV, axis=0)  # HF repeat_kv
    a = _causal_attention(q, k, v, window).transpose(1, 0, 2).reshape(T, HEADS * HD)
    x = x + a @ t[p + 'self_attn.o_proj.weight'].T
    x = x + mlp(t, p, rms(x, t[p + 'post_attention_layernorm.weight']))
  head = t.get('lm_head.weight', t['model.embed_tokens.weight'])
  return rms(x, t['model.norm.weight']) @ head.T


def gpt2_reference(t: dict[str, np.ndarray], ids: np.ndarray, eps: float = 1e-5) -> np.ndarray:
  t = {k: v.astype(np.float64) for k, v in t.items()}
  ln = lambda x, w, b: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b
  gelu_new = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  T = ids.shape[0]
  x = t['wte.weight'][ids] + t['wpe.weight'][:T]
  for i in range(LAYERS):
    p = f'h.{i}.'
    h = ln(x, t[p + 'ln_1.weight'], t[p + 'ln_1.bias'])
    qkv = h @ t[p + 'attn.c_attn.weight'] + t[p + 'attn.c_attn.bias']          # Conv1D: x @ W, W (in, out)
    q, k, v = (z.reshape(T, HEADS, D // HEADS).transpose(1, 0, 2) for z in np.split(qkv, 3, axis=-1))
    a = _causal_attention(q, k, v).transpose(1, 0, 2).reshape(T, D)
    x = x + a @ t[p + 'attn.c_proj.weight'] + t[p + 'attn.c_proj.bias']
    h = ln(x, t[p + 'ln_2.weight'], t[p + 'ln_2.bias'])
    x = x + gelu_new(h @ t[p + 'mlp.c_fc.weight'] + t[p + 'mlp.c_fc.bias']) @ t[p + 'mlp.c_proj.weight'] + t[p + 'mlp.c_proj.bias']
  return ln(x, t['ln_f.weight'], t['ln_f.bias']) @ t['wte.weight'].T


IDS = np.array([[3, 17, 42, 5, 63, 0, 9, 28, 11, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], np.int32)


def _logits(model, params):
  logits, _ = jax.jit(model.__call__)(params, IDS)
  return np.asarray(logits)


# -- tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('tie', [False, True])
def test_llama_logits_match_numpy(tmp_path, tie):
  t = write_llama(tmp_path / 'hf', tie=tie)
  model, params = bs.hf.load(tmp_path / 'hf', dtype='float32')
  assert model.config.rope_theta == 500000.0 and model.config.num_kv_heads == KV
  assert model.config.tie_embeddings == tie
  logits = _logits(model, params)
  assert logits.shape == (2, IDS.shape[1], VOCAB) and logits.dtype == np.float32
  for b in range(2):
    np.testing.assert_allclose(logits[b], llama_reference(t, IDS[b]), rtol=2e-5, atol=2e-5)


def test_gpt2_logits_match_numpy(tmp_path):
  t = write_gpt2(tmp_path / 'hf')
  model, params = bs.hf.load(tmp_path / 'hf')
  logits = _logits(model, params)
  for b in range(2):
    np.testing.assert_allclose(logits[b], gpt2_reference(t, IDS[b]), rtol=2e-5, atol=2e-5)


def _read_all(directory: Path) -> tuple[dict[str, np.ndarray], set[str]]:
  out, metas = {}, set()
  for f in sorted(directory.glob('*.safetensors')):
    with safe_open(f, 'numpy') as h:
      metas.add(json.dumps(h.metadata()))
      out.update({k: h.get_tensor(k) for k in h.keys()})
  return out, metas


@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_save_then_load_is_bitwise_and_sharded_index_loads(tmp_path, family):
  t = write_llama(tmp_path / 'hf') if family == 'llama' else write_gpt2(tmp_path / 'hf')
  model, params = bs.hf.load(tmp_path / 'hf')
  out = bs.hf.save(model, params, tmp_path / 'out', max_shard_size=8_000)  # several shards + index
  index = json.loads((out / 'model.safetensors.index.json').read_text())
  files = sorted(p.name for p in out.glob('*.safetensors'))
  assert len(files) > 2 and sorted(set(index['weight_map'].values())) == files
  assert files[0] == f'model-00001-of-{len(files):05d}.safetensors'
  saved, metas = _read_all(out)
  assert metas == {json.dumps({'format': 'pt'})}
  assert index['metadata']['total_size'] == sum(v.nbytes for v in saved.values())
  # The HF tensors come back byte for byte, under the names the HF class saves (GPT2LMHeadModel: 'transformer.').
  prefix = 'transformer.' if family == 'gpt2' else ''
  assert set(saved) == {prefix + k for k in t}
  for k, v in t.items():
    assert saved[prefix + k].dtype == v.dtype and np.array_equal(saved[prefix + k], v), k
  config = json.loads((out / 'config.json').read_text())
  assert config['model_type'] == family and config['torch_dtype'] == 'float32'
  model2, params2 = bs.hf.load(out)
  assert model2.config == model.config and set(params2.keys()) == set(params.keys())
  for path, p in params.items():
    a, b = np.asarray(jax.random.key_data(p.value) if path[-1] == 'seed' else p.value), params2[path].value
    b = np.asarray(jax.random.key_data(b) if path[-1] == 'seed' else b)
    assert a.dtype == b.dtype and np.array_equal(a, b), path


def test_save_bfloat16_and_single_file(tmp_path):
  write_llama(tmp_path / 'hf', tie=True)
  model, params = bs.hf.load(tmp_path / 'hf', dtype='bfloat16')
  assert params[('lm', 'layers', 'block', 'attn', 'q')].value.dtype == jax.numpy.bfloat16
  out = bs.hf.save(model, params, tmp_path / 'out')
  assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors']
  with safe_open(out / 'model.safetensors', 'numpy') as h:
    assert 'lm_head.weight' not in h.keys()  # tied, as save_pretrained writes it
    assert h.get_slice('model.norm.weight').get_dtype() == 'BF16'
  assert json.loads((out / 'config.json').read_text())['torch_dtype'] == 'bfloat16'
  with pytest.raises(FileExistsError, match='overwrite=True'):
    bs.hf.save(model, params, tmp_path / 'out')


def test_renamed_missing_misshaped_tensors_are_all_listed(tmp_path):
  t = write_llama(tmp_path / 'hf')
  t['model.layers.0.self_attn.qq_proj.weight'] = t.pop('model.layers.0.self_attn.q_proj.weight')  # renamed
  del t['model.layers.1.mlp.up_proj.weight']                                                     # missing
  t['model.norm.weight'] = np.ones(D + 1, np.float32)                                             # misshaped
  save_file(t, str(tmp_path / 'hf' / 'model.safetensors'))
  with pytest.raises(bs.hf.ConversionError) as e:
    bs.hf.load(tmp_path / 'hf')
  problems = {k: what for k, what, fix in e.value.problems}
  assert problems == {
      'model.layers.0.self_attn.q_proj.weight': 'missing',
      'model.layers.1.mlp.up_proj.weight': 'missing',
      'model.layers.0.self_attn.qq_proj.weight': 'unexpected',
      'model.norm.weight': f'shape [{D + 1}], expected [{D}]',
  }


def test_unrepresentable_config_fields_are_named(tmp_path):
  write_llama(tmp_path / 'hf', rope_scaling={'type': 'linear', 'factor': 2.0}, hidden_act='gelu')
  with pytest.raises(bs.hf.UnsupportedConfig, match='config.json/rope_scaling') as e:
    bs.hf.load(tmp_path / 'hf')
  assert {k for k, _, _ in e.value.problems} == {'config.json/rope_scaling', 'config.json/hidden_act'}


@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_load_onto_fsdp4_tensor2_mesh_equals_one_device(tmp_path, family):
  write_llama(tmp_path / 'hf') if family == 'llama' else write_gpt2(tmp_path / 'hf')
  mesh_cfg = MeshConfig(data=1, fsdp=4, tensor=2)
  mesh = make_mesh(mesh_cfg)
  model, sharded = bs.hf.load(tmp_path / 'hf', mesh=mesh, rules=rules_from_config(mesh_cfg))
  _, single = bs.hf.load(tmp_path / 'hf')
  q = sharded[('lm', 'layers', 'block', 'attn', 'q')].value
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  for path, p in single.items():
    if path[-1] != 'seed':
      assert np.array_equal(np.asarray(p.value), np.asarray(sharded[path].value)), path
  reference = _logits(model, single)
  with bs.use_mesh_rules(mesh, rules_from_config(mesh_cfg)):
    np.testing.assert_allclose(_logits(model, sharded), reference, rtol=1e-5, atol=1e-5)
