"""Param and Params: every array of a model, with static metadata alongside.

Both are registered with `jax.tree_util.register_dataclass`, which JAX flattens
in C++: a jitted call over `Params` costs about what a plain dict of arrays
costs (see benchmarks/dispatch.py), instead of one Python callback per leaf.
"""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, ValuesView
from typing import Any

import jax
import numpy as np

Path = tuple[str, ...]


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
      raise TypeError(f'Param trainable must be a bool, got {type(trainable).__name__}: {trainable!r}.')
    if type(metadata) is not Metadata:
      if metadata is None:
        metadata = _EMPTY
      elif isinstance(metadata, Mapping):
        metadata = Metadata(metadata)
      else:
        raise TypeError(f'Param metadata must be a dict or None, got {type(metadata).__name__}.')
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

  # -- split / merge ---------------------------------------------------------

  def split(self, predicate: Callable[[Path, Param], bool] | None = None) -> tuple[Params, Params]:
    """Returns `(matching, rest)`; the default predicate is `param.trainable`."""
    match: dict[Path, Param] = {}
    rest: dict[Path, Param] = {}
    for path, param in self._data.items():
      keep = param.trainable if predicate is None else predicate(path, param)
      (match if keep else rest)[path] = param
    return Params(match, self._locked), Params(rest, self._locked)

  def merge(self, other: Params) -> Params:
    """Returns the union of both; entries of `other` win on equal paths."""
    if not isinstance(other, Params):
      raise TypeError(f'Params.merge expects Params, got {type(other).__name__}.')
    if self._locked != other._locked:
      raise ValueError(
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
      raise ParamNotFoundError(_not_found_message(path, self._data)) from None

  def __setitem__(self, path: Path, param: Param) -> None:
    if self._locked:
      raise RuntimeError(
          f'Cannot set {"/".join(map(str, path))}: params are locked. Use '
          'params = params.unlocked(), set the entry, then .locked() again.'
      )
    if not isinstance(param, Param):
      raise TypeError(f'Params entries must be Param, got {type(param).__name__} for {path}. Wrap it: bx.Param(value).')
    if not isinstance(path, tuple) or not all(isinstance(p, str) for p in path):
      raise TypeError(f'Params keys are tuples of str, got {path!r}.')
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

  # -- helpers ---------------------------------------------------------------

  def values_dict(self) -> dict[Path, Any]:
    """`{path: value}` without the Param wrappers."""
    return {k: p.value for k, p in self._data.items()}

  def _with(self, path: Path, param: Param) -> Params:
    data = dict(self._data)
    data[path] = param
    return Params(data, self._locked)

  def __repr__(self) -> str:
    state = 'locked' if self._locked else 'unlocked'
    lines = [f'Params[{state}]({{']
    for k, p in self._data.items():
      lines.append(f'  {k}: {p!r},')
    lines.append('})')
    return '\n'.join(lines)


jax.tree_util.register_dataclass(Params, data_fields=['_data'], meta_fields=['_locked'])


def _not_found_message(path: Path, data: Mapping[Path, Any]) -> str:
  import difflib
  shown = '/'.join(map(str, path))
  names = ['/'.join(map(str, k)) for k in data]
  close = difflib.get_close_matches(shown, names, n=3)
  hint = f' Did you mean {", ".join(close)}?' if close else ''
  return f'No param at {shown}.{hint} ({len(names)} params present.)'
