"""Trainer overhead: blox-train's tokens/s against the bare jitted step loop, same model, one run.

    python benchmarks/trainer_overhead.py                 # default (tiny) config, 100 steps x 3
    python benchmarks/trainer_overhead.py --steps 200 model.num_layers=2

The bare loop is the floor: one device batch reused, `state, m = step(state, batch)`
N times, one sync at the end. The trainer is the full `train()`: grain data
(fresh batches, host -> device), metrics at log steps, the progress bar and
async checkpoints. Its rate is wall-clock between its first and last log
lines (compile excluded, checkpoint saves included). Bare-loop runs and
trainer runs alternate, repeated, since a shared machine's load drifts; the
median ratio is reported.
Target: the trainer within 5% of the bare loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

import blox as bx
from blox_scale.training.config import load_config
from blox_scale.parallel.distributed import make_global_batch
from blox_scale.training.metrics import read_metrics
from blox_scale.models import DecoderLM
from blox_scale.training.optim import make_optimizer
from blox_scale.parallel.sharding import batch_sharding, make_mesh, rules_from_config
from blox_scale.training.step import abstract_train_state, init_train_state, make_train_step, train_state_shardings
from blox_scale.cli.train import train


class BareLoop:
  """The jitted step alone: one device batch reused, one sync at the end. Compiled once."""

  def __init__(self, cfg):
    mesh, rules = make_mesh(cfg.mesh), rules_from_config(cfg.mesh)
    model = DecoderLM(bx.Graph('lm'), cfg.model)
    optimizer, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    shardings = train_state_shardings(abstract_train_state(model, optimizer, cfg.train.seed), mesh, rules)
    self.state = init_train_state(model, optimizer, cfg.train.seed, mesh, rules, shardings)
    self.step = make_train_step(model, optimizer, mesh, rules, shardings, batch_sharding(mesh, rules),
                                grad_accum_steps=cfg.optimizer.grad_accum_steps, learning_rate_fn=schedule)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    self.tokens_per_step = B * T
    tokens = np.random.default_rng(0).integers(0, 256, (B, T + 1)).astype(np.int32)
    self.batch = make_global_batch({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
                                    'mask': np.ones((B, T), np.float32)}, mesh, rules)
    self.state, m = self.step(self.state, self.batch)  # compile
    jax.block_until_ready(m)

  def run(self, steps: int) -> float:
    """tokens/s over `steps` steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, m = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, m))
    return self.tokens_per_step * steps / (time.perf_counter() - t0)


def trainer(cfg) -> float:
  """tokens/s of `train()` between its first and last log lines (a fresh workdir: no resume)."""
  with tempfile.TemporaryDirectory() as workdir:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, workdir=workdir))
    if train(cfg) != 0:
      raise RuntimeError('the trainer failed')
    records = read_metrics(workdir, 'train')
  first, last = records[0], records[-1]
  return (last['step'] - first['step']) * cfg.data.batch_size * cfg.data.seq_len / (last['time'] - first['time'])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--repeats', type=int, default=3, help='(bare, trainer) pairs; the median ratio is reported.')
  parser.add_argument('--config', default=None)
  parser.add_argument('overrides', nargs='*')
  args = parser.parse_args()
  cfg = load_config(args.config, [*args.overrides, f'train.steps={args.steps}', 'train.log_every=10',
                                  'train.eval_every=0', 'train.sample_tokens=0', 'train.plot=false',
                                  f'checkpoint.every={max(1, args.steps // 3)}'])
  print(f'model d_model={cfg.model.d_model} layers={cfg.model.num_layers}, batch {cfg.data.batch_size} x '
        f'{cfg.data.seq_len}, {args.steps} steps, {jax.device_count()} {jax.devices()[0].platform} device(s)')
  bare = BareLoop(cfg)
  rows = []
  for i in range(args.repeats):
    # Alternate the order so that a drifting machine load favours neither side.
    if i % 2 == 0:
      b, t = bare.run(args.steps), trainer(cfg)
    else:
      t, b = trainer(cfg), bare.run(args.steps)
    rows.append((b, t))
  print(f'\n{"run":>4s}{"bare tokens/s":>16s}{"trainer tokens/s":>18s}{"trainer/bare":>14s}')
  for i, (b, t) in enumerate(rows):
    print(f'{i:>4d}{b:>16,.0f}{t:>18,.0f}{t / b:>14.3f}')
  ratio = statistics.median(t / b for b, t in rows)
  print(f'median trainer / bare = {ratio:.3f} (overhead {100 * (1 - ratio):+.1f}%; target within 5%)')


if __name__ == '__main__':
  sys.exit(main())
