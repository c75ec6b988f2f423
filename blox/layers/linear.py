"""Linear and Embed: the dense layers of every model."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from blox.graph import Graph
from blox.layers._common import DType, add_bias, cast, compute_dtype, with_axes
from blox.module import Module
from blox.params import Params, path_to_str
from blox.rng import Rng

Initializer = jax.nn.initializers.Initializer


class Linear(Module):
  """`y = x @ kernel + bias`.

  Params (logical axes in `metadata['sharding']`):
    kernel: [in_features, output_size], axes ('embed', 'mlp')
    bias:   [output_size],              axes ('mlp',)
  Override the axes with `kernel_metadata={'sharding': (...)}` (and
  `bias_metadata`).

  Mixed precision: params are stored in `param_dtype`; with `dtype=None` the
  matmul uses jnp promotion of inputs and kernel (as jax-blox), otherwise
  inputs and params are cast to `dtype` and the output is `dtype`.
  """

  def __init__(
      self,
      graph: Graph,
      output_size: int,
      rng: Rng | None,
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
    self.output_size = output_size
    self.rng = rng
    self.use_bias = use_bias
    self.kernel_init = kernel_init
    self.bias_init = bias_init
    self.kernel_metadata = with_axes(('embed', 'mlp'), kernel_metadata)
    self.bias_metadata = with_axes(('mlp',), bias_metadata)
    self.param_dtype = param_dtype
    self.dtype = dtype

  def __call__(
      self,
      params: Params,
      inputs: jax.Array,
      precision: jax.lax.Precision | None = None,
  ) -> tuple[jax.Array, Params]:
    """`inputs: [..., in_features]` -> `[..., output_size]`."""
    if not inputs.shape:
      raise ValueError(
          f"Input must not be scalar. Linear {path_to_str(self.graph.path)}: input must "
          'have at least one dimension (the features), got a scalar. Reshape it, e.g. x[None].'
      )
    kernel, params = self.get_param(
        params, 'kernel', (inputs.shape[-1], self.output_size), self.kernel_init,
        dtype=self.param_dtype, metadata=self.kernel_metadata, rng=self.rng)
    dtype = compute_dtype(self.dtype, inputs, kernel)
    outputs = jnp.dot(cast(inputs, dtype), cast(kernel, dtype), precision=precision)
    if self.use_bias:
      bias, params = self.get_param(
          params, 'bias', (self.output_size,), self.bias_init,
          dtype=self.param_dtype, metadata=self.bias_metadata, rng=self.rng)
      outputs = add_bias(outputs, bias)
    return outputs, params


class Embed(Module):
  """Token embedding; `attend` is the tied output projection.

  Params:
    embedding: [num_embeddings, embedding_size], axes ('vocab', 'embed')

  `embed(params, ids: int[...]) -> [..., embedding_size]`
  `embed.attend(params, x: [..., embedding_size]) -> [..., num_embeddings]`
  With `dtype` set, looked-up rows and logits are in `dtype`.
  """

  def __init__(
      self,
      graph: Graph,
      num_embeddings: int,
      embedding_size: int,
      rng: Rng | None,
      embedding_init: Initializer = jax.nn.initializers.variance_scaling(1.0, 'fan_in', 'normal', out_axis=0),
      embedding_metadata: dict[str, Any] | None = None,
      *,
      param_dtype: DType = jnp.float32,
      dtype: DType | None = None,
  ) -> None:
    super().__init__(graph)
    self.num_embeddings = num_embeddings
    self.embedding_size = embedding_size
    self.rng = rng
    self.embedding_init = embedding_init
    self.embedding_metadata = with_axes(('vocab', 'embed'), embedding_metadata)
    self.param_dtype = param_dtype
    self.dtype = dtype

  def _table(self, params: Params) -> tuple[jax.Array, Params]:
    return self.get_param(
        params, 'embedding', (self.num_embeddings, self.embedding_size), self.embedding_init,
        dtype=self.param_dtype, metadata=self.embedding_metadata, rng=self.rng)

  def __call__(self, params: Params, indices: jax.Array) -> tuple[jax.Array, Params]:
    """`indices: int[...]` -> `[..., embedding_size]`."""
    if not jnp.issubdtype(jnp.asarray(indices).dtype, jnp.integer):
      raise TypeError(
          f"Embed {path_to_str(self.graph.path)}: indices must be integers, got "
          f'{jnp.asarray(indices).dtype}. Cast token ids with .astype(jnp.int32).'
      )
    table, params = self._table(params)
    # Gather first, cast after: only the looked-up rows are converted.
    rows = table[indices]
    return (rows if self.dtype is None else cast(rows, jnp.dtype(self.dtype))), params

  def attend(self, params: Params, inputs: jax.Array) -> tuple[jax.Array, Params]:
    """`inputs: [..., embedding_size]` -> logits `[..., num_embeddings]`."""
    table, params = self._table(params)
    dtype = compute_dtype(self.dtype, inputs, table)
    return jnp.dot(cast(inputs, dtype), cast(table, dtype).T), params
