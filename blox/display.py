"""Looking at a model: `display` (treescope tree) and `summary` (text table).

Both read only the static Graph and the Params' shapes, dtypes and metadata,
so they work on abstract params from `jax.eval_shape` as well.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from blox.graph import Graph, Path
from blox.module import Module
from blox.params import Param, Params, path_to_str


def _nbytes(value: Any) -> int:
  """Bytes of an array or ShapeDtypeStruct (typed PRNG keys included)."""
  dtype = getattr(value, 'dtype', None)
  if dtype is None:
    return 0
  size = int(np.prod(np.shape(value), dtype=np.int64))
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    # A typed key stores its raw uint32 words: 2 for the default threefry impl.
    return size * int(np.prod(jax.random.key_data(jax.random.key(0)).shape)) * 4
  return size * np.dtype(dtype).itemsize


def _size(value: Any) -> int:
  return int(np.prod(np.shape(value), dtype=np.int64)) if hasattr(value, 'shape') else 0


def _human(n: int) -> str:
  for unit in ('B', 'KB', 'MB', 'GB'):
    if n < 1024 or unit == 'GB':
      return f'{n} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  raise AssertionError  # unreachable


def _dtype_name(value: Any) -> str:
  dtype = getattr(value, 'dtype', None)
  return '-' if dtype is None else str(getattr(dtype, 'name', dtype))


def _as_graphs(graph: Graph | Sequence[Graph]) -> tuple[Graph, ...]:
  graphs = (graph,) if isinstance(graph, Graph) else tuple(graph)
  for g in graphs:
    if not isinstance(g, Graph):
      raise TypeError(f'display/summary expect a bx.Graph (or a tuple of them), got {type(g).__name__}.')
  return graphs


# -- display (treescope) -----------------------------------------------------


class _Constructor:
  """Renders as `TypeName(arg=..., ...)`."""

  def __init__(self, name: str, args: dict[str, Any]) -> None:
    self.name, self.args = name, args

  def __treescope_repr__(self, path: str, subtree_renderer: Any) -> Any:
    import treescope
    return treescope.repr_lib.render_object_constructor(
        object_type=type(self.name, (), {}), attributes=self.args, path=path,
        subtree_renderer=subtree_renderer, roundtrippable=False)


class _ModuleRef:
  """A module passed to another module's constructor (e.g. the shared Rng)."""

  def __init__(self, module: Module) -> None:
    self.text = f"<{type(module).__name__} at {path_to_str(module.graph.path)}>"

  def __treescope_repr__(self, path: str, subtree_renderer: Any) -> Any:
    import treescope
    return treescope.rendering_parts.text(self.text)


def _param_view(param: Param) -> _Constructor:
  attrs: dict[str, Any] = {}
  if hasattr(param.value, 'shape'):
    attrs['shape'] = tuple(param.value.shape)
    attrs['dtype'] = _dtype_name(param.value)
  if param.metadata:
    attrs['metadata'] = dict(param.metadata)
  attrs['value'] = param.value
  return _Constructor(f"Param[{'T' if param.trainable else 'N'}]", attrs)


def _config(module: Module | None) -> dict[str, Any]:
  if module is None:
    return {}
  args = getattr(module, '_init_args', {})
  return {k: _refs(v) for k, v in args.items() if v is not None}


def _refs(value: Any) -> Any:
  """Modules inside constructor args are shown by path, not expanded again."""
  if isinstance(value, Module):
    return _ModuleRef(value)
  if isinstance(value, (list, tuple)) and not hasattr(value, '_fields'):
    return type(value)(_refs(v) for v in value)
  if isinstance(value, dict):
    return {k: _refs(v) for k, v in value.items()}
  return value


def _node_view(graph: Graph, by_parent: dict[Path, dict[str, Param]], with_params: bool) -> tuple[_Constructor, int, int]:
  """Returns (view, number of elements, bytes) for `graph` and its subtree."""
  module = graph.module
  body: dict[str, Any] = {}
  count = nbytes = 0
  config = _config(module)
  own = by_parent.get(graph.path, {})
  if with_params:
    if config:
      body['__init__'] = _Constructor(type(module).__name__, config)
    for name, param in own.items():
      body[name] = _param_view(param)
      count += _size(param.value)
      nbytes += _nbytes(param.value)
  else:
    body.update(config)
  for name, child in graph.children.items():
    view, c, b = _node_view(child, by_parent, with_params)
    body[name] = view
    count += c
    nbytes += b
  title = type(module).__name__ if module is not None else 'Graph'
  if count:
    title += f' # Params: {count} ({_human(nbytes)})'
  return _Constructor(title, body), count, nbytes


