"""LSTM and GRU cells; `apply` runs them over `[batch, time, features]`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from blox.graph import Graph
from blox.layers._common import DType
from blox.layers.linear import Linear
from blox.params import Params, path_to_str
from blox.rng import Rng
from blox.sequence import RecurrenceBase


class LSTMState(NamedTuple):
  """`hidden, cell: [batch, hidden_size]`."""

  hidden: jax.Array
  cell: jax.Array


class GRUState(NamedTuple):
  """`hidden: [batch, hidden_size]`."""

  hidden: jax.Array


def _state_dtype(dtype: DType | None) -> DType:
  # The scan carry must keep one dtype: the state is created in the dtype
  # the step computes in (float32 unless a compute dtype is given).
  return jnp.float32 if dtype is None else jnp.dtype(dtype)


class LSTM(RecurrenceBase[jax.Array, LSTMState, jax.Array, jax.Array]):
  """Long short-term memory cell.

  One Linear `gates` maps `concat(x, h)` to the four gates (i, g, f, o):
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g);  h' = sigmoid(o) * tanh(c')
  Step: `inputs: [batch, in]`, state `LSTMState` -> output `h': [batch, hidden_size]`.
  Params: gates/kernel [in + hidden_size, 4 * hidden_size], gates/bias [4 * hidden_size].
  """

  def __init__(self, graph: Graph, hidden_size: int, rng: Rng | None, is_static: bool = False, *,
               param_dtype: DType = jnp.float32, dtype: DType | None = None) -> None:
    super().__init__(graph, is_static)
    self.hidden_size = hidden_size
    self.dtype = dtype
    self.gates = Linear(graph.child('gates'), 4 * hidden_size, rng=rng, param_dtype=param_dtype, dtype=dtype)

  def initial_state(self, params: Params, inputs: jax.Array) -> tuple[LSTMState, Params]:
    """Zeros `[batch, hidden_size]`; `inputs: [batch, ...]` gives the batch size."""
    zeros = jnp.zeros((inputs.shape[0], self.hidden_size), _state_dtype(self.dtype))
    return LSTMState(hidden=zeros, cell=zeros), params

  def __call__(self, params: Params, inputs: jax.Array, prev_state: LSTMState | None,
               is_reset: jax.Array | None = None, is_training: bool = True) -> tuple[tuple[jax.Array, LSTMState], Params]:
    del is_training  # no dropout inside the cell
    if prev_state is None:
      raise ValueError(
          f"The LSTM __call__ method requires a valid prev_state. LSTM {path_to_str(self.graph.path)}: "
          'a step needs prev_state; build one with '
          'state, params = lstm.initial_state(params, x), or use lstm.apply for a sequence.'
      )
    state = self.maybe_reset_state(params, prev_state, inputs, is_reset)
    h, c = state.hidden, state.cell
    gates, params = self.gates(params, jnp.concatenate([inputs.astype(h.dtype), h], axis=-1))
    i, g, f, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, LSTMState(hidden=h, cell=c)), params


class GRU(RecurrenceBase[jax.Array, GRUState, jax.Array, jax.Array]):
  """Gated recurrent unit.

    z, r = sigmoid(gates(concat(x, h)));  n = tanh(candidate(concat(x, r * h)))
    h' = (1 - z) * h + z * n
  Params: gates/{kernel,bias} (2 * hidden_size outputs), candidate/{kernel,bias}.
  """

  def __init__(self, graph: Graph, hidden_size: int, rng: Rng | None, is_static: bool = False, *,
               param_dtype: DType = jnp.float32, dtype: DType | None = None) -> None:
    super().__init__(graph, is_static)
    self.hidden_size = hidden_size
    self.dtype = dtype
    self.gates = Linear(graph.child('gates'), 2 * hidden_size, rng=rng, param_dtype=param_dtype, dtype=dtype)
    self.candidate = Linear(graph.child('candidate'), hidden_size, rng=rng, param_dtype=param_dtype, dtype=dtype)

  def initial_state(self, params: Params, inputs: jax.Array) -> tuple[GRUState, Params]:
    """Zeros `[batch, hidden_size]`; `inputs: [batch, ...]` gives the batch size."""
    return GRUState(hidden=jnp.zeros((inputs.shape[0], self.hidden_size), _state_dtype(self.dtype))), params

  def __call__(self, params: Params, inputs: jax.Array, prev_state: GRUState | None,
               is_reset: jax.Array | None = None, is_training: bool = True) -> tuple[tuple[jax.Array, GRUState], Params]:
    del is_training
    if prev_state is None:
      raise ValueError(
          f"The GRU __call__ method requires a valid prev_state. GRU {path_to_str(self.graph.path)}: "
          'a step needs prev_state; build one with '
          'state, params = gru.initial_state(params, x), or use gru.apply for a sequence.'
      )
    h = self.maybe_reset_state(params, prev_state, inputs, is_reset).hidden
    x = inputs.astype(h.dtype)
    zr, params = self.gates(params, jnp.concatenate([x, h], axis=-1))
    z, r = jnp.split(jax.nn.sigmoid(zr), 2, axis=-1)
    n, params = self.candidate(params, jnp.concatenate([x, r * h], axis=-1))
    h = (1 - z) * h + z * jnp.tanh(n)
    return (h, GRUState(hidden=h)), params
