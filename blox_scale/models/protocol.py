"""The model protocol: what blox-train and every tool call on a model.

`DecoderLM` implements it, and `build_model` builds it by default. For a model
that is not a decoder LM of that shape, `model.factory: 'pkg.module:fn'` names
a function that builds the whole model:

    def fn(graph: bx.Graph, config: ModelConfig, rng: bx.Rng) -> Model

`graph` is the model's root ('lm': params are named `lm/...`), `config` the
run's whole `model:` section (its free-form `config.factory_args` mapping holds
the model's own options, which `fn` validates), `rng` an unseeded `bx.Rng` at
`lm/rng` that `init` seeds. `fn` builds modules only (no arrays): every tool
calls it, also where nothing is allocated (config checks, blox-plan).

A `Model` has:

    config: ModelConfig
    init(seed) -> bx.Params
        Every param, locked. Pure: the trainer runs it under `jax.eval_shape`
        (abstract state, resume checks, blox-plan) and under
        `jax.jit(out_shardings=...)` (each device creates its own shards).
        Typically `params = rng.seed(bx.Params(), seed=seed)`, one forward
        pass on a dummy batch to create the rest, `params.locked()`.
    loss(params, batch, is_training=True) -> (loss, (metrics, params))
        `batch`: the trainer's batch (`abstract_batch`):
        `{'inputs', 'targets': int32[B, T], 'mask': float32[B, T]}`
        (+ `segment_ids`, `positions: int32[B, T]` with data.packing=document).
        `loss`: f32 scalar, differentiated w.r.t. the trainable params.
        `metrics`: f32 scalars, logged as they are; 'tokens' (the number of
        counted targets) weights micro-batches and eval batches.
        `params`: with any non-trainable state the call changed (RNG counters).

Optional: `graph` (the root `bx.Graph`, as `DecoderLM.graph`): fine-tuning
(`finetune.lora`, `finetune.quant`) finds the projections to wrap under it.

A model that can generate text (blox-sample, end-of-training samples) also
has the `Decoder` methods (`init_cache`, `decode`: the KV-cache form
`models/generate.py` drives, see `DecoderLM.decode`). Without them it trains,
and sampling says so in one line (`check_can_decode`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

import blox as bx
from blox_scale.models.config import ModelConfig

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class PluginError(ValueError):
  """A `model.block` / `model.factory` path that cannot be imported or is not a factory; the message names the key."""


class DecodeNotSupported(NotImplementedError):
  """The model cannot generate text (no KV-cache decode); the message names the config key and the fix."""


@runtime_checkable
class Model(Protocol):
  """What the trainer, blox-plan, checkpoint restore and resume call (see the module docstring)."""

  config: ModelConfig

  def init(self, seed: Any = 0) -> bx.Params:
    """Every param, locked; pure (runs under `jax.eval_shape` and `jax.jit`)."""
    ...

  def loss(self, params: bx.Params, batch: Batch, is_training: bool = True) -> tuple[jax.Array, tuple[Metrics, bx.Params]]:
    """`(loss, (metrics, params))` of the trainer's batch."""
    ...


@runtime_checkable
class Decoder(Protocol):
  """The optional decoding half of a `Model` (what `models/generate.py` calls)."""

  def init_cache(self, batch: int, length: int, dtype: Any = None) -> Any:
    """An empty cache for `batch` rows of `length` slots (any pytree)."""
    ...

  def decode(self, params: bx.Params, tokens: jax.Array, cache: Any, *, cache_index: Any,
             pad: jax.Array) -> tuple[tuple[jax.Array, Any], bx.Params]:
    """`tokens: int32[B, T]` at cache slots `[cache_index, cache_index + T)`, `pad: int32[B]` left-pad
    slots per row -> `((logits: f32[B, T, vocab], cache), params)`."""
    ...


PROTOCOL = 'config, init(seed) and loss(params, batch, is_training)'


def check_model(model: Any, spec: str) -> Model:
  """`model` if it has the `Model` members; else a PluginError naming `model.factory` and what is missing."""
  if isinstance(model, Model):
    return model
  missing = [name for name in ('config', 'init', 'loss') if not hasattr(model, name)]
  raise PluginError(f'model.factory={spec!r}: returned a {type(model).__name__}, which has no '
                    f'{", ".join(missing)}; return an object with {PROTOCOL} (docs/custom_blocks.md)')


def cannot_decode(model: Any) -> str | None:
  """None when `model` can generate text, else the one-line reason (naming the config key and the fix)."""
  if isinstance(model, Decoder):
    check = getattr(model, 'check_can_decode', None)  # DecoderLM: its block may have no cache form
    if check is not None:
      try:
        check()
      except DecodeNotSupported as e:
        return str(e)
    return None
  spec = getattr(getattr(model, 'config', None), 'factory', '')
  return (f'model.factory={spec!r}: {type(model).__name__} has no init_cache/decode, so it cannot generate text '
          '(blox-sample, end-of-training samples); add the Decoder methods to sample from it (docs/custom_blocks.md)')


def check_can_decode(model: Any) -> None:
  """Raises `DecodeNotSupported` (one line) unless `model` can generate text."""
  reason = cannot_decode(model)
  if reason is not None:
    raise DecodeNotSupported(reason)
