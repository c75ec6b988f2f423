"""The same GPT train step in raw JAX, blox, Flax NNX (two styles) and Equinox, side by side.

    python benchmarks/peers/run.py [--out benchmarks/peers/results.json]

Model (benchmarks/peers/common.py): GPT-2-style decoder, d_model 256, 4 heads,
MLP 1024, vocab 1024, seq 128, batch 8, float32, AdamW, the train state donated.
Every variant starts from the same init numbers. Before anything is timed, the
loss and every gradient of each variant are compared with raw JAX's (one depth,
every remat policy) and the first step's loss of every timed configuration too;
any difference beyond float tolerance stops the run with an error.

Figures, per depth L and remat policy (none / full / dots):
  compile   trace + lower + XLA compile of the train step (`.lower().compile()`;
            NNX's `nnx.jit` has no AOT path: its first call minus one step)
  temp      XLA's temp buffer bytes (`compiled.memory_analysis()`), the
            activation memory a remat policy trades against recomputation
  step      median wall time of a train step, measured in paired rounds: every
            round runs each variant `--steps` times in a rotated order, and the
            ratio to raw JAX is taken within the round (load from other processes
            hits both), then the median over rounds
and the dispatch time of a tiny model's train step (the step's time is then
per-call overhead: flattening the state, argument checks, the launch).
The machine's load average is recorded before and after: on a shared machine
the absolute times move, the paired ratios much less.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.peers import blox_peer, common, eqx_peer, nnx_peer, raw_jax  # noqa: E402

VARIANTS = {
    'raw_jax': raw_jax.build,
    'blox': blox_peer.build,
    'nnx': nnx_peer.build_lifted,
    'nnx_functional': nnx_peer.build_functional,
    'equinox': eqx_peer.build,
}
from benchmarks.peers.common import LOSS_RTOL, Mismatch, check_grads  # noqa: E402


def timed_steps(v: dict, batch: dict, n: int) -> list[float]:
  times = []
  for _ in range(n):
    start = time.perf_counter()
    v['state'], loss = v['step'](v['state'], batch)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  return times


def first_call(v: dict, batch: dict) -> dict:
  """Compiles (AOT where the framework has it), reads XLA's memory analysis, runs one step."""
  out = {}
  if v['lower'] is not None:
    start = time.perf_counter()
    lowered = v['lower'](v['state'], batch)
    mid = time.perf_counter()
    compiled = lowered.compile()
    end = time.perf_counter()
    mem = compiled.memory_analysis()
    out.update(lower_s=mid - start, compile_s=end - start, temp_bytes=int(mem.temp_size_in_bytes),
               argument_bytes=int(mem.argument_size_in_bytes))
    del compiled
  start = time.perf_counter()
  v['state'], loss = v['step'](v['state'], batch)
  jax.block_until_ready(loss)
  out['first_call_s'] = time.perf_counter() - start
  out['first_loss'] = float(loss)
  return out


def check_all(remats) -> dict:
  """Loss and every gradient of each variant against raw JAX, on a tiny model (cheap to compile)."""
  shape = common.tiny(2)
  numbers, batch = common.init_numbers(shape), common.make_batch(shape)
  worst = {}
  for remat in remats:
    ref = raw_jax.build(shape, numbers, remat)['grads'](batch)
    worst[f'raw_jax/{remat}'] = 0.0
    for name, build in VARIANTS.items():
      if name == 'raw_jax' or name == 'nnx':  # nnx: the same model and gradient code as nnx_functional
        continue
      got = build(shape, numbers, remat)['grads'](batch)
      worst[f'{name}/{remat}'] = check_grads(name, ref, got, f'tiny L=2 remat={remat}')
      print(f'  {name:<15} remat={remat:<5} loss and gradients match raw JAX (worst {worst[f"{name}/{remat}"]:.2f} of tolerance)', flush=True)
  return worst


