"""Conv and ConvTranspose: N-d convolutions, channels last.

The number of spatial dims is `len(kernel_size)` (an int means 1-d).
Inputs are `[*batch, *spatial, channels]` with any number (0 or more) of
leading batch dims; they are folded into one batch dim for XLA and restored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from blox.graph import Graph
from blox.layers._common import DType, add_bias, cast, compute_dtype, with_axes
from blox.module import Module
from blox.params import Params, path_to_str
from blox.rng import Rng

Initializer = jax.nn.initializers.Initializer
PaddingLike = str | Sequence[tuple[int, int]]


def as_tuple(x: int | Sequence[int], n: int, what: str = 'value') -> tuple[int, ...]:
  """An int broadcast to `n` dims, or a sequence of exactly `n` ints."""
  if isinstance(x, int):
    return (x,) * n
  x = tuple(int(v) for v in x)
  if len(x) != n:
    raise ValueError(f'{what} must be an int or {n} ints (one per spatial dim), got {x}.')
  return x


def fold_batch(inputs: jax.Array, num_spatial: int, where: str, kind: str) -> tuple[jax.Array, tuple[int, ...]]:
  """`[*batch, *spatial, c]` -> (`[prod(batch), *spatial, c]`, batch shape).

  `kind` ('conv', 'conv_transpose', 'pooling') words the error as jax-blox did.
  """
  if inputs.ndim < num_spatial + 1:
    raise ValueError(
        f'Expected input rank >= {num_spatial + 1} for {num_spatial}D {kind} (at least '
        f'{num_spatial} spatial dims + 1 channel dim), got {inputs.ndim}. {where}: '
        f'expected input rank >= {num_spatial + 1} ({num_spatial} spatial dims + channels, '
        f'batch dims optional), got shape {inputs.shape}.'
    )
  batch_shape = inputs.shape[:inputs.ndim - num_spatial - 1]
  return inputs.reshape((math.prod(batch_shape),) + inputs.shape[len(batch_shape):]), batch_shape


def channels_last_specs(num_spatial: int, kernel_io: tuple[int, int]) -> jax.lax.ConvDimensionNumbers:
  """Dimension numbers for `[n, *spatial, c]` inputs/outputs and `[*k, a, b]` kernels.

  `kernel_io` gives the kernel dims holding (output, input) features.
  """
  spatial = tuple(range(1, num_spatial + 1))
  io = (0, num_spatial + 1) + spatial
  return jax.lax.ConvDimensionNumbers(lhs_spec=io, rhs_spec=kernel_io + tuple(range(num_spatial)), out_spec=io)


class _ConvBase(Module):
  """Shared constructor state of Conv and ConvTranspose."""

  def _setup(self, kernel_size, output_channels, rng, strides, padding, kernel_dilation,
             feature_group_count, use_bias, kernel_init, bias_init, kernel_metadata, bias_metadata,
             kernel_axes, param_dtype, dtype) -> None:
    self.kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    n = len(self.kernel_size)
    self.output_channels = output_channels
    self.rng = rng
    self.strides = strides
    self.padding = padding
    self.kernel_dilation = kernel_dilation
    self.feature_group_count = feature_group_count
    self.use_bias = use_bias
    self.kernel_init = kernel_init
    self.bias_init = bias_init
    self.kernel_metadata = with_axes(('conv_spatial',) * n + kernel_axes, kernel_metadata)
    self.bias_metadata = with_axes(('conv_out',), bias_metadata)
    self.param_dtype = param_dtype
    self.dtype = dtype

  def _bias(self, params: Params, outputs: jax.Array) -> tuple[jax.Array, Params]:
    if not self.use_bias:
      return outputs, params
    bias, params = self.get_param(
        params, 'bias', (self.output_channels,), self.bias_init, dtype=self.param_dtype,
        metadata=self.bias_metadata, rng=self.rng)
    return add_bias(outputs, bias), params

  @property
  def _where(self) -> str:
    return f"{type(self).__name__} {path_to_str(self.graph.path)}"


class Conv(_ConvBase):
  """N-d convolution (cross-correlation, as in every DL library).

  Params:
    kernel: [*kernel_size, in_channels // feature_group_count, output_channels],
      axes ('conv_spatial', ..., 'conv_in', 'conv_out')
    bias: [output_channels], axes ('conv_out',)
  `inputs: [*batch, *spatial, in_channels]` -> `[*batch, *out_spatial, output_channels]`.
  """

  def __init__(
      self,
      graph: Graph,
      kernel_size: int | Sequence[int],
      output_channels: int,
      rng: Rng | None,
      strides: int | Sequence[int] = 1,
      padding: PaddingLike = 'SAME',
      input_dilation: int | Sequence[int] = 1,
      kernel_dilation: int | Sequence[int] = 1,
      feature_group_count: int = 1,
      use_bias: bool = True,
      kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
      bias_init: Initializer = jax.nn.initializers.zeros,
      kernel_metadata: dict[str, Any] | None = None,
      bias_metadata: dict[str, Any] | None = None,
      *,
      param_dtype: DType = jnp.float32,
      dtype: DType | None = None,
  ) -> None:
    super().__init__(graph)
    self._setup(kernel_size, output_channels, rng, strides, padding, kernel_dilation,
                feature_group_count, use_bias, kernel_init, bias_init, kernel_metadata,
                bias_metadata, ('conv_in', 'conv_out'), param_dtype, dtype)
    self.input_dilation = input_dilation

  def __call__(self, params: Params, inputs: jax.Array,
               precision: jax.lax.Precision | None = None) -> tuple[jax.Array, Params]:
    n = len(self.kernel_size)
    x, batch_shape = fold_batch(inputs, n, self._where, 'conv')  # [b, *spatial, c_in]
    c_in = x.shape[-1]
    if c_in % self.feature_group_count:
      raise ValueError(
          f'input_channels ({c_in}) must be divisible by feature_group_count '
          f'({self.feature_group_count}). {self._where}: the last input dim holds the '
          f'channels; give {self.feature_group_count} equal groups of them.'
      )
    kernel, params = self.get_param(
        params, 'kernel', self.kernel_size + (c_in // self.feature_group_count, self.output_channels),
        self.kernel_init, dtype=self.param_dtype, metadata=self.kernel_metadata, rng=self.rng)
    dtype = compute_dtype(self.dtype, x, kernel)
    y = jax.lax.conv_general_dilated(
        cast(x, dtype), cast(kernel, dtype),
        window_strides=as_tuple(self.strides, n, 'strides'),
        padding=self.padding,
        lhs_dilation=as_tuple(self.input_dilation, n, 'input_dilation'),
        rhs_dilation=as_tuple(self.kernel_dilation, n, 'kernel_dilation'),
        dimension_numbers=channels_last_specs(n, (n + 1, n)),
        feature_group_count=self.feature_group_count,
        precision=precision,
    )  # [b, *out_spatial, c_out]
    y, params = self._bias(params, y)
    return y.reshape(batch_shape + y.shape[1:]), params


class ConvTranspose(_ConvBase):
  """N-d transposed convolution (`jax.lax.conv_transpose`, kernel not flipped).

  Params:
    kernel: [*kernel_size, output_channels, in_channels], axes
      ('conv_spatial', ..., 'conv_out', 'conv_in')
    bias: [output_channels], axes ('conv_out',)
  `feature_group_count` other than 1 is refused: `jax.lax.conv_transpose`
  has no grouped form (jax-blox accepted it and then failed inside XLA).
  """

  def __init__(
      self,
      graph: Graph,
      kernel_size: int | Sequence[int],
      output_channels: int,
      rng: Rng | None,
      strides: int | Sequence[int] = 1,
      padding: PaddingLike = 'SAME',
      kernel_dilation: int | Sequence[int] = 1,
      feature_group_count: int = 1,
      use_bias: bool = True,
      kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
      bias_init: Initializer = jax.nn.initializers.zeros,
      kernel_metadata: dict[str, Any] | None = None,
      bias_metadata: dict[str, Any] | None = None,
      *,
      param_dtype: DType = jnp.float32,
      dtype: DType | None = None,
  ) -> None:
    super().__init__(graph)
    if feature_group_count != 1:
      raise ValueError(
          f"ConvTranspose {path_to_str(graph.path)}: feature_group_count="
          f'{feature_group_count} is not supported (jax.lax.conv_transpose has no '
          'groups). Use feature_group_count=1, or split the channels and apply one '
          'ConvTranspose per group.'
      )
    self._setup(kernel_size, output_channels, rng, strides, padding, kernel_dilation,
                feature_group_count, use_bias, kernel_init, bias_init, kernel_metadata,
                bias_metadata, ('conv_out', 'conv_in'), param_dtype, dtype)

  def __call__(self, params: Params, inputs: jax.Array,
               precision: jax.lax.Precision | None = None) -> tuple[jax.Array, Params]:
    n = len(self.kernel_size)
    x, batch_shape = fold_batch(inputs, n, self._where, 'conv_transpose')  # [b, *spatial, c_in]
    kernel, params = self.get_param(
        params, 'kernel', self.kernel_size + (self.output_channels, x.shape[-1]),
        self.kernel_init, dtype=self.param_dtype, metadata=self.kernel_metadata, rng=self.rng)
    dtype = compute_dtype(self.dtype, x, kernel)
    y = jax.lax.conv_transpose(
        cast(x, dtype), cast(kernel, dtype),
        strides=as_tuple(self.strides, n, 'strides'),
        padding=self.padding,
        rhs_dilation=as_tuple(self.kernel_dilation, n, 'kernel_dilation'),
        dimension_numbers=channels_last_specs(n, (n, n + 1)),
        precision=precision,
    )  # [b, *out_spatial, c_out]
    y, params = self._bias(params, y)
    return y.reshape(batch_shape + y.shape[1:]), params
