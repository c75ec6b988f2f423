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
from typing import Any

import jax.numpy as jnp

import blox as bx
from blox_scale.finetune.lora import LoRA
from blox_scale.finetune.params import unfreeze
from blox_scale.finetune.quant import _leading_layers, dequantize_array
from blox_scale.finetune.wrap import Wrapper, in_ndim, projections


def lora_delta(a: jnp.ndarray, b: jnp.ndarray, lead: int, scale: float) -> jnp.ndarray:
  """`a: [*lead, *in, r]`, `b: [*lead, r, *out]` -> `scale * a . b: [*lead, *in, *out]` (f32)."""
  lead_shape = a.shape[:lead]
  in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
  r = a.shape[-1]
  a2 = a.astype(jnp.float32).reshape((math.prod(lead_shape), math.prod(in_shape), r))
  b2 = b.astype(jnp.float32).reshape((math.prod(lead_shape), r, math.prod(out_shape)))
  return (scale * jnp.matmul(a2, b2)).reshape(lead_shape + in_shape + out_shape)


def merge(model: Any, params: bx.Params) -> bx.Params:
  """Returns the base model's params with every LoRA folded in and every int8 kernel dequantized."""
  data = dict(params.items())
  for _, outer in projections(model):
    if not isinstance(outer, Wrapper):
      continue
    base = outer.base
    kpath = outer.param_path('kernel')
    kernel = data[kpath]
    lead, n = _leading_layers(kernel), in_ndim(base)
    dtype = jnp.dtype(getattr(base, 'param_dtype', kernel.dtype))
    spath = outer.param_path('kernel_scale')
    if kernel.dtype == jnp.int8:
      w = dequantize_array(kernel.value, data.pop(spath).value, lead, n, jnp.float32)
    else:
      w = kernel.value.astype(jnp.float32)
    module = outer
    while isinstance(module, Wrapper):
      if isinstance(module, LoRA):
        a = data.pop(module.param_path('lora_a')).value
        b = data.pop(module.param_path('lora_b')).value
        w = w + lora_delta(a, b, lead, module.scale)
      module = module.inner
    data[kpath] = kernel.replace(value=w.astype(dtype))
  return unfreeze(bx.Params(data, params.is_locked))
