"""Shared test helpers: one tree_allclose for the whole suite."""

import jax
import jax.numpy as jnp
import numpy as np


def tree_allclose(a, b, *, rtol=1e-5, atol=1e-5):
  """Asserts two pytrees have the same structure and allclose leaves."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, f'tree structures differ:\n{ta}\n{tb}'
  for i, (x, y) in enumerate(zip(la, lb)):
    x = np.asarray(jnp.asarray(x, jnp.float32)) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else np.asarray(x)
    y = np.asarray(jnp.asarray(y, jnp.float32)) if jnp.issubdtype(jnp.asarray(y).dtype, jnp.floating) else np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f'leaf {i}')


def bf16_tols():
  return dict(rtol=2e-2, atol=2e-2)
