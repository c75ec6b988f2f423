"""Streaming safetensors I/O in Hugging Face's layout.

A checkpoint directory holds `model.safetensors`, or shards
`model-00001-of-0000N.safetensors` listed by `model.safetensors.index.json`
(`{"metadata": {"total_size": bytes}, "weight_map": {name: file}}`).

Reading opens the file for each tensor (`safe_open` maps it; closing unmaps
it), so the pages of tensors already converted do not stay in this process's
resident set: host memory holds one tensor at a time, not the checkpoint.
Writing streams: a shard's header first, then its tensors one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open

SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
DTYPES = {'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16), 'BF16': np.dtype(ml_dtypes.bfloat16),
          'F64': np.dtype(np.float64)}
TORCH_DTYPE = {np.dtype(np.float32): 'float32', np.dtype(np.float16): 'float16',
               np.dtype(ml_dtypes.bfloat16): 'bfloat16'}


class Reader:
  """Names, shapes and dtypes of a checkpoint's tensors (headers only), and one tensor at a time."""

  def __init__(self, directory: str | Path):
    self.directory = Path(directory)
    index, single = self.directory / INDEX, self.directory / SINGLE
    if index.exists():
      weight_map = json.loads(index.read_text())['weight_map']
      self.files = {name: self.directory / f for name, f in weight_map.items()}
    elif single.exists():
      with safe_open(single, 'numpy') as f:
        self.files = {name: single for name in f.keys()}
    else:
      raise FileNotFoundError(f'{self.directory}: neither {SINGLE} nor {INDEX} found; '
                              'pass a directory written by save_pretrained (or bs.hf.save)')
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.dtypes: dict[str, str] = {}
    for path in sorted(set(self.files.values())):
      if not path.exists():
        raise FileNotFoundError(f'{path}: listed in {INDEX} but missing; copy the complete checkpoint')
      with safe_open(path, 'numpy') as f:
        for name in f.keys():
          if self.files.get(name) == path:
            s = f.get_slice(name)
            self.shapes[name], self.dtypes[name] = tuple(s.get_shape()), s.get_dtype()
    lost = sorted(set(self.files) - set(self.shapes))
    if lost:
      raise FileNotFoundError(f'{INDEX}: {lost[:5]} are listed but not in their shard files; the checkpoint is incomplete')

  def names(self) -> list[str]:
    return list(self.shapes)

  def read(self, name: str) -> np.ndarray:
    """The whole tensor, in its stored dtype."""
    with safe_open(self.files[name], 'numpy') as f:
      return f.get_tensor(name)

  def nbytes(self) -> int:
    return sum(int(np.prod(s)) * DTYPES.get(self.dtypes[n], np.dtype(np.float32)).itemsize
               for n, s in self.shapes.items())


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
  """Greedy, in order: a new shard starts when the next tensor would pass the limit."""
  shards: list[list[str]] = [[]]
  used = 0
  for name, size in sizes:
    if shards[-1] and used + size > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += size
  return shards


ST_DTYPES = {v: k for k, v in DTYPES.items()}


def _header(specs: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
  """The safetensors header for tensors stored back to back in this order (8-byte aligned, as the library writes)."""
  entries: dict[str, object] = {'__metadata__': {'format': 'pt'}}
  offset = 0
  for name, shape, dtype in specs:
    size = int(np.prod(shape)) * dtype.itemsize
    entries[name] = {'dtype': ST_DTYPES[dtype], 'shape': list(shape), 'data_offsets': [offset, offset + size]}
    offset += size
  text = json.dumps(entries, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)
  return len(text).to_bytes(8, 'little') + text


def write(directory: Path, shards: list[list[str]], specs: dict[str, tuple[tuple[int, ...], np.dtype]],
          tensors: Callable[[list[str]], Iterator[tuple[str, np.ndarray]]],
          progress: Callable[[int], None] = lambda n: None) -> None:
  """Writes the shards (one file, or N files + index) into an existing `directory`, streaming.

  `specs[name] = (shape, dtype)` for every tensor: the header is written
  first, then `tensors(names)` yields `(name, array)` in `names` order and
  each array is appended and released, so memory holds one tensor, not a
  shard. (The safetensors library's `save_file` takes a whole shard; the file
  format, a JSON header then the raw little-endian bytes back to back, is
  written here exactly as the format's specification gives it, and the
  tests read the files back with `safe_open`.)
  """
  total, weight_map = 0, {}
  for k, names in enumerate(shards):
    fname = SINGLE if len(shards) == 1 else f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
    order = [(n, tuple(specs[n][0]), np.dtype(specs[n][1])) for n in names]
    with open(directory / fname, 'wb') as f:
      f.write(_header(order))
      for (name, shape, dtype), (got, array) in zip(order, tensors(names)):
        if got != name or array.shape != shape or array.dtype != dtype:
          raise AssertionError(f'{fname}: expected {name} {dtype}{list(shape)}, got {got} {array.dtype}{list(array.shape)}')
        np.ascontiguousarray(array).tofile(f)  # raw bytes, little-endian on every host JAX supports
        total += array.nbytes
        weight_map[name] = fname
        progress(array.nbytes)
  if len(shards) > 1:
    index = {'metadata': {'total_size': total}, 'weight_map': dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + '\n')
