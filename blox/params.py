"""Param and Params: every array of a model, with static metadata alongside.

Both are registered with `jax.tree_util.register_dataclass`, which JAX flattens
in C++: a jitted call over `Params` costs about what a plain dict of arrays
costs (see benchmarks/dispatch.py), instead of one Python callback per leaf.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from typing import Any

import jax
import numpy as np

Path = tuple[str, ...]


# -----------------------------------------------------------------------------
# Path <-> string: the one naming used by summaries, errors and checkpoints
# -----------------------------------------------------------------------------

_ESCAPES = {'%': '%25', '/': '%2F'}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}


def path_to_str(path: Iterable[Any]) -> str:
  """`('lm', 'stack', 'kernel')` -> `'lm/stack/kernel'`, the inverse of `str_to_path`.

  Names are joined with '/'; a '/' inside one name is written `%2F` and a '%'
  is written `%25`, so every string reads back to exactly one path. A name
  without '/' or '%' appears as it is (checkpoints and summaries keep the
  names they had). Non-str entries are shown with `str`. `()` -> `''`.
  """
  return '/'.join(_escape(str(name)) for name in path)


def str_to_path(name: str) -> Path:
  """`'lm/stack/kernel'` -> `('lm', 'stack', 'kernel')`; undoes `path_to_str`."""
  if not name:
    return ()
  return tuple(re.sub('%(?:25|2F)', lambda m: _UNESCAPES[m.group(0)], part) for part in name.split('/'))


def _escape(name: str) -> str:
  if '%' in name or '/' in name:
    return name.replace('%', '%25').replace('/', '%2F')
  return name


def key_path_to_str(key_path: Iterable[Any]) -> str:
  """A `jax.tree_util` key path -> a '/'-joined name (`'' ` for the root).

  For any pytree holding `Params`: a Params path contributes its names (as
  `path_to_str` writes them), dict keys, attribute names and sequence
  indices one name each, and the fields of the containers themselves
  (`Params`' dict, `Param.value`) none: the state `{'params': params}` names
  a param `'params/lm/embed/embedding'`.
  """
  parts = []
  for entry in key_path:
    if isinstance(entry, jax.tree_util.DictKey):
      key = entry.key
      parts.append(path_to_str(key) if isinstance(key, tuple) else _escape(str(key)))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      if entry.name not in _CONTAINER_FIELDS:
        parts.append(_escape(entry.name))
    elif isinstance(entry, jax.tree_util.SequenceKey):
      parts.append(str(entry.idx))
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
      parts.append(str(entry.key))
    else:
      parts.append(_escape(str(entry)))
  return '/'.join(parts)


# Pytree fields that hold a container's contents rather than name anything.
_CONTAINER_FIELDS = ('_data', 'value')


# -----------------------------------------------------------------------------
# Recording param creation (Stack's init needs the value a param was created with)
# -----------------------------------------------------------------------------

_CREATED: contextvars.ContextVar[dict[Path, Param] | None] = contextvars.ContextVar('blox_created', default=None)


@contextlib.contextmanager
def record_created() -> Iterator[dict[Path, Param]]:
  """Records every param as it is first created while the block runs.

      with record_created() as created:
        _, params = block(params, x)
      # created: {path: Param as get_param (or with_param) first added it}

  A stateful layer (BatchNorm) creates its state and updates it in the same
  call; `created` holds the value at creation, `params` the updated one.
  Every `with_param` that adds a path not yet in its Params counts, also
  inside jax transforms traced in the block (the values are then tracers of
  that trace). Nested uses record into the innermost one only.
  """
  created: dict[Path, Param] = {}
  token = _CREATED.set(created)
  try:
    yield created
  finally:
    _CREATED.reset(token)


def _hashable(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_hashable(v) for v in value)
  if isinstance(value, dict) and not isinstance(value, Metadata):
    return Metadata(value)
  return value


class Metadata(dict):
  """A read-only, hashable dict: `Param.metadata`.

  Param metadata is static pytree data, so JAX hashes and compares it for
  every jit cache lookup; a plain dict is neither hashable nor safe to share.
  It reads like a dict (`get`, `[]`, `in`, `items`); build a changed copy with
  `{**meta, 'key': value}`. Lists inside are stored as tuples.
  """

  __slots__ = ('_hash',)

  def __init__(self, *args: Any, **kwargs: Any) -> None:
    items = dict(*args, **kwargs)
    super().__init__({k: _hashable(v) for k, v in items.items()})
    self._hash: int | None = None

  def __hash__(self) -> int:  # type: ignore[override]
    if self._hash is None:
      try:
        self._hash = hash(tuple(sorted(self.items(), key=lambda kv: str(kv[0]))))
      except TypeError:
        # Unhashable values (arrays, sets): fall back to the keys; equality
        # still compares values, so this is correct, only slower to look up.
        self._hash = hash(tuple(sorted(map(str, self.keys()))))
    return self._hash

  def _readonly(self, *args: Any, **kwargs: Any) -> None:
    raise TypeError(
        'Param metadata is read-only (it is static, hashed by jax.jit). Make '
        "a new one instead: param.replace(metadata={**param.metadata, 'k': v})."
    )

  __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

  def __repr__(self) -> str:
    return dict.__repr__(self)

  def __reduce__(self):
    return (Metadata, (dict(self),))


_EMPTY = Metadata()


class Param:
  """One array (or pytree) of a model with static `trainable` and `metadata`.

  The only pytree child is `value`; `trainable` and `metadata` are static.
  Logical sharding axes live in `metadata['sharding']`, one name (or None)
  per dimension of `value`.
  """

  __slots__ = ('value', 'trainable', 'metadata')

  def __init__(self, value: Any, trainable: bool = True, metadata: Mapping[str, Any] | None = None) -> None:
    # Runs on every unflatten: keep the common path to two type checks.
    if trainable is not True and trainable is not False:
      raise TypeError(
          f'trainable must be a bool, got {type(trainable).__name__}. Param trainable={trainable!r}: '
          'pass True or False (it is static: split() and jit cache keys read it).')
    if type(metadata) is not Metadata:
      if metadata is None:
        metadata = _EMPTY
      elif isinstance(metadata, Mapping):
        metadata = Metadata(metadata)
      else:
        raise TypeError(
            f'metadata must be a dict or None, got {type(metadata).__name__}. Param metadata is a '
            "mapping of static data, e.g. {'sharding': ('embed', 'mlp')}.")
    self.value = value
    self.trainable = trainable
    self.metadata = metadata

  @property
  def sharding(self) -> tuple[str | None, ...]:
    """Logical axis names, one per dimension (`()` when none were given)."""
    return self.metadata.get('sharding', ())

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(np.shape(self.value))

  @property
  def dtype(self) -> Any:
    return getattr(self.value, 'dtype', None)

  def replace(self, **fields: Any) -> Param:
    """Returns a copy with `value`, `trainable` or `metadata` replaced."""
    unknown = set(fields) - {'value', 'trainable', 'metadata'}
    if unknown:
      raise TypeError(f'Param.replace got unknown fields {sorted(unknown)}; valid: value, trainable, metadata.')
    return Param(
        fields.get('value', self.value),
        fields.get('trainable', self.trainable),
        fields.get('metadata', self.metadata),
    )

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Param):
      return NotImplemented
    return (self.value is other.value and self.trainable == other.trainable
            and self.metadata == other.metadata)

  __hash__ = None  # type: ignore[assignment]

  def __repr__(self) -> str:
    kind = 'T' if self.trainable else 'N'
    value = self.value
    if hasattr(value, 'shape') and hasattr(value, 'dtype'):
      value = f'{getattr(value.dtype, "name", value.dtype)}{list(value.shape)}'
    else:
      value = repr(value)
    meta = f', metadata={dict(self.metadata)}' if self.metadata else ''
    return f'Param[{kind}]({value}{meta})'


jax.tree_util.register_dataclass(Param, data_fields=['value'], meta_fields=['trainable', 'metadata'])


class Params(Mapping):
  """Immutable mapping `{path tuple: Param}` with a locked flag; a pytree.

  Unlocked params accept new entries (lazy init); locked params raise on any
  attempt to create one, which catches renamed or forgotten params at the
  first call instead of silently training a fresh random weight.
  """

  __slots__ = ('_data', '_locked')

  def __init__(self, _data: dict[Path, Param] | None = None, _locked: bool = False) -> None:
    # The private arguments exist for pytree unflattening; users call Params().
    self._data = {} if _data is None else _data
    self._locked = _locked

  # -- locking ---------------------------------------------------------------

  @property
  def is_locked(self) -> bool:
    return self._locked

  def locked(self) -> Params:
    """A copy that refuses to create new params."""
    return Params(dict(self._data), True)

  def unlocked(self) -> Params:
    """A copy that may create new params (e.g. to add adapters)."""
    return Params(dict(self._data), False)

  @classmethod
  def from_items(cls, items: Mapping[Path, Param] | Iterable[tuple[Path, Param]], *, locked: bool = False) -> Params:
    """Params holding `items` (`{path: Param}` or `(path, Param)` pairs), in that order.

    The inverse of `params.items()`: `Params.from_items(params.items(),
    locked=params.is_locked) == params`.
    """
    data: dict[Path, Param] = {}
    for path, param in (items.items() if isinstance(items, Mapping) else items):
      _check_entry(path, param)
      data[path] = param
    return cls(data, bool(locked))

  # -- split / merge / filter ------------------------------------------------

  def split(self, predicate: Callable[[Path, Param], bool] | None = None) -> tuple[Params, Params]:
    """Returns `(matching, rest)`; the default predicate is `param.trainable`."""
    if predicate is None:
      predicate = lambda path, param: param.trainable
    return self.partition(predicate)

  def partition(self, predicate: Callable[[Path, Param], bool] | None = None, *,
                prefix: Path | None = None) -> tuple[Params, Params]:
    """Returns `(matching, rest)`: `filter`'s selection and everything else.

    Both keep this lock state and the order of `items()`.
    """
    match: dict[Path, Param] = {}
    rest: dict[Path, Param] = {}
    n = None if prefix is None else len(prefix)
    for path, param in self._data.items():
      keep = (n is None or path[:n] == prefix) and (predicate is None or predicate(path, param))
      (match if keep else rest)[path] = param
    return Params(match, self._locked), Params(rest, self._locked)

  def filter(self, predicate: Callable[[Path, Param], bool] | None = None, *,
             prefix: Path | None = None) -> Params:
    """The entries under the path `prefix` (a tuple of names) for which
    `predicate(path, param)` is true; either test may be left out."""
    return self.partition(predicate, prefix=prefix)[0]

  def merge(self, other: Params) -> Params:
    """Returns the union of both; entries of `other` win on equal paths."""
    if not isinstance(other, Params):
      raise TypeError(f'Params.merge expects Params, got {type(other).__name__}.')
    if self._locked != other._locked:
      raise ValueError(
          f'Locked mismatch: {self._locked} vs {other._locked}. '
          f'Cannot merge Params with different lock states (self locked='
          f'{self._locked}, other locked={other._locked}). Call .locked() or '
          '.unlocked() on one of them first.'
      )
    return Params({**self._data, **other._data}, self._locked)

  # -- mapping ---------------------------------------------------------------

  def __getitem__(self, path: Path) -> Param:
    try:
      return self._data[path]
    except KeyError:
      from blox.errors import ParamNotFoundError
      raise ParamNotFoundError(f"Path '{path}' not found. {_not_found_message(path, self._data)}") from None

  def __setitem__(self, path: Path, param: Param) -> None:
    if self._locked:
      raise RuntimeError(
          f'Cannot set params after locking. Use unlocked() first. Cannot set {path_to_str(path)}: params are locked. Use '
          'params = params.unlocked(), set the entry, then .locked() again.'
      )
    _check_entry(path, param)
    self._data[path] = param

  def __contains__(self, path: object) -> bool:
    return path in self._data

  def __iter__(self) -> Iterator[Path]:
    return iter(self._data)

  def __len__(self) -> int:
    return len(self._data)

  def keys(self) -> KeysView[Path]:
    return self._data.keys()

  def values(self) -> ValuesView[Param]:
    return self._data.values()

  def items(self) -> ItemsView[Path, Param]:
    return self._data.items()

  def get(self, path: Path, default: Any = None) -> Any:
    """The Param at `path`, or `default` when there is none."""
    return self._data.get(path, default)

  # -- functional updates ----------------------------------------------------

  def with_param(self, path: Path, param: Param) -> Params:
    """A copy with `param` stored at `path` (added, or replacing the entry there).

    Adding a path to locked params raises `ParamsLockedError`; replacing an
    existing entry works either way (state such as norm statistics changes
    during training). A path added inside `record_created()` is recorded.
    """
    if path not in self._data:
      _check_entry(path, param)
      if self._locked:
        from blox.errors import ParamsLockedError
        raise ParamsLockedError(
            f'Cannot add {path_to_str(path)}: params are locked. Use '
            'params.unlocked().with_param(...) and .locked() again, if the param is new on purpose.'
        )
      created = _CREATED.get()
      if created is not None and path not in created:
        created[path] = param
    data = dict(self._data)
    data[path] = param
    return Params(data, self._locked)

  def with_value(self, path: Path, value: Any) -> Params:
    """A copy with the value of the existing param at `path` replaced."""
    return self.replace_values({path: value})

  def replace_values(self, values: Mapping[Path, Any]) -> Params:
    """A copy with the values of existing params replaced: `{path: new value}`.

    `trainable` and `metadata` stay; a path that is not present raises
    `ParamNotFoundError` (use `with_param` to add one).
    """
    data = dict(self._data)
    for path, value in values.items():
      data[path] = self[path].replace(value=value)
    return Params(data, self._locked)

  def values_dict(self) -> dict[Path, Any]:
    """`{path: value}` without the Param wrappers."""
    return {k: p.value for k, p in self._data.items()}

  def __repr__(self) -> str:
    state = 'locked' if self._locked else 'unlocked'
    lines = [f'Params[{state}]({{']
    for k, p in self._data.items():
      lines.append(f'  {k}: {p!r},')
    lines.append('})')
    return '\n'.join(lines)


jax.tree_util.register_dataclass(Params, data_fields=['_data'], meta_fields=['_locked'])


def _check_entry(path: Any, param: Any) -> None:
  if not isinstance(param, Param):
    raise TypeError(
        f'Expected Param, got {type(param).__name__}. Params entries must be Param, got '
        f'{type(param).__name__} for {path}. Wrap it: bx.Param(value).')
  if not isinstance(path, tuple) or not all(isinstance(p, str) for p in path):
    raise TypeError(f'Params keys are tuples of str, got {path!r}.')


def _not_found_message(path: Path, data: Mapping[Path, Any]) -> str:
  import difflib
  shown = path_to_str(path)
  names = [path_to_str(k) for k in data]
  close = difflib.get_close_matches(shown, names, n=3)
  hint = f' Did you mean {", ".join(close)}?' if close else ''
  return f'No param at {shown}.{hint} ({len(names)} params present.)'
