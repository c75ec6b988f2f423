"""Sequence processing: SequenceBase, RecurrenceBase, static_scan, dynamic_scan.

A step function has the signature
  `((outputs_t, state), params) = step(params, inputs_t, state, is_reset_t, is_training)`
and the scans apply it over axis 1 (time) of `inputs: [batch, time, ...]`,
returning `((outputs: [batch, time, ...], final_state), params)`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from blox.errors import SequenceLengthError
from blox.graph import Graph
from blox.module import Module
from blox.params import Params, path_to_str

InputsT = TypeVar('InputsT')
StateT = TypeVar('StateT')
OutputsT = TypeVar('OutputsT')
ResetT = TypeVar('ResetT')

StepFn = Callable[[Params, Any, Any, Any, bool], tuple[tuple[Any, Any], Params]]


def _time_length(inputs: Any, where: str, rank_error: str = 'Input leaves must have rank >= 2, got {ndim}.') -> int:
  """The common length of axis 1 of every leaf; errors begin with jax-blox's sentence."""
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError(
        f'The input Pytree cannot be empty. {where}: inputs are an empty pytree; give at '
        'least one [batch, time, ...] array.')
  for x in leaves:
    if x.ndim < 2:
      raise ValueError(
          f'{rank_error.format(ndim=x.ndim)} {where}: every input leaf must be [batch, time, ...] '
          f'(rank >= 2), got shape {x.shape}.')
  length = leaves[0].shape[1]
  for x in leaves:
    if x.shape[1] != length:
      lengths = sorted({y.shape[1] for y in leaves})
      raise SequenceLengthError(
          f'[Chex] Assertion assert_axis_dimension failed: Expected tensor to have dimension equal '
          f"to '{length}' on axis '1' but got '{x.shape[1]}' instead. {where}: input leaves disagree "
          f'on the time length (axis 1): {lengths}.')
  return length


def _at(tree: Any, t: int) -> Any:
  return jax.tree.map(lambda x: x[:, t], tree)


def _stack_time(items: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *items)


def static_scan(step_fn: StepFn, params: Params, inputs: Any, prev_state: Any, is_reset: Any,
                is_training: bool) -> tuple[tuple[Any, Any], Params]:
  """Applies `step_fn` over time with a Python loop (unrolled in a jaxpr).

  Useful for debugging and for short sequences; `dynamic_scan` compiles once
  whatever the length.
  """
  length = _time_length(inputs, 'static_scan')
  outputs, state = [], prev_state
  for t in range(length):
    (out, state), params = step_fn(params, _at(inputs, t), state, _at(is_reset, t), is_training)
    outputs.append(out)
  return (_stack_time(outputs), state), params


def dynamic_scan(step_fn: StepFn, params: Params, inputs: Any, prev_state: Any, is_reset: Any,
                 is_training: bool) -> tuple[tuple[Any, Any], Params]:
  """Applies `step_fn` over time with `jax.lax.scan`.

  Params are part of the scan carry (the RNG counter and other state change
  each step), so their structure must not change inside the scan. With
  unlocked params (lazy init) the first step therefore runs outside the scan
  and creates every param; the remaining steps are scanned. This gives the
  same numbers as the unrolled loop, while jax-blox fell back to a Python
  loop over the whole sequence for init.
  """
  length = _time_length(inputs, 'dynamic_scan')
  first = []
  if not params.is_locked:
    (out0, prev_state), params = step_fn(params, _at(inputs, 0), prev_state, _at(is_reset, 0), is_training)
    first = [out0]
    inputs = jax.tree.map(lambda x: x[:, 1:], inputs)
    is_reset = jax.tree.map(lambda x: x[:, 1:], is_reset)
    if length == 1:
      return (_stack_time(first), prev_state), params

  def body(carry, xs):
    state, p = carry
    x_t, reset_t = xs
    (out, state), p = step_fn(p, x_t, state, reset_t, is_training)
    return (state, p), out

  time_major = lambda tree: jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), tree)  # noqa: E731
  (state, params), outputs = jax.lax.scan(body, (prev_state, params), (time_major(inputs), time_major(is_reset)))
  outputs = time_major(outputs)  # [batch, time, ...]
  if first:
    outputs = jax.tree.map(lambda a, b: jnp.concatenate([a[:, None], b], axis=1), first[0], outputs)
  return (outputs, state), params


