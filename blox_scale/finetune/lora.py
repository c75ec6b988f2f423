"""LoRA (Hu et al. 2021, arXiv:2106.09685) as a wrapper around any projection.

    y = base(x) + (alpha / rank) * (dropout(x) . A) . B

`A: [*in_shape, rank]` (random), `B: [rank, *out_shape]` (zeros, so the
wrapped model computes exactly what the base model computes until B moves).
The low-rank path runs on the activations: the frozen kernel only takes part
in the forward matmul and in the input gradient, never in a weight gradient.

    model = bs.DecoderLM(bx.Graph('lm'), config)
    bs.finetune.add_lora(model, targets=('attn/q', 'attn/v'), rank=8, alpha=16)
    params = bs.finetune.init_new_params(model, pretrained_params, seed=0)

Inside a `Stack` the adapters are block params like any other: stored once
with a leading layer axis (`lm/layers/block/attn/q_lora_a: [layers, embed, rank]`,
logical axes `('layers', 'embed', None)`) and sliced by the same scan as the
base weights.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import blox as bx
from blox.graph import Path
from blox.layers import cast
from blox_scale.finetune.wrap import Wrapper, find_wrapper, projections, select, wrap_outermost

_state = threading.local()


@contextlib.contextmanager
def lora_dropout(enabled: bool = True) -> Iterator[None]:
  """While tracing inside this context, LoRA dropout is applied (training).

  Projections do not receive `is_training`; the fine-tuning train step enters
  this context around the loss (`bs.finetune.FineTuned(model).loss(...,
  is_training=True)` does it), so evaluation and sampling never drop.
  """
  previous = getattr(_state, 'dropout', False)
  _state.dropout = bool(enabled)
  try:
    yield
  finally:
    _state.dropout = previous


def _a_init(in_ndim: int) -> Any:
  # PEFT's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), var 1/(3 fan_in).
  return jax.nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform', in_axis=tuple(range(in_ndim)),
                                              out_axis=in_ndim)


class LoRA(Wrapper):
  """A low-rank adapter around a projection (`bx.Linear`, `bs.nn.Projection`, ...).

  Args:
    inner: the projection module (or a wrapper around it, e.g. an int8 base).
    rank: r, the adapter rank (>= 1).
    alpha: the output is scaled by alpha / rank.
    dropout_rate: dropout on the adapter's input, applied inside `lora_dropout()`.
    rng: draws A's init and the dropout masks (default: the projection's rng).
    param_dtype: dtype of A and B (float32: adapters and their optimizer state
      stay f32 whatever the base is stored in).

  Params (next to the projection's kernel, see `Wrapper`):
    lora_a: `[*in_shape, rank]`, axes `(*kernel_in_axes, None)`
    lora_b: `[rank, *out_shape]`, axes `(None, *kernel_out_axes)`
  """

  def __init__(self, inner: bx.Module, rank: int, alpha: float, dropout_rate: float = 0.0,
               rng: bx.Rng | None = None, param_dtype: Any = jnp.float32) -> None:
    super().__init__(inner)
    where = bx.path_to_str(self.graph.path)
    if not isinstance(rank, int) or rank < 1:
      raise ValueError(f'LoRA {where}: rank={rank!r} must be an int >= 1 (finetune.lora.rank).')
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f'LoRA {where}: dropout_rate={dropout_rate} must be in [0, 1) (finetune.lora.dropout).')
    self.rank = rank
    self.alpha = float(alpha)
    self.dropout_rate = float(dropout_rate)
    self.rng = rng if rng is not None else getattr(self.base, 'rng', None)
    if self.rng is None:
      raise ValueError(f'LoRA {where}: no bx.Rng to initialise A with (the projection has none); pass rng=.')
    self.param_dtype = param_dtype

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def __call__(self, params: bx.Params, x: jax.Array, *args: Any, **kwargs: Any) -> tuple[jax.Array, bx.Params]:
    y, params = self.inner(params, x, *args, **kwargs)
    n = self.in_ndim
    in_shape, out_shape = x.shape[x.ndim - n:], y.shape[x.ndim - n:]
    axes = tuple(params[self.param_path('kernel')].sharding)
    axes += (None,) * (n + len(out_shape) - len(axes))  # a short sharding means trailing Nones
    a, params = self.get_param(params, 'lora_a', in_shape + (self.rank,), _a_init(n), dtype=self.param_dtype,
                               metadata={'sharding': axes[:n] + (None,)}, rng=self.rng)
    b, params = self.get_param(params, 'lora_b', (self.rank,) + out_shape, jax.nn.initializers.zeros,
                               dtype=self.param_dtype, metadata={'sharding': (None,) + axes[n:]}, rng=self.rng)
    h = x
    if self.dropout_rate > 0.0 and getattr(_state, 'dropout', False):
      key, params = self.rng(params)
      keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, h.shape)
      h = jnp.where(keep, h / (1.0 - self.dropout_rate), jnp.zeros_like(h))
    dtype = y.dtype
    h = jnp.tensordot(cast(h, dtype), cast(a, dtype), axes=n)       # [..., rank]
    delta = jnp.tensordot(h, cast(b, dtype), axes=1)                # [..., *out_shape]
    return y + cast(delta * jnp.asarray(self.scale, dtype), dtype), params


def add_lora(model: Any, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
             rng: bx.Rng | None = None) -> list[Path]:
  """Wraps every projection of `model` whose path matches `targets` with `LoRA`.

  `model`: a `DecoderLM`, any module, or a graph (the model is changed in
  place; build it, call this, then create or load params). Returns the
  wrapped module paths. Adapter params do not exist yet: create them with
  `init_new_params` (pretrained weights) or `model.init` (from scratch).
  """
  chosen = select(model, targets, 'finetune.lora.targets')
  already = [bx.path_to_str(p) for p, m in chosen if find_wrapper(m, LoRA)]
  if already:
    raise ValueError(f'LoRA is already applied to {already}; call add_lora once per model.')
  for _, module in chosen:
    wrap_outermost(module, lambda m: LoRA(m, rank, alpha, dropout, rng))
  return [p for p, _ in chosen]


def lora_modules(model: Any) -> list[LoRA]:
  """Every LoRA wrapper of the model."""
  found = (find_wrapper(module, LoRA) for _, module in projections(model))
  return [m for m in found if m is not None]


class WithLoRADropout:
  """`model` whose `loss(..., is_training=True)` (and call) runs inside `lora_dropout()`.

  Everything else is the wrapped model's (`init`, `config`, `decode`, ...).
  The train step is given this; eval and sampling use the model itself.
  """

  def __init__(self, model: Any) -> None:
    self.model = model

  def __getattr__(self, name: str) -> Any:
    return getattr(self.model, name)

  def loss(self, params: bx.Params, batch: Any, is_training: bool = True) -> Any:
    with lora_dropout(is_training):
      return self.model.loss(params, batch, is_training=is_training)

  def __call__(self, params: bx.Params, tokens: Any, is_training: bool = False) -> Any:
    with lora_dropout(is_training):
      return self.model(params, tokens, is_training=is_training)
