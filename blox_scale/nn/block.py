"""The pre-norm transformer block (GPT-2, Llama): the unit a `Stack` scans.

    h = x + dropout(attn(norm_1(x)))
    y = h + dropout(mlp(norm_2(h)))

Pre-norm keeps the residual stream an identity path from the embedding to the
final norm, which is what lets deep stacks train without warmup tricks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import blox as bx
from blox.layers import DType
from blox_scale.nn.attention import Attention, Cache
from blox_scale.nn.config import BlockConfig
from blox_scale.nn.mlp import MLP
from blox_scale.parallel.sharding import constrain

NORMS = ('rmsnorm', 'layernorm')


def make_norm(graph: bx.Graph, kind: str, eps: float, param_dtype: DType, dtype: DType | None) -> bx.Module:
  """RMSNorm (scale only) or LayerNorm (scale and bias); params axes ('norm',)."""
  if kind == 'rmsnorm':
    return bx.RMSNorm(graph, epsilon=eps, param_dtype=param_dtype, dtype=dtype)
  if kind == 'layernorm':
    return bx.LayerNorm(graph, epsilon=eps, param_dtype=param_dtype, dtype=dtype)
  raise ValueError(f"norm={kind!r} is not one of {NORMS} (at {bx.path_to_str(graph.path)}).")


class PreNormBlock(bx.Module):
  """What the pre-norm blocks share (`TransformerBlock`, `MoEBlock`): children `norm_1`, `attn`
  and `dropout` (None without dropout), and the attention half of the call."""

  dropout: bx.Module | None

  def _drop(self, params: bx.Params, x: jax.Array, is_training: bool) -> tuple[jax.Array, bx.Params]:
    if self.dropout is None:
      return x, params
    return self.dropout(params, x, is_training=is_training)

  def _attend(self, params: bx.Params, x: jax.Array, cache: Cache | None, positions: jax.Array | None,
              mask: jax.Array | None, cache_index: jax.Array | int,
              is_training: bool) -> tuple[jax.Array, Any, bx.Params]:
    """`(x + dropout(attn(norm_1(x))), new_kv or None, params)`, in `x`'s dtype (the scan carry)."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32)[None], x.shape[:2])
    x = constrain(x, ('batch', 'seq', 'embed'))
    h, params = self.norm_1(params, x)
    if cache is None:
      a, params = self.attn(params, h, positions, mask=mask)
      new_kv = None
    else:
      (a, new_kv), params = self.attn(params, h, positions, cache, mask=mask, cache_index=cache_index)
    a, params = self._drop(params, a, is_training)
    return (x + a).astype(x.dtype), new_kv, params


class TransformerBlock(PreNormBlock):
  """Attention + MLP with pre-norm residuals.

  Call forms (the two a `bs.Stack` uses):
    `y, params = block(params, x, positions=p, is_training=False)`
    `(y, new_kv), params = block(params, x, cache, positions=p, mask=m, cache_index=i)`
  `x: [batch, T, d_model]` -> `y` of the same shape and dtype (the scan carry);
  `positions: int[batch, T]`; cache and mask as in `Attention`.
  Children: norm_1, attn, norm_2, mlp (and dropout with `dropout_rate > 0`).
  `config`: a `BlockConfig` (`BlockConfig.create(d_model=..., num_heads=...)`
  or `ModelConfig.block_config()`).
  """

  def __init__(self, graph: bx.Graph, config: BlockConfig, rng: bx.Rng | None = None) -> None:
    super().__init__(graph)
    c = config
    self.config = c
    self.norm_1 = make_norm(graph.child('norm_1'), c.norm, c.norm_eps, c.param_dtype, c.dtype)
    self.attn = Attention(graph.child('attn'), c.attention, rng)
    self.norm_2 = make_norm(graph.child('norm_2'), c.norm, c.norm_eps, c.param_dtype, c.dtype)
    self.mlp = MLP(graph.child('mlp'), c.mlp, rng)
    self.dropout = None
    if c.dropout_rate > 0.0:
      if rng is None:
        raise ValueError(f"TransformerBlock {bx.path_to_str(graph.path)}: dropout_rate={c.dropout_rate} needs rng=bx.Rng.")
      self.dropout = bx.Dropout(graph.child('dropout'), c.dropout_rate, rng)

  def __call__(
      self,
      params: bx.Params,
      x: jax.Array,
      cache: Cache | None = None,
      *,
      positions: jax.Array | None = None,
      mask: jax.Array | None = None,
      cache_index: jax.Array | int = 0,
      is_training: bool = False,
  ) -> tuple[Any, bx.Params]:
    if x.ndim != 3 or x.shape[-1] != self.config.d_model:
      raise ValueError(
          f"TransformerBlock {bx.path_to_str(self.graph.path)}: expected x: [batch, seq, {self.config.d_model}], got {x.shape}.")
    x, new_kv, params = self._attend(params, x, cache, positions, mask, cache_index, is_training)
    h, params = self.norm_2(params, x)
    m, params = self.mlp(params, h)
    m, params = self._drop(params, m, is_training)
    x = constrain((x + m).astype(x.dtype), ('batch', 'seq', 'embed'))
    if cache is None:
      return x, params
    return (x, new_kv), params
