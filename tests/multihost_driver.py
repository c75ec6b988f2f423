"""A small multi-process training loop for tests/test_multihost.py.

Run it under launch/local.sh (N processes) or alone (one process); with the
same global batch size and mesh sizes it must print the same losses:

  launch/local.sh 2 python3 tests/multihost_driver.py --steps 3
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python3 tests/multihost_driver.py --steps 3

Each process builds the same global batch per step from a seed, loads only
its rows (`process_batch_slice`) and turns them into global arrays
(`make_global_batch`). The primary process prints `LOSS <step> <loss>` lines.
`--die-process P --die-step S` makes process P exit abruptly (os._exit) after
step S, to test that the others do not hang.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from blox_scale import distributed  # noqa: E402  (no JAX computation before initialize)
from blox_scale.training.config import load_config  # noqa: E402


def tiny_config(mesh: str, heartbeat: int = 10) -> Any:
  mesh_overrides = [f'mesh.{kv}' for kv in mesh.split(',') if kv]
  return load_config(None, [
      'model.num_layers=2', 'model.d_model=32', 'model.num_heads=4', 'model.mlp_dim=64',
      'model.max_seq_len=16', 'data.seq_len=16', f'distributed.heartbeat_timeout={heartbeat}',
      'distributed.shutdown_timeout=10', 'distributed.initialization_timeout=60', *mesh_overrides])


def global_batch(step: int, batch: int, seq: int, vocab: int) -> dict[str, Any]:
  """The same global batch on every process and in every run, from the step."""
  import numpy as np
  rng = np.random.default_rng(1000 + step)
  tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': np.ones((batch, seq), np.float32)}


def run(cfg: Any, steps: int, batch: int, devices: Any = None, die_process: int = -1, die_step: int = 0) -> list[float]:
  """The training loop; returns the per-step losses (printed on the primary)."""
  import jax
  import optax

  import blox as bx
  from blox_scale.parallel import sharding
  from blox_scale.models import DecoderLM
  from blox_scale.training.step import abstract_train_state, init_train_state, make_train_step, train_state_shardings

  mesh = sharding.make_mesh(cfg.mesh, devices)
  rules = sharding.rules_from_config(cfg.mesh)
  model = DecoderLM(bx.Graph('lm'), cfg.model)
  optimizer = optax.adamw(1e-2)
  shardings = train_state_shardings(abstract_train_state(model, optimizer), mesh, rules)
  state = init_train_state(model, optimizer, 0, mesh, rules, shardings)
  train_step = make_train_step(model, optimizer, mesh, rules, shardings, sharding.batch_sharding(mesh, rules))
  rows = distributed.process_batch_slice(batch, mesh, rules)
  print(f'process {jax.process_index()}/{jax.process_count()} devices {jax.local_device_count()}/'
        f'{jax.device_count()} mesh {dict(mesh.shape)} rows {rows.start}:{rows.stop}', flush=True)
  losses = []
  step = 0
  while die_process >= 0 or step < steps:
    full = global_batch(step, batch, cfg.data.seq_len, cfg.model.vocab_size)
    local = {k: v[rows] for k, v in full.items()}
    state, metrics = train_step(state, distributed.make_global_batch(local, mesh, rules))
    loss = float(metrics['loss'])  # a host transfer: every process waits for the step
    losses.append(loss)
    if distributed.is_primary():
      print(f'LOSS {step} {loss:.9g}', flush=True)
    if jax.process_index() == die_process and step >= die_step:
      print(f'process {die_process} dying abruptly after step {step}', flush=True)
      os._exit(17)
    step += 1
    if die_process >= 0:
      time.sleep(0.5)  # survivors keep stepping until JAX notices the death
  return losses


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--mesh', default='data=-1,fsdp=2,tensor=1')
  ap.add_argument('--die-process', type=int, default=-1)
  ap.add_argument('--die-step', type=int, default=0)
  ap.add_argument('--heartbeat', type=int, default=10)
  args = ap.parse_args()
  cfg = tiny_config(args.mesh, args.heartbeat)
  distributed.initialize(cfg.distributed)
  run(cfg, args.steps, args.batch, die_process=args.die_process, die_step=args.die_step)
  print('DONE', flush=True)


if __name__ == '__main__':
  main()
