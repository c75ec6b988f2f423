"""AdamW from small optax pieces: clip -> adam -> decoupled weight decay -> -lr.

    optimizer = optax.chain(
        optax.clip_by_global_norm(grad_clip),          # if grad_clip > 0
        optax.scale_by_adam(b1, b2, eps),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule),        # warmup, then cosine/linear/constant
    )

This is optax's `adamw` written out, so each piece can be read, swapped or
dropped. Gradient accumulation lives in the train step
(`make_train_step(..., grad_accum_steps=k)`), not here: the step averages k
micro-batch gradients and calls this optimizer once.

Weight decay is masked by the params' logical axes rather than by rank,
because stacking turns a norm scale `[d]` into `[layers, d]`: decay applies
only to params with at least two non-`layers` dimensions that are not norm
scales/biases (axis name `norm`) and not named `bias`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import blox as bx
from blox_scale.training.config import OptimizerConfig

Schedule = Callable[[Any], Any]

# optimizer.schedule: the decay after warmup (see lr_schedule).
SCHEDULES = ('cosine', 'linear', 'constant')


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> Schedule:
  """step (int or int32 array) -> learning rate (f32).

  Linear warmup to `learning_rate` over `warmup_steps` (step 0 already gets
  1/warmup of the peak, so no step is wasted at lr 0), then decay to
  `min_lr_ratio * learning_rate` at `total_steps` ('cosine' or 'linear'),
  or hold ('constant').
  """
  peak = cfg.learning_rate
  floor = cfg.learning_rate * cfg.min_lr_ratio
  warmup = max(0, cfg.warmup_steps)
  decay_steps = max(1, total_steps - warmup)
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={cfg.schedule!r} is not one of {', '.join(SCHEDULES)}.")

  def schedule(step: Any) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1.0) / max(1, warmup))
    t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if cfg.schedule == 'cosine':
      decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * t))
    elif cfg.schedule == 'linear':
      decayed = peak + (floor - peak) * t
    else:
      decayed = jnp.asarray(peak, jnp.float32)
    return jnp.where(step < warmup, warm, decayed)

  return schedule


def _decays(path: tuple[str, ...], param: bx.Param) -> bool:
  """True for matrices (kernels, embeddings); False for norms, biases and vectors."""
  axes = tuple(param.sharding)
  shape = param.shape
  if axes and axes[0] == 'layers':  # stacked by Stack: not a real dimension of the weight
    axes, shape = axes[1:], shape[1:]
  if 'norm' in axes or (path and path[-1] in ('bias', 'b')):
    return False
  return len(shape) >= 2


def decay_mask(params: Any) -> Any:
  """A pytree of bools like `params`: True where weight decay applies.

  For `bx.Params` the decision uses the logical axes (see module doc); for
  any other pytree, arrays with ndim >= 2 decay.
  """
  if isinstance(params, bx.Params):
    return params.replace_values({k: _decays(k, p) for k, p in params.items()})
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, Schedule]:
  """AdamW as a chain of small transforms, and its learning-rate schedule.

  Returns `(optimizer, schedule)`; `schedule(step)` is what the optimizer
  uses at update number `step` (the trainer logs it).
  """
  for key, value in (('optimizer.learning_rate', cfg.learning_rate), ('optimizer.eps', cfg.eps)):
    if not value > 0:
      raise ValueError(f'{key} must be > 0, got {value}.')
  for key, value in (('optimizer.b1', cfg.b1), ('optimizer.b2', cfg.b2), ('optimizer.min_lr_ratio', cfg.min_lr_ratio)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f'{key} must be in [0, 1], got {value}.')
  if cfg.weight_decay < 0 or cfg.grad_clip < 0:
    raise ValueError(f'optimizer.weight_decay ({cfg.weight_decay}) and optimizer.grad_clip ({cfg.grad_clip}) must be >= 0.')
  schedule = lr_schedule(cfg, total_steps)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  if cfg.weight_decay > 0:
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule
