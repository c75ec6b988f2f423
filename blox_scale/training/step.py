"""The sharded train step: state, init on devices, loss -> grad -> optax update.

A small set of functions the trainer builds on and a user can call from their
own loop. Shardings are computed once, by the caller, and passed in:

  mesh = make_mesh(cfg.mesh); rules = rules_from_config(cfg.mesh)
  shardings = train_state_shardings(abstract_train_state(model, optimizer), mesh, rules)
  state = init_train_state(model, optimizer, seed, mesh, rules, shardings)
  train_step = make_train_step(model, optimizer, mesh, rules, shardings, batch_sharding(mesh, rules))
  for batch in batches:                 # global arrays, see distributed.make_global_batch
    state, metrics = train_step(state, batch)

`model` is anything with `init(seed) -> Params` and
`loss(params, batch, is_training) -> (loss, (metrics, params))` (the
`blox_scale.models.Model` protocol, which `DecoderLM` implements). `optimizer` is any `optax.GradientTransformation`; it
sees the trainable params only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import einops
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import blox as bx
from blox_scale.parallel import sharding
from blox_scale.parallel.sharding import Rules, param_shardings, use_mesh_rules
from blox_scale.training.offload import to_device

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything that changes during training, as one pytree.

  step: int32[] optimizer steps applied so far.
  params: all Params (trainable and non-trainable, e.g. RNG counters).
  opt_state: the optax state of the trainable params.
  """
  step: jax.Array
  params: bx.Params
  opt_state: Any

  def replace(self, **changes: Any) -> TrainState:
    return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(TrainState, data_fields=['step', 'params', 'opt_state'], meta_fields=[])


def _init_fn(model: Any, optimizer: optax.GradientTransformation, seed: int) -> Callable[[], TrainState]:
  def init() -> TrainState:
    params = model.init(seed)
    trainable, _ = params.split()
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(trainable))
  return init


def train_state_shardings(abstract_state: TrainState, mesh: Mesh, rules: Rules) -> TrainState:
  """NamedShardings for every leaf of a (possibly abstract) TrainState.

  Params follow their logical axes (errors name the param that does not
  divide); optimizer state follows the params it mirrors; the step is
  replicated.
  """
  return TrainState(
      step=NamedSharding(mesh, PartitionSpec()),
      params=param_shardings(abstract_state.params, mesh, rules),
      opt_state=sharding.state_shardings(abstract_state.opt_state, mesh, rules),
  )


def abstract_train_state(model: Any, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
  """The TrainState as ShapeDtypeStructs (`jax.eval_shape`: nothing allocated)."""
  return jax.eval_shape(_init_fn(model, optimizer, seed))


def abstract_batch(batch_size: int, seq_len: int, sharding: Any = None, packing: str = 'concat') -> Batch:
  """The train/eval batch as ShapeDtypeStructs (placed with `sharding`, e.g. `batch_sharding(mesh, rules)`).

  {'inputs': int32[B, T], 'targets': int32[B, T], 'mask': float32[B, T]}:
  the one description of a batch that the trainer, blox-plan and the tests
  compile against. `packing='document'` (data.packing) adds
  'segment_ids' and 'positions': int32[B, T].
  """
  dtypes = {'inputs': jnp.int32, 'targets': jnp.int32, 'mask': jnp.float32}
  if packing == 'document':
    dtypes.update(segment_ids=jnp.int32, positions=jnp.int32)
  return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=sharding) for k, dt in dtypes.items()}


def init_train_state(model: Any, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh,
                     rules: Rules, shardings: TrainState | None = None) -> TrainState:
  """Creates params and optimizer state directly in their shards.

  The init function runs under `jax.jit(out_shardings=...)`: each device
  computes only its own shard, so no host or device ever holds a whole
  weight matrix that is meant to be sharded. `shardings`: the
  `train_state_shardings` the caller already has (computed here if None).
  """
  return sharded_init_fn(model, optimizer, seed, mesh, rules, shardings)()


def sharded_init_fn(model: Any, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh,
                    rules: Rules, shardings: TrainState | None = None) -> Callable[[], TrainState]:
  """The jitted, argument-free init that `init_train_state` calls.

  Exposed so that its compiled memory can be inspected
  (`sharded_init_fn(...).lower().compile().memory_analysis()`).
  """
  init = _init_fn(model, optimizer, seed)
  if shardings is None:
    shardings = train_state_shardings(jax.eval_shape(init), mesh, rules)

  def sharded_init() -> TrainState:
    with use_mesh_rules(mesh, rules):
      return init()

  return jax.jit(sharded_init, out_shardings=shardings)


