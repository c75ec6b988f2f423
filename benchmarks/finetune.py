"""Fine-tuning memory and speed: full fine-tuning against LoRA on an f32, a bf16 and an int8 base.

    python benchmarks/finetune.py                   # tiny (d_model 128, 4 layers) and mid (d_model 512, 8 layers)
    python benchmarks/finetune.py --steps 20 --repeats 5

For every model and mode, in one run on this machine's first device: the
compiled train step's memory from XLA (`compiled.memory_analysis()`: params,
optimizer state, temporaries, and the peak = arguments + outputs - donated
aliases + temporaries), the trainable parameter count, and the step time
(median over repeats of `steps` steps with one batch reused, compile
excluded). Modes run interleaved within each repeat, since a shared
machine's load drifts; ratios are against full fine-tuning of the same model.
LoRA: rank 8 on attn/q, attn/v and mlp/* (the tiny_lora preset's targets).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blox as bx
from blox_scale import finetune as ft
from blox_scale.models import DecoderLM
from blox_scale.models.config import ModelConfig
from blox_scale.parallel.sharding import batch_sharding, make_mesh, rules_from_config
from blox_scale.training import finetune
from blox_scale.training.config import FinetuneConfig, LoRAConfig, MeshConfig
from blox_scale.training.step import TrainState, make_train_step, train_state_shardings

MODELS = {
    'tiny': ModelConfig(d_model=128, num_layers=4, mlp_dim=512, num_heads=4, max_seq_len=128),
    'mid': ModelConfig(d_model=512, num_layers=8, mlp_dim=2048, num_heads=8, max_seq_len=128),
}
LORA = LoRAConfig(rank=8, alpha=16, targets=('attn/q', 'attn/v', 'mlp/*'))
MODES = {
    'full f32': None,
    'lora f32 base': FinetuneConfig(init_from='bench', lora=LORA),
    'lora bf16 base': FinetuneConfig(init_from='bench', lora=LORA, base_dtype='bfloat16'),
    'lora int8 base': FinetuneConfig(init_from='bench', lora=LORA, base_dtype='bfloat16', quant='int8'),
}


class Case:
  """One model in one mode: its compiled step, state and batch on device 0."""

  def __init__(self, model_cfg: ModelConfig, f: FinetuneConfig | None, batch: int, seq: int):
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    rules = rules_from_config(MeshConfig())
    optimizer = optax.adamw(1e-3, weight_decay=0.0)
    plain = DecoderLM(bx.Graph('lm'), model_cfg)
    base = jax.jit(plain.init)(0)
    if f is None:
      model, params = plain, base
    else:
      model_cfg = dataclasses.replace(model_cfg, param_dtype=f.base_dtype or model_cfg.param_dtype)
      model = finetune.build_model(model_cfg, f)
      params = jax.jit(lambda b: finetune.adapt(model, f, b))(base)
    trainable, _ = params.split()
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(trainable))
    shardings = train_state_shardings(state, mesh, rules)
    self.state = jax.device_put(state, shardings)
    self.trainable = ft.count(params, trainable=True)
    step = make_train_step(model, optimizer, mesh, rules, shardings, batch_sharding(mesh, rules))
    tokens = np.random.default_rng(0).integers(0, 256, (batch, seq + 1)).astype(np.int32)
    self.batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': np.ones((batch, seq), np.float32)}
    self.compiled = step.lower(self.state, self.batch).compile()
    mem = self.compiled.memory_analysis()
    self.params_bytes = ft.nbytes(params)
    self.opt_bytes = ft.nbytes(state.opt_state)
    self.temp = mem.temp_size_in_bytes
    self.peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes

  def run(self, steps: int) -> float:
    """Seconds per step over `steps` steps (one sync at the end)."""
    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--models', default='tiny,mid', help=f'comma-separated, of {", ".join(MODELS)}')
  ap.add_argument('--steps', type=int, default=5, help='steps per timing')
  ap.add_argument('--repeats', type=int, default=3, help='timings per mode (median reported)')
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--seq', type=int, default=128)
  args = ap.parse_args()
  MiB = 1024 ** 2
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}; batch {args.batch} x {args.seq}; '
        f'LoRA rank {LORA.rank} on {", ".join(LORA.targets)}')
  for name in args.models.split(','):
    cases = {mode: Case(MODELS[name], f, args.batch, args.seq) for mode, f in MODES.items()}
    for case in cases.values():
      case.run(1)  # warm
    times: dict[str, list[float]] = {mode: [] for mode in cases}
    for _ in range(args.repeats):
      for mode, case in cases.items():
        times[mode].append(case.run(args.steps))
    full = cases['full f32']
    full_time = statistics.median(times['full f32'])
    print(f'\n{name}: d_model {MODELS[name].d_model}, {MODELS[name].num_layers} layers')
    print(f'{"mode":<16}{"trainable":>11}{"params MiB":>12}{"opt MiB":>9}{"temp MiB":>10}{"peak MiB":>10}'
          f'{"peak/full":>10}{"ms/step":>9}{"time/full":>10}')
    for mode, case in cases.items():
      t = statistics.median(times[mode])
      print(f'{mode:<16}{case.trainable:>11,}{case.params_bytes / MiB:>12.2f}{case.opt_bytes / MiB:>9.2f}'
            f'{case.temp / MiB:>10.2f}{case.peak / MiB:>10.2f}{case.peak / full.peak:>10.2f}'
            f'{1e3 * t:>9.1f}{t / full_time:>10.2f}')


if __name__ == '__main__':
  main()
