"""Checkpoint fingerprints: mesh-independent, and every single flipped bit changes them."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from blox_scale.training import integrity


def _by_hand(x: np.ndarray) -> str:
  """The same fingerprint in NumPy: position-weighted sums of the raw bits, modulo 2^32."""
  bits = x.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64)
  i = np.arange(bits.size, dtype=np.uint64)
  out = ''
  for seed in (0x9E3779B9, 0x7F4A7C15):
    h = i ^ seed
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) % (1 << 32)
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) % (1 << 32)
    w = (h ^ (h >> 16)) | 1
    out += f'{int((bits * w % (1 << 32)).sum() % (1 << 32)):08x}'
  return out


def test_fingerprint_matches_numpy_and_ignores_the_mesh():
  rs = np.random.default_rng(0)
  arrays = {'w': rs.standard_normal((8, 12)).astype(np.float32), 'b': rs.standard_normal(12).astype(jnp.bfloat16),
            'n': np.arange(5, dtype=np.int32), 's': np.float32(3.5)}
  want = {k: _by_hand(np.asarray(v).reshape(np.shape(v))) for k, v in arrays.items()}
  assert integrity.fingerprints({k: jnp.asarray(v) for k, v in arrays.items()}) == want
  mesh = jax.make_mesh((4, 2), ('a', 'b'))
  sharded = dict(arrays, w=jax.device_put(arrays['w'], NamedSharding(mesh, P('a', 'b'))))
  assert integrity.fingerprints(sharded) == want


def test_every_single_bit_flip_is_detected():
  x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
  expected = integrity.fingerprints({'x': jnp.asarray(x)})
  raw = x.view(np.uint32).reshape(-1)
  flipped = []
  for i in range(raw.size):
    for bit in range(32):
      y = raw.copy()
      y[i] ^= np.uint32(1 << bit)
      flipped.append(y.view(np.float32).reshape(x.shape))
  got = jax.jit(jax.vmap(lambda a: jnp.stack(integrity._leaf_fingerprint(a))))(jnp.asarray(np.stack(flipped)))
  want = np.array([int(expected['x'][:8], 16), int(expected['x'][8:], 16)], np.uint32)
  assert not np.any(np.all(np.asarray(got) == want, axis=1))
  assert integrity.mismatches({'x': jnp.asarray(flipped[5])}, expected) == ['x']
  assert integrity.mismatches({'x': jnp.asarray(x)}, expected) == []


def test_all_finite():
  assert bool(integrity.all_finite({'a': jnp.ones(3), 'k': jnp.arange(3)}))
  assert not bool(integrity.all_finite({'a': jnp.array([1.0, jnp.nan])}))


def _never_retrieved_logs(filename: str, function: str,
                          message: str = 'Encountered error while reading array index') -> list[str]:
  """What asyncio logs for a task that failed inside `function` of `filename` and was never awaited."""
  import asyncio
  import gc
  import logging

  namespace: dict = {}
  exec(compile(f'async def {function}():\n  raise ValueError({message!r})\n',
               filename, 'exec'), namespace)
  records = []
  handler = logging.Handler()
  handler.emit = lambda record: records.append(record.getMessage())
  log = logging.getLogger('asyncio')
  log.addHandler(handler)
  try:
    with integrity.quiet_unraisable():  # as a checkpoint restore does; its filter stays installed
      pass

    async def main():
      task = asyncio.ensure_future(namespace[function]())
      await asyncio.sleep(0.01)
      del task  # failed, never awaited

    asyncio.run(main())
    gc.collect()
  finally:
    log.removeHandler(handler)
  return records


def test_abandoned_orbax_reads_are_not_logged_other_task_errors_are(monkeypatch):
  # A restore that fails on one array abandons orbax's other reads; asyncio logs each failed one with a
  # traceback whenever it is garbage-collected (after the one-line fallback warning). Only those are dropped.
  monkeypatch.delenv('BLOX_DEBUG', raising=False)
  orbax_file = '/site-packages/orbax/checkpoint/_src/serialization/serialization.py'
  assert _never_retrieved_logs(orbax_file, '_read_array_index_and_device_put') == []
  assert any('never retrieved' in m for m in _never_retrieved_logs('/home/user/mine.py', 'read_my_file'))
  assert any('never retrieved' in m for m in _never_retrieved_logs(orbax_file, '_write_array'))
  # A failed save's other writes (into its .orbax-checkpoint-tmp directory), wherever they were raised.
  tmp_write = '/run/checkpoints/8.orbax-checkpoint-tmp-1/state/d/0: No space left on device'
  assert _never_retrieved_logs('/site-packages/tensorstore/x.py', 'write_chunk', tmp_write) == []
  monkeypatch.setenv('BLOX_DEBUG', '1')
  assert any('never retrieved' in m for m in _never_retrieved_logs(orbax_file, '_read_array_index_and_device_put'))