def tree_view(graph: Graph | Sequence[Graph], params: Params | None = None) -> Any:
  """The object `display` renders (a treescope-renderable tree)."""
  graphs = _as_graphs(graph)
  by_parent: dict[Path, dict[str, Param]] = {}
  for path, param in (params.items() if params is not None else ()):
    by_parent.setdefault(path[:-1], {})[path[-1]] = param
  views = {}
  for g in graphs:
    view, _, _ = _node_view(g, by_parent, params is not None)
    view.name = f'{g.name}: {view.name}'
    views[g.name] = view
  if len(views) == 1:
    return next(iter(views.values()))
  return _Constructor('Model', views)


def display(graph: Graph | Sequence[Graph], params: Params | None = None) -> None:
  """Shows the graph (and params, if given) as a foldable treescope tree.

  In a notebook the tree is interactive; in a terminal its text rendering is
  printed. Pass a tuple of graphs to show several models together.
  """
  import treescope
  view = tree_view(graph, params)
  if 'IPython' in sys.modules and getattr(sys.modules['IPython'], 'get_ipython', lambda: None)() is not None:
    treescope.show(view)
  else:
    print(treescope.render_to_text(view))


# -- summary (plain text) ----------------------------------------------------


_HEADER = ('path', 'module', 'shape', 'dtype', 'trainable', 'logical axes', 'bytes')


def summary_rows(graph: Graph | Sequence[Graph], params: Params) -> list[tuple[str, ...]]:
  """One row per param under the graph(s): the cells of `summary`'s table."""
  graphs = _as_graphs(graph)
  if not isinstance(params, Params):
    raise TypeError(f'summary expects bx.Params as its second argument, got {type(params).__name__}.')
  rows = []
  for path, param in params.items():
    if not any(path[:len(g.path)] == g.path for g in graphs):
      continue
    owner = _find(graphs, path[:-1])
    module = owner.module if owner is not None else None
    axes = param.sharding
    rows.append((
        path_to_str(path),
        type(module).__name__ if module is not None else '-',
        str(tuple(np.shape(param.value))),
        _dtype_name(param.value),
        'yes' if param.trainable else 'no',
        ', '.join('-' if a is None else str(a) for a in axes) if axes else '-',
        str(_nbytes(param.value)),
    ))
  return rows


def _find(graphs: tuple[Graph, ...], path: Path) -> Graph | None:
  for g in graphs:
    if path[:len(g.path)] != g.path:
      continue
    node = g
    for name in path[len(g.path):]:
      node = node.children.get(name)
      if node is None:
        break
    else:
      return node
  return None


def summary(graph: Graph | Sequence[Graph], params: Params) -> str:
  """A plain-text table of every param: path, module, shape, dtype,
  trainable, logical axes, bytes, then totals. `print(bx.summary(g, p))`."""
  rows = summary_rows(graph, params)
  table = [_HEADER] + rows
  widths = [max(len(r[i]) for r in table) for i in range(len(_HEADER))]
  right = {6}  # numbers align right

  def line(cells: Sequence[str]) -> str:
    return '  '.join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

  rule = '-' * len(line(_HEADER))
  out = [line(_HEADER), rule] + [line(r) for r in rows] + [rule]
  counts = {True: 0, False: 0}
  total_bytes = 0
  for path, param in params.items():
    if any(path[:len(g.path)] == g.path for g in _as_graphs(graph)):
      counts[param.trainable] += _size(param.value)
      total_bytes += _nbytes(param.value)
  out.append(
      f'total: {len(rows)} params, {counts[True] + counts[False]:,} elements '
      f'({counts[True]:,} trainable, {counts[False]:,} non-trainable), '
      f'{total_bytes:,} bytes ({_human(total_bytes)})'
  )
  return '\n'.join(out)


def print_summary(graph: Graph | Sequence[Graph], params: Params) -> None:
  """`print(summary(graph, params))`."""
  print(summary(graph, params))
