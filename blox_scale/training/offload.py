"""Host offload: parts of the train state kept in host memory between steps (`train.offload`).

    train:
      offload: [opt_state, frozen]

`place(shardings, parts)` gives the chosen leaves of the TrainState's shardings
the memory kind `pinned_host`. Init and checkpoint restore then create them in
host memory, and the train step's `out_shardings` put the updated values back
there (the jit's donation still aliases them: input and output live in the
same memory). Inside the step `to_device` moves every host-resident input to
device memory before it is used, so the math is unchanged.

- 'opt_state': the optimizer state (Adam's moments: 2x the trainable params in f32).
- 'frozen': the params that do not train (the frozen base of a LoRA or
  partial fine-tuning run; they reach the loss as non-differentiated inputs).

It needs a backend with `pinned_host` memory (GPU, TPU; jax's CPU backend lists
one too, but there host and device memory are the same RAM: nothing is saved).
"""

from __future__ import annotations

from typing import Any

import jax

from blox_scale.training.config import ConfigError

PARTS = ('opt_state', 'frozen')
HOST = 'pinned_host'


def memory_kinds(device: Any = None) -> list[str]:
  """The memory kinds `device` (default: the first device) can address, e.g. ['device', 'pinned_host']."""
  device = device if device is not None else jax.devices()[0]
  try:
    return [m.kind for m in device.addressable_memories()]
  except Exception:  # a backend without the memories API  # noqa: BLE001
    return []


def check_supported(parts: Any, key: str = 'train.offload') -> None:
  """ConfigError naming `key`, the backend and the fix when offload is asked for and there is no pinned_host memory."""
  if not parts:
    return
  device = jax.devices()[0]
  kinds = memory_kinds(device)
  if HOST not in kinds:
    raise ConfigError(f'{key}={list(parts)}: the {device.platform} backend has no {HOST!r} memory '
                      f'(its memory kinds: {kinds or "none reported"}), so nothing can be offloaded to host; '
                      f'set {key}=[] (or run on a backend with host memory kinds, e.g. GPU or TPU)')


def place(shardings: Any, parts: Any) -> Any:
  """`shardings` (a TrainState of shardings) with the `parts` leaves in pinned_host memory.

  parts: a subset of PARTS. 'frozen' moves the Params whose `trainable` is
  False; the step counter and trainable params stay in device memory.
  """
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    raise ConfigError(f'train.offload: unknown part(s) {unknown}; choose from {list(PARTS)}')
  host = lambda s: s.with_memory_kind(HOST)
  params, opt_state = shardings.params, shardings.opt_state
  if 'opt_state' in parts:
    opt_state = jax.tree.map(host, opt_state)
  if 'frozen' in parts:
    trainable, frozen = params.split()
    params = trainable.merge(jax.tree.map(host, frozen))
  return shardings.replace(params=params, opt_state=opt_state)


def to_device(tree: Any) -> Any:
  """Inside a jit: every leaf that lives in host memory moved to device memory (others unchanged)."""
  def one(x: Any) -> Any:
    if getattr(jax.typeof(x), 'memory_space', None) == jax.memory.Space.Host:
      return jax.device_put(x, jax.memory.Space.Device)
    return x
  return jax.tree.map(one, tree)


def on_device(tree: Any) -> Any:
  """Outside a jit: `tree` with its host-memory arrays copied to device memory (same shardings otherwise)."""
  def one(x: Any) -> Any:
    s = getattr(x, 'sharding', None)
    return jax.device_put(x, s.with_memory_kind('device')) if getattr(s, 'memory_kind', None) == HOST else x
  return jax.tree.map(one, tree)


def device_shardings(shardings: Any) -> Any:
  """`shardings` with every pinned_host memory kind replaced by device memory."""
  return jax.tree.map(lambda s: s.with_memory_kind('device') if s.memory_kind == HOST else s, shardings)


def host_bytes(tree: Any) -> int:
  """Bytes of the arrays of `tree` (arrays or ShapeDtypeStructs with shardings) placed in host memory."""
  total = 0
  for x in jax.tree.leaves(tree):
    s = getattr(x, 'sharding', None)
    if s is not None and getattr(s, 'memory_kind', None) == HOST:  # an RNG key counts 8 bytes, as in blox-plan
      total += x.size * (8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended) else x.dtype.itemsize)
  return int(total)
