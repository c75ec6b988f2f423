"""Conversion memory and speed: a synthetic Llama-shaped Hugging Face checkpoint of >= 2 GB.

    python benchmarks/convert.py [--layers 10 --d-model 2048 --mlp 5632 --vocab 32000 --shard 1GB --keep DIR]

Writes a Llama checkpoint in Hugging Face's sharded layout (config.json,
model-0000k-of-0000N.safetensors, model.safetensors.index.json; float32,
random weights) to a temporary directory, then runs each conversion in a
fresh child process and reports, side by side: wall time, MB/s (checkpoint
bytes / wall time), the child's peak RSS (its VmHWM) and its growth over
the RSS of a child that only imports the same modules and starts JAX
(the baseline), as a fraction of the checkpoint size.

  hf-to-blox    blox-convert hf-to-blox: streamed into an orbax checkpoint,
                one layer of one param at a time (target: growth << size)
  blox-to-hf    blox-convert blox-to-hf: restores one stacked param at a time
                (orbax placeholders for the rest) and writes shard by shard
  hf.load       bs.hf.load onto the CPU device: the params themselves are host
                memory here, so growth ~ 1x size; the excess over 1x is the
                streaming overhead

The wall time includes the child's start-up (imports, JAX init: a few seconds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blox_scale.interop.hf import parse_size  # noqa: E402
from blox_scale.interop.safetensors_io import INDEX, plan_shards  # noqa: E402

BASELINE = 'import jax, numpy, orbax.checkpoint, safetensors, blox_scale.cli.convert; jax.devices()'
LOAD = ('import sys, jax, blox_scale as bs; model, params = bs.hf.load(sys.argv[1]); '
        'jax.block_until_ready([p.value for p in params.values()])')


def llama_tensors(layers: int, d: int, heads: int, kv: int, mlp: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
  hd = d // heads
  out = [('model.embed_tokens.weight', (vocab, d))]
  for i in range(layers):
    p = f'model.layers.{i}.'
    out += [(p + 'self_attn.q_proj.weight', (heads * hd, d)), (p + 'self_attn.k_proj.weight', (kv * hd, d)),
            (p + 'self_attn.v_proj.weight', (kv * hd, d)), (p + 'self_attn.o_proj.weight', (d, heads * hd)),
            (p + 'mlp.gate_proj.weight', (mlp, d)), (p + 'mlp.up_proj.weight', (mlp, d)),
            (p + 'mlp.down_proj.weight', (d, mlp)), (p + 'input_layernorm.weight', (d,)),
            (p + 'post_attention_layernorm.weight', (d,))]
  return out + [('model.norm.weight', (d,)), ('lm_head.weight', (vocab, d))]


def write_checkpoint(directory: Path, args: argparse.Namespace) -> int:
  """Writes the sharded checkpoint one shard at a time; returns its tensor bytes."""
  tensors = dict(llama_tensors(args.layers, args.d_model, args.heads, args.kv_heads, args.mlp, args.vocab))
  sizes = [(n, int(np.prod(s)) * 4) for n, s in tensors.items()]
  shards = plan_shards(sizes, parse_size(args.shard))
  rng = np.random.default_rng(0)
  weight_map = {}
  for k, names in enumerate(shards):
    fname = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
    arrays = {n: (rng.standard_normal(tensors[n], dtype=np.float32) * 0.02) for n in names}
    save_file(arrays, str(directory / fname), metadata={'format': 'pt'})
    weight_map.update({n: fname for n in names})
    del arrays
  total = sum(s for _, s in sizes)
  (directory / INDEX).write_text(json.dumps({'metadata': {'total_size': total}, 'weight_map': weight_map}))
  (directory / 'config.json').write_text(json.dumps({
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': args.vocab,
      'hidden_size': args.d_model, 'intermediate_size': args.mlp, 'num_hidden_layers': args.layers,
      'num_attention_heads': args.heads, 'num_key_value_heads': args.kv_heads, 'hidden_act': 'silu',
      'max_position_embeddings': 2048, 'rms_norm_eps': 1e-5, 'rope_theta': 10000.0,
      'tie_word_embeddings': False, 'torch_dtype': 'float32'}))
  return total


def _hwm(pid: int) -> int | None:
  """VmHWM (peak resident set since exec) of a running process, in bytes."""
  try:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  except (FileNotFoundError, ProcessLookupError):
    return None
  return None


def run_child(argv: list[str]) -> tuple[float, int]:
  """(wall seconds, peak RSS bytes) of one child process.

  The peak is the child's own high-water mark (VmHWM, reset at exec), polled
  every 20 ms until it exits; `ru_maxrss` from wait4 would also count the
  parent's pages shared at fork time.
  """
  start = time.perf_counter()
  proc = subprocess.Popen(argv, cwd=ROOT, env={'PYTHONPATH': str(ROOT), 'PATH': '/usr/bin:/bin',
                                               'JAX_PLATFORMS': 'cpu'})
  peak = 0
  while proc.poll() is None:
    peak = max(peak, _hwm(proc.pid) or 0)
    time.sleep(0.02)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise SystemExit(f'child failed ({proc.returncode}): {" ".join(argv)}')
  return wall, peak


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=10)
  parser.add_argument('--d-model', type=int, default=2048)
  parser.add_argument('--heads', type=int, default=16)
  parser.add_argument('--kv-heads', type=int, default=4)
  parser.add_argument('--mlp', type=int, default=5632)
  parser.add_argument('--vocab', type=int, default=32000)
  parser.add_argument('--shard', default='1GB', help='Shard size of the synthetic checkpoint.')
  parser.add_argument('--keep', default=None, help='Write under this directory and keep it (default: a temp dir).')
  args = parser.parse_args()

  base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix='blox-convert-bench-'))
  src, wd, dst = base / 'hf', base / 'blox', base / 'hf-out'
  try:
    src.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    size = write_checkpoint(src, args)
    print(f'synthetic Llama checkpoint: {args.layers} layers, d_model {args.d_model}, mlp {args.mlp}, '
          f'vocab {args.vocab}: {size / 2**30:.2f} GiB float32 in {len(list(src.glob("*.safetensors")))} shards '
          f'(written in {time.perf_counter() - t0:.0f}s)')
    largest = max(int(np.prod(s)) * 4 for _, s in llama_tensors(args.layers, args.d_model, args.heads,
                                                                    args.kv_heads, args.mlp, args.vocab))
    print(f'largest single tensor: {largest / 2**20:.0f} MiB')
    py = sys.executable
    _, baseline = run_child([py, '-c', BASELINE])
    runs = {
        'hf-to-blox': [py, '-m', 'blox_scale.cli.convert', 'hf-to-blox', str(src), str(wd), '--no-progress'],
        'blox-to-hf': [py, '-m', 'blox_scale.cli.convert', 'blox-to-hf', str(wd), str(dst), '--no-progress'],
        'hf.load': [py, '-c', LOAD, str(src)],
    }
    print(f'baseline child (imports + JAX init): peak RSS {baseline / 2**20:.0f} MiB')
    print(f'{"conversion":<12} {"wall s":>8} {"MB/s":>8} {"peak RSS MiB":>13} {"growth MiB":>11} {"growth/size":>12} '
          f'{"growth/largest tensor":>22}')
    for name, argv in runs.items():
      wall, peak = run_child(argv)
      growth = peak - baseline
      print(f'{name:<12} {wall:8.1f} {size / 1e6 / wall:8.1f} {peak / 2**20:13.0f} {growth / 2**20:11.0f} '
            f'{growth / size:12.2f} {growth / largest:22.1f}', flush=True)
  finally:
    if not args.keep:
      shutil.rmtree(base, ignore_errors=True)


if __name__ == '__main__':
  main()
