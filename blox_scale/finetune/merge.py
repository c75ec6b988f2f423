"""Folding adapters into the base weights: plain params of the base model.

    kernel' = dequantize(kernel) + (alpha / rank) * A . B      (per layer)

The result has the base model's layout and nothing else (no adapters, no
int8 scales), in the dtype each projection asks for (`param_dtype`), with
the trainable flags of a freshly initialised model: any code that reads the
base model's params (the model without `add_lora`, `bs.hf.save`, a blox
checkpoint) reads it. Works on concrete arrays and under `jax.jit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

import blox as bx
from blox_scale.finetune.lora import LoRA
from blox_scale.finetune.params import unfreeze
from blox_scale.finetune.quant import _leading_layers, dequantize_array, dequantize_expert_kernel, int8_expert_kernels
from blox_scale.finetune.wrap import Wrapper, in_ndim, projections


def lora_delta(a: jnp.ndarray, b: jnp.ndarray, lead: int, scale: float) -> jnp.ndarray:
  """`a: [*lead, *in, r]`, `b: [*lead, r, *out]` -> `scale * a . b: [*lead, *in, *out]` (f32)."""
  lead_shape = a.shape[:lead]
  in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
  r = a.shape[-1]
  a2 = a.astype(jnp.float32).reshape((math.prod(lead_shape), math.prod(in_shape), r))
  b2 = b.astype(jnp.float32).reshape((math.prod(lead_shape), r, math.prod(out_shape)))
  return (scale * jnp.matmul(a2, b2)).reshape(lead_shape + in_shape + out_shape)


def fold(outer: Wrapper, read: Callable[[tuple[str, ...]], bx.Param]) -> bx.Param:
  """The base kernel of the wrapped projection `outer`, int8 dequantized and every LoRA folded in.

  `read(path)` returns a stored `Param` (its metadata names the leading layer
  axes): the kernel, its int8 scales, the adapters. Returns the kernel's Param
  with the merged value, `[*layers, *in, *out]` in the projection's `param_dtype`.
  """
  base = outer.base
  kernel = read(outer.param_path('kernel'))
  lead, n = _leading_layers(kernel), in_ndim(base)
  dtype = jnp.dtype(getattr(base, 'param_dtype', kernel.dtype))
  if kernel.dtype == jnp.int8:
    w = dequantize_array(kernel.value, read(outer.param_path('kernel_scale')).value, lead, n, jnp.float32)
  else:
    w = jnp.asarray(kernel.value).astype(jnp.float32)
  module = outer
  while isinstance(module, Wrapper):
    if isinstance(module, LoRA):
      a, b = read(module.param_path('lora_a')).value, read(module.param_path('lora_b')).value
      w = w + lora_delta(jnp.asarray(a), jnp.asarray(b), lead, module.scale)
    module = module.inner
  return kernel.replace(value=w.astype(dtype))


def merge(model: Any, params: bx.Params) -> bx.Params:
  """Returns the base model's params with every LoRA folded in and every int8 kernel (experts too) dequantized."""
  data = dict(params.items())
  for _, outer in projections(model):
    if isinstance(outer, Wrapper):
      data[outer.param_path('kernel')] = fold(outer, data.pop)
  for path, moe in int8_expert_kernels(model).items():
    data[path] = dequantize_expert_kernel(moe, path, data.pop)
  return unfreeze(bx.Params(data, params.is_locked))


def merged_reader(model: Any, stored: bx.Params,
                  fetch: Callable[[tuple[str, ...]], Any]) -> Callable[[tuple[str, ...]], Any]:
  """`fetch` of the adapted model's stored params -> the same for the base model's params, one at a time.

  stored: the adapted model's abstract params (shapes and metadata). `fetch(path)`
  returns one stored array (e.g. read from a checkpoint); the result returns the
  base model's array at `path`, folded with `fold` where `model` wraps that kernel,
  so an export holds one projection and its adapters in memory, not the model.
  """
  wrapped = {outer.param_path('kernel'): outer for _, outer in projections(model) if isinstance(outer, Wrapper)}
  experts = int8_expert_kernels(model)
  stored_param = lambda p: stored[p].replace(value=fetch(p))

  def read(path: tuple[str, ...]) -> Any:
    if path in experts:
      return np.asarray(dequantize_expert_kernel(experts[path], path, stored_param).value)
    if path not in wrapped:
      return fetch(path)
    return np.asarray(fold(wrapped[path], stored_param).value)

  return read
