"""Freezing by path pattern, new (adapter) params for a pretrained model, sizes.

Freezing is the static `Param.trainable` flag: `params.split()` (what the
train step differentiates and what the optimizer state is built from) then
leaves frozen params out entirely, so they get no gradient computation and no
Adam moments; they reach the loss as non-differentiated inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import blox as bx
from blox.graph import Path
from blox_scale.finetune.wrap import matches_any, path_matches

ADAPTER_NAMES = ('lora_a', 'lora_b')


def is_adapter(path: Path) -> bool:
  """A LoRA param (`.../lora_a`, `attn/q_lora_b`, ...)."""
  return any(path[-1] == n or path[-1].endswith('_' + n) for n in ADAPTER_NAMES)


def freeze(params: bx.Params, patterns: Sequence[str]) -> bx.Params:
  """Marks params whose path matches a pattern as frozen (`trainable=False`, metadata `frozen`).

  Unmatched patterns are an error (a typo would silently train everything).
  """
  if isinstance(patterns, str):
    patterns = (patterns,)
  unmatched = [p for p in patterns if not any(path_matches(k, p) for k in params.keys())]
  if unmatched:
    raise ValueError(f'finetune.freeze: pattern(s) {unmatched} match no param. Param paths look like '
                     f'{", ".join("/".join(k) for k in list(params.keys())[:4])}, ...')
  return bx.Params({k: (_frozen(p) if p.trainable and matches_any(k, patterns) else p) for k, p in params.items()},
                   params.is_locked)


def _frozen(param: bx.Param) -> bx.Param:
  return param.replace(trainable=False, metadata={**param.metadata, 'frozen': True})


def freeze_base(params: bx.Params) -> bx.Params:
  """Freezes every trainable param that is not a LoRA adapter (LoRA-only fine-tuning)."""
  return bx.Params({k: (_frozen(p) if p.trainable and not is_adapter(k) else p) for k, p in params.items()},
                   params.is_locked)


def unfreeze(params: bx.Params) -> bx.Params:
  """Undoes `freeze` (params of a plain model are trainable again)."""
  out = {}
  for k, p in params.items():
    if p.metadata.get('frozen'):
      meta = {m: v for m, v in p.metadata.items() if m != 'frozen'}
      p = p.replace(trainable=True, metadata=meta)
    out[k] = p
  return bx.Params(out, params.is_locked)


def init_new_params(model: Any, params: bx.Params, seed: int = 0, *, out_shardings: Any = None) -> bx.Params:
  """`params` plus every param the model creates that `params` lacks (e.g. LoRA adapters).

  The new params get the values a fresh `model.init(seed)` gives them: one
  jitted init whose only outputs are the new params, so XLA drops the
  (discarded) re-initialisation of everything else. `out_shardings`: a
  function `abstract Params -> shardings` to create them in their shards.
  """
  abstract = jax.eval_shape(model.init, seed)
  new = [k for k in abstract.keys() if k not in params]
  if not new:
    return params

  def init_new() -> bx.Params:
    fresh = model.init(seed)
    return bx.Params({k: fresh[k] for k in new}, params.is_locked)

  shardings = None
  if out_shardings is not None:
    shardings = out_shardings(jax.eval_shape(init_new))
  created = jax.jit(init_new, out_shardings=shardings)()
  return params.merge(created)


def count(params: bx.Params, trainable: bool | None = None) -> int:
  """Number of scalars (of trainable, frozen, or all params)."""
  return sum(int(np.prod(p.shape)) for p in params.values() if trainable is None or p.trainable == trainable)


def nbytes(tree: Any) -> int:
  """Bytes of every array leaf of a pytree (ShapeDtypeStructs count as well)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if hasattr(leaf, 'dtype') and hasattr(leaf, 'shape'):
      dt = leaf.dtype
      itemsize = np.dtype(dt).itemsize if not jax.dtypes.issubdtype(dt, jax.dtypes.extended) else 8
      total += int(np.prod(leaf.shape)) * itemsize
  return total
