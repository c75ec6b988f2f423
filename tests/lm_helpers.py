"""Test helpers for the LM tests: params filled from numpy instead of a compiled init.

The model's own init is tested where it matters (tests/test_decoder.py). Elsewhere a
compiled init only costs time: on CPU, XLA takes seconds to compile threefry for every
random draw. `fill_params` takes the abstract params (`jax.eval_shape`, nothing compiled)
and fills them with numpy random numbers of the right shape and dtype.
"""

import jax
import jax.numpy as jnp
import numpy as np

import blox as bx


def fill_params(abstract: bx.Params, seed: int = 0, std: float = 0.3) -> bx.Params:
  """Kernels ~ N(0, std), norm scales ~ 1 + N(0, 0.2), biases ~ N(0, 0.1); Rng: key(seed), counter 0."""
  rs = np.random.default_rng(seed)
  data = {}
  for path, param in abstract.items():
    v = param.value
    if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
      value = jax.random.key(seed)
    elif jnp.issubdtype(v.dtype, jnp.integer):
      value = jnp.zeros(v.shape, v.dtype)
    elif path[-1] == 'scale':
      value = jnp.asarray(1.0 + 0.2 * rs.standard_normal(v.shape), v.dtype)
    elif 'bias' in path[-1]:
      value = jnp.asarray(0.1 * rs.standard_normal(v.shape), v.dtype)
    else:
      value = jnp.asarray(std * rs.standard_normal(v.shape), v.dtype)
    data[path] = param.replace(value=value)
  return bx.Params.from_items(data, locked=abstract.is_locked)
