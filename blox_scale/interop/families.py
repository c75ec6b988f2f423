"""Hugging Face model families as tables: tensor-name rules and a config mapping.

A family is data, not a code path: a list of `Rule`s (one Hugging Face tensor
<-> one or more blox params, per layer, per layer and expert, or neither) and two functions between
Hugging Face's `config.json` and `ModelConfig`. Adding Qwen2 is a
new table here; `hf.py` and the converter do not change.

Layouts (blox params, per layer, see blox_scale/nn/attention.py and mlp.py):
  attn/q [embed, heads, head_dim], attn/k, attn/v [embed, kv_heads, head_dim],
  attn/o [heads, head_dim, embed], mlp kernels [in, out]; MoE (nn/moe.py):
  moe/router [embed, experts] (float32), moe/wi_gate, moe/wi_up [experts, embed, mlp],
  moe/wo [experts, mlp, embed].
Hugging Face `nn.Linear` weights are stored (out, in); GPT-2's `Conv1D`
weights are stored (in, out).

RoPE: Hugging Face's Llama checkpoints are already permuted to the "rotate
half" layout (`rotate_half` pairs dim j with j + head_dim/2), which is exactly
the pairing of blox_scale/nn/rope.py, so q/k weights need no permutation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from blox_scale.models.config import ModelConfig
from blox_scale.nn.config import MoEConfig

Arrays = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  """One Hugging Face tensor <-> the blox param(s) it holds.

  hf: the tensor name; '{i}' stands for the layer index (a per-layer rule),
    '{e}' for the expert index (a per-expert rule, also per layer).
  blox: the param names under the model root ('layers/block/attn/q'); a
    per-layer rule fills row i of each stacked param, a per-expert rule row
    [i, e] of a stacked `[layers, experts, ...]` param.
  to_blox: `(hf_tensor, cfg) -> arrays` in blox layout, one per `blox` name
    (for a per-expert rule: one expert's row).
  to_hf: `(arrays, cfg) -> hf_tensor`, the exact inverse.
  hf_shape: `cfg -> shape` of the Hugging Face tensor (checked before reading).
  """
  hf: str
  blox: tuple[str, ...]
  to_blox: Callable[[np.ndarray, ModelConfig], Arrays]
  to_hf: Callable[[Arrays, ModelConfig], np.ndarray]
  hf_shape: Callable[[ModelConfig], tuple[int, ...]]

  @property
  def per_layer(self) -> bool:
    return '{i}' in self.hf

  @property
  def per_expert(self) -> bool:
    return '{e}' in self.hf


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: its name rules and its config mapping."""
  name: str
  model_type: str                       # config.json's model_type
  architecture: str                     # config.json's architectures[0]
  rules: Callable[[ModelConfig], list[Rule]]
  from_hf: Callable[[dict[str, Any]], ModelConfig]
  to_hf: Callable[[ModelConfig], dict[str, Any]]
  matches: Callable[[ModelConfig], bool]  # can this family export the model?
  save_prefix: str = ''                 # prefix save writes (what the HF class saves)
  load_prefixes: tuple[str, ...] = ('',)  # prefixes stripped on load
  ignore: tuple[str, ...] = ()          # tensor-name suffixes that are buffers, not weights


class UnsupportedConfig(ValueError):
  """config.json sets fields the blox model cannot represent; `.problems` lists them."""

  def __init__(self, problems: list[tuple[str, str, str]]):
    self.problems = problems
    super().__init__('\n'.join(f'{k}: {what}; {fix}' for k, what, fix in problems))


def _dims(c: ModelConfig) -> tuple[int, int, int, int]:
  """(d_model, heads, kv_heads, head_dim)."""
  return c.d_model, c.num_heads, c.num_kv_heads or c.num_heads, c.head_dim or c.d_model // c.num_heads


def _identity(name: str, blox: str, shape: Callable[[ModelConfig], tuple[int, ...]]) -> Rule:
  return Rule(name, (blox,), lambda t, c: (t,), lambda a, c: a[0], shape)


def _linear_t(name: str, blox: str, out_in: Callable[[ModelConfig], tuple[int, int]]) -> Rule:
  """nn.Linear weight (out, in) <-> blox kernel (in, out)."""
  return Rule(name, (blox,), lambda t, c: (t.T,), lambda a, c: a[0].T, out_in)


def _check(problems: list, hf: dict[str, Any], key: str, ok: Callable[[Any], bool], default: Any, what: str,
           fix: str) -> None:
  value = hf.get(key, default)
  if not ok(value):
    problems.append((f'config.json/{key}', f'{value!r} {what}', fix))


def _require(hf: dict[str, Any], keys: tuple[str, ...]) -> None:
  missing = [k for k in keys if k not in hf]
  if missing:
    raise UnsupportedConfig([(f'config.json/{k}', 'is missing', 'add it (Hugging Face writes it)') for k in missing])


# -----------------------------------------------------------------------------
# Llama (LlamaForCausalLM; also TinyLlama, SmolLM and other Llama-architecture models)
# -----------------------------------------------------------------------------


def _llama_rules(c: ModelConfig) -> list[Rule]:
  d, n, k, h = _dims(c)
  L = 'model.layers.{i}.'
  heads = lambda num: Rule(  # q/k/v_proj (num*h, d) <-> [d, num, h]
      '', (), lambda t, c, num=num: (t.T.reshape(d, num, h),), lambda a, c: a[0].reshape(d, -1).T,
      lambda c, num=num: (num * h, d))
  rules = [
      _identity('model.embed_tokens.weight', 'embed/embedding', lambda c: (c.vocab_size, d)),
      dataclasses.replace(heads(n), hf=L + 'self_attn.q_proj.weight', blox=('layers/block/attn/q',)),
      dataclasses.replace(heads(k), hf=L + 'self_attn.k_proj.weight', blox=('layers/block/attn/k',)),
      dataclasses.replace(heads(k), hf=L + 'self_attn.v_proj.weight', blox=('layers/block/attn/v',)),
      Rule(L + 'self_attn.o_proj.weight', ('layers/block/attn/o',),  # (d, n*h) <-> [n, h, d]
           lambda t, c: (t.T.reshape(n, h, d),), lambda a, c: a[0].reshape(-1, d).T, lambda c: (d, n * h)),
      _linear_t(L + 'mlp.gate_proj.weight', 'layers/block/mlp/wi_gate/kernel', lambda c: (c.mlp_dim, d)),
      _linear_t(L + 'mlp.up_proj.weight', 'layers/block/mlp/wi_up/kernel', lambda c: (c.mlp_dim, d)),
      _linear_t(L + 'mlp.down_proj.weight', 'layers/block/mlp/wo/kernel', lambda c: (d, c.mlp_dim)),
      _identity(L + 'input_layernorm.weight', 'layers/block/norm_1/scale', lambda c: (d,)),
      _identity(L + 'post_attention_layernorm.weight', 'layers/block/norm_2/scale', lambda c: (d,)),
      _identity('model.norm.weight', 'final_norm/scale', lambda c: (d,)),
  ]
  if c.use_bias:
    for proj, num, name in (('q', n, 'q'), ('k', k, 'k'), ('v', k, 'v')):
      rules.append(Rule(L + f'self_attn.{proj}_proj.bias', (f'layers/block/attn/{name}_bias',),
                        lambda t, c, num=num: (t.reshape(num, h),), lambda a, c: a[0].reshape(-1),
                        lambda c, num=num: (num * h,)))
    rules.append(_identity(L + 'self_attn.o_proj.bias', 'layers/block/attn/o_bias', lambda c: (d,)))
    for proj, name, size in (('gate', 'wi_gate', c.mlp_dim), ('up', 'wi_up', c.mlp_dim), ('down', 'wo', d)):
      rules.append(_identity(L + f'mlp.{proj}_proj.bias', f'layers/block/mlp/{name}/bias', lambda c, s=size: (s,)))
  if not c.tie_embeddings:
    rules.append(_linear_t('lm_head.weight', 'head/kernel', lambda c: (c.vocab_size, d)))
  return rules


def _llama_from_hf(hf: dict[str, Any]) -> ModelConfig:
  _require(hf, ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads'))
  problems: list[tuple[str, str, str]] = []
  _check(problems, hf, 'hidden_act', lambda v: v == 'silu', 'silu', 'is not supported (blox MLP: swiglu = silu gate)',
         "only 'silu' converts")
  _check(problems, hf, 'rope_scaling', lambda v: v is None, None, 'is not supported (blox RoPE has no scaling)',
         'use a checkpoint without rope_scaling')
  _check(problems, hf, 'mlp_bias', lambda v: v == hf.get('attention_bias', False), False,
         f"differs from attention_bias={hf.get('attention_bias', False)!r} (blox model.use_bias covers both)",
         'both must be equal')
  _check(problems, hf, 'sliding_window', lambda v: v is None, None,
         'is not supported for the llama family (LlamaForCausalLM attends to every earlier position)',
         "remove it, or use model_type 'mistral' (MistralForCausalLM) for a windowed model")
  if problems:
    raise UnsupportedConfig(problems)
  heads = hf['num_attention_heads']
  return ModelConfig(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], num_layers=hf['num_hidden_layers'],
      num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads, mlp_dim=hf['intermediate_size'],
      mlp_activation='swiglu', norm='rmsnorm', norm_eps=float(hf.get('rms_norm_eps', 1e-6)), position='rope',
      rope_theta=float(hf.get('rope_theta', 10000.0)), max_seq_len=hf.get('max_position_embeddings', 2048),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)), use_bias=bool(hf.get('attention_bias', False)),
      init_std=float(hf.get('initializer_range', 0.02)))


