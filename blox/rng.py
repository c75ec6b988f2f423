"""Rng: a counter-based random stream kept in Params.

`key, params = rng(params)` returns `jax.random.fold_in(seed, counter)` and
increments the counter. Nothing is hidden: the seed (a typed key) and the
counter (uint32) are ordinary non-trainable params, so the same seed and
counter always give the same key, under jit, vmap, scan and on restore.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blox.errors import RngNotSeededError
from blox.graph import Graph
from blox.module import Module
from blox.params import Params, path_to_str


def is_key(x: Any) -> bool:
  """True for a typed PRNG key array (or ShapeDtypeStruct): what `Rng` stores as its seed."""
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def as_key(seed: Any, where: str = 'seed') -> jax.Array:
  """Turns an int, an integer scalar array or a typed key into a typed key."""
  if is_key(seed):
    if np.shape(seed) != ():
      raise ValueError(f'{where}: expected a single key, got a key array of shape {np.shape(seed)}.')
    return seed
  if isinstance(seed, (bool, np.bool_)):
    raise TypeError(f'{where}: a bool is not a seed; pass an int such as 0 or a jax.random.key.')
  if isinstance(seed, (int, np.integer)):
    return jax.random.key(int(seed))
  dtype = getattr(seed, 'dtype', None)
  if dtype is not None and jnp.issubdtype(dtype, jnp.integer):
    if np.shape(seed) == ():
      return jax.random.key(seed)
    if np.shape(seed) == (2,) and jnp.dtype(dtype) == jnp.uint32:
      raise TypeError(
          f'{where}: got a raw uint32[2] key (from the legacy '
          'jax.random.PRNGKey). Pass jax.random.key(n) or '
          'jax.random.wrap_key_data(raw_key) instead.'
      )
  raise TypeError(
      f'{where}: expected an int, an integer scalar array or a typed key '
      f'(jax.random.key), got {type(seed).__name__}'
      f'{"" if dtype is None else f" of dtype {dtype} and shape {np.shape(seed)}"}.'
  )


class Rng(Module):
  """A random stream whose state (`seed`, `counter`) lives in Params.

  Seed it once: `params = rng.seed(bx.Params(), seed=0)`. Modules that need
  randomness take the Rng in their constructor and call `key, params =
  rng(params)`.
  """

  def __init__(self, graph: Graph) -> None:
    super().__init__(graph)

  def _require(self, params: Params, name: str) -> Any:
    param = params.get(self.param_path(name))
    if param is None:
      where = path_to_str(self.graph.path)
      raise RngNotSeededError(
          f"Rng '{self.graph.path}' not initialized. Use rng.seed(params, seed=...) first. "
          f'Rng {where} is not seeded (no {where}/{name} in params). Seed it '
          f'before the first call: params = rng.seed(params, seed=0).'
      )
    return param.value

  def get_seed(self, params: Params) -> jax.Array:
    """The typed key this stream folds its counter into."""
    return self._require(params, 'seed')

  def get_counter(self, params: Params) -> jax.Array:
    """The uint32 counter: how many keys this stream has handed out."""
    return self._require(params, 'counter')

  def seed(self, params: Params, *, seed: Any = None, counter: Any = None) -> Params:
    """Creates the stream (`seed` required, counter 0) or updates it."""
    exists = self.param_path('seed') in params
    where = path_to_str(self.graph.path)
    if not exists and seed is None:
      raise ValueError(
          f"Rng '{self.graph.path}' not initialized. Seed is required. Rng {where} is not "
          'seeded yet: pass seed= (an int or jax.random.key).')
    if exists and seed is None and counter is None:
      raise ValueError(
          f'At least one of seed or counter must be provided. Rng {where}.seed: pass seed=, '
          'counter= or both.')
    if not exists and counter is None:
      counter = 0
    if seed is not None:
      key = as_key(seed, where=f'Rng {where} seed')
      if exists:
        params = self.set_param(params, 'seed', key)
      else:
        _, params = self.get_param(params, 'seed', (), lambda *_: key, key.dtype, trainable=False,
                                   metadata={'tag': 'rng_seed', 'sharding': ()})
    if counter is not None:
      if isinstance(counter, (float, bool)) or (hasattr(counter, 'dtype') and not jnp.issubdtype(counter.dtype, jnp.integer)):
        raise TypeError(f'Rng {where} counter must be an integer, got {counter!r}.')
      value = jnp.asarray(counter, jnp.uint32)
      if exists:
        params = self.set_param(params, 'counter', value)
      else:
        _, params = self.get_param(params, 'counter', (), lambda *_: value, jnp.uint32, trainable=False,
                                   metadata={'tag': 'rng_counter', 'sharding': ()})
    return params

  def __call__(self, params: Params) -> tuple[jax.Array, Params]:
    """Returns `(fold_in(seed, counter), params with counter + 1)`."""
    seed = self.get_seed(params)
    counter = self.get_counter(params)
    key = jax.random.fold_in(seed, counter)
    return key, self.set_param(params, 'counter', counter + jnp.uint32(1))
