"""Multi-process runs on JAX's multi-controller runtime.

Every process runs the same program. `initialize(cfg.distributed)` joins
them (`jax.distributed.initialize`) before anything touches a device; from
then on `jax.devices()` lists the devices of all processes, a mesh spans
them, and each process feeds only the rows of the global batch that live on
its own devices (`make_global_batch`). Logging and checkpoint commits happen
on the primary process (`is_primary()`).

Where the coordinates come from, first match wins:
  1. the config: `distributed.coordinator_address`, `num_processes`, `process_id`;
  2. the variables `BLOX_COORDINATOR_ADDRESS`, `BLOX_NUM_PROCESSES`,
     `BLOX_PROCESS_ID` (set by launch/local.sh);
  3. JAX's own cluster detection (SLURM, Open MPI, Cloud TPU), when the
     environment looks like one of them and `distributed.cluster_detection`
     is 'auto' (or names a method);
  4. otherwise: a single process, nothing to initialise.

Failure handling comes from JAX's coordination service: every process sends
heartbeats to process 0; when one stops for `heartbeat_timeout` seconds (a
crash, a kill, a lost host) every other process is told "The following tasks
are unhealthy (stopped sending heartbeats)", and when process 0 itself dies
the others miss their next heartbeat. Nobody hangs in a collective forever.
JAX's reaction is a fatal log and `abort()` (exit 134, a core dump where
enabled); `initialize` turns that abort into one line and exit status 3
(`EXIT_PEER_LOST`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from blox_scale.parallel.sharding import Rules, batch_sharding, num_batch_shards

log = logging.getLogger(__name__)

ENV_COORDINATOR = 'BLOX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'BLOX_NUM_PROCESSES'
ENV_PROCESS_ID = 'BLOX_PROCESS_ID'

_initialized = False
EXIT_PEER_LOST = 3


_abort_handler: Any = None  # the ctypes callback must outlive the call that installs it


def _exit_cleanly_on_abort() -> None:
  """Turns the runtime's abort (SIGABRT, exit 134, a core dump) into one line and exit 3.

  When a peer dies, JAX's coordination client ends the survivors with a fatal
  log and `abort()`; its only hook (`missed_heartbeat_callback`) cannot call
  Python (the status argument has no Python type), and Python's own signal
  handlers run too late to stop an abort. A C-level handler installed with
  ctypes runs inside `abort()` itself: it writes the line and `_exit`s.
  """
  global _abort_handler
  import ctypes
  import signal

  def on_abort(signum: int) -> None:
    os.write(2, (f'blox: error: process {_process_index()} stops: the JAX runtime aborted, most likely because '
                 'another process of the run died or stopped responding (see the lines above); restart all '
                 f'processes to resume from the last checkpoint (exit {EXIT_PEER_LOST})\n').encode())
    os._exit(EXIT_PEER_LOST)

  _abort_handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(on_abort)
  libc = ctypes.CDLL(None)
  libc.signal.restype = ctypes.c_void_p
  libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
  libc.signal(int(signal.SIGABRT), ctypes.cast(_abort_handler, ctypes.c_void_p))


def _process_index() -> int | str:
  try:
    return jax.process_index()
  except Exception:  # noqa: BLE001  (the runtime may be half torn down)
    return '?'


def _cluster_environment() -> str | None:
  """The multi-process launcher JAX can read coordinates from, if any."""
  env = os.environ
  if int(env.get('SLURM_NTASKS', env.get('SLURM_STEP_NUM_TASKS', '1')) or 1) > 1 and 'SLURM_JOB_ID' in env:
    return 'slurm'
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return 'ompi'
  # Cloud TPU VMs: multi-host slices list their workers; a single host needs no init.
  hosts = env.get('TPU_WORKER_HOSTNAMES', '')
  if hosts and len(hosts.split(',')) > 1:
    return 'tpu'
  return None


def _setting(value: Any, unset: Any, env_name: str, cast: type) -> Any:
  if value != unset:
    return value
  raw = os.environ.get(env_name)
  return cast(raw) if raw not in (None, '') else unset


def _force_cpu_devices(count: int) -> None:
  """Asks XLA for `count` fake CPU devices; only effective before the backend starts."""
  from jax._src import xla_bridge  # the one place JAX reports whether backends exist
  if xla_bridge.backends_are_initialized():
    if jax.local_device_count() != count:
      raise RuntimeError(
          f'distributed.local_device_count={count}, but JAX already started with '
          f'{jax.local_device_count()} local devices. Call initialize() before any JAX '
          'computation, or set XLA_FLAGS=--xla_force_host_platform_device_count before starting Python.')
    return
  os.environ['XLA_FLAGS'] = xla_flags_with_cpu_devices(count)


def xla_flags_with_cpu_devices(count: int, flags: str | None = None) -> str:
  """`XLA_FLAGS` asking for `count` fake CPU devices: `flags` (default: the
  environment's) with any earlier device count replaced and every other flag kept.

  Only takes effect in a process whose JAX backend has not started yet (set
  it in a child's environment, or before the first JAX computation).
  """
  flags = os.environ.get('XLA_FLAGS', '') if flags is None else flags
  kept = [f for f in flags.split() if 'xla_force_host_platform_device_count' not in f]
  return ' '.join(kept + [f'--xla_force_host_platform_device_count={count}'])


def initialize(cfg: Any = None) -> bool:
  """Joins this process to the others; returns True when running multi-process.

  cfg: a `DistributedConfig` (or None for all defaults). Must run before any
  JAX computation. Calling it again is a no-op.
  """
  global _initialized
  if _initialized:
    return jax.process_count() > 1
  from blox_scale.training.config import DistributedConfig
  cfg = DistributedConfig() if cfg is None else cfg
  if cfg.local_device_count:
    _force_cpu_devices(cfg.local_device_count)

  address = _setting(cfg.coordinator_address, '', ENV_COORDINATOR, str)
  num = _setting(cfg.num_processes, 0, ENV_NUM_PROCESSES, int)
  pid = _setting(cfg.process_id, -1, ENV_PROCESS_ID, int)
  timeouts: dict[str, Any] = dict(initialization_timeout=cfg.initialization_timeout,
                  heartbeat_timeout_seconds=cfg.heartbeat_timeout,
                  shutdown_timeout_seconds=cfg.shutdown_timeout)

  if address:
    if num < 1 or pid < 0 or pid >= num:
      raise ValueError(
          f'distributed.coordinator_address={address!r} needs num_processes >= 1 and '
          f'0 <= process_id < num_processes; got num_processes={num}, process_id={pid} '
          f'(set them in the config or via {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}).')
    if num == 1:
      _initialized = True
      return False
    _cpu_collectives()
    host = address.rsplit(':', 1)[0]
    if host in ('127.0.0.1', 'localhost', '[::1]'):
      # A local run: the coordinator listens on loopback only (by default it
      # binds every interface).
      timeouts['coordinator_bind_address'] = address
    jax.distributed.initialize(address, num, pid, cluster_detection_method='deactivate', **timeouts)
  else:
    method = cfg.cluster_detection
    if method == 'off':
      _initialized = True
      return False
    if method == 'auto':
      if _cluster_environment() is None:
        _initialized = True
        return False
      method = None  # let JAX try all of its detectors
    jax.distributed.initialize(cluster_detection_method=method, **timeouts)
  _initialized = True
  if jax.process_count() > 1:
    _exit_cleanly_on_abort()
  log.info('jax.distributed: process %d of %d, %d local / %d global devices',
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def _cpu_collectives() -> None:
  """Cross-process collectives on CPU need Gloo (the default in recent JAX; set it anyway)."""
  try:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except (AttributeError, ValueError):  # older/newer JAX without the option
    pass


def is_primary() -> bool:
  """True on the process that logs, writes metrics and commits checkpoints."""
  return jax.process_index() == 0


def process_batch_slice(global_batch_size: int, mesh: Mesh, rules: Rules) -> slice:
  """The rows `[start, stop)` of the global batch this process must load.

  Derived from the batch sharding: the rows whose shards live on this
  process's devices. With `jax.make_mesh` device order they are contiguous
  (an error says so if a custom device order breaks that).
  """
  shards = num_batch_shards(mesh, rules)
  if global_batch_size % shards:
    raise ValueError(
        f'data.batch_size={global_batch_size} is not divisible by the {shards} batch shards of the mesh '
        f'({dict(mesh.shape)}, batch -> {rules.get("batch")}); use a multiple of {shards}.')
  sharding = batch_sharding(mesh, rules, 1)
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  rows: set[int] = set()
  for (index,) in index_map.values():
    rows.update(range(*index.indices(global_batch_size)))
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    raise ValueError(
        f'Process {jax.process_index()} holds non-contiguous batch rows {sorted(rows)[:8]}...; '
        'build the mesh with blox_scale.parallel.sharding.make_mesh (jax.make_mesh device order).')
  return slice(start, stop)


def make_global_batch(local_batch: Any, mesh: Mesh, rules: Rules) -> Any:
  """Process-local numpy batch (this process's rows) -> global jax.Arrays.

  local_batch: pytree of arrays `[local_rows, ...]`, the rows given by
    `process_batch_slice`. On one process that is the whole batch.
  Returns arrays of shape `[local_rows * process_count_along_batch, ...]`,
  sharded along the batch dim by the mesh rules. No data moves between
  processes: each process places its rows on its own devices.
  """
  def one(x: Any) -> jax.Array:
    x = np.asarray(x)
    sharding = batch_sharding(mesh, rules, x.ndim)
    local, total = _batch_shard_counts(sharding)
    global_rows = x.shape[0] * total // local
    return jax.make_array_from_process_local_data(sharding, x, (global_rows,) + x.shape[1:])
  return jax.tree.map(one, local_batch)


def _batch_shard_counts(sharding: jax.sharding.NamedSharding) -> tuple[int, int]:
  """(batch shards on this process's devices, batch shards in total)."""
  entry = sharding.spec[0] if len(sharding.spec) else None
  if entry is None:
    return 1, 1
  mesh = sharding.mesh
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  dims = [mesh.axis_names.index(n) for n in names]
  local_ids = {d.id for d in mesh.local_devices}
  coords = {tuple(pos[i] for i in dims) for pos in np.argwhere(np.isin(mesh.device_ids, list(local_ids)))}
  return len(coords), int(np.prod([mesh.shape[n] for n in names]))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
