"""Dispatch cost of a jitted call over a tiny model's params: plain dict vs bx.Params.

    python3 benchmarks/dispatch.py [--calls 2000] [--layers 4]

The same forward pass (an MLP of `--layers` Linear+LayerNorm blocks, with an
Rng) is jitted twice: (a) over a plain dict `{path: array}` written with
jnp, (b) over `bx.Params` through the blox modules, returning `(y, params)`
like every blox call (so both flatten the params on the way in and
unflatten them on the way out). Shapes are tiny so the time is dispatch:
pytree flattening, argument handling and the launch, not FLOPs. Calls of the
two variants are interleaved in rounds so that machine load hits both
alike. Prints the median microseconds per call and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import blox as bx  # noqa: E402


def build(num_layers: int):
  graph = bx.Graph('net')
  rng = bx.Rng(graph.child('rng'))
  layers = []
  for i in range(num_layers):
    layers += [bx.Linear(graph.child(f'dense_{i}'), 16, rng), jax.nn.relu, bx.LayerNorm(graph.child(f'norm_{i}'))]
  model = bx.Sequential(graph.child('mlp'), layers)
  x = jnp.ones((2, 16))
  _, params = model(rng.seed(bx.Params(), seed=0), x)
  return model, params.locked(), x


def plain_forward(num_layers: int):
  def forward(values: dict, x: jax.Array):
    for i in range(num_layers):
      x = jax.nn.relu(x @ values[('net', f'dense_{i}', 'kernel')] + values[('net', f'dense_{i}', 'bias')])
      mean = x.mean(-1, keepdims=True)
      var = ((x - mean) ** 2).mean(-1, keepdims=True)
      x = (x - mean) * jax.lax.rsqrt(var + 1e-5) * values[('net', f'norm_{i}', 'scale')] + values[('net', f'norm_{i}', 'bias')]
    return x, values
  return forward


def median_us(fn, args, calls: int) -> list[float]:
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e6)
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--calls', type=int, default=2000)
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--rounds', type=int, default=10)
  args = parser.parse_args()

  model, params, x = build(args.layers)
  values = params.values_dict()
  with jax.numpy_rank_promotion('allow'):
    plain = jax.jit(plain_forward(args.layers))
    blox = jax.jit(model)
    y_plain, _ = plain(values, x)
    y_blox, _ = blox(params, x)
  assert jnp.allclose(y_plain, y_blox, atol=1e-5), 'the two variants must compute the same thing'

  per_round = max(args.calls // args.rounds, 1)
  results: dict[str, list[float]] = {'dict': [], 'Params': []}
  for _ in range(args.rounds):
    results['dict'] += median_us(plain, (values, x), per_round)
    results['Params'] += median_us(blox, (params, x), per_round)

  flatten = {
      'dict': median_us(lambda: jax.tree.flatten(values), (), 1000),
      'Params': median_us(lambda: jax.tree.flatten(params), (), 1000),
  }
  leaves = len(jax.tree.leaves(params))
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, {leaves} leaves, '
        f'{args.rounds} rounds x {per_round} calls each')
  print(f"{'variant':<10}{'median us/call':>16}{'p90 us/call':>14}{'flatten us':>12}")
  for name, times in results.items():
    p90 = statistics.quantiles(times, n=10)[-1]
    print(f'{name:<10}{statistics.median(times):>16.1f}{p90:>14.1f}{statistics.median(flatten[name]):>12.1f}')
  ratio = statistics.median(results['Params']) / statistics.median(results['dict'])
  print(f'Params / dict dispatch ratio: {ratio:.2f}x')


if __name__ == '__main__':
  main()
