"""Stacked <-> per-layer param layouts, as pure functions.

A `Stack` stores each param of its block once, under
`stack.graph.path + ('block', ...)`, with a leading axis of size
`num_layers` and logical axes `('layers', *axes)`. Checkpoints from unscanned
models (and tools that want one tree per layer) use the per-layer layout:
`stack.graph.path + ('layer_0', ...)`, `('layer_1', ...)`, ... with the
block's own shapes and axes. `unstack` and `restack` convert between the two;
`restack(unstack(p, s), s) == p`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from blox import Metadata, Param, Params, Path, path_to_str

if TYPE_CHECKING:
  from blox_scale.stacking.stack import Stack

LAYERS = 'layers'
_LAYER_NAME = re.compile(r'layer_(\d+)$')


def stacked_metadata(metadata: Mapping[str, Any], ndim: int) -> Metadata:
  """Metadata of a param stacked over layers: sharding gains a leading 'layers'.

  `ndim` is the rank of one layer's param. A param without logical axes gets
  `('layers', None, ...)` so that every stacked param names its layer axis.
  """
  axes = metadata.get('sharding')
  axes = (None,) * ndim if axes is None else tuple(axes)
  return Metadata({**metadata, 'sharding': (LAYERS, *axes)})


def layer_metadata(metadata: Mapping[str, Any]) -> Metadata:
  """Metadata of one layer's slice: the leading (layer) axis name removed."""
  axes = metadata.get('sharding')
  if not axes:
    return Metadata(metadata)
  return Metadata({**metadata, 'sharding': tuple(axes)[1:]})


def unstack(params: Params, stack: Stack) -> Params:
  """Stacked layout -> per-layer layout (`.../layer_{i}/...`).

  Params outside the stack's block pass through unchanged. Values are slices
  `value[i]`; the result keeps the lock state of `params`.
  """
  prefix = stack.block.graph.path
  base = stack.graph.path
  data: dict[Path, Param] = {}
  for path, param in params.items():
    if path[:len(prefix)] != prefix:
      data[path] = param
      continue
    shape = np.shape(param.value)
    if not shape or shape[0] != stack.num_layers:
      raise ValueError(
          f'unstack: param {path_to_str(path)} has shape {shape}, but params of Stack '
          f'{path_to_str(base)} need a leading layer axis of size num_layers='
          f'{stack.num_layers}. Are these params already per-layer?'
      )
    meta = layer_metadata(param.metadata)
    rest = path[len(prefix):]
    for i in range(stack.num_layers):
      data[base + (f'layer_{i}',) + rest] = Param(param.value[i], param.trainable, meta)
  return Params.from_items(data, locked=params.is_locked)


def restack(params: Params, stack: Stack) -> Params:
  """Per-layer layout (`.../layer_{i}/...`) -> stacked layout (`.../block/...`).

  Every layer `0..num_layers-1` must hold the same param names, shapes,
  dtypes, trainability and metadata; a difference is an error naming the
  param and both layers. Params outside the stack pass through.
  """
  base = stack.graph.path
  prefix = stack.block.graph.path
  num_layers = stack.num_layers
  layers: dict[int, dict[Path, Param]] = {}
  data: dict[Path, Param] = {}
  for path, param in params.items():
    match = _LAYER_NAME.match(path[len(base)]) if len(path) > len(base) and path[:len(base)] == base else None
    if match is None:
      data[path] = param
      continue
    layers.setdefault(int(match.group(1)), {})[path[len(base) + 1:]] = param
  if sorted(layers) != list(range(num_layers)):
    raise ValueError(
        f'restack: Stack {path_to_str(base)} has num_layers={num_layers}, but the '
        f'per-layer params hold layers {sorted(layers)}. Expected exactly '
        f'{path_to_str(base)}/layer_0 ... layer_{num_layers - 1}.'
    )
  first = layers[0]
  for i in range(1, num_layers):
    if set(layers[i]) != set(first):
      diff = sorted(set(layers[i]) ^ set(first))
      raise ValueError(
          f'restack: the params of layer_{i} differ from layer_0 in Stack '
          f'{path_to_str(base)}: {[path_to_str(d) for d in diff]} present in only one of them. '
          'Every layer of a stack must have the same params.'
      )
    for rest, p0 in first.items():
      pi = layers[i][rest]
      same = (np.shape(pi.value) == np.shape(p0.value) and pi.dtype == p0.dtype
              and pi.trainable == p0.trainable and pi.metadata == p0.metadata)
      if not same:
        raise ValueError(
            f'restack: param {path_to_str(rest)} differs between layer_0 and layer_{i} '
            f'of Stack {path_to_str(base)}: {p0!r} vs {pi!r}. Every layer of a stack '
            'must have the same shapes, dtypes, trainability and metadata.'
        )
  for rest, p0 in first.items():
    value = jnp.stack([layers[i][rest].value for i in range(num_layers)])
    data[prefix + rest] = Param(value, p0.trainable, stacked_metadata(p0.metadata, np.ndim(p0.value)))
  return Params.from_items(data, locked=params.is_locked)