def run_config(shape: common.Shape, remat: str, args, names: list[str], timed: bool) -> dict:
  numbers = common.init_numbers(shape)
  batch = common.make_batch(shape)
  variants = {name: VARIANTS[name](shape, numbers, remat) for name in names}
  result: dict = {'num_layers': shape.num_layers, 'remat': remat, 'variants': {}}
  for name in names:
    result['variants'][name] = first_call(variants[name], batch)
  ref_loss = result['variants']['raw_jax']['first_loss']
  for name in names:
    loss = result['variants'][name]['first_loss']
    if abs(loss - ref_loss) > LOSS_RTOL * abs(ref_loss):
      raise Mismatch(f'{name} L={shape.num_layers} remat={remat}: first-step loss {loss!r} != raw JAX {ref_loss!r}')
  if timed:
    rounds = {name: [] for name in names}
    for r in range(args.rounds):
      order = names[r % len(names):] + names[:r % len(names)]
      for name in order:
        rounds[name].append(statistics.median(timed_steps(variants[name], batch, args.steps)))
    for name in names:
      ratios = [t / base for t, base in zip(rounds[name], rounds['raw_jax'])]
      result['variants'][name].update(step_s=rounds[name], step_median_s=statistics.median(rounds[name]),
                                      step_ratio=statistics.median(ratios))
  for name in names:
    v = result['variants'][name]
    if 'compile_s' not in v:  # nnx.jit: no AOT lowering, so its first call minus one step
      v['compile_s'] = v['first_call_s'] - v.get('step_median_s', 0.0)
      v['compile_from_first_call'] = True
  ref = result['variants']['raw_jax']
  for v in result['variants'].values():
    v['compile_ratio'] = v['compile_s'] / ref['compile_s']
    if 'temp_bytes' in v:
      v['temp_ratio'] = v['temp_bytes'] / max(ref['temp_bytes'], 1)
  return result


def dispatch(args) -> dict:
  """Per-call time of a tiny model's train step (state in, state out, donated)."""
  out = {}
  for L in args.dispatch_depths:
    shape = common.tiny(L)
    numbers, batch = common.init_numbers(shape), common.make_batch(shape)
    variants = {name: build(shape, numbers, 'full') for name, build in VARIANTS.items()}
    names = list(variants)
    for v in variants.values():
      timed_steps(v, batch, 3)  # compile and warm up
    per_round = {name: [] for name in names}
    for r in range(args.dispatch_rounds):
      order = names[r % len(names):] + names[:r % len(names)]
      for name in order:
        per_round[name].append(statistics.median(timed_steps(variants[name], batch, args.dispatch_calls)))
    leaves = {name: len(jax.tree.leaves(v['state'])) for name, v in variants.items()}
    out[str(L)] = {
        name: {'us': [t * 1e6 for t in per_round[name]],
               'median_us': statistics.median(per_round[name]) * 1e6,
               'ratio': statistics.median([t / b for t, b in zip(per_round[name], per_round['raw_jax'])]),
               'state_leaves': leaves[name]}
        for name in names
    }
  return out


def environment() -> dict:
  import equinox
  import flax
  import optax
  return {
      'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'python': platform.python_version(), 'machine': platform.machine(),
      'cpus': os.cpu_count(), 'platform': jax.devices()[0].platform,
      'device': jax.devices()[0].device_kind, 'devices': jax.device_count(),
      'versions': {'jax': jax.__version__, 'jaxlib': jax.lib.__version__ if hasattr(jax.lib, '__version__') else jax.__version__,
                   'flax': flax.__version__, 'equinox': equinox.__version__, 'optax': optax.__version__,
                   'numpy': np.__version__},
      'loadavg_start': list(os.getloadavg()),
  }


