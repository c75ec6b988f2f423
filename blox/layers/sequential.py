"""Sequential: apply layers one after another."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax

from blox.graph import Graph
from blox.module import Module
from blox.params import Params, path_to_str


class Sequential(Module):
  """Chains layers: blox Modules are called as `x, params = layer(params, x)`,
  plain callables (e.g. `jax.nn.relu`) as `x = f(x)`. `layers` is a sequence,
  or a mapping whose values are applied in order (its keys are only labels;
  param paths come from each module's own graph node)."""

  def __init__(self, graph: Graph,
               layers: Sequence[Module | Callable[[jax.Array], jax.Array]] | Mapping[str, Module | Callable]) -> None:
    super().__init__(graph)
    if isinstance(layers, Mapping):
      layers = list(layers.values())
    for i, layer in enumerate(layers):
      if not callable(layer):
        raise TypeError(
            f"Sequential {path_to_str(graph.path)}: layer {i} is a {type(layer).__name__}, "
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
