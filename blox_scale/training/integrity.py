"""Checkpoints that verify themselves: a content fingerprint per array, and finiteness.

orbax (0.12) checks the structure of what it restores but not the bytes: a
flipped bit inside a chunk, or a chunk file deleted (tensorstore then reads
the fill value, zeros), restores silently. So every save stores, in the
checkpoint's own JSON metadata (committed atomically with the arrays), a
64-bit fingerprint of each array's *values*; a restore recomputes it on the
restored arrays and compares.

The fingerprint is a position-weighted sum of the raw bits, in uint32
arithmetic (wrapping), computed by one jitted function on the sharded arrays:

    h = sum_i bits[i] * w(i)     with w(i) odd, from a hash of the flat index i

Integer addition modulo 2^32 is exact and order-free, so the value does not
depend on the mesh or the device count (a checkpoint written on 8 devices
verifies on 1), and no array is gathered to one host. Any single flipped bit
changes `bits[i]` by 2^k and `h` by 2^k * w(i) != 0 (mod 2^32) since w(i) is
odd: it is always detected. Two lanes with independent weights make a random
multi-bit change go unnoticed with probability about 2^-64.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blox_scale.training.offload import to_device

FINGERPRINT_KEY = 'fingerprints'


def _bits(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32 (1-, 2- and 4-byte dtypes; typed keys by their key data)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major index of every element, built from iotas (no reshape of a sharded array)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % (1 << 32))
    stride *= shape[dim]
  return index


def _mix(i: jax.Array, seed: int) -> jax.Array:
  """An odd uint32 weight per index (murmur3's finaliser)."""
  h = i ^ jnp.uint32(seed)
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  return (h ^ (h >> 16)) | jnp.uint32(1)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """uint32[2] of one array."""
  bits = _bits(x)
  if bits.ndim == 0:
    bits = bits[None]
  i = _flat_index(bits.shape)
  lanes = [jnp.sum(bits * _mix(i, seed), dtype=jnp.uint32) for seed in (0x9E3779B9, 0x7F4A7C15)]
  return jnp.stack(lanes)


@jax.jit
def _fingerprints(leaves: list[jax.Array]) -> list[jax.Array]:
  return [_leaf_fingerprint(x) for x in to_device(leaves)]  # offloaded (pinned_host) leaves computed on device


def fingerprints(named: dict[str, jax.Array]) -> dict[str, str]:
  """`{name: 16 hex digits}` of every array in `named` (one jitted call, one small transfer).

  Leaves that are not arrays yet (blox-convert's lazily computed params, written
  one layer at a time so a conversion never holds the model) get no fingerprint:
  computing one would materialise them. Restores check the names that have one.
  """
  names = sorted(n for n, x in named.items() if isinstance(x, (jax.Array, np.ndarray, np.generic)))
  values = jax.device_get(_fingerprints([named[n] for n in names]))
  return {n: f'{int(v[0]):08x}{int(v[1]):08x}' for n, v in zip(names, values)}


def mismatches(named: dict[str, jax.Array], expected: dict[str, str]) -> list[str]:
  """Names whose restored values do not match the fingerprints saved with them."""
  got = fingerprints({n: named[n] for n in expected if n in named})
  return sorted(n for n in expected if got.get(n) != expected[n])


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """bool[]: every floating leaf of `tree` is finite (checked before a save and after a restore)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(to_device(tree)) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


# -----------------------------------------------------------------------------
# Verifying a restore, setting a bad checkpoint aside
# -----------------------------------------------------------------------------

CORRUPT_DIR = 'checkpoints.corrupt'


class CheckpointCorruptError(RuntimeError):
  """A checkpoint cannot be read, does not match its fingerprints, or holds non-finite params."""

  def __init__(self, path: Any, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path, self.reason = path, reason


def verify(path: Any, named: dict[str, jax.Array], expected: dict[str, str] | None, params: Any) -> None:
  """Raises CheckpointCorruptError unless `named` matches `expected` and `params` are finite.

  named: the restored arrays as stored ({name: array}); expected: the
  fingerprints saved with them (None: a checkpoint from before fingerprints,
  checked for finiteness only).
  """
  if expected:
    bad = mismatches(named, {n: v for n, v in expected.items() if n in named})
    if bad:
      raise CheckpointCorruptError(path, f'{len(bad)} array(s) do not match the fingerprint saved with them '
                                         f'({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""})')
  if not bool(all_finite(params)):
    raise CheckpointCorruptError(path, 'its params are not finite')


class AbandonedOrbaxErrors(logging.Filter):
  """Drops asyncio's '... exception was never retrieved' for the orbax reads and writes a failure abandoned.

  When one array of a restore cannot be read (or one write of a save fails, e.g. on a full disk),
  orbax raises that error, which blox reports in one line by step and path, and abandons the other
  reads or writes of the same checkpoint. Those that failed too are logged by asyncio with a
  traceback whenever their futures are garbage-collected, possibly long after the one-line report
  (seen 1 run in ~3 for saves, ~30 for restores, on a loaded machine). A record is dropped only if
  its exception was raised inside orbax's read path or names a write into an
  `.orbax-checkpoint-tmp` directory; anything else asyncio logs is kept; BLOX_DEBUG=1 keeps all.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if os.environ.get('BLOX_DEBUG') or not record.exc_info or not record.getMessage().split('\n', 1)[0].endswith(
        'exception was never retrieved'):
      return True
    value = record.exc_info[1]
    if isinstance(value, (ValueError, OSError)) and '.orbax-checkpoint-tmp' in str(value):
      return False  # a write of a failed save
    frames = traceback.extract_tb(record.exc_info[2])
    return not any('/orbax/' in f.filename and ('read' in f.name or 'deserializ' in f.name) for f in frames)


def drop_abandoned_orbax_errors() -> None:
  """Installs `AbandonedOrbaxErrors` on asyncio's logger (once per process)."""
  asyncio_log = logging.getLogger('asyncio')
  if not any(isinstance(f, AbandonedOrbaxErrors) for f in asyncio_log.filters):
    asyncio_log.addFilter(AbandonedOrbaxErrors())


@contextlib.contextmanager
def quiet_unraisable() -> Iterator[None]:
  """Drops "Exception ignored in <coroutine>" reports while a failed read is cleaned up (BLOX_DEBUG=1 keeps them),
  and from then on asyncio's reports of the abandoned reads (`AbandonedOrbaxErrors`)."""
  drop_abandoned_orbax_errors()
  previous = sys.unraisablehook
  sys.unraisablehook = previous if os.environ.get('BLOX_DEBUG') else (lambda unraisable: None)
  try:
    yield
  finally:
    gc.collect()  # finalise the abandoned coroutines now, while their reports are dropped
    sys.unraisablehook = previous


def set_aside(step_dir: Any) -> Any:
  """Moves `<workdir>/checkpoints/<step>` to `<workdir>/checkpoints.corrupt/<step>` (never deletes); returns the new path."""
  from pathlib import Path
  step_dir = Path(step_dir)
  target_dir = step_dir.parent.parent / CORRUPT_DIR
  target_dir.mkdir(exist_ok=True)
  target, n = target_dir / step_dir.name, 1
  while target.exists():
    target, n = target_dir / f'{step_dir.name}.{n}', n + 1
  step_dir.rename(target)
  return target
