"""LayerNorm, RMSNorm and BatchNorm.

Statistics are always computed in (at least) float32, whatever the input
dtype: a bf16 mean over thousands of features loses most of its mantissa.
The output is `dtype` when given, else the jnp promotion of input and params
(jax-blox's behaviour).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from blox.graph import Graph
from blox.layers._common import DType, cast, expand_last, require_bool, stats_dtype, with_axes
from blox.module import Module
from blox.params import Params, path_to_str
from blox.rng import Rng

Initializer = jax.nn.initializers.Initializer


def _moments(x: jax.Array, axes: int | tuple[int, ...], axis_name: str | None,
             groups: Sequence[Sequence[int]] | None, keepdims: bool) -> tuple[jax.Array, jax.Array]:
  """Mean and variance of `x` over `axes`, and across `axis_name` if given.

  Across devices the variance is `E[x^2] - E[x]^2` of the averaged moments:
  averaging per-device variances (what jax-blox did) is wrong whenever the
  per-device means differ. Locally the two-pass `var` is kept (more accurate).
  """
  if axis_name is None:
    return jnp.mean(x, axis=axes, keepdims=keepdims), jnp.var(x, axis=axes, keepdims=keepdims)
  mean = jax.lax.pmean(jnp.mean(x, axis=axes, keepdims=keepdims), axis_name, axis_index_groups=groups)
  mean_sq = jax.lax.pmean(jnp.mean(jnp.square(x), axis=axes, keepdims=keepdims), axis_name, axis_index_groups=groups)
  return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


class _Norm(Module):
  """Shared scale/bias handling of the three norms."""

  def __init__(self, graph: Graph, *, epsilon: float, use_scale: bool, use_bias: bool,
               scale_init: Initializer, bias_init: Initializer, axis_name: str | None,
               axis_index_groups: Sequence[Sequence[int]] | None, rng: Rng | None,
               scale_metadata: dict[str, Any] | None, bias_metadata: dict[str, Any] | None,
               param_dtype: DType, dtype: DType | None) -> None:
    # The public constructors keep jax-blox's explicit keyword signatures and
    # hand everything they share to this one place.
    super().__init__(graph)
    self.epsilon = epsilon
    self.use_scale = use_scale
    self.use_bias = use_bias
    self.scale_init = scale_init
    self.bias_init = bias_init
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.rng = rng
    self.scale_metadata = with_axes(('norm',), scale_metadata)
    self.bias_metadata = with_axes(('norm',), bias_metadata)
    self.param_dtype = param_dtype
    self.dtype = dtype

  def _affine(self, params: Params, y: jax.Array, inputs: jax.Array, features: int,
              use_scale: bool, use_bias: bool) -> tuple[jax.Array, Params]:
    """`y: f32[..., features]` (normalised) -> scaled, shifted, in the output dtype."""
    out_dtype = inputs.dtype
    if use_scale:
      scale, params = self.get_param(
          params, 'scale', (features,), self.scale_init, dtype=self.param_dtype,
          metadata=self.scale_metadata, rng=self.rng)
      out_dtype = jnp.promote_types(out_dtype, scale.dtype)
      y = y * expand_last(cast(scale, y.dtype), y.ndim)
    if use_bias:
      bias, params = self.get_param(
          params, 'bias', (features,), self.bias_init, dtype=self.param_dtype,
          metadata=self.bias_metadata, rng=self.rng)
      out_dtype = jnp.promote_types(out_dtype, bias.dtype)
      y = y + expand_last(cast(bias, y.dtype), y.ndim)
    out_dtype = out_dtype if self.dtype is None else jnp.dtype(self.dtype)
    return cast(y, out_dtype), params


class LayerNorm(_Norm):
  """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis.

  Params: scale, bias: [features], axes ('norm',) (override with
  `scale_metadata` / `bias_metadata`). `axis_name` averages the statistics
  across a named axis (shard_map / vmap).
  """

  def __init__(
      self,
      graph: Graph,
      epsilon: float = 1e-5,
      use_scale: bool = True,
      use_bias: bool = True,
      scale_init: Initializer = jax.nn.initializers.ones,
      bias_init: Initializer = jax.nn.initializers.zeros,
      axis_name: str | None = None,
      axis_index_groups: Sequence[Sequence[int]] | None = None,
      rng: Rng | None = None,
      *,
      scale_metadata: dict[str, Any] | None = None,
      bias_metadata: dict[str, Any] | None = None,
      param_dtype: DType = jnp.float32,
      dtype: DType | None = None,
  ) -> None:
    super().__init__(
        graph, epsilon=epsilon, use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
        bias_init=bias_init, axis_name=axis_name, axis_index_groups=axis_index_groups, rng=rng,
        scale_metadata=scale_metadata, bias_metadata=bias_metadata, param_dtype=param_dtype, dtype=dtype)

  def __call__(self, params: Params, inputs: jax.Array) -> tuple[jax.Array, Params]:
    """`inputs: [..., features]` -> same shape."""
    x = cast(inputs, stats_dtype(inputs))
    mean, var = _moments(x, -1, self.axis_name, self.axis_index_groups, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    return self._affine(params, y, inputs, inputs.shape[-1], self.use_scale, self.use_bias)


class RMSNorm(_Norm):
  """`x / sqrt(mean(x**2) + eps) * scale` over the last axis.

  Params: scale: [features], axes ('norm',) (override with `scale_metadata`).
  """

  def __init__(
      self,
      graph: Graph,
      epsilon: float = 1e-5,
      use_scale: bool = True,
      scale_init: Initializer = jax.nn.initializers.ones,
      axis_name: str | None = None,
      axis_index_groups: Sequence[Sequence[int]] | None = None,
      rng: Rng | None = None,
      *,
      scale_metadata: dict[str, Any] | None = None,
      param_dtype: DType = jnp.float32,
      dtype: DType | None = None,
  ) -> None:
    super().__init__(
        graph, epsilon=epsilon, use_scale=use_scale, use_bias=False, scale_init=scale_init,
        bias_init=jax.nn.initializers.zeros, axis_name=axis_name, axis_index_groups=axis_index_groups,
        rng=rng, scale_metadata=scale_metadata, bias_metadata=None, param_dtype=param_dtype, dtype=dtype)

  def __call__(self, params: Params, inputs: jax.Array) -> tuple[jax.Array, Params]:
    """`inputs: [..., features]` -> same shape."""
    x = cast(inputs, stats_dtype(inputs))
    mean_sq = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    if self.axis_name is not None:
      mean_sq = jax.lax.pmean(mean_sq, self.axis_name, axis_index_groups=self.axis_index_groups)
    y = x * jax.lax.rsqrt(mean_sq + self.epsilon)
    return self._affine(params, y, inputs, inputs.shape[-1], self.use_scale, False)


class BatchNorm(_Norm):
  """Batch normalisation over every axis but the last.

  `inputs: [batch, *spatial, features]`. Training uses the batch statistics
  and returns params with updated running averages
  (`running = momentum * running + (1 - momentum) * batch_stat`); inference
  (`is_training=False`) uses the running averages. With `axis_name` the
  statistics cover the whole batch across that axis (devices or vmap lanes).

  Params: running_mean, running_var (non-trainable, float32), scale, bias:
  all [features], axes ('norm',). Running statistics stay float32 whatever
  `param_dtype` is: they accumulate small updates over many steps.
  """

  def __init__(
      self,
      graph: Graph,
      momentum: float = 0.9,
      epsilon: float = 1e-5,
      use_scale: bool = True,
      use_bias: bool = True,
      scale_init: Initializer = jax.nn.initializers.ones,
      bias_init: Initializer = jax.nn.initializers.zeros,
      axis_name: str | None = None,
      axis_index_groups: Sequence[Sequence[int]] | None = None,
      rng: Rng | None = None,
      *,
      scale_metadata: dict[str, Any] | None = None,
      bias_metadata: dict[str, Any] | None = None,
      stats_metadata: dict[str, Any] | None = None,
      param_dtype: DType = jnp.float32,
      dtype: DType | None = None,
  ) -> None:
    super().__init__(
        graph, epsilon=epsilon, use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
        bias_init=bias_init, axis_name=axis_name, axis_index_groups=axis_index_groups, rng=rng,
        scale_metadata=scale_metadata, bias_metadata=bias_metadata, param_dtype=param_dtype, dtype=dtype)
    self.momentum = momentum
    self.stats_metadata = with_axes(('norm',), stats_metadata)

  def __call__(self, params: Params, inputs: jax.Array, is_training: bool = True) -> tuple[jax.Array, Params]:
    """`inputs: [batch, *spatial, features]` -> same shape."""
    is_training = require_bool(is_training, 'is_training', f"BatchNorm {path_to_str(self.graph.path)}")
    features = inputs.shape[-1]
    # Same creation order as jax-blox (running stats first, each drawing a
    # key when rng is given) so the same seed gives the same numbers.
    running_mean, params = self.get_param(
        params, 'running_mean', (features,), jax.nn.initializers.zeros, dtype=jnp.float32,
        trainable=False, metadata=self.stats_metadata, rng=self.rng)
    running_var, params = self.get_param(
        params, 'running_var', (features,), jax.nn.initializers.ones, dtype=jnp.float32,
        trainable=False, metadata=self.stats_metadata, rng=self.rng)
    x = cast(inputs, stats_dtype(inputs))
    if is_training:
      axes = tuple(range(inputs.ndim - 1))
      mean, var = _moments(x, axes, self.axis_name, self.axis_index_groups, keepdims=False)
      # Running averages are state, not part of the differentiated function.
      m = self.momentum
      new_mean = m * running_mean + (1.0 - m) * jax.lax.stop_gradient(mean).astype(jnp.float32)
      new_var = m * running_var + (1.0 - m) * jax.lax.stop_gradient(var).astype(jnp.float32)
      params = self.set_param(params, 'running_mean', new_mean)
      params = self.set_param(params, 'running_var', new_var)
    else:
      mean, var = cast(running_mean, x.dtype), cast(running_var, x.dtype)
    y = (x - expand_last(mean, x.ndim)) * expand_last(jax.lax.rsqrt(var + self.epsilon), x.ndim)
    return self._affine(params, y, inputs, features, self.use_scale, self.use_bias)
