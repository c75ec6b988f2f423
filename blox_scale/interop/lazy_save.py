"""Write a checkpoint whose arrays never exist in memory as a whole.

`LazyArray(shape, dtype, rows=f)` stands for a host array whose row `i`
(`[i, ...]`, e.g. one layer of a stacked param) `f(i)` computes on demand;
`LazyArray(shape, dtype, whole=g)` for a small array made in one piece. The
orbax handler registered here writes a LazyArray row by row into a zarr
array chunked one row per chunk, and awaits each row before computing the
next, so a conversion holds one layer of one param at a time.

The bytes written are those orbax's own numpy handler writes (same
tensorstore spec, typestr 'np.ndarray'): the checkpoint restores with the
ordinary `Checkpointer.restore` / `load_for_inference`, onto any mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import checkpoint_utils
from orbax.checkpoint._src.futures import future
from orbax.checkpoint._src.multihost import multihost
from orbax.checkpoint._src.serialization import ocdbt_utils, type_handler_registry, type_handlers
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils


@dataclasses.dataclass(frozen=True, eq=False)
class LazyArray:
  """A host array computed when written: by rows (`rows(i) -> [shape[1:]]`) or whole (`whole() -> [shape]`)."""
  shape: tuple[int, ...]
  dtype: np.dtype
  rows: Callable[[int], np.ndarray] | None = None
  whole: Callable[[], np.ndarray] | None = None

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * np.dtype(self.dtype).itemsize

  def _check(self, value: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    value = np.asarray(value)
    if value.shape != shape or value.dtype != np.dtype(self.dtype):
      raise ValueError(f'LazyArray {what}: got {value.dtype}{list(value.shape)}, expected {np.dtype(self.dtype)}{list(shape)}')
    return value

  def row(self, i: int) -> np.ndarray:
    return self._check(self.rows(i), self.shape[1:], f'row {i}')

  def materialize(self) -> np.ndarray:
    if self.whole is not None:
      return self._check(self.whole(), self.shape, 'whole')
    return np.stack([self.row(i) for i in range(self.shape[0])])


class LazyArrayHandler(type_handlers.NumpyHandler):
  """Writes LazyArrays one row (one chunk) at a time; reads like any numpy array."""

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def _background_serialize(self, values: Sequence[LazyArray], infos: Sequence[Any],
                                  args: Optional[Sequence[Any]] = None) -> None:
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      by_rows = value.rows is not None and value.ndim >= 1
      spec = ts_utils.build_array_write_spec(
          info=info, arg=arg, global_shape=value.shape,
          local_shape=((1,) + value.shape[1:]) if by_rows else value.shape,  # the chunk: one row
          dtype=np.dtype(value.dtype), use_ocdbt=info.is_ocdbt_checkpoint,
          process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
          metadata_key=self._metadata_key)
      if multihost.process_index() != 0:
        continue
      t = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
      if by_rows:
        for i in range(value.shape[0]):
          await t[i].write(value.row(i))  # one row in memory at a time
      else:
        await t.write(value.materialize())

  async def serialize(self, values: Sequence[LazyArray], infos: Sequence[Any],
                      args: Optional[Sequence[Any]] = None) -> Sequence[future.Future]:
    args = args or [ocp.type_handlers.SaveArgs()] * len(values)
    return [future.CommitFutureAwaitingContractedSignals(self._background_serialize(values, infos, args),
                                                        name='lazy_array_handler')]


_registered = False


def register() -> None:
  """Lets orbax's StandardSave accept LazyArray leaves (in this process; idempotent).

  Called by the converter only, not on import: it extends orbax's global
  registry. The handler's typestr is 'np.ndarray' and its reading half is
  orbax's numpy handler, so restoring any checkpoint behaves as before.
  """
  global _registered
  if _registered:
    return
  type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(LazyArray, LazyArrayHandler(), override=True, ignore_warnings=True)
  checkpoint_utils.STANDARD_ARRAY_TYPES = checkpoint_utils.STANDARD_ARRAY_TYPES + (LazyArray,)
  _registered = True
