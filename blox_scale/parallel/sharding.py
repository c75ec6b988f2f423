"""Logical axis names -> mesh axes.

Params and activations are annotated with logical names ('embed', 'mlp',
'batch', ...). A rules mapping (from the config) turns them into a
`PartitionSpec` for the current mesh. Model code calls `constrain(x, axes)`
at block boundaries; outside `use_mesh_rules(...)` it is a no-op, so the same
model runs unsharded on one device with no code change.

  mesh = make_mesh(cfg.mesh)                   # axes ('data', 'fsdp', 'expert', 'tensor')
  rules = rules_from_config(cfg.mesh)          # {'embed': 'fsdp', 'batch': ('data', 'fsdp', 'expert'), ...}
  shardings = param_shardings(jax.eval_shape(model.init, 0), mesh, rules)

Parallelism comes from the rules alone: 'batch' over data (and fsdp) is data
parallelism; 'embed' -> fsdp shards every weight along d_model (ZeRO-3 /
FSDP: XLA all-gathers a layer's weights just before use and reduce-scatters
its gradients); 'mlp'/'heads' -> tensor is Megatron-style tensor
parallelism; 'expert' -> expert splits the stacked expert weights of MoE
layers [E, ...] (expert parallelism; the batch is split over expert too, so
outside the MoE layers the expert axis is data parallelism); 'seq' -> tensor shards the residual stream between blocks
along the sequence (sequence parallelism). The stacked 'layers' axis stays
unsharded so that the scan slices a layer locally.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import blox as bx

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


# -----------------------------------------------------------------------------
# Meshes
# -----------------------------------------------------------------------------

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, ...]:
  """`(data, fsdp, expert, tensor)` sizes for `num_devices`; one size may be -1 (fills).

  Raises a ValueError naming the `mesh.*` keys when the sizes cannot multiply
  to the device count.
  """
  sizes = {name: int(getattr(mesh_cfg, name, 1)) for name in MESH_AXES}
  given = ', '.join(f'mesh.{k}={v}' for k, v in sizes.items())
  fill = [k for k, v in sizes.items() if v == -1]
  bad = [k for k, v in sizes.items() if v == 0 or v < -1]
  if bad or len(fill) > 1:
    raise ValueError(f'Invalid mesh sizes ({given}): each must be >= 1, and at most one may be -1 (fills the rest).')
  known = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
          f'Cannot fill mesh.{fill[0]}: {num_devices} devices are not divisible by the other axes '
          f'({given}, product {known}). Pick sizes whose product divides {num_devices}.')
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f'Mesh sizes ({given}) multiply to {known}, but there are {num_devices} devices. '
        f'Make data*fsdp*expert*tensor = {num_devices}, or set one of them to -1 to fill.')
  return tuple(sizes[k] for k in MESH_AXES)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` with axes ('data', 'fsdp', 'expert', 'tensor') over `devices` (default: all).

  Axes are `AxisType.Auto`: the compiler propagates shardings from the
  params, the batch and `constrain` calls (GSPMD), so model code never names
  mesh axes. `jax.make_mesh` orders devices so that the innermost axis
  ('tensor') stays within a host / a fast interconnect domain.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # make_mesh refuses some subsets of devices (e.g. a 1-device mesh out of
    # 8 for a test); a plain reshape is then the natural order.
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=auto)


def rules_from_config(mesh_cfg: Any) -> dict[str, Any]:
  """`mesh.rules` with YAML lists turned into tuples (the form PartitionSpec wants)."""
  rules = getattr(mesh_cfg, 'rules', mesh_cfg)
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in rules.items()}


def _check_rules(mesh: Mesh, rules: Rules) -> None:
  for name, target in rules.items():
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    for t in targets:
      if t not in mesh.shape:
        raise ValueError(
            f"mesh.rules['{name}'] maps to mesh axis {t!r}, which is not in the mesh "
            f'(axes: {", ".join(mesh.axis_names)}). Use one of them or null.')


# -----------------------------------------------------------------------------
# Param and optimizer-state shardings
# -----------------------------------------------------------------------------


def _path_name(key_path: tuple[Any, ...]) -> str:
  """Readable path for a leaf of Params (`lm/stack/block/mlp/kernel`)."""
  return bx.key_path_to_str(key_path) or '<root>'


def _axis_size(mesh: Mesh, entry: Any) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(mesh.shape[n] for n in names)


def spec_for(path: str, shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules: Rules) -> PartitionSpec:
  """The PartitionSpec of one param, checking rank and divisibility.

  `axes` are the logical names from `Param.metadata['sharding']`, one per
  leading dim: as in a PartitionSpec, missing trailing entries mean None, so
  `()` means the param is replicated.
  """
  if not axes:
    return PartitionSpec()
  if len(axes) > len(shape):
    raise ValueError(
        f'Param {path}: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}. '
        "Give at most one name (or None) per dimension in metadata['sharding'] "
        '(missing trailing entries mean None).')
  axes = tuple(axes) + (None,) * (len(shape) - len(axes))
  spec = logical_to_spec(axes, rules)
  for dim, (size, name, entry) in enumerate(zip(shape, axes, spec)):
    n = _axis_size(mesh, entry)
    if size % n:
      raise ValueError(
          f"Param {path}: dimension {dim} ('{name}', size {size}) is not divisible by mesh axis "
          f'{entry!r} of size {n}. Change the mesh (mesh.{entry if isinstance(entry, str) else "..."}) '
          f"so that it divides {size}, or map '{name}' elsewhere (e.g. the override mesh.rules.{name}=null).")
  return spec


def _is_param(x: Any) -> bool:
  return isinstance(x, bx.Param)


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Rules) -> Any:
  """A pytree like `abstract_params` with a `NamedSharding` in every Param.

  `abstract_params` is `Params` (or any pytree holding `Param`s), usually from
  `jax.eval_shape(model.init, seed)`. The result has the same structure (each
  `Param` keeps its metadata, its value is the sharding), so it can be given
  to `jax.jit(out_shardings=...)` directly. Raises a ValueError naming the
  param path, dimension and mesh axis when a size does not divide.
  """
  _check_rules(mesh, rules)

  def one(key_path: tuple, leaf: Any) -> Any:
    if _is_param(leaf):
      spec = spec_for(_path_name(key_path), np.shape(leaf.value), leaf.sharding, mesh, rules)
      return leaf.replace(value=NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map_with_path(one, abstract_params, is_leaf=_is_param)


def state_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """Shardings for optimizer state (or any pytree that holds Params).

  optax states mirror the params pytree: `mu`/`nu` of Adam are `Params` whose
  `Param`s keep the metadata of the param they belong to, so they get exactly
  the param's sharding. Anything else (step counts, scalars, factored
  statistics whose shape differs from the param's, so that the param's axes
  do not fit them) is replicated: small by construction, and always valid.
  """
  _check_rules(mesh, rules)

  def fits(shape: tuple[int, ...], axes: tuple[Any, ...]) -> bool:
    if len(axes) > len(shape):
      return False
    spec = logical_to_spec(axes, rules)
    return all(size % _axis_size(mesh, entry) == 0 for size, entry in zip(shape, spec))

  def one(key_path: tuple, leaf: Any) -> Any:
    if _is_param(leaf):
      shape = np.shape(leaf.value)
      axes = tuple(leaf.sharding)
      if axes and fits(shape, axes):
        spec = spec_for(_path_name(key_path), shape, axes, mesh, rules)
      else:
        spec = PartitionSpec()
      return leaf.replace(value=NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map_with_path(one, abstract_tree, is_leaf=_is_param)


# -----------------------------------------------------------------------------
# Batches
# -----------------------------------------------------------------------------

BATCH_AXES = ('batch',)


def batch_spec(ndim: int, rules: Rules) -> PartitionSpec:
  """Input batches are split along their leading (batch) dim only.

  The sequence dim of *inputs* stays whole even when 'seq' is sharded:
  sequence sharding applies to activations, via `constrain` inside the model,
  so every process still loads whole sequences.
  """
  return logical_to_spec(BATCH_AXES + (None,) * (ndim - 1), rules)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  """`NamedSharding` of one `[batch, ...]` input array of rank `ndim`."""
  return NamedSharding(mesh, batch_spec(ndim, rules))


def num_batch_shards(mesh: Mesh, rules: Rules) -> int:
  """How many ways the batch dim is split (the global batch must divide this)."""
  return _axis_size(mesh, batch_spec(1, rules)[0])


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract_tree` that carry `shardings` (a matching tree or one `Sharding`).

  The inputs of ahead-of-time compilation (`jitted.lower(...)`) and of
  restoring onto a mesh: nothing is allocated.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), abstract_tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def shard_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds for `tree` (arrays or ShapeDtypeStructs) under `shardings`.

  The largest per-device total: with uneven placements (a replicated scalar
  next to sharded matrices) all devices hold the same here, since every
  sharding is even by construction (divisibility is checked).
  """
  total = 0
  leaves = jax.tree.leaves(tree)
  sh = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  if len(leaves) != len(sh):
    raise ValueError(f'shard_bytes: {len(leaves)} leaves but {len(sh)} shardings.')
  for x, s in zip(leaves, sh):
    shape = s.shard_shape(tuple(x.shape))
    itemsize = jnp.dtype(x.dtype).itemsize if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else 8
    total += math.prod(shape) * itemsize
  return total
