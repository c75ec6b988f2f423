"""Trainer overhead: blox-train's tokens/s against the bare jitted step loop, same model, one run.

    python benchmarks/trainer_overhead.py                 # default (tiny) config, 120 steps
    python benchmarks/trainer_overhead.py --steps 200 model.num_layers=2

The bare loop is the floor: one device batch reused, `state, m = step(state, batch)`
N times, one sync at the end. The trainer is the full `train()`: grain data
(fresh batches, host -> device), metrics at log steps, the progress bar and
async checkpoints. Its rate is wall-clock between its first and last log
lines (compile excluded, checkpoint saves included). Bare runs before and
after the trainer bracket it, since this machine's load drifts.
Target: the trainer within 5% of the bare loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

import blox as bx
from blox_scale.config import load_config
from blox_scale.distributed import make_global_batch
from blox_scale.metrics import read_metrics
from blox_scale.models import DecoderLM
from blox_scale.optim import make_optimizer
from blox_scale.sharding import make_mesh, rules_from_config
from blox_scale.step import init_train_state, make_train_step
from blox_scale.train import train


def bare_loop(cfg, steps: int) -> float:
  """tokens/s of the jitted step alone (data already on device)."""
  mesh, rules = make_mesh(cfg.mesh), rules_from_config(cfg.mesh)
  model = DecoderLM(bx.Graph('lm'), cfg.model)
  optimizer, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
  state = init_train_state(model, optimizer, cfg.train.seed, mesh, rules)
  step = make_train_step(model, optimizer, mesh, rules, grad_accum_steps=cfg.optimizer.grad_accum_steps,
                         learning_rate_fn=schedule)
  B, T = cfg.data.batch_size, cfg.data.seq_len
  tokens = np.random.default_rng(0).integers(0, 256, (B, T + 1)).astype(np.int32)
  batch = make_global_batch({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
                             'mask': np.ones((B, T), np.float32)}, mesh, rules)
  state, m = step(state, batch)  # compile
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready((state, m))
  return B * T * steps / (time.perf_counter() - t0)


def trainer(cfg, steps: int, log_every: int) -> float:
  """tokens/s of `train()` between its first and last log lines."""
  assert train(cfg) == 0
  records = read_metrics(cfg.train.workdir, 'train')
  first, last = records[0], records[-1]
  return (last['step'] - first['step']) * cfg.data.batch_size * cfg.data.seq_len / (last['time'] - first['time'])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=120)
  parser.add_argument('--config', default=None)
  parser.add_argument('overrides', nargs='*')
  args = parser.parse_args()
  log_every = 10
  with tempfile.TemporaryDirectory() as workdir:
    cfg = load_config(args.config, [*args.overrides, f'train.steps={args.steps}', f'train.log_every={log_every}',
                                    'train.eval_every=0', 'train.sample_tokens=0', 'train.plot=false',
                                    f'checkpoint.every={max(1, args.steps // 3)}', f'train.workdir={workdir}'])
    print(f'model d_model={cfg.model.d_model} layers={cfg.model.num_layers}, batch {cfg.data.batch_size} x '
          f'{cfg.data.seq_len}, {args.steps} steps, {jax.device_count()} {jax.devices()[0].platform} device(s)')
    before = bare_loop(cfg, args.steps)
    full = trainer(cfg, args.steps, log_every)
    after = bare_loop(cfg, args.steps)
  bare = statistics.mean([before, after])
  print(f'{"":24s}{"tokens/s":>12s}')
  print(f'{"bare step loop (before)":24s}{before:12,.0f}')
  print(f'{"blox-train":24s}{full:12,.0f}')
  print(f'{"bare step loop (after)":24s}{after:12,.0f}')
  print(f'trainer / bare = {full / bare:.3f}  (overhead {100 * (1 - full / bare):+.1f}%; target within 5%)')


if __name__ == '__main__':
  sys.exit(main())
