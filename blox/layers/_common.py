"""Helpers shared by the layers: default logical axes and mixed precision."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

DType = Any


def with_axes(default_axes: Sequence[str | None], metadata: Mapping[str, Any] | None) -> dict[str, Any]:
  """Param metadata with default logical axes; the user's entries win.

  `kernel_metadata={'sharding': (None, 'model')}` replaces the default
  `('embed', 'mlp')`; other keys the user gives are kept as they are.
  """
  return {'sharding': tuple(default_axes), **(metadata or {})}


def compute_dtype(dtype: DType | None, *arrays: Any) -> DType:
  """The dtype a layer computes in.

  `dtype=None` keeps jax-blox's behaviour: the usual jnp promotion of inputs
  and params (bf16 inputs with f32 params compute in f32).
  """
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.result_type(*arrays)


def cast(x: jax.Array, dtype: DType) -> jax.Array:
  # astype is a no-op (no convert in the jaxpr) when the dtype already matches.
  return x if x.dtype == dtype else x.astype(dtype)


def stats_dtype(x: jax.Array) -> DType:
  """Norm statistics are accumulated in at least float32 (bf16 sums lose bits)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def expand_last(v: jax.Array, ndim: int) -> jax.Array:
  """`v: [features]` reshaped to `[1, ..., 1, features]` (rank promotion is strict)."""
  return v.reshape((1,) * (ndim - 1) + v.shape)


def require_bool(value: Any, what: str, where: str) -> bool:
  """`is_training` and similar flags pick Python code paths, so they must be static."""
  if isinstance(value, jax.core.Tracer):
    # The error jax-blox users saw (bool() of the tracer), with the fix after JAX's first line.
    error = jax.errors.TracerBoolConversionError(value)
    first, _, rest = str(error).partition('\n')
    error.args = (
        f'{first} {where}: {what} must be a Python bool (it selects the code path at trace '
        'time), got a traced value. Mark it static, e.g. '
        f"jax.jit(f, static_argnames='{what}'), or pass a constant.\n{rest}",
    )
    raise error
  return bool(value)


def add_bias(outputs: jax.Array, bias: jax.Array) -> jax.Array:
  """`outputs: [..., f] + bias: [f]`, added in the wider dtype, returned in `outputs.dtype`.

  With bf16 compute over f32 params the add runs in f32 (XLA fuses the
  converts), so the bias gradient, a sum over every batch and position, is
  accumulated in f32 rather than in bf16.
  """
  wide = jnp.promote_types(outputs.dtype, bias.dtype)
  return cast(cast(outputs, wide) + expand_last(cast(bias, wide), outputs.ndim), outputs.dtype)
