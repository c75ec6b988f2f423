"""Wrapping the projections of a built model graph, selected by path pattern.

A blox model is a static `Graph` of modules; its arrays live in `Params`. A
fine-tuning change to a projection (LoRA, an int8 frozen base) is a module
that wraps the projection's module in place: it takes the projection's graph
node and its attribute in the parent module, stores its own params next to
the projection's (the wrapped module's `param_path`), and calls it. Because a
`Stack` builds its block once and scans it, wrapping a projection inside the
block wraps it in every layer, and the wrapper's params are created by the
stack's vmapped init with the leading layer axis, like every block param.

Path patterns (`attn/q`, `mlp/*`, `layers/block/attn`): '/'-separated
segments (read by `bx.str_to_path`: `%2F` is a '/' inside one graph name),
each an `fnmatch` pattern; a pattern matches a path when its
segments match a contiguous run of the path's names (so `attn/q` matches
`lm/layers/block/attn/q` and `mlp/*` matches `.../mlp/wi_gate/kernel`).
A projection is selected when its own path matches (or a pattern names one
of its ancestors, e.g. `attn` selects q, k, v and o).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import blox as bx
from blox.graph import Path
from blox_scale.nn.projection import Projection


def path_matches(path: Path, pattern: str) -> bool:
  """True when the segments of `pattern` match a contiguous run of `path`."""
  parts = [p for p in bx.str_to_path(pattern.strip('/')) if p]  # '%2F' is a '/' inside one name
  if not parts:
    raise ValueError(f'Empty path pattern {pattern!r}: give names such as attn/q or mlp/*.')
  n = len(parts)
  return any(all(fnmatch.fnmatchcase(path[i + j], parts[j]) for j in range(n)) for i in range(len(path) - n + 1))


def matches_any(path: Path, patterns: Iterable[str]) -> bool:
  return any(path_matches(path, p) for p in patterns)


def graph_of(model: Any) -> bx.Graph:
  """The graph of a model (`.graph`), a module, or a graph itself."""
  graph = model if isinstance(model, bx.Graph) else getattr(model, 'graph', None)
  if not isinstance(graph, bx.Graph):
    raise TypeError(f'Expected a model with a .graph (e.g. bs.DecoderLM), a bx.Module or a bx.Graph, '
                    f'got {type(model).__name__}.')
  return graph


class Wrapper(bx.Module):
  """A module that takes the place of `inner` in the graph and delegates to it.

  Params are named by the innermost wrapped module (`param_path`), so that a
  wrapper's own params sit next to the projection's kernel: `mlp/wi_gate/lora_a`
  beside `mlp/wi_gate/kernel`, `attn/q_lora_a` beside `attn/q`.
  """

  def __init__(self, inner: bx.Module) -> None:
    graph = inner.graph
    # The node binds one module; the wrapper takes the inner module's place
    # (graph.walk, display and summary then show the wrapper).
    graph._module = None
    super().__init__(graph)
    self.inner = inner

  @property
  def base(self) -> bx.Module:
    """The projection module at the bottom of the chain of wrappers."""
    inner = self.inner
    while isinstance(inner, Wrapper):
      inner = inner.inner
    return inner

  def param_path(self, name: str) -> Path:
    return self.base.param_path(name)

  @property
  def in_ndim(self) -> int:
    return in_ndim(self.base)

  def __call__(self, params: bx.Params, x: Any, *args: Any, **kwargs: Any) -> tuple[Any, bx.Params]:
    return self.inner(params, x, *args, **kwargs)


def find_wrapper(module: bx.Module, kind: type) -> Wrapper | None:
  """The wrapper of type `kind` in `module`'s chain of wrappers, if any."""
  while isinstance(module, Wrapper):
    if isinstance(module, kind):
      return module
    module = module.inner
  return None


def is_projection(module: Any) -> bool:
  """`bx.Linear` (and subclasses), `bs.nn.Projection`, or a wrapper around one."""
  return isinstance(module, (bx.Linear, Projection, Wrapper))


def in_ndim(module: bx.Module) -> int:
  """How many trailing input dims the projection contracts with its kernel's leading dims."""
  if isinstance(module, Wrapper):
    return module.in_ndim
  return int(getattr(module, 'in_ndim', 1))  # bx.Linear: x[..., in] @ kernel[in, out]


def projections(model: Any) -> Iterator[tuple[Path, bx.Module]]:
  """`(path, module)` of every projection module in the model's graph, depth first."""
  graph = graph_of(model)
  if graph.module is not None and is_projection(graph.module):
    yield graph.path, graph.module
  for path, module in graph.walk():
    if is_projection(module):
      yield path, module


def select(model: Any, patterns: Sequence[str], what: str) -> list[tuple[Path, bx.Module]]:
  """The projections whose path matches one of `patterns`; an unmatched pattern is an error."""
  if isinstance(patterns, str):
    patterns = (patterns,)
  found = list(projections(model))
  unmatched = [p for p in patterns if not any(path_matches(path, p) for path, _ in found)]
  if unmatched:
    names = sorted({bx.path_to_str(path[-2:]) for path, _ in found})
    raise ValueError(f'{what}: pattern(s) {unmatched} match no projection of the model. Projections '
                     f'(bx.Linear or bs.nn.Projection modules) end in: {", ".join(names) or "none"}.')
  return [(path, m) for path, m in found if matches_any(path, patterns)]


def _owner(module: bx.Module) -> bx.Module:
  """The nearest ancestor module, which holds `module` as an attribute."""
  node = module.graph.parent
  while node is not None and node.module is None:
    node = node.parent
  if node is None:
    raise ValueError(f"Cannot wrap {bx.path_to_str(module.graph.path)}: it has no parent module holding it.")
  return node.module


def _replace_reference(holder: Any, old: Any, new: Any) -> bool:
  """Replaces `old` by `new` among `holder`'s attributes (and lists/tuples/dicts of them)."""
  for name, value in list(vars(holder).items()):
    if value is old:
      setattr(holder, name, new)
      return True
    if isinstance(value, list) and any(v is old for v in value):
      value[:] = [new if v is old else v for v in value]
      return True
    if isinstance(value, tuple) and any(v is old for v in value):
      setattr(holder, name, tuple(new if v is old else v for v in value))
      return True
    if isinstance(value, dict) and any(v is old for v in value.values()):
      for k, v in value.items():
        if v is old:
          value[k] = new
      return True
  return False


def wrap_innermost(module: bx.Module, make: Any) -> bx.Module:
  """Wraps the projection at the bottom of `module`'s wrapper chain with `make(base)`.

  `module` is what the graph node binds (a projection or the outermost
  wrapper). Returns the new outermost module of the node.
  """
  if isinstance(module, Wrapper):
    holder = module
    while isinstance(holder.inner, Wrapper):
      holder = holder.inner
    base = holder.inner
    holder.inner = make(base)
    module.graph._module = module  # the outermost wrapper keeps the node
    return module
  return wrap_outermost(module, make)


def wrap_outermost(module: bx.Module, make: Any) -> bx.Module:
  """Replaces `module` (bound to its node) by `make(module)` in the graph and in its parent."""
  owner = _owner(module)
  new = make(module)
  if not _replace_reference(owner, module, new):
    module.graph._module = module
    raise ValueError(
        f"Cannot wrap {bx.path_to_str(module.graph.path)}: its parent {type(owner).__name__} does not hold it "
        'as an attribute (or in a list/tuple/dict attribute). Keep sub-modules as attributes of the '
        'module that calls them.')
  return new