def _llama_to_hf(c: ModelConfig) -> dict[str, Any]:
  d, n, k, h = _dims(c)
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': c.vocab_size,
      'hidden_size': d, 'intermediate_size': c.mlp_dim, 'num_hidden_layers': c.num_layers,
      'num_attention_heads': n, 'num_key_value_heads': k, 'head_dim': h, 'hidden_act': 'silu',
      'max_position_embeddings': c.max_seq_len, 'rms_norm_eps': c.norm_eps, 'rope_theta': c.rope_theta,
      'rope_scaling': None, 'tie_word_embeddings': c.tie_embeddings, 'attention_bias': c.use_bias,
      'mlp_bias': c.use_bias, 'attention_dropout': 0.0, 'initializer_range': c.init_std, 'pretraining_tp': 1,
      'use_cache': True,
  }


def _llama_matches(c: ModelConfig) -> bool:
  return ((c.position, c.norm, c.mlp_activation, c.qk_norm, c.sliding_window, c.moe.num_experts)
          == ('rope', 'rmsnorm', 'swiglu', False, 0, 0))


LLAMA = Family('llama', 'llama', 'LlamaForCausalLM', _llama_rules, _llama_from_hf, _llama_to_hf, _llama_matches,
               ignore=('rotary_emb.inv_freq',))