class SequenceBase(Module, Generic[InputsT, StateT, OutputsT, ResetT], metaclass=abc.ABCMeta):
  """Interface of sequence modules (abstract: a subclass that misses one of
  the three methods cannot be instantiated).

  `__call__` processes one step (`inputs: [batch, ...]`), `apply` a whole
  sequence (`inputs: [batch, time, ...]`), `initial_state` builds the state
  for a batch.
  """

  @abc.abstractmethod
  def initial_state(self, params: Params, inputs: InputsT) -> tuple[StateT, Params]:
    """The state before the first step; `inputs` gives the batch size."""

  @abc.abstractmethod
  def __call__(self, params: Params, inputs: InputsT, prev_state: StateT | None,
               is_reset: ResetT | None = None, is_training: bool = True) -> tuple[tuple[OutputsT, StateT], Params]:
    """One step: `((outputs, new_state), params)`."""

  @abc.abstractmethod
  def apply(self, params: Params, inputs: InputsT, prev_state: StateT | None = None,
            is_reset: ResetT | None = None, is_training: bool = True) -> tuple[tuple[OutputsT, StateT], Params]:
    """A whole sequence: `((outputs: [batch, time, ...], final_state), params)`."""


class RecurrenceBase(SequenceBase[InputsT, StateT, OutputsT, ResetT]):
  """A recurrent module: `apply` scans `__call__` over time.

  `is_static=True` uses `static_scan` (Python loop), else `dynamic_scan`
  (`jax.lax.scan`).
  """

  def __init__(self, graph: Graph, is_static: bool = False) -> None:
    super().__init__(graph)
    self._is_static = bool(is_static)

  @property
  def is_static(self) -> bool:
    return self._is_static

  @is_static.setter
  def is_static(self, value: bool) -> None:
    self._is_static = bool(value)

  def maybe_reset_state(self, params: Params, prev_state: StateT, inputs: InputsT,
                        is_reset: ResetT | None = None) -> StateT:
    """Replaces the state of batch rows where `is_reset: bool[batch]` is True by a fresh one."""
    if is_reset is None:
      return prev_state
    fresh, _ = self.initial_state(params, inputs)

    def pick(new: jax.Array, old: jax.Array, reset: jax.Array) -> jax.Array:
      reset = reset.reshape(reset.shape + (1,) * (old.ndim - reset.ndim))  # [batch, 1, ...]
      return jnp.where(reset, new.astype(old.dtype), old)

    if isinstance(is_reset, (jax.Array, np.ndarray)):  # one flag per row for the whole state
      return jax.tree.map(lambda n, o: pick(n, o, is_reset), fresh, prev_state)
    return jax.tree.map(pick, fresh, prev_state, is_reset)

  def apply(self, params: Params, inputs: InputsT, prev_state: StateT | None = None,
            is_reset: ResetT | None = None, is_training: bool = True) -> tuple[tuple[OutputsT, StateT], Params]:
    """`inputs: [batch, time, ...]` -> `((outputs: [batch, time, ...], final_state), params)`."""
    _time_length(inputs, f"{type(self).__name__} {path_to_str(self.graph.path)}.apply",
                 'Input leaves must have rank >= 2.')
    if prev_state is None:
      prev_state, params = self.initial_state(params, _at(inputs, 0))
    scan = static_scan if self._is_static else dynamic_scan
    return scan(self, params, inputs, prev_state, is_reset, is_training)
