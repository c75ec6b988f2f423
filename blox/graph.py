"""Graph: the static naming tree of a model. It holds names and modules, never arrays."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from blox.params import Path, path_to_str

if TYPE_CHECKING:
  from blox.module import Module


class Graph:
  """A node of the static naming tree.

  Each node has a `name` and a `path` (the names from the root down to it).
  A module binds to one node and stores its params under `node.path`.
  Child names are unique under a parent, so two modules can never share a
  param path by accident. A name may contain '/' (as in jax-blox): it stays
  one path element, `graph.child('a/b').path[-1] == 'a/b'`, while
  `graph / 'a' / 'b'` nests two nodes; wherever a path becomes a string
  (`bx.path_to_str`), a '/' inside a name is written `%2F`.
  """

  def __init__(self, name: str) -> None:
    if not name:
      raise ValueError(f'Graph node must have a name. Got {name!r}; pass a non-empty string such as \'net\'.')
    if not isinstance(name, str):
      raise ValueError(
          f'Graph name must be a string, got {type(name).__name__} {name!r}: param paths are '
          f'tuples of str (checkpoints and shardings are keyed by them). Pass str({name!r}).')
    self.name = name
    self.path: Path = (name,)
    self.metadata: dict[str, Any] = {}
    self._children: dict[str, Graph] = {}
    self._parent: Graph | None = None
    self._module: Module | None = None

  def child(self, name: str) -> Graph:
    """Returns a new child node called `name`; a duplicate name is an error."""
    if name in self._children:
      raise ValueError(
          f"Graph node '{self.path}' already has a child named '{name}'. Each child "
          f'needs its own name (e.g. {name}_1, {name}_2), so that no two modules '
          'share a param path.'
      )
    node = Graph(name)
    node._parent = self
    node.path = self.path + (name,)
    self._children[name] = node
    return node

  def __truediv__(self, name: str) -> Graph:
    return self.child(name)

  def _bind(self, module: Module) -> None:
    if self._module is not None:
      raise ValueError(
          f"Graph node '{self.path}' already bound to {self._module}. Cannot bind "
          f'{module}. Give each module its own node with graph.child(name).'
      )
    self._module = module

  @property
  def is_root(self) -> bool:
    return self._parent is None

  @property
  def parent(self) -> Graph | None:
    return self._parent

  @property
  def root(self) -> Graph:
    node = self
    while node._parent is not None:
      node = node._parent
    return node

  @property
  def module(self) -> Module | None:
    """The module bound to this node, if any (the root binds none)."""
    return self._module

  @property
  def children(self) -> dict[str, Graph]:
    return dict(self._children)

  def walk(self) -> Iterator[tuple[Path, Module]]:
    """Yields `(path, module)` for every bound descendant, depth first."""
    for node in self._children.values():
      if node._module is not None:
        yield node.path, node._module
      yield from node.walk()

  def __repr__(self) -> str:
    path = path_to_str(self.path)
    n = len(self._children)
    return f"Graph('{path}')" if n == 0 else f"Graph('{path}', children={n})"