# -----------------------------------------------------------------------------
# Mistral (MistralForCausalLM): Llama's tensors and config plus a sliding window
# -----------------------------------------------------------------------------


def _sliding_window(problems: list, hf: dict[str, Any], default: int | None) -> int:
  """config.json's sliding_window -> model.sliding_window (0 = full causal).

  Hugging Face (masking_utils.sliding_window_causal_mask_function) lets query i
  attend key j iff i - sliding_window < j <= i, which is blox's
  `attention_mask` and `local_window_size=(window - 1, 0)`. null, or a window
  of at least max_position_embeddings (it never masks a key then), is 0.
  """
  w = hf.get('sliding_window', default)
  if w is None:
    return 0
  if isinstance(w, bool) or not isinstance(w, int) or w < 1:
    problems.append(('config.json/sliding_window', f'{w!r} is not a window size',
                     'use a positive integer, or null for full causal attention'))
    return 0
  return 0 if w >= hf.get('max_position_embeddings', 2048) else w


def _windowed_llama_from_hf(hf: dict[str, Any], family: str,
                            default_window: int | None) -> tuple[ModelConfig | None, list]:
  """Llama's mapping plus sliding_window, no biases (Mistral and Mixtral have none): (config or None, problems)."""
  problems: list[tuple[str, str, str]] = []
  try:
    base = _llama_from_hf({k: v for k, v in hf.items() if k not in ('sliding_window', 'attention_bias', 'mlp_bias')})
  except UnsupportedConfig as e:
    problems, base = list(e.problems), None
  window = _sliding_window(problems, hf, default_window)
  _check(problems, hf, 'attention_bias', lambda v: not v, False, f'is not supported ({family} has no biases)',
         'only false converts')
  return (None if base is None else dataclasses.replace(base, sliding_window=window)), problems


