"""Module: binds a Graph node to the code that reads and creates its params."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from blox.errors import ParamMismatchError, ParamNotFoundError, ParamsLockedError
from blox.graph import Graph, Path
from blox.params import Metadata, Param, Params, path_to_str

if TYPE_CHECKING:
  from blox.rng import Rng

Initializer = Callable[..., Any]


class Module:
  """Base class of every layer: `outputs, params = module(params, *inputs)`.

  A subclass takes `graph` first, calls `super().__init__(graph)`, and keeps
  only static configuration on `self`; arrays live in `Params`. Constructor
  arguments are recorded (for `display`, `summary` and `repr`).
  """

  _init_type: str
  _init_args: dict[str, Any]

  def __init__(self, graph: Graph) -> None:
    if not isinstance(graph, Graph):
      raise TypeError(
          f'{type(self).__name__} expects a bx.Graph as its first argument, '
          f'got {type(graph).__name__}. Pass graph.child(name).'
      )
    if graph.is_root:
      raise ValueError(
          f"Cannot bind '{type(self).__name__}' to root graph node '{graph.name}'. Use "
          "graph.child('name') to create a child node. The root binds no module "
          "(graph / 'name' makes a child too)."
      )
    graph._bind(self)
    self.graph = graph

  def __init_subclass__(cls, **kwargs: Any) -> None:
    super().__init_subclass__(**kwargs)
    init = cls.__dict__.get('__init__')
    if init is None:
      return
    try:
      signature = inspect.signature(init)
    except (TypeError, ValueError):
      return

    @functools.wraps(init)
    def recording_init(self: Module, *args: Any, **kw: Any) -> None:
      if not hasattr(self, '_init_args'):  # the most derived class records
        try:
          bound = signature.bind(self, *args, **kw)
          bound.apply_defaults()
          self._init_args = {k: v for k, v in bound.arguments.items() if k not in ('self', 'graph', '__class__')}
        except TypeError:
          self._init_args = {}
        self._init_type = cls.__name__
      init(self, *args, **kw)
      if getattr(self, 'graph', None) is None:
        raise RuntimeError(
            f"Module '{cls.__name__}' failed to initialize. Did you forget to call "
            f'super().__init__(graph)? {cls.__name__}.__init__ returned without binding a graph '
            'node; call super().__init__(graph) first thing in __init__.')

    cls.__init__ = recording_init  # type: ignore[method-assign]

  # -- params ----------------------------------------------------------------

  def param_path(self, name: str) -> Path:
    """`graph.path + (name,)`: where this module's param `name` lives."""
    return self.graph.path + (name,)

  def get_param(
      self,
      params: Params,
      name: str,
      shape: tuple[int, ...] | None = None,
      init: Initializer | None = None,
      dtype: Any = None,
      trainable: bool = True,
      metadata: Mapping[str, Any] | None = None,
      rng: Rng | None = None,
  ) -> tuple[Any, Params]:
    """Returns `(value, params)`, creating the param on first use.

    Args:
      params: the Params container.
      name: local name, stored at `self.param_path(name)`.
      shape: required to create; when given for an existing param it must match.
      init: `init(key, shape, dtype)`, required to create.
      dtype: param dtype; `None` means float32 when creating and no check when
        reading. An explicit dtype must match an existing param's.
      trainable: whether `params.split()` puts it with the trainable params.
      metadata: static dict; `'sharding'` holds a logical axis name (or None)
        per leading dim, stored as given; missing trailing entries mean None
        (PartitionSpec semantics), more entries than dims are an error.
      rng: an Rng module; its next key is passed to `init` (the counter
        advances even when `init` ignores the key, so changing one
        initializer never reshuffles the others).
    """
    if not isinstance(params, Params):
      raise TypeError(
          f'{type(self).__name__} at {path_to_str(self.graph.path)} expected Params as '
          f'its first argument, got {type(params).__name__}. Call it as '
          'module(params, *inputs).'
      )
    path = self.param_path(name)
    existing = params.get(path)
    if existing is not None:
      _check_existing(path, existing, shape, dtype)
      return existing.value, params
    if shape is None or init is None:
      raise ParamNotFoundError(
          f"Parameter '{path}' not found. To create a new parameter, provide shape and "
          f'init. Param {path_to_str(path)} does not exist and cannot be created: '
          f'shape={shape!r}, init={"given" if init else None}. Pass shape= and '
          'init= to create it, or load it into params first.'
      )
    if params.is_locked:
      raise ParamsLockedError(
          f"Parameter '{path}' missing (params locked). "
          f'Param {path_to_str(path)} does not exist and params are locked. Locked '
          'params refuse new entries so that a renamed or missing weight is '
          'caught instead of silently re-initialised. If this param is new on '
          'purpose (an adapter, a new head), call params.unlocked(), run the '
          'model once, then .locked(); otherwise check the module names.'
      )
    shape = tuple(int(d) for d in shape)
    dtype = jnp.float32 if dtype is None else dtype
    meta = Metadata(metadata or {})
    axes = meta.get('sharding')
    if axes is not None and len(axes) > len(shape):
      # Fewer names than dims is fine: as in a PartitionSpec (and in jax-blox),
      # the missing trailing entries mean None.
      raise ValueError(
          f"Param {path_to_str(path)}: metadata['sharding']={tuple(axes)!r} names "
          f'{len(axes)} axes but the param has shape {shape} ({len(shape)} '
          'dims). Give at most one logical axis name (or None) per dimension; '
          'missing trailing entries mean None.'
      )
    if rng is not None:
      key, params = rng(params)
    else:
      key = None
    value = init(key, shape, dtype)
    if tuple(np.shape(value)) != shape:
      raise ValueError(f'Initializer for {path_to_str(path)} returned shape {np.shape(value)}, expected {shape}.')
    return value, params.with_param(path, Param(value, trainable, meta))

  def set_param(
      self,
      params: Params,
      name: str,
      value: Any,
      trainable: bool | None = None,
      metadata: Mapping[str, Any] | None = None,
  ) -> Params:
    """Returns params with this module's param `name` updated.

    `value=None` keeps the value; `metadata` is merged into the existing one.
    Works on locked params too (state such as norm statistics and RNG
    counters changes during training); only creating new params is refused.
    """
    path = self.param_path(name)
    existing = params.get(path)
    if existing is None:
      raise ParamNotFoundError(
          f"Path '{path}' not found. set_param: no param at {path_to_str(path)}. Create it "
          'with get_param (shape=, init=) before updating it.'
      )
    if value is None and trainable is None and metadata is None:
      raise ValueError(
          'At least one of value, trainable, or metadata must be provided. '
          f'set_param({path_to_str(path)}) got none of them; value=None keeps the value.')
    if value is not None:
      if not isinstance(value, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        raise TypeError(
            f'value must be a jax.Array, got {type(value).__name__}. set_param({path_to_str(path)}): '
            'pass an array (jax.Array, np.ndarray or jax.ShapeDtypeStruct), e.g. jnp.asarray(value).')
      _check_existing(path, existing, np.shape(value), value.dtype, what='set_param with', read=False)
    return params.with_param(path, Param(
        existing.value if value is None else value,
        existing.trainable if trainable is None else trainable,
        existing.metadata if metadata is None else {**existing.metadata, **metadata},
    ))

  def __repr__(self) -> str:
    args = ', '.join(f'{k}={v!r}' for k, v in getattr(self, '_init_args', {}).items())
    return f'{getattr(self, "_init_type", type(self).__name__)}({args})'

  def __call__(self, params: Params, *args: Any, **kwargs: Any) -> tuple[Any, Params]:
    raise NotImplementedError(f'{type(self).__name__} must implement __call__(params, ...) -> (outputs, params).')


def _manual_axes() -> dict[str, int]:
  """`{mesh axis: size}` of the axes that are manual here (inside `jax.shard_map`), else `{}`."""
  mesh = jax.sharding.get_abstract_mesh()
  return {name: mesh.shape[name] for name in mesh.manual_axes}


def _split_factors(ndim: int, axes: tuple[Any, ...], manual: Mapping[str, int]) -> tuple[int, ...]:
  """Per dim, how many ways the manual mesh axes named in `axes` split it (1: whole)."""
  factors = []
  for d in range(ndim):
    entry = axes[d] if d < len(axes) else None
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    factors.append(int(np.prod([manual.get(n, 1) for n in names])))
  return tuple(factors)


def _per_device_match(have: tuple[int, ...], want: tuple[int, ...], axes: tuple[Any, ...]) -> bool | str:
  """Inside shard_map, whether `want` is the global or the per-device shape of `have`.

  A param sharded over manual mesh axes arrives as its per-device slice; a layer
  asks for a shape built partly from its (global) configuration and partly from
  its (per-device) inputs, so each dim may be either. Returns True when every
  dim fits, else a description of the manual axes for the error ('' outside
  shard_map, where no mismatch is allowed).
  """
  manual = _manual_axes()
  if not manual:
    return ''
  factors = _split_factors(len(have), axes, manual)
  if len(want) == len(have) and all(w in (h, h * f) for w, h, f in zip(want, have, factors)):
    return True
  global_shape = tuple(h * f for h, f in zip(have, factors))
  return (
      f" Inside shard_map over manual mesh axes {manual}, its metadata['sharding']="
      f'{axes!r} makes the global shape {global_shape} (per device {have}); name the '
      "mesh axes a dim is split over in the layer's *_metadata={'sharding': ...}."
  )


def _check_existing(path: Path, existing: Param, shape: Any, dtype: Any, what: str = 'requested with',
                    read: bool = True) -> None:
  value = existing.value
  have_shape = getattr(value, 'shape', None)
  if shape is not None and have_shape is not None and tuple(shape) != tuple(have_shape):
    # Only reads may differ by the sharding (set_param stores the value it gets,
    # so a value of another shape would change the param).
    inside = _per_device_match(tuple(have_shape), tuple(shape), tuple(existing.sharding)) if read else ''
    if inside is not True:
      raise ParamMismatchError(
          f'Param {path_to_str(path)} exists with shape {tuple(have_shape)} but was '
          f'{what} shape {tuple(shape)}. The input feature size probably changed '
          'since init (or two modules share a graph node); re-initialise, or '
          f'fix the input shape.{inside}'
      )
  have_dtype = getattr(value, 'dtype', None)
  if dtype is not None and have_dtype is not None and _canonical(dtype) != _canonical(have_dtype):
    have, want = _dtype_name(have_dtype), _dtype_name(dtype)
    raise ParamMismatchError(
        f'Param {path_to_str(path)} exists with dtype {have} but was {what} dtype '
        f'{want}. Build the layer with param_dtype={have}, or cast the stored '
        'params to the dtype the model asks for.'
    )


def _canonical(dtype: Any) -> Any:
  # Typed PRNG key dtypes (the Rng seed) are extended dtypes that jnp.dtype
  # does not accept; they compare directly.
  if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
    return dtype
  return jnp.dtype(dtype)


def _dtype_name(dtype: Any) -> str:
  return str(getattr(_canonical(dtype), 'name', dtype))
