"""Projection: a Linear with multi-dimensional kernels, named in its parent's namespace.

Attention keeps its kernels 3-d (`q: [embed, heads, head_dim]`,
`o: [heads, head_dim, embed]`) so that tensor parallelism can shard 'heads'
without a reshape. `Projection` is that einsum as a module, so that the
projections of attention are modules like `bx.Linear` (and can be wrapped by
`blox_scale.finetune`: LoRA, an int8 base), while the params keep the names
they always had: the module bound at `attn/q` stores its kernel at `attn/q`
and its bias at `attn/q_bias` (not `attn/q/kernel`), the layout of every
checkpoint and of the Hugging Face conversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import blox as bx
from blox.graph import Path
from blox.layers import DType, cast, compute_dtype


class Projection(bx.Module):
  """`y = contract(x, kernel) (+ bias)` over x's last `in_ndim` dims.

  `x: [..., *in_shape]`, `kernel: [*in_shape, *out_shape]` ->
  `y: [..., *out_shape]` in the compute dtype (`dtype`, or the promotion of x
  and the kernel). `out_shape` is given at the call (attention knows its
  head_dim only from the input width).

  Params (paths in the parent's namespace, see module doc):
    kernel: `[*in_shape, *out_shape]`, axes `kernel_axes`
    bias:   `[*out_shape]`, axes `kernel_axes[in_ndim:]` (with `use_bias`)
  """

  def __init__(
      self,
      graph: bx.Graph,
      rng: bx.Rng | None,
      *,
      in_ndim: int,
      kernel_axes: Sequence[str | None],
      kernel_init: Any,
      use_bias: bool = False,
      param_dtype: DType = jnp.float32,
      dtype: DType | None = None,
  ) -> None:
    super().__init__(graph)
    if in_ndim < 1 or in_ndim >= len(kernel_axes):
      raise ValueError(f"Projection {'/'.join(graph.path)}: in_ndim={in_ndim} must be in [1, "
                       f'{len(kernel_axes) - 1}] for kernel_axes={tuple(kernel_axes)}.')
    self.rng = rng
    self.in_ndim = in_ndim
    self.kernel_axes = tuple(kernel_axes)
    self.kernel_init = kernel_init
    self.use_bias = use_bias
    self.param_dtype = param_dtype
    self.dtype = dtype

  def param_path(self, name: str) -> Path:
    """`kernel` -> `<parent>/<name of this node>`, anything else -> `<parent>/<node>_<name>`."""
    own = self.graph.name
    return self.graph.parent.path + ((own if name == 'kernel' else f'{own}_{name}'),)

  def __call__(self, params: bx.Params, x: jax.Array, out_shape: Sequence[int]) -> tuple[jax.Array, bx.Params]:
    """`x: [..., *in_shape]` -> `[..., *out_shape]`."""
    n = self.in_ndim
    out_shape = tuple(int(d) for d in out_shape)
    if x.ndim < n or len(out_shape) != len(self.kernel_axes) - n:
      raise ValueError(
          f"Projection {'/'.join(self.graph.path)}: x {x.shape} needs at least in_ndim={n} dims and "
          f'out_shape {out_shape} {len(self.kernel_axes) - n} dims (kernel_axes={self.kernel_axes}).')
    kernel, params = self.get_param(
        params, 'kernel', x.shape[x.ndim - n:] + out_shape, self.kernel_init, dtype=self.param_dtype,
        metadata={'sharding': self.kernel_axes}, rng=self.rng)
    dtype = compute_dtype(self.dtype, x, kernel)
    y = jnp.tensordot(cast(x, dtype), cast(kernel, dtype), axes=n)
    if self.use_bias:
      bias, params = self.get_param(
          params, 'bias', out_shape, jax.nn.initializers.zeros, dtype=self.param_dtype,
          metadata={'sharding': self.kernel_axes[n:]}, rng=self.rng)
      y = y + cast(bias, dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
    return y, params
