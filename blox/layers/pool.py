"""max_pool, min_pool, avg_pool over the spatial dims of `[*batch, *spatial, channels]`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blox.layers.conv import PaddingLike, as_tuple, fold_batch


def _pool(inputs: jax.Array, init: jax.Array, op: Callable, window_shape: int | Sequence[int],
          strides: int | Sequence[int] | None, padding: PaddingLike, name: str) -> jax.Array:
  window = (window_shape,) if isinstance(window_shape, int) else tuple(window_shape)
  n = len(window)
  x, batch_shape = fold_batch(inputs, n, name, 'pooling')  # [b, *spatial, c]
  strides = window if strides is None else as_tuple(strides, n, 'strides')
  pad = padding if isinstance(padding, str) else ((0, 0),) + tuple(map(tuple, padding)) + ((0, 0),)
  y = jax.lax.reduce_window(x, init, op, (1,) + window + (1,), (1,) + strides + (1,), pad)
  return y.reshape(batch_shape + y.shape[1:])


# Init values are NumPy constants, never traced arrays: JAX recognises
# reduce_window with a constant identity as max/min/sum pooling, which has a
# gradient; with a traced init it falls back to the generic (non
# differentiable) reduce_window.
def _lowest(dtype) -> np.ndarray:
  if jnp.issubdtype(dtype, jnp.floating):
    return np.array(-np.inf, dtype)
  return np.array(jnp.iinfo(dtype).min, dtype)


def _highest(dtype) -> np.ndarray:
  if jnp.issubdtype(dtype, jnp.floating):
    return np.array(np.inf, dtype)
  return np.array(jnp.iinfo(dtype).max, dtype)


def max_pool(inputs: jax.Array, window_shape: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: PaddingLike = 'VALID') -> jax.Array:
  """Maximum over each window. `strides=None` means non-overlapping windows."""
  return _pool(inputs, _lowest(inputs.dtype), jax.lax.max, window_shape, strides, padding, 'max_pool')


def min_pool(inputs: jax.Array, window_shape: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: PaddingLike = 'VALID') -> jax.Array:
  """Minimum over each window. `strides=None` means non-overlapping windows."""
  return _pool(inputs, _highest(inputs.dtype), jax.lax.min, window_shape, strides, padding, 'min_pool')


def avg_pool(inputs: jax.Array, window_shape: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: PaddingLike = 'VALID') -> jax.Array:
  """Mean over each window.

  With padding other than 'VALID' the mean is over the real (non-padded)
  elements of each window, as in jax-blox.
  """
  zero = np.array(0, inputs.dtype)
  total = _pool(inputs, zero, jax.lax.add, window_shape, strides, padding, 'avg_pool')
  if isinstance(padding, str) and padding == 'VALID':
    window = (window_shape,) if isinstance(window_shape, int) else tuple(window_shape)
    return total / math.prod(window)
  counts = _pool(jnp.ones_like(inputs), zero, jax.lax.add, window_shape, strides, padding, 'avg_pool')
  return total / counts
