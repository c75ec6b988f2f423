"""Logical axis names -> mesh axes.

Params and activations are annotated with logical names ('embed', 'mlp',
'batch', ...). A rules mapping (from the config) turns them into a
`PartitionSpec` for the current mesh. Model code calls `constrain(x, axes)`
at block boundaries; outside `use_mesh_rules(...)` it is a no-op, so the same
model runs unsharded on one device with no code change.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Mapping[str, Any]

_state = threading.local()


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """`('batch', 'seq', 'embed')` -> `PartitionSpec(('data', 'fsdp'), None, 'fsdp')`.

  A name missing from `rules`, or mapped to None, is replicated. A mesh axis
  may be used by one dimension only; a later dimension that maps to an axis
  already used is replicated instead (e.g. 'embed' -> fsdp on an activation
  whose batch dim already uses fsdp).
  """
  used: set[str] = set()
  spec = []
  for name in axes:
    target = rules.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    targets = tuple(t for t in targets if t not in used)
    used.update(targets)
    spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return PartitionSpec(*spec)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """While tracing inside this context, `constrain` places activations."""
  previous = getattr(_state, 'current', None)
  _state.current = (mesh, dict(rules))
  try:
    yield
  finally:
    _state.current = previous


def current_mesh_rules() -> tuple[Mesh, dict[str, Any]] | None:
  return getattr(_state, 'current', None)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op with no mesh rules."""
  current = current_mesh_rules()
  if current is None:
    return x
  mesh, rules = current
  if len(axes) != x.ndim:
    raise ValueError(f'constrain: {len(axes)} logical axes {tuple(axes)} for an array of shape {x.shape}.')
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))
