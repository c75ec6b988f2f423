"""The MoE transformer block, built through the `model.block` plug-in (`model.moe` resolves here).

`moe_block(graph, model_config, rng)` is an ordinary block factory (docs/custom_blocks.md):
`model.block: blox_scale.nn.moe_block:moe_block` and the sugar `model.moe.num_experts > 0`
build the same model. It is also the worked example of a block that adds to the loss:

  * The block's class has `aux_names`; `DecoderLM` then passes the Stack carry
    `(x, aux)`, with `aux = {name: f32[]}` running sums (zeros into the first
    layer), and every layer adds its own share. Summing in the carry works in the
    scan, the Python loop and under every remat policy, and costs a few scalars.
  * `aux['aux_loss']` is added to the training loss; every entry is reported
    as a train metric (`moe_aux_loss`, `moe_z_loss`, `moe_dropped_frac`: means
    over the MoE layers, unweighted).
  * `every_n_layers = n > 1` repeats the pattern (n - 1 dense layers, then one
    MoE layer) with `bs.Group`: the Stack scans num_layers / n groups
    (`moe_block.layers_per_block`), and decoding hands each group its n layers' cache.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import blox as bx
from blox_scale.nn.attention import Attention, Cache
from blox_scale.nn.block import PreNormBlock, make_norm
from blox_scale.nn.config import BlockConfig, MoEConfig
from blox_scale.nn.mlp import MLP
from blox_scale.nn.moe import MoE
from blox_scale.parallel.sharding import constrain
from blox_scale.stacking.group import Group

# The running sums a MoE model carries through its layers (DecoderLM reports them as metrics).
AUX_NAMES = ('aux_loss', 'moe_aux_loss', 'moe_z_loss', 'moe_dropped_frac')
Aux = dict[str, jax.Array]


class MoEBlock(PreNormBlock):
  """Pre-norm block whose MLP is a `MoE` (or a dense `MLP`, for the dense layers of a pattern).

    h = x + attn(norm_1(x));  y = h + moe(norm_2(h))

  Call forms (carry `(x, aux)`, see the module doc):
    `(y, aux), params = block(params, (x, aux), positions=p, is_training=False)`
    `((y, aux), new_kv), params = block(params, (x, aux), cache, positions=p, mask=m, cache_index=i)`
  `x: [batch, T, d_model]`. `scale`: this layer's share of the mean over MoE
  layers (1 / number of MoE layers).
  """

  aux_names = AUX_NAMES

  def __init__(self, graph: bx.Graph, config: BlockConfig, moe: MoEConfig | None, rng: bx.Rng | None,
               *, scale: float = 1.0) -> None:
    super().__init__(graph)
    c = config
    self.config = c
    self.moe_config = moe
    self.scale = scale
    self.norm_1 = make_norm(graph / 'norm_1', c.norm, c.norm_eps, c.param_dtype, c.dtype)
    self.attn = Attention(graph / 'attn', c.attention, rng)
    self.norm_2 = make_norm(graph / 'norm_2', c.norm, c.norm_eps, c.param_dtype, c.dtype)
    self.mlp = MLP(graph / 'mlp', c.mlp, rng) if moe is None else MoE(graph / 'moe', moe, c.mlp, rng)
    self.dropout = bx.Dropout(graph / 'dropout', c.dropout_rate, rng) if c.dropout_rate > 0 else None

  def __call__(self, params: bx.Params, carry: tuple[jax.Array, Aux], cache: Cache | None = None, *,
               positions: jax.Array | None = None, mask: jax.Array | None = None,
               cache_index: jax.Array | int = 0, is_training: bool = False) -> tuple[Any, bx.Params]:
    x, aux = carry
    x, new_kv, params = self._attend(params, x, cache, positions, mask, cache_index, is_training)
    h, params = self.norm_2(params, x)
    if self.moe_config is None:
      m, params = self.mlp(params, h)
    else:
      (m, stats), params = self.mlp(params, h)
      aux = self._add(aux, stats)
    m, params = self._drop(params, m, is_training)
    x = constrain((x + m).astype(x.dtype), ('batch', 'seq', 'embed'))
    return ((x, aux) if cache is None else ((x, aux), new_kv)), params

  def _add(self, aux: Aux, stats: Aux) -> Aux:
    c, s = self.moe_config, self.scale
    mine = {'aux_loss': c.aux_loss_weight * stats['aux_loss'] + c.z_loss_weight * stats['z_loss'],
            'moe_aux_loss': stats['aux_loss'], 'moe_z_loss': stats['z_loss'],
            'moe_dropped_frac': stats['dropped_frac']}
    return {n: aux[n] + s * mine[n].astype(aux[n].dtype) for n in aux}


class MoEGroup(Group):
  """`n - 1` dense `MoEBlock`s then one MoE `MoEBlock`, one step of the Stack's scan.

  Training calls pass the carry through the sub-blocks (`bs.Group`). The cache
  call gets this group's slice of the model's cache, `{'k', 'v'}: [n, batch,
  S, kv_heads, head_dim]` (DecoderLM reshapes `[num_layers, ...]` to
  `[num_layers / n, n, ...]`), gives sub-block j its `[j]`, and returns the
  new keys/values stacked the same way.
  """

  aux_names = AUX_NAMES

  def __call__(self, params: bx.Params, carry: Any, cache: Cache | None = None, **kwargs: Any) -> tuple[Any, bx.Params]:
    if cache is None:
      return super().__call__(params, carry, **kwargs)
    new = []
    for j, sub in enumerate(self.blocks):
      (carry, kv), params = sub(params, carry, jax.tree.map(lambda a: a[j], cache), **kwargs)
      new.append(kv)
    return (carry, jax.tree.map(lambda *a: jnp.stack(a), *new)), params


def moe_block(graph: bx.Graph, config: Any, rng: bx.Rng) -> bx.Module:
  """The factory `model.block: blox_scale.nn.moe_block:moe_block` (and `model.moe` sugar) names.

  `config` is the `ModelConfig`; `config.moe` (a `MoEConfig`) sets the experts
  and `model.block_args` must be empty. One MoE layer, or the pattern of
  `every_n_layers` layers as a `MoEGroup`.
  """
  if config.block_args:
    raise ValueError(f'model.block_args: {sorted(config.block_args)} given, but the MoE block takes its '
                     'options from model.moe.* (num_experts, top_k, every_n_layers, ...); remove model.block_args')
  m = config.moe
  if m.num_experts < 1:
    raise ValueError(f'model.moe.num_experts={m.num_experts}: the MoE block needs num_experts >= 1 '
                     '(e.g. model.moe.num_experts=8)')
  n = layers_per_block(config)
  block_config = config.block_config()
  scale = n / config.num_layers   # 1 / number of MoE layers
  if n == 1:
    return MoEBlock(graph, block_config, m, rng, scale=scale)
  dense = lambda g: MoEBlock(g, block_config, None, rng)
  sparse = lambda g: MoEBlock(g, block_config, m, rng, scale=scale)
  return MoEGroup(graph, [dense] * (n - 1) + [sparse], names=[f'dense_{j}' for j in range(n - 1)] + ['moe'])


def layers_per_block(config: Any) -> int:
  """Layers one block of `moe_block` holds (`model.moe.every_n_layers`); the Stack scans num_layers / this."""
  n = config.moe.every_n_layers
  if n < 1 or config.num_layers % n:
    raise ValueError(f'model.moe.every_n_layers={n}: must be >= 1 and divide model.num_layers={config.num_layers} '
                     '(the Stack repeats a pattern of n - 1 dense layers and one MoE layer)')
  return n


moe_block.layers_per_block = layers_per_block
