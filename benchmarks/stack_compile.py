"""Compile time of a train step against depth: scanned Stack vs the same stack unrolled.

    python3 benchmarks/stack_compile.py [--depths 2 8 32 64] [--width 32]

For each depth L the same model (pre-norm residual MLP blocks from blox
layers, remat='full') is built twice: `Stack(..., scan=True)` (one
`lax.scan`) and `Stack(..., scan=False)` (a Python loop over the same stacked
params, i.e. an unrolled graph). It prints trace+lower time and XLA compile
time of `jax.jit(train_step).lower(...).compile()`, and the median run time of
the compiled step, side by side. Tiny widths: this measures compile cost, not
FLOPs. A scanned stack should be flat in L; the unrolled one grows with L.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Run from a checkout without installing: prefer the repo's packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import blox as bx  # noqa: E402
import blox_scale as bs  # noqa: E402


class MLPBlock(bx.Module):
  """x + W2 gelu(W1 LayerNorm(x)); x: [batch, width]."""

  def __init__(self, graph: bx.Graph, rng: bx.Rng, width: int) -> None:
    super().__init__(graph)
    self.norm = bx.LayerNorm(graph.child('norm'))
    self.up = bx.Linear(graph.child('up'), 4 * width, rng=rng)
    self.down = bx.Linear(graph.child('down'), width, rng=rng)

  def __call__(self, params: bx.Params, x: jax.Array) -> tuple[jax.Array, bx.Params]:
    h, params = self.norm(params, x)
    h, params = self.up(params, h)
    h, params = self.down(params, jax.nn.gelu(h))
    return x + h, params


def build(depth: int, width: int, scan: bool):
  root = bx.Graph('model')
  rng = bx.Rng(root.child('rng'))
  stack = bs.Stack(root.child('stack'), lambda g: MLPBlock(g, rng, width), depth, rng=rng, scan=scan)
  x = jnp.ones((8, width), jnp.float32)
  params = rng.seed(bx.Params(), seed=0)
  # Abstract init: nothing allocated, only shapes (the benchmark is about compiling).
  params = jax.eval_shape(lambda p: stack(p, x)[1], params)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype) if not jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key)
                        else jax.random.key(0), params)

  def train_step(params: bx.Params, x: jax.Array) -> tuple[jax.Array, bx.Params]:
    trainable, rest = params.split()

    def loss_fn(trainable):
      y, new = stack(trainable.merge(rest), x)
      return jnp.mean(y * y), new

    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updated = jax.tree.map(lambda p, g: p - 1e-3 * g, trainable, grads)
    _, new_rest = new.split()
    return loss, updated.merge(new_rest)

  return train_step, params.locked(), x


def measure(depth: int, width: int, scan: bool, runs: int) -> dict[str, float]:
  step, params, x = build(depth, width, scan)
  t0 = time.perf_counter()
  lowered = jax.jit(step).lower(params, x)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  times = []
  for _ in range(runs):
    s = time.perf_counter()
    jax.block_until_ready(compiled(params, x))
    times.append(time.perf_counter() - s)
  return {'lower': t1 - t0, 'compile': t2 - t1, 'run_ms': 1e3 * statistics.median(times),
          'leaves': len(jax.tree.leaves(params))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--depths', type=int, nargs='+', default=[2, 8, 32, 64])
  parser.add_argument('--width', type=int, default=32)
  parser.add_argument('--runs', type=int, default=5)
  args = parser.parse_args()
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}; width={args.width}, remat=full')
  print(f'{"L":>4} | {"scan: lower":>11} {"compile":>8} {"run ms":>7} {"leaves":>6} | '
        f'{"loop: lower":>11} {"compile":>8} {"run ms":>7} {"leaves":>6} | {"compile ratio loop/scan":>23}')
  for depth in args.depths:
    s = measure(depth, args.width, True, args.runs)
    u = measure(depth, args.width, False, args.runs)
    print(f'{depth:>4} | {s["lower"]:>10.2f}s {s["compile"]:>7.2f}s {s["run_ms"]:>7.2f} {s["leaves"]:>6} | '
          f'{u["lower"]:>10.2f}s {u["compile"]:>7.2f}s {u["run_ms"]:>7.2f} {u["leaves"]:>6} | '
          f'{(u["lower"] + u["compile"]) / (s["lower"] + s["compile"]):>22.1f}x', flush=True)


if __name__ == '__main__':
  main()