def _split_micro(batch: Batch, k: int) -> Batch:
  """`[B, ...]` -> `[k, B/k, ...]`, micro-batch i = rows i, i+k, i+2k, ...

  Interleaving (rather than contiguous blocks) keeps every micro-batch spread
  over all batch shards: device d holds rows of every micro-batch, so no
  micro-batch has to move between devices.
  """
  def split(x: jax.Array) -> jax.Array:
    b = x.shape[0]
    if b % k:
      raise ValueError(f'grad_accum_steps={k} does not divide the batch size {b}; '
                       'set optimizer.grad_accum_steps to a divisor of data.batch_size.')
    return einops.rearrange(x, '(rows k) ... -> k rows ...', k=k)
  return jax.tree.map(split, batch)


def _learning_rate(opt_state: Any) -> jax.Array | None:
  """The learning rate if the optimizer exposes it (`optax.inject_hyperparams`)."""
  try:
    return optax.tree_utils.tree_get(opt_state, 'learning_rate')
  except (KeyError, ValueError, TypeError):
    return None


def _loss_and_grad(model: Any, grad_shardings: bx.Params, trainable: bx.Params, rest: bx.Params, batch: Batch):
  """-> (loss, metrics, grads placed as `grad_shardings`, updated non-trainable params, token weight)."""
  def loss_fn(t: bx.Params):
    loss, (metrics, params) = model.loss(t.merge(rest), batch, is_training=True)
    return loss, (metrics, params)
  (loss, (metrics, params)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  # Gradients live in their param's shards: XLA then reduce-scatters them
  # instead of all-reducing whole gradients (and the accumulator stays sharded).
  grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
  _, new_rest = params.split()  # non-trainable state the model updated (RNG counters, ...)
  weight = jnp.asarray(metrics.get('tokens', 1.0), jnp.float32)
  return loss, metrics, grads, new_rest, weight


def _accumulated_loss_and_grad(loss_and_grad: Callable, k: int, batch_shardings: Any, grad_shardings: bx.Params,
                               trainable: bx.Params, rest: bx.Params, batch: Batch):
  """`loss_and_grad` over k micro-batches in a `lax.scan`, averaged weighted by token counts.

  -> (loss, metrics, grads, updated non-trainable params); 'tokens' is summed.
  """
  micro = _split_micro(batch, k)

  def body(carry, mb):
    grad_sum, rest, loss_sum, metric_sums, weight_sum = carry
    mb = jax.lax.with_sharding_constraint(mb, batch_shardings)
    loss, metrics, grads, rest, w = loss_and_grad(trainable, rest, mb)
    grad_sum = jax.tree.map(lambda a, g: a + w * g, grad_sum, grads)
    metric_sums = {n: metric_sums[n] + (metrics[n] if n == 'tokens' else w * metrics[n]) for n in metric_sums}
    return (grad_sum, rest, loss_sum + w * loss, metric_sums, weight_sum + w), None

  # The metric names are only known after tracing the model once.
  first = jax.tree.map(lambda x: x[0], micro)
  _, metrics_shape, _, _, _ = jax.eval_shape(loss_and_grad, trainable, rest, first)
  zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, trainable), grad_shardings)
  metric_zeros = {n: jnp.zeros((), jnp.float32) for n in metrics_shape}
  carry = (zeros, rest, jnp.zeros((), jnp.float32), metric_zeros, jnp.zeros((), jnp.float32))
  (grad_sum, rest, loss_sum, metric_sums, weight_sum), _ = jax.lax.scan(body, carry, micro)
  grads = jax.tree.map(lambda g: g / weight_sum, grad_sum)
  metrics = {n: (v if n == 'tokens' else v / weight_sum) for n, v in metric_sums.items()}
  return loss_sum / weight_sum, metrics, grads, rest


