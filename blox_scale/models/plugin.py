"""Your own layer or model: `model.block` / `model.factory: 'pkg.module:fn'`.

The `DecoderLM` repeats one layer in a `bs.Stack`. By default that layer is
`TransformerBlock`; `model.block` names a function that builds another one:

    def factory(graph: bx.Graph, config: ModelConfig, rng: bx.Rng) -> bx.Module

`config` is the whole `model:` section (`config.d_model`, `config.num_heads`,
... and the free-form `config.block_args` mapping, which the factory
validates); `rng` is the model's `bx.Rng`, which the Stack folds per layer.
The returned module is called like `TransformerBlock`:

    y, params = block(params, x, positions=positions, is_training=is_training)

with `x: [batch, seq, d_model]` and `y` of the same shape and dtype. A block
that also supports KV-cache decoding (`blox-sample`) accepts the cache form

    (y, new_kv), params = block(params, x, cache, positions=p, mask=m, cache_index=i)

with `cache = {'k', 'v'}: [batch, S, kv_heads, head_dim]` (its layer's
slice) and `new_kv` its T new keys/values (`bs.Attention` implements exactly
this, so a block built from it gets decoding for free).

A factory whose block holds a repeating pattern of n layers (bs.Group) says
so with an attribute `factory.layers_per_block(config) -> n`; the Stack then
scans num_layers / n blocks, and the cache call gets `[n, batch, S, ...]`.
A block that adds to the loss declares `aux_names` (a tuple of names,
including 'aux_loss'): DecoderLM then passes the carry `(x, aux)` with
`aux = {name: f32[]}` running sums (zeros into the first layer), adds the
final `aux['aux_loss']` to the loss and reports every entry as a metric
(nn/moe_block.py is the worked example).

The factory path is recorded in the run's config.yaml, so every tool that
rebuilds the model (resume, blox-sample, blox-plan, blox-convert) gets the
same block. docs/custom_blocks.md walks through a complete example.

`model.factory` replaces the whole model instead (same signature, returning
a `models.protocol.Model`); `resolve` imports both.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from blox_scale.models.protocol import DecodeNotSupported, PluginError  # noqa: F401  (re-exported)


def resolve(spec: str, key: str = 'model.block') -> Callable[..., Any]:
  """`'pkg.module:factory'` -> the factory function.

  The module is imported as Python would from the current directory too (a
  console script like `blox-train` does not put the current directory on
  `sys.path`; `python -m` does), so a block in `./my_blocks.py` is found as
  `my_blocks:factory`.
  """
  module_name, sep, attr = spec.partition(':')
  if not sep or not module_name or not attr:
    raise PluginError(f"{key}={spec!r}: not of the form 'pkg.module:factory'; "
                      f"write the module's import path, a colon and the function name (e.g. my_blocks:parallel_block)")
  try:
    module = _import(module_name)
  except ModuleNotFoundError as e:
    raise PluginError(f"{key}={spec!r}: cannot import {e.name!r} ({e}); "
                      'install the package or run from the directory that holds it') from e
  except Exception as e:  # the user's module raised while importing: show that error's one line
    raise PluginError(f'{key}={spec!r}: importing {module_name} failed: {type(e).__name__}: {e}; fix that module') from e
  obj = module
  for part in attr.split('.'):
    if not hasattr(obj, part):
      names = sorted(n for n in dir(module) if not n.startswith('_') and callable(getattr(module, n)))
      raise PluginError(f'{key}={spec!r}: {module_name} has no {attr!r}; '
                        f'its callables are: {", ".join(names) or "(none)"}')
    obj = getattr(obj, part)
  if not callable(obj):
    raise PluginError(f'{key}={spec!r}: {attr} is a {type(obj).__name__}, not a function; '
                      f'point it at a function (graph, model_config, rng) -> {_RETURNS[key]}')
  try:
    inspect.signature(obj).bind(None, None, None)
  except TypeError as e:
    raise PluginError(f'{key}={spec!r}: {attr} cannot be called as factory(graph, model_config, rng) ({e}); '
                      'give it exactly those three parameters') from e
  except ValueError:  # builtins without a signature: trust them
    pass
  return obj


_RETURNS = {'model.block': 'Module', 'model.factory': 'model'}


def _import(module_name: str) -> Any:
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    cwd = os.getcwd()
    if e.name != module_name.split('.')[0] or cwd in sys.path:
      raise
    sys.path.insert(0, cwd)
    return importlib.import_module(module_name)


def layers_per_block(factory: Callable[..., Any], config: Any) -> int:
  """How many layers one block of `factory` holds (`factory.layers_per_block(config)`, default 1)."""
  count = getattr(factory, 'layers_per_block', None)
  n = 1 if count is None else count(config)
  if not isinstance(n, int) or n < 1 or config.num_layers % n:
    raise PluginError(f'model.num_layers={config.num_layers}: the block holds {n} layers, which must divide it; '
                      f'set model.num_layers to a multiple of {n}')
  return n


def supports_cache(block: Any) -> bool:
  """Whether `block`'s call takes a KV cache (`block(params, x, cache, ...)`), as decoding needs."""
  try:
    return 'cache' in inspect.signature(block.__call__).parameters
  except (TypeError, ValueError):
    return False
