"""Group: k different sub-blocks applied in sequence, as one stackable block.

Heterogeneous models repeat a pattern (local, local, global attention...).
`Stack(g, lambda g: Group(g, [local, local, global]), num_layers // 3)`
scans the pattern num_layers/3 times; each sub-block's params are stacked
separately under `block/sub_{j}/...`. A remainder (num_layers not a
multiple of the pattern) runs in a second Stack of the leftover sub-blocks:
see docs/stack.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import blox as bx


class Group(bx.Module):
  """Sub-blocks `blocks[0], blocks[1], ...` applied in order to the carry.

  Args:
    graph: this group's node; sub-block j is built at `graph.child(names[j])`.
    blocks: factories `graph -> Module`, each called as `x, params =
      sub(params, x, *args, **kwargs)`.
    names: child names (default `sub_0`, `sub_1`, ...).
    per_layer: when True the group is called as `((x, ys), params) =
      group(params, x, xs, ...)` with `xs` a tuple of one per-layer input per
      sub-block (None for sub-blocks that take none) and each sub-block
      called as `((x, y), params) = sub(params, x, x_j, ...)`; use it with
      `Stack.call_per_layer` (e.g. one KV cache per attention sub-block).
  """

  def __init__(self, graph: bx.Graph, blocks: Sequence[Callable[[bx.Graph], bx.Module]],
               names: Sequence[str] | None = None, per_layer: bool = False) -> None:
    super().__init__(graph)
    if not blocks:
      raise ValueError(f'Group {bx.path_to_str(graph.path)}: give at least one sub-block factory.')
    names = [f'sub_{j}' for j in range(len(blocks))] if names is None else list(names)
    if len(names) != len(blocks):
      raise ValueError(f'Group {bx.path_to_str(graph.path)}: {len(names)} names for {len(blocks)} blocks.')
    self.blocks = [make(graph.child(name)) for make, name in zip(blocks, names)]
    self.per_layer = per_layer

  def __call__(self, params: bx.Params, x: Any, *args: Any, **kwargs: Any) -> tuple[Any, bx.Params]:
    if not self.per_layer:
      for sub in self.blocks:
        x, params = sub(params, x, *args, **kwargs)
      return x, params
    xs, *args = args
    if len(xs) != len(self.blocks):
      raise ValueError(
          f'Group {bx.path_to_str(self.graph.path)}: per-layer input has {len(xs)} entries '
          f'for {len(self.blocks)} sub-blocks; give one per sub-block (None if unused).'
      )
    ys = []
    for sub, x_j in zip(self.blocks, xs):
      if x_j is None:
        x, params = sub(params, x, *args, **kwargs)
        ys.append(None)
      else:
        (x, y_j), params = sub(params, x, x_j, *args, **kwargs)
        ys.append(y_j)
    return (x, tuple(ys)), params
