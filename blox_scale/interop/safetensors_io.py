"""Streaming safetensors I/O in Hugging Face's layout.

A checkpoint directory holds `model.safetensors`, or shards
`model-00001-of-0000N.safetensors` listed by `model.safetensors.index.json`
(`{"metadata": {"total_size": bytes}, "weight_map": {name: file}}`).

Reading opens the file for each tensor (`safe_open` maps it; closing unmaps
it), so the pages of tensors already converted do not stay in this process's
resident set: host memory holds one tensor at a time, not the checkpoint.
Writing takes tensors one shard at a time from a generator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

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


def write(directory: Path, shards: list[list[str]], tensors: Callable[[list[str]], Iterator[tuple[str, np.ndarray]]],
          progress: Callable[[int], None] = lambda n: None) -> None:
  """Writes the shards (one file, or N files + index) into an existing `directory`.

  `tensors(names)` yields `(name, array)` for one shard's names; each shard is
  written and released before the next is requested.
  """
  total, weight_map = 0, {}
  for k, names in enumerate(shards):
    fname = SINGLE if len(shards) == 1 else f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
    arrays = {}
    for name, array in tensors(names):
      arrays[name] = np.ascontiguousarray(array)
      total += array.nbytes
      weight_map[name] = fname
      progress(array.nbytes)
    save_file(arrays, str(directory / fname), metadata={'format': 'pt'})
    del arrays
  if len(shards) > 1:
    index = {'metadata': {'total_size': total}, 'weight_map': dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + '\n')