def _mistral_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """Llama's mapping plus sliding_window; a missing key is MistralConfig's default, 4096."""
  config, problems = _windowed_llama_from_hf(hf, 'mistral', 4096)
  if problems:
    raise UnsupportedConfig(problems)
  return config


def _mistral_to_hf(c: ModelConfig) -> dict[str, Any]:
  llama_only = ('attention_bias', 'mlp_bias', 'pretraining_tp', 'rope_scaling')
  return {**{k: v for k, v in _llama_to_hf(c).items() if k not in llama_only},
          'architectures': ['MistralForCausalLM'], 'model_type': 'mistral', 'sliding_window': c.sliding_window or None}


def _mistral_matches(c: ModelConfig) -> bool:  # windowed only: without a window the model exports as Llama
  return (c.sliding_window > 0 and not c.use_bias
          and _llama_matches(dataclasses.replace(c, sliding_window=0)))


MISTRAL = Family('mistral', 'mistral', 'MistralForCausalLM', _llama_rules, _mistral_from_hf, _mistral_to_hf,
                 _mistral_matches, ignore=('rotary_emb.inv_freq',))


# -----------------------------------------------------------------------------
# GPT-2 (GPT2LMHeadModel)
# -----------------------------------------------------------------------------


def _gpt2_rules(c: ModelConfig) -> list[Rule]:
  d, n, _, h = _dims(c)
  L = 'h.{i}.'

  def split_qkv(t: np.ndarray, c: ModelConfig) -> Arrays:  # c_attn.weight (d, 3d) -> 3 x [d, n, h]
    return tuple(part.reshape(*t.shape[:-1], n, h) for part in np.split(t, 3, axis=-1))

  def fuse_qkv(a: Arrays, c: ModelConfig) -> np.ndarray:
    return np.concatenate([x.reshape(*x.shape[:-2], n * h) for x in a], axis=-1)

  qkv = ('layers/block/attn/q', 'layers/block/attn/k', 'layers/block/attn/v')
  rules = [
      _identity('wte.weight', 'embed/embedding', lambda c: (c.vocab_size, d)),
      _identity('wpe.weight', 'pos_embed/embedding', lambda c: (c.max_seq_len, d)),
      _identity(L + 'ln_1.weight', 'layers/block/norm_1/scale', lambda c: (d,)),
      _identity(L + 'ln_1.bias', 'layers/block/norm_1/bias', lambda c: (d,)),
      Rule(L + 'attn.c_attn.weight', qkv, split_qkv, fuse_qkv, lambda c: (d, 3 * n * h)),
      Rule(L + 'attn.c_attn.bias', tuple(p + '_bias' for p in qkv), split_qkv, fuse_qkv, lambda c: (3 * n * h,)),
      Rule(L + 'attn.c_proj.weight', ('layers/block/attn/o',),  # Conv1D (n*h, d) <-> [n, h, d]
           lambda t, c: (t.reshape(n, h, d),), lambda a, c: a[0].reshape(n * h, d), lambda c: (n * h, d)),
      _identity(L + 'attn.c_proj.bias', 'layers/block/attn/o_bias', lambda c: (d,)),
      _identity(L + 'ln_2.weight', 'layers/block/norm_2/scale', lambda c: (d,)),
      _identity(L + 'ln_2.bias', 'layers/block/norm_2/bias', lambda c: (d,)),
      _identity(L + 'mlp.c_fc.weight', 'layers/block/mlp/wi/kernel', lambda c: (d, c.mlp_dim)),
      _identity(L + 'mlp.c_fc.bias', 'layers/block/mlp/wi/bias', lambda c: (c.mlp_dim,)),
      _identity(L + 'mlp.c_proj.weight', 'layers/block/mlp/wo/kernel', lambda c: (c.mlp_dim, d)),
      _identity(L + 'mlp.c_proj.bias', 'layers/block/mlp/wo/bias', lambda c: (d,)),
      _identity('ln_f.weight', 'final_norm/scale', lambda c: (d,)),
      _identity('ln_f.bias', 'final_norm/bias', lambda c: (d,)),
  ]
  if not c.tie_embeddings:
    rules.append(_linear_t('lm_head.weight', 'head/kernel', lambda c: (c.vocab_size, d)))
  return rules


