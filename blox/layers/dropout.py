"""Dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blox.graph import Graph
from blox.layers._common import DType, cast, require_bool
from blox.module import Module
from blox.params import Params, path_to_str
from blox.rng import Rng


class Dropout(Module):
  """Zeroes each element with probability `rate` and scales the rest by `1 / (1 - rate)`.

  `rate` is the DROP probability. A no-op when `is_training=False` or
  `rate == 0` (then no key is drawn). With `is_training=True` it draws one key
  from `rng`, so the params it returns carry the advanced counter. Dropout
  has no params, hence no `param_dtype`; `dtype` casts the output.
  """

  def __init__(self, graph: Graph, rate: float, rng: Rng, *, dtype: DType | None = None) -> None:
    super().__init__(graph)
    if not 0.0 <= rate < 1.0:
      raise ValueError(
          f"Dropout rate must be in [0.0, 1.0), got {rate}. Dropout {path_to_str(graph.path)}: "
          'rate is the drop probability and must be in [0, 1) (0.1 drops 10% of '
          'the elements); for no dropout pass 0.0 or is_training=False.'
      )
    if not isinstance(rng, Rng):
      raise TypeError(f"Dropout {path_to_str(graph.path)}: rng must be a bx.Rng, got {type(rng).__name__}.")
    self.rate = rate
    self.rng = rng
    self.dtype = dtype

  def __call__(self, params: Params, inputs: jax.Array, is_training: bool = True) -> tuple[jax.Array, Params]:
    """`inputs: [...]` -> same shape (dtype `dtype` if set)."""
    is_training = require_bool(is_training, 'is_training', f"Dropout {path_to_str(self.graph.path)}")
    x = inputs if self.dtype is None else cast(inputs, jnp.dtype(self.dtype))
    if not is_training or self.rate == 0.0:
      return x, params
    key, params = self.rng(params)
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(key, keep, x.shape)
    # where(mask, x / keep, 0) equals x * mask / keep and keeps x's dtype.
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype)), params
