"""Sequential: apply layers one after another."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax

from blox.graph import Graph
from blox.module import Module
from blox.params import Params


class Sequential(Module):
  """Chains layers: blox Modules are called as `x, params = layer(params, x)`,
  plain callables (e.g. `jax.nn.relu`) as `x = f(x)`."""

  def __init__(self, graph: Graph, layers: Sequence[Module | Callable[[jax.Array], jax.Array]]) -> None:
    super().__init__(graph)
    for i, layer in enumerate(layers):
      if not callable(layer):
        raise TypeError(
            f"Sequential {'/'.join(graph.path)}: layer {i} is a {type(layer).__name__}, "
            'not a Module or a callable.'
        )
    self.layers = list(layers)

  def __call__(self, params: Params, inputs: jax.Array) -> tuple[jax.Array, Params]:
    x = inputs
    for layer in self.layers:
      if isinstance(layer, Module):
        x, params = layer(params, x)
      else:
        x = layer(x)
    return x, params
