"""One frozen config per block family: `Attention(graph, AttentionConfig(...), rng)`.

Each block takes a small config (nanoGPT's `Block(config)`) instead of a
long keyword list restated at every level. The defaults and one-line docs
live here, once: `ModelConfig` (models/config.py) declares its matching
fields with `inherit(...)`, and `ModelConfig.block_config()` derives these configs
by copying every field of the same name, so a new block option is one field
here, one `inherit` line there, and its use in the block.

  attn = Attention(graph, AttentionConfig(num_heads=8, num_kv_heads=2), rng)
  block = TransformerBlock(graph, model_config.block_config(), rng)
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax.numpy as jnp


def field(default: Any, doc: str) -> Any:
  """A dataclass field with a default and its one-line documentation."""
  if isinstance(default, (dict, list)):
    return dataclasses.field(default_factory=lambda: type(default)(default), metadata={'doc': doc})
  return dataclasses.field(default=default, metadata={'doc': doc})


def inherit(config_class: type, name: str) -> Any:
  """The field `name` of `config_class` (same default and doc), for a config that repeats it."""
  f = config_class.__dataclass_fields__[name]
  return field(f.default, f.metadata['doc'])


def derive(config_class: type, source: Any, **explicit: Any) -> Any:
  """`config_class` from the fields of `source` with the same names, then `explicit`."""
  names = [f.name for f in dataclasses.fields(config_class)]
  same = {n: getattr(source, n) for n in names if n not in explicit and hasattr(source, n)}
  return config_class(**same, **explicit)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Causal self-attention: MHA, GQA or MQA, RoPE, QK-norm, sliding window (nn/attention.py)."""
  num_heads: int = field(4, 'Query heads per attention layer.')
  num_kv_heads: int = field(0, 'Key/value heads (0 = num_heads; 1 = multi-query; else grouped-query).')
  head_dim: int = field(0, 'Per-head width (0 = d_model // num_heads).')
  qk_norm: bool = field(False, 'RMS-normalise queries and keys per head before attention.')
  norm_eps: float = field(1e-5, 'Epsilon of the norms.')
  use_rope: bool = field(True, 'Rotate queries and keys by position (RoPE); False: no positions in attention.')
  rope_theta: float = field(10000.0, 'RoPE base frequency.')
  sliding_window: int = field(0, 'Attend only to the last N positions (0 = full causal attention).')
  use_bias: bool = field(False, 'Biases in attention and MLP projections.')
  init_std: float = field(0.02, 'Stddev of the normal initialiser for embeddings and projections.')
  out_init_std: float | None = field(None, 'Stddev of the output projection o (None = init_std).')
  implementation: str | None = field(None, "jax.nn.dot_product_attention implementation: None/'xla' (any platform) or 'cudnn'.")
  param_dtype: Any = field(jnp.float32, 'Storage dtype of the params.')
  dtype: Any = field(None, 'Compute dtype (None: the promotion of the inputs and params).')


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """Transformer MLP: GELU (GPT-2) or SwiGLU (Llama) (nn/mlp.py)."""
  mlp_dim: int = field(512, 'Hidden width of the MLP.')
  d_model: int = field(128, 'Width of the residual stream.')
  activation: str = field('swiglu', "MLP type: 'swiglu' (gated SiLU) or 'gelu'.")
  use_bias: bool = inherit(AttentionConfig, 'use_bias')
  init_std: float = inherit(AttentionConfig, 'init_std')
  out_init_std: float | None = field(None, 'Stddev of the output projection wo (None = init_std).')
  param_dtype: Any = inherit(AttentionConfig, 'param_dtype')
  dtype: Any = inherit(AttentionConfig, 'dtype')


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Pre-norm transformer block: norms, residual dropout, attention and MLP (nn/block.py).

  `BlockConfig.create(d_model=64, num_heads=4, mlp_dim=256, dtype=jnp.bfloat16)`
  fills the block and both parts from one set of names.
  """
  d_model: int = inherit(MLPConfig, 'd_model')
  norm: str = field('rmsnorm', "Normalisation: 'rmsnorm' or 'layernorm'.")
  norm_eps: float = inherit(AttentionConfig, 'norm_eps')
  dropout_rate: float = field(0.0, 'Dropout probability on residual branches during training.')
  param_dtype: Any = inherit(AttentionConfig, 'param_dtype')
  dtype: Any = inherit(AttentionConfig, 'dtype')
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig, metadata={'doc': 'The attention.'})
  mlp: MLPConfig = dataclasses.field(default_factory=MLPConfig, metadata={'doc': 'The MLP.'})

  @classmethod
  def create(cls, source: Any = None, **values: Any) -> BlockConfig:
    """Every field of the block, its attention and its MLP from `values`, else `source`'s same-named attribute.

    `source` is e.g. a `ModelConfig`; a name none of the three configs has
    is an error.
    """
    parts = (cls, AttentionConfig, MLPConfig)
    known = {f.name for c in parts for f in dataclasses.fields(c)} - {'attention', 'mlp'}
    unknown = sorted(set(values) - known)
    if unknown:
      raise TypeError(f'BlockConfig.create: unknown field(s) {unknown}; valid: {sorted(known)}.')
    merged = {n: getattr(source, n) for n in known if hasattr(source, n)}
    merged = types.SimpleNamespace(**{**merged, **values})
    return derive(cls, merged, attention=derive(AttentionConfig, merged), mlp=derive(MLPConfig, merged))


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-experts MLP: router, top-k routing, dispatch, auxiliary losses (nn/moe.py, docs/moe.md)."""
  num_experts: int = field(0, 'Experts per MoE layer (0 = no MoE: every layer has a dense MLP).')
  top_k: int = field(2, 'Experts each token is sent to.')
  every_n_layers: int = field(1, 'Every n-th layer is MoE, the others dense (1 = all; 2 = dense, MoE, dense, MoE, ...).')
  mlp_dim: int = field(0, 'Hidden width of each expert (0 = model.mlp_dim).')
  capacity_factor: float = field(1.25, "dispatch='capacity': slots per expert = ceil(capacity_factor * tokens * top_k / num_experts) per sequence.")
  dispatch: str = field('dropless', "'dropless' (tokens sorted by expert, grouped matmul with jax.lax.ragged_dot) or 'capacity' (fixed slots per expert, one-hot einsums; overflow is dropped).")
  routing: str = field('topk_softmax', "'topk_softmax' (softmax over the k chosen logits: Mixtral) or 'softmax_topk' (softmax over all experts, keep the k largest probabilities unrenormalised: Switch, DeepSeek).")
  aux_loss_weight: float = field(0.01, 'Weight of the load-balancing loss num_experts * sum_e f_e * p_e (mean over MoE layers).')
  z_loss_weight: float = field(0.001, 'Weight of the router z-loss mean(logsumexp(router logits)**2) (mean over MoE layers).')