def _gpt2_from_hf(hf: dict[str, Any]) -> ModelConfig:
  _require(hf, ('vocab_size', 'n_embd', 'n_layer', 'n_head', 'n_positions'))
  problems: list[tuple[str, str, str]] = []
  _check(problems, hf, 'activation_function', lambda v: v in ('gelu_new', 'gelu_pytorch_tanh'), 'gelu_new',
         'is not supported (blox gelu is the tanh approximation)', "use 'gelu_new'")
  _check(problems, hf, 'scale_attn_weights', lambda v: v is True, True, 'is not supported',
         'blox always scales attention by 1/sqrt(head_dim)')
  _check(problems, hf, 'scale_attn_by_inverse_layer_idx', lambda v: v is False, False, 'is not supported',
         'only False converts')
  _check(problems, hf, 'add_cross_attention', lambda v: v is False, False, 'is not supported',
         'blox is decoder-only')
  if problems:
    raise UnsupportedConfig(problems)
  d = hf['n_embd']
  return ModelConfig(
      vocab_size=hf['vocab_size'], d_model=d, num_layers=hf['n_layer'], num_heads=hf['n_head'],
      mlp_dim=hf.get('n_inner') or 4 * d, mlp_activation='gelu', norm='layernorm',
      norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)), position='learned', max_seq_len=hf['n_positions'],
      tie_embeddings=bool(hf.get('tie_word_embeddings', True)), use_bias=True,
      init_std=float(hf.get('initializer_range', 0.02)))


def _gpt2_to_hf(c: ModelConfig) -> dict[str, Any]:
  return {
      'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': c.vocab_size, 'n_embd': c.d_model,
      'n_layer': c.num_layers, 'n_head': c.num_heads, 'n_inner': c.mlp_dim, 'n_positions': c.max_seq_len,
      'n_ctx': c.max_seq_len, 'activation_function': 'gelu_new', 'layer_norm_epsilon': c.norm_eps,
      'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0, 'scale_attn_weights': True,
      'scale_attn_by_inverse_layer_idx': False, 'reorder_and_upcast_attn': False,
      'tie_word_embeddings': c.tie_embeddings, 'initializer_range': c.init_std, 'use_cache': True,
  }


def _gpt2_matches(c: ModelConfig) -> bool:
  d, n, k, h = _dims(c)
  return ((c.position, c.norm, c.mlp_activation, c.use_bias, c.qk_norm, c.sliding_window, c.moe.num_experts)
          == ('learned', 'layernorm', 'gelu', True, False, 0, 0) and k == n and n * h == d)


GPT2 = Family('gpt2', 'gpt2', 'GPT2LMHeadModel', _gpt2_rules, _gpt2_from_hf, _gpt2_to_hf, _gpt2_matches,
              save_prefix='transformer.', load_prefixes=('transformer.', ''),
              ignore=('attn.bias', 'attn.masked_bias'))

# -----------------------------------------------------------------------------
# Mixtral (MixtralForCausalLM): Llama's attention, norms, embeddings and head; a MoE MLP in every layer
# -----------------------------------------------------------------------------


def _mixtral_rules(c: ModelConfig) -> list[Rule]:
  d, f, E = c.d_model, c.moe.mlp_dim or c.mlp_dim, c.moe.num_experts
  L, X = 'model.layers.{i}.block_sparse_moe.', 'model.layers.{i}.block_sparse_moe.experts.{e}.'
  return [r for r in _llama_rules(c) if '.mlp.' not in r.hf] + [
      _linear_t(L + 'gate.weight', 'layers/block/moe/router', lambda c: (E, d)),      # [E, d] <-> [d, E]
      _linear_t(X + 'w1.weight', 'layers/block/moe/wi_gate', lambda c: (f, d)),       # per expert [f, d] <-> [d, f]
      _linear_t(X + 'w3.weight', 'layers/block/moe/wi_up', lambda c: (f, d)),
      _linear_t(X + 'w2.weight', 'layers/block/moe/wo', lambda c: (d, f)),            # [d, f] <-> [f, d]
  ]


def _mixtral_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """Llama's mapping plus model.moe: dropless (no token dropped, as Hugging Face computes), topk_softmax
  routing; router_aux_loss_coef * num_experts_per_tok is the aux-loss weight (HF's f_e counts each of the
  k choices, blox's is a fraction of the N*k assignments); no z-loss (Mixtral has none); sliding_window as
  Mistral's (a missing key is MixtralConfig's default, null)."""
  _require(hf, ('num_local_experts', 'intermediate_size'))
  base, problems = _windowed_llama_from_hf(hf, 'mixtral', None)
  _check(problems, hf, 'router_jitter_noise', lambda v: not v, 0.0, 'is not supported (blox routers add no noise)',
         'use 0.0')
  experts, top_k = hf['num_local_experts'], hf.get('num_experts_per_tok', 2)
  _check(problems, hf, 'num_experts_per_tok', lambda v: isinstance(v, int) and 1 <= v <= experts, 2,
         f'must be in [1, num_local_experts={experts}]', 'fix config.json')
  if problems:
    raise UnsupportedConfig(problems)
  moe = MoEConfig(num_experts=experts, top_k=top_k, every_n_layers=1, mlp_dim=0, dispatch='dropless',
                  routing='topk_softmax', aux_loss_weight=float(hf.get('router_aux_loss_coef', 0.001)) * top_k,
                  z_loss_weight=0.0)
  return dataclasses.replace(base, moe=moe)


def _mixtral_to_hf(c: ModelConfig) -> dict[str, Any]:
  m = c.moe
  return {
      **_mistral_to_hf(c), 'architectures': ['MixtralForCausalLM'], 'model_type': 'mixtral',
      'intermediate_size': m.mlp_dim or c.mlp_dim, 'num_local_experts': m.num_experts,
      'num_experts_per_tok': m.top_k, 'router_aux_loss_coef': m.aux_loss_weight / m.top_k,
      'output_router_logits': False, 'router_jitter_noise': 0.0,
  }


def _mixtral_matches(c: ModelConfig) -> bool:
  m = c.moe
  return ((c.position, c.norm, c.mlp_activation, c.qk_norm, c.use_bias)
          == ('rope', 'rmsnorm', 'swiglu', False, False)
          and m.num_experts > 0 and m.every_n_layers == 1 and m.routing == 'topk_softmax')


MIXTRAL = Family('mixtral', 'mixtral', 'MixtralForCausalLM', _mixtral_rules, _mixtral_from_hf, _mixtral_to_hf,
                 _mixtral_matches, ignore=('rotary_emb.inv_freq',))

FAMILIES = {f.model_type: f for f in (LLAMA, MISTRAL, GPT2, MIXTRAL)}


def family_for_hf(hf: dict[str, Any]) -> Family:
  model_type = hf.get('model_type')
  if model_type not in FAMILIES:
    raise UnsupportedConfig([('config.json/model_type', f'{model_type!r} has no conversion table',
                              f'supported: {sorted(FAMILIES)} (add a table in blox_scale/interop/families.py)')])
  return FAMILIES[model_type]


def family_for_model(c: ModelConfig) -> Family:
  for family in FAMILIES.values():
    if family.matches(c):
      return family
  raise UnsupportedConfig([(
      'model', f'position={c.position!r}, norm={c.norm!r}, mlp_activation={c.mlp_activation!r}, use_bias={c.use_bias}, '
      f'qk_norm={c.qk_norm}, sliding_window={c.sliding_window}, moe.num_experts={c.moe.num_experts}, '
      f'moe.every_n_layers={c.moe.every_n_layers}, moe.routing={c.moe.routing!r} matches no Hugging Face family',
      "llama: rope + rmsnorm + swiglu, no sliding_window; mistral: llama's without use_bias, sliding_window > 0; "
      'gpt2: learned + layernorm + gelu + use_bias; '
      "mixtral: llama's + model.moe with every_n_layers 1, routing topk_softmax and no use_bias")])
