"""Decode throughput: the KV cache scanned with the layers vs the same model unrolled.

    python benchmarks/decode.py [--layers 8 --d-model 256 --batch 8 --prompt 32 --new 128 --repeats 5 --remat full]

Both variants use the same params (a scanned checkpoint decodes as it is) and
the same `blox_scale.models.generate.generate` (prefill + a `fori_loop` of single-token
steps inside one jit); only `model.scan_layers` differs. Printed: compile
time, median wall time of a whole `generate` call, and tokens/s, where
"decode tok/s" counts the generated tokens only, measured as the difference
between two generation lengths so that the prefill cancels out.
Target: scanned within 10% of unrolled.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np

import blox as bx
from blox_scale.training.config import ModelConfig
from blox_scale.models import DecoderLM
from blox_scale.models.generate import generate


def timed(fn, repeats: int) -> tuple[float, float]:
  """(first call incl. compile, median of the following calls) in seconds."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--layers', type=int, default=8)
  parser.add_argument('--d-model', type=int, default=256)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--kv-heads', type=int, default=2)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--prompt', type=int, default=32)
  parser.add_argument('--new', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--remat', default='full', help="model.remat (the config default 'full'; no effect without a gradient "
                      "except for the jax.checkpoint boundary itself; try 'none').")
  args = parser.parse_args()

  base = ModelConfig(vocab_size=256, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                     num_kv_heads=args.kv_heads, mlp_dim=4 * args.d_model, max_seq_len=args.prompt + args.new + 16,
                     remat=args.remat)
  params = jax.jit(DecoderLM(bx.Graph('lm'), base).init)(0)
  rng = np.random.default_rng(0)
  # Different prompt lengths (left-padded to one bucket).
  prompts = [rng.integers(0, 256, size=int(rng.integers(args.prompt // 2, args.prompt + 1))).tolist()
             for _ in range(args.batch)]
  short = max(1, args.new // 4)

  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.layers} layers, d_model {args.d_model}, '
        f'{args.heads}/{args.kv_heads} heads, batch {args.batch}, prompts <= {args.prompt}, {args.new} new tokens, '
        f'remat={args.remat}')
  print(f'{"variant":<10} {"compile+1st (s)":>16} {"median call (s)":>16} {"tok/s (call)":>13} {"decode tok/s":>13}')
  results = {}
  for name, scan in (('scanned', True), ('unrolled', False)):
    model = DecoderLM(bx.Graph('lm'), dataclasses.replace(base, scan_layers=scan))
    run = lambda n: generate(model, params, prompts, max_new_tokens=n)
    first, t_long = timed(lambda: run(args.new), args.repeats)
    _, t_short = timed(lambda: run(short), args.repeats)
    call_rate = args.batch * args.new / t_long
    decode_rate = args.batch * (args.new - short) / max(t_long - t_short, 1e-9)
    results[name] = decode_rate
    print(f'{name:<10} {first:>16.2f} {t_long:>16.4f} {call_rate:>13.0f} {decode_rate:>13.0f}')
  ratio = results['scanned'] / results['unrolled']
  print(f'scanned / unrolled decode throughput: {ratio:.3f} (target >= 0.90)')


if __name__ == '__main__':
  main()