def make_train_step(model: Any, optimizer: optax.GradientTransformation, mesh: Mesh, rules: Rules,
                    state_shardings: TrainState, batch_shardings: Any, *,
                    grad_accum_steps: int = 1,
                    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
                    donate: bool = True) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Returns `jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, replicated))`.

  state_shardings: `train_state_shardings(abstract_state, mesh, rules)`; the
    new state keeps exactly this layout (donation reuses every buffer).
  batch_shardings: one `NamedSharding` for every batch array
    (`batch_sharding(mesh, rules)`) or a matching tree; the batch may arrive
    with any sharding and is constrained to it.
  batch: {'inputs': int32[B, T], 'targets': int32[B, T], 'mask': float32[B, T]}
    (`abstract_batch`), global arrays.
  metrics: float32 scalars 'loss', 'grad_norm' (before any clipping the
    optimizer does), the model's own metrics ('z_loss', 'tokens', ...),
    'learning_rate' and bool 'finite'. When the loss or the
    gradient is not finite the update is not applied: params and optimizer
    state are returned unchanged and 'finite' is False.
  The learning rate is read one way, `metrics['learning_rate']`: it is
  `learning_rate_fn(step)` (the schedule `make_optimizer` returns), else the
  optimizer's own when it exposes one (`optax.inject_hyperparams`), else absent.

  With `grad_accum_steps=k` the batch is split into k micro-batches run one
  after the other in a `lax.scan` (activation memory of B/k rows); losses and
  gradients are averaged weighted by each micro-batch's token count, which
  equals the full-batch loss when the model averages over masked tokens.
  The result is a plain jitted function: `.lower(abstract_state,
  abstract_batch)` compiles it ahead of time (blox-train, blox-plan).
  Leaves whose sharding has memory kind 'pinned_host' (`offload.place`,
  `train.offload`) are moved to device memory inside the step and their new
  values written back to host memory by `out_shardings`.
  """
  if grad_accum_steps < 1:
    raise ValueError(f'grad_accum_steps must be >= 1, got {grad_accum_steps}.')
  k = grad_accum_steps
  grad_shardings, _ = state_shardings.params.split()  # gradients are trainable-param-shaped
  loss_and_grad = functools.partial(_loss_and_grad, model, grad_shardings)
  accumulate = functools.partial(_accumulated_loss_and_grad, loss_and_grad, k, batch_shardings, grad_shardings)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    with use_mesh_rules(mesh, rules):
      state = to_device(state)  # offloaded leaves (train.offload) come in from host memory
      batch = jax.lax.with_sharding_constraint(batch, batch_shardings)
      trainable, rest = state.params.split()
      if k == 1:
        loss, metrics, grads, new_rest, _ = loss_and_grad(trainable, rest, batch)
      else:
        loss, metrics, grads, new_rest = accumulate(trainable, rest, batch)
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
      new_trainable = optax.apply_updates(trainable, updates)

      # A non-finite step changes nothing: select the old values. (A `cond`
      # would skip the update's compute, but the select is cheap next to the
      # step and keeps the output buffers aliasable with the donated input.)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      params = keep(new_trainable.merge(new_rest), state.params)
      opt_state = keep(opt_state, state.opt_state)
      new_state = TrainState(step=state.step + finite.astype(jnp.int32), params=params, opt_state=opt_state)

      out = {n: jnp.asarray(v, jnp.float32) for n, v in metrics.items()}
      out.update(loss=jnp.asarray(loss, jnp.float32), grad_norm=grad_norm, finite=finite)
      lr = learning_rate_fn(state.step) if learning_rate_fn is not None else _learning_rate(state.opt_state)
      if lr is not None:
        out['learning_rate'] = jnp.asarray(lr, jnp.float32)
      return new_state, out

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, donate_argnums=(0,) if donate else (), out_shardings=(state_shardings, replicated))


def make_eval_step(model: Any, mesh: Mesh, rules: Rules, batch_shardings: Any) -> Callable[[bx.Params, Batch], Metrics]:
  """Returns jitted `eval_step(params, batch) -> metrics` (is_training=False).

  batch_shardings: as for `make_train_step`.
  metrics: 'loss' and the model's own metrics, float32 scalars.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def eval_step(params: bx.Params, batch: Batch) -> Metrics:
    with use_mesh_rules(mesh, rules):
      params = to_device(params)  # offloaded frozen params come in from host memory
      batch = jax.lax.with_sharding_constraint(batch, batch_shardings)
      loss, (metrics, _) = model.loss(params, batch, is_training=False)
      out = {n: jnp.asarray(v, jnp.float32) for n, v in metrics.items()}
      out['loss'] = jnp.asarray(loss, jnp.float32)
      return out

  return jax.jit(eval_step, out_shardings=replicated)