def print_table(results: dict) -> None:
  names = list(VARIANTS)
  print(f"\nTrain step, ratio to raw JAX (median over {results['settings']['rounds']} paired rounds; "
        'compile and XLA temp bytes as ratios too)')
  header = f"{'L':>3} {'remat':<5} {'figure':<8}" + ''.join(f'{n:>16}' for n in names)
  print(header)
  for cfg in results['configs']:
    for figure, key in (('step', 'step_ratio'), ('compile', 'compile_ratio'), ('temp', 'temp_ratio')):
      cells = []
      for n in names:
        value = cfg['variants'].get(n, {}).get(key)
        cells.append(f'{value:>16.2f}' if value is not None else f"{'-':>16}")
      if any(c.strip() != '-' for c in cells[1:]):
        print(f"{cfg['num_layers']:>3} {cfg['remat']:<5} {figure:<8}" + ''.join(cells))
  print('\nRaw JAX absolute figures')
  for cfg in results['configs']:
    r = cfg['variants']['raw_jax']
    step = f"{r['step_median_s'] * 1e3:9.1f} ms/step" if 'step_median_s' in r else ' ' * 17
    print(f"{cfg['num_layers']:>3} {cfg['remat']:<5} {step}  compile {r['compile_s']:6.2f} s  "
          f"temp {r['temp_bytes'] / 2**20:8.1f} MiB")
  print('\nDispatch of a tiny train step (us per call, ratio to raw JAX)')
  for L, row in results['dispatch'].items():
    print(f'L={L:<3}' + ''.join(f"{n:>16}" for n in names))
    print(' ' * 5 + ''.join(f"{row[n]['median_us']:>9.0f} {row[n]['ratio']:>5.2f}x" for n in names))
  env = results['environment']
  print(f"\nload average (1/5/15 min) at start {env['loadavg_start']}, at end {env['loadavg_end']}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--depths', type=int, nargs='+', default=[2, 8, 32], help='compile time and XLA temp bytes at these depths')
  parser.add_argument('--time-depths', type=int, nargs='+', default=[2, 8], help='also time the train step at these depths')
  parser.add_argument('--remats', nargs='+', default=list(common.REMATS), choices=common.REMATS)
  parser.add_argument('--rounds', type=int, default=5, help='paired rounds per configuration')
  parser.add_argument('--steps', type=int, default=1, help='steps per variant per round (their median is the round figure)')
  parser.add_argument('--dispatch-depths', type=int, nargs='+', default=[2, 8])
  parser.add_argument('--dispatch-rounds', type=int, default=10)
  parser.add_argument('--dispatch-calls', type=int, default=50)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results.json'))
  args = parser.parse_args()

  start = time.perf_counter()
  results = {'environment': environment(), 'settings': vars(args) | {'shape': vars(common.Shape(0)) | {'num_layers': None}},
             'configs': []}
  print('checking loss and gradients against raw JAX ...', flush=True)
  results['grad_check'] = check_all(args.remats)
  for L in args.depths:
    # nnx.jit and jax.jit over nnx.split run the same model code; the lifted
    # variant's extra cost is per call, so it is compiled and timed at the
    # shallowest depth only (and in the dispatch table).
    names = [n for n in VARIANTS if n != 'nnx' or L == min(args.depths)]
    for remat in args.remats:
      print(f'L={L} remat={remat} ...', flush=True)
      results['configs'].append(run_config(common.Shape(L), remat, args, names, timed=L in args.time_depths))
      with open(args.out + '.partial', 'w') as f:  # what is done so far survives an interrupted run
        json.dump(results, f, indent=1)
  print('dispatch ...', flush=True)
  results['dispatch'] = dispatch(args)
  results['environment']['loadavg_end'] = list(os.getloadavg())
  results['environment']['wall_s'] = time.perf_counter() - start
  results['environment']['cpu_s'] = time.process_time()
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=1)
  if os.path.exists(args.out + '.partial'):
    os.remove(args.out + '.partial')
  print_table(results)
  print(f"\n{args.out} written in {results['environment']['wall_s'] / 60:.1f} min "
        f"({results['environment']['cpu_s'] / 60:.1f} min of CPU time)")


if __name__ == '__main__':
  main()
