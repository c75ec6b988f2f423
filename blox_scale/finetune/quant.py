"""A frozen int8 base: weight-only quantization with per-output-channel scales.

    kernel_q = round(kernel / scale).clip(-127, 127) : int8[*in_shape, *out_shape]
    scale    = max |kernel| over the input dims / 127 : f32[*out_shape]

Stored: the int8 kernel at the kernel's own path and the scales beside it
(`mlp/wi_gate/kernel_scale`, `attn/q_kernel_scale`), a quarter of the f32
bytes plus one float per output channel. At run time `Int8Base` hands the
projection `kernel_q * scale` in the dtype the projection asks for, right
before its matmul, one layer at a time inside the stack's scan: the
dequantized weight is a per-layer temporary of the step, never a stored copy.
The rounding error per weight is at most scale / 2 (tests check the bound).

Mixture-of-experts layers hold their experts as stacked kernels inside one
`MoE` module, not projections: `add_int8_base` marks the `MoE` modules, and
`quantize` stores `moe/wi_gate: int8[*layers, E, d, f]` with
`moe/wi_gate_scale: f32[*layers, E, f]` (one scale per expert and output
channel); `MoE` dequantizes them itself per call, for either dispatch path.

A 4-bit mode is not provided: none of the JAX quantization libraries covers
a weight-only int4/NF4 base of plain arrays without taking over the model
code (qwix intercepts Flax modules), and per-channel int4 without groups
loses too much; see docs/finetuning.md.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import blox as bx
from blox_scale.finetune.wrap import Wrapper, find_wrapper, graph_of, in_ndim, projections, select, wrap_innermost
from blox_scale.nn.moe import MoE
from blox_scale.stacking.layout import LAYERS

QUANT_MODES = ('none', 'int8')


def _leading_layers(param: bx.Param) -> int:
  """How many leading stacked-layer axes a param has (one per enclosing Stack)."""
  n = 0
  for name in tuple(param.sharding):
    if name != LAYERS:
      break
    n += 1
  return n


def quantize_array(kernel: jax.Array, lead: int, n_in: int) -> tuple[jax.Array, jax.Array]:
  """`kernel: [*lead, *in, *out]` -> `(int8 same shape, f32 scale [*lead, *out])`."""
  w = jnp.asarray(kernel, jnp.float32)
  in_axes = tuple(range(lead, lead + n_in))
  scale = jnp.max(jnp.abs(w), axis=in_axes) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel stays zero
  q = jnp.clip(jnp.round(w / jnp.expand_dims(scale, in_axes)), -127, 127).astype(jnp.int8)
  return q, scale


def dequantize_array(q: jax.Array, scale: jax.Array, lead: int, n_in: int, dtype: Any) -> jax.Array:
  """Inverse of `quantize_array`, computed in f32 and returned in `dtype`."""
  in_axes = tuple(range(lead, lead + n_in))
  return (q.astype(jnp.float32) * jnp.expand_dims(scale.astype(jnp.float32), in_axes)).astype(dtype)


class Int8Base(Wrapper):
  """Reads the projection's int8 kernel and scales; the projection sees a float kernel.

  Before `quantize` has run (lazy init, a float checkpoint) the kernel is
  float and passes straight through.
  """

  def __call__(self, params: bx.Params, x: Any, *args: Any, **kwargs: Any) -> tuple[Any, bx.Params]:
    kpath = self.param_path('kernel')
    stored = params.get(kpath)
    if stored is None or stored.dtype != jnp.int8:
      return self.inner(params, x, *args, **kwargs)
    scale = params[self.param_path('kernel_scale')].value
    dtype = jnp.dtype(getattr(self.base, 'param_dtype', jnp.float32))
    w = dequantize_array(stored.value, scale, 0, self.in_ndim, dtype)
    view = params.with_param(kpath, stored.replace(value=w))
    y, out = self.inner(view, x, *args, **kwargs)
    # The int8 param goes back unchanged (identity: a Stack sees no update of it).
    return y, out.with_param(kpath, stored)


def add_int8_base(model: Any, targets: tuple[str, ...] = ('*',), experts: bool = True) -> list[tuple[str, ...]]:
  """Wraps the projections matching `targets` (default: all) with `Int8Base`, below any LoRA.

  experts: also store the stacked expert kernels of every `MoE` module as int8
  (`int8_experts`); `MoE` dequantizes them itself, one scale per expert and
  output channel. Returns the wrapped projections' paths.
  """
  chosen = select(model, targets, 'finetune.quant targets')
  for _, module in chosen:
    if not find_wrapper(module, Int8Base):
      wrap_innermost(module, Int8Base)
  if experts:
    for _, module in moe_modules(model):
      module.int8_experts = True
  return [p for p, _ in chosen]


def moe_modules(model: Any) -> list[tuple[tuple[str, ...], MoE]]:
  """`(path, module)` of every `MoE` module of the model's graph."""
  graph = graph_of(model)
  found = [(graph.path, graph.module)] if isinstance(graph.module, MoE) else []
  return found + [(p, m) for p, m in graph.walk() if isinstance(m, MoE)]


