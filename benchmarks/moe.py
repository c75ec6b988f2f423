"""MoE train-step time against a dense model of the same active FLOPs, side by side in one run.

    python benchmarks/moe.py                     # 8 and 32 experts, dropless and capacity (a few minutes on CPU)
    python benchmarks/moe.py --rounds 7 --steps 3 --d-model 128 --json moe.json

Variants (same attention, layers, d_model; every layer's MLP differs):
  dense              SwiGLU of width top_k * expert_width: the FLOPs a token's MoE layer does
  moe{E}_{dispatch}  E experts of width expert_width, top-k routing, dispatch dropless or capacity
So every variant does the same matmul FLOPs per token, plus the router (d_model * E) for MoE;
the step-time ratio to dense is the overhead of routing and dispatch. Timing: paired rounds
(every round runs each variant `--steps` steps in a rotated order; a round's ratio is taken
within the round, so load from other processes hits all variants alike), then medians over
rounds, as benchmarks/peers/run.py does. One device, float32; the numbers in docs/moe.md come
from this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import jax
import numpy as np

from blox_scale import flops
from blox_scale.models import build_model
from blox_scale.nn.config import MoEConfig
from blox_scale.parallel.distributed import make_global_batch
from blox_scale.parallel.sharding import batch_sharding, make_mesh, rules_from_config
from blox_scale.training.config import MeshConfig, ModelConfig, OptimizerConfig
from blox_scale.training.optim import make_optimizer
from blox_scale.training.step import abstract_train_state, init_train_state, make_train_step, train_state_shardings


def variants(args) -> dict[str, ModelConfig]:
  base = ModelConfig(vocab_size=256, d_model=args.d_model, num_layers=args.layers, num_heads=4, num_kv_heads=2,
                     mlp_dim=args.top_k * args.expert_width, max_seq_len=args.seq_len, remat='none')
  out = {'dense': base}
  for e in args.experts:
    for dispatch in ('dropless', 'capacity'):
      moe = MoEConfig(num_experts=e, top_k=args.top_k, mlp_dim=args.expert_width, dispatch=dispatch,
                      capacity_factor=args.capacity_factor)
      out[f'moe{e}_{dispatch}'] = dataclasses.replace(base, moe=moe)
  return out


class Runner:
  """One variant's compiled train step on one device, a fixed batch, its state."""

  def __init__(self, config: ModelConfig, batch: dict, mesh, rules) -> None:
    model = build_model(config)
    optimizer, _ = make_optimizer(OptimizerConfig(), 1000)
    shardings = train_state_shardings(abstract_train_state(model, optimizer), mesh, rules)
    self.state = init_train_state(model, optimizer, 0, mesh, rules, shardings)
    self.step = make_train_step(model, optimizer, mesh, rules, shardings, batch_sharding(mesh, rules))
    self.batch = batch
    t0 = time.perf_counter()
    self.state, metrics = self.step(self.state, batch)
    jax.block_until_ready(metrics)
    self.first_call_s = time.perf_counter() - t0
    self.metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self.active = flops.matmul_params(config)
    self.total = flops.total_params(config)

  def run(self, steps: int) -> float:
    """Median seconds per step over `steps` synchronised steps."""
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      self.state, metrics = self.step(self.state, self.batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--experts', type=int, nargs='+', default=[8, 32])
  parser.add_argument('--top-k', type=int, default=2)
  parser.add_argument('--expert-width', type=int, default=64, help='hidden width of one expert')
  parser.add_argument('--d-model', type=int, default=64)
  parser.add_argument('--layers', type=int, default=2)
  parser.add_argument('--batch-size', type=int, default=8)
  parser.add_argument('--seq-len', type=int, default=128)
  parser.add_argument('--capacity-factor', type=float, default=1.25)
  parser.add_argument('--rounds', type=int, default=5, help='paired rounds')
  parser.add_argument('--steps', type=int, default=3, help='steps per variant per round (their median is the round figure)')
  parser.add_argument('--json', default='', help='also write the results here')
  args = parser.parse_args()

  mesh_cfg = MeshConfig(data=1)
  mesh, rules = make_mesh(mesh_cfg, jax.devices()[:1]), rules_from_config(mesh_cfg)
  B, T = args.batch_size, args.seq_len
  tokens = np.random.default_rng(0).integers(0, 256, (B, T + 1)).astype(np.int32)
  batch = make_global_batch({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': np.ones((B, T), np.float32)},
                            mesh, rules)
  configs = variants(args)
  runners = {name: Runner(c, batch, mesh, rules) for name, c in configs.items()}
  names = list(runners)
  rounds = {n: [] for n in names}
  for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      rounds[n].append(runners[n].run(args.steps))
  results = {}
  for n in names:
    ratios = [t / d for t, d in zip(rounds[n], rounds['dense'])]
    x = runners[n]
    results[n] = {'step_ms_median': 1e3 * statistics.median(rounds[n]), 'ratio_to_dense': statistics.median(ratios),
                  'step_ms_rounds': [1e3 * t for t in rounds[n]], 'first_call_s': x.first_call_s,
                  'active_matmul_params': x.active, 'total_matmul_params': x.total,
                  'tokens_per_s': B * T / statistics.median(rounds[n]),
                  'dropped_frac': x.metrics.get('moe_dropped_frac', 0.0)}
  env = {'jax': jax.__version__, 'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
         'python': platform.python_version(), 'settings': vars(args)}
  print(f"MoE vs dense of the same active FLOPs: d_model {args.d_model}, {args.layers} layers, batch {B} x {T}, "
        f"top-{args.top_k} of E experts of width {args.expert_width} (dense width {args.top_k * args.expert_width}), "
        f"capacity_factor {args.capacity_factor}; {env['backend']} {env['device']}, jax {env['jax']}; "
        f"median of {args.rounds} paired rounds x {args.steps} steps")
  print(f"{'variant':<18}{'ms/step':>10}{'x dense':>9}{'tok/s':>10}{'active':>10}{'total':>10}{'dropped':>9}{'1st call s':>12}")
  for n, r in results.items():
    print(f"{n:<18}{r['step_ms_median']:>10.1f}{r['ratio_to_dense']:>9.2f}{r['tokens_per_s']:>10,.0f}"
          f"{r['active_matmul_params']:>10,}{r['total_matmul_params']:>10,}{r['dropped_frac']:>9.3f}{r['first_call_s']:>12.1f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'environment': env, 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