def int8_expert_kernels(model: Any) -> dict[tuple[str, ...], MoE]:
  """Param path -> `MoE` module of every expert kernel that `add_int8_base` stores as int8."""
  return {m.param_path(name): m for _, m in moe_modules(model) if getattr(m, 'int8_experts', False)
          for name in (*m.names, 'wo')}


def dequantize_expert_kernel(module: MoE, path: tuple[str, ...], read: Any) -> bx.Param:
  """The float Param of the expert kernel at `path` (`read(path)` gives stored Params), in `param_dtype`."""
  kernel = read(path)
  if kernel.dtype != jnp.int8:
    return kernel
  scale = read(path[:-1] + (path[-1] + '_scale',))
  w = dequantize_array(kernel.value, scale.value, _leading_layers(kernel) + 1, 1, module.mlp.param_dtype)
  return kernel.replace(value=w)


def quantize(model: Any, params: bx.Params) -> bx.Params:
  """Returns params with the kernel of every `Int8Base` projection stored as int8 + scales.

  Also the expert kernels of `MoE` modules that `add_int8_base` marked
  (`moe/wi_gate: int8[*layers, E, d, f]`, `moe/wi_gate_scale: f32[*layers, E, f]`).
  Works on concrete arrays and under `jax.jit` / `jax.eval_shape`. Quantized
  kernels and their scales are frozen (`trainable=False`).
  """
  data = dict(params.items())
  for _, module in projections(model):
    if not find_wrapper(module, Int8Base):
      continue
    kpath, spath = module.param_path('kernel'), module.param_path('kernel_scale')
    if kpath not in data:
      raise KeyError(f"quantize: no kernel at {bx.path_to_str(kpath)}; create or load the params first.")
    kernel = data[kpath]
    if kernel.dtype == jnp.int8:
      continue
    lead, n = _leading_layers(kernel), in_ndim(module)
    q, scale = quantize_array(kernel.value, lead, n)
    axes = tuple(kernel.sharding)
    axes += (None,) * (np.ndim(q) - len(axes))  # a short sharding means trailing Nones
    frozen = {**kernel.metadata, 'frozen': True}
    data[kpath] = bx.Param(q, False, frozen)
    scale_axes = axes[:lead] + axes[lead + n:]
    data[spath] = bx.Param(scale, False, {'sharding': scale_axes, 'frozen': True})
  for kpath in int8_expert_kernels(model):
    if kpath not in data:
      raise KeyError(f"quantize: no expert kernel at {bx.path_to_str(kpath)}; create or load the params first.")
    data.update(_quantized_experts(data[kpath], kpath))
  return bx.Params(data, params.is_locked)


def _quantized_experts(kernel: bx.Param, kpath: tuple[str, ...]) -> dict[tuple[str, ...], bx.Param]:
  """`[*layers, E, in, out]` -> int8 at `kpath` and f32 scales `[*layers, E, out]` at `kpath + '_scale'`."""
  if kernel.dtype == jnp.int8:
    return {}
  lead = _leading_layers(kernel) + 1  # the expert axis: one scale per expert and output channel
  q, scale = quantize_array(kernel.value, lead, 1)
  axes = tuple(kernel.sharding)
  axes += (None,) * (np.ndim(q) - len(axes))
  frozen = {**kernel.metadata, 'frozen': True}
  return {kpath: bx.Param(q, False, frozen),
          kpath[:-1] + (kpath[-1] + '_scale',): bx.Param(scale, False, {'sharding': axes[:lead] + axes[lead + 1:],
                                                                         'frozen': True})}
