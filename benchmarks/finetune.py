"""Fine-tuning memory and speed: full fine-tuning against LoRA on an f32, a bf16 and an int8 base.

    python benchmarks/finetune.py                   # tiny, mid (timed) and mid150m (memory only)
    python benchmarks/finetune.py --models mid150m  # XLA's memory analysis of a 150M model, one compile per mode
    python benchmarks/finetune.py --steps 20 --repeats 5

For every model and mode, in one run on this machine's first device: the
compiled train step's memory from XLA (`compiled.memory_analysis()`: params,
optimizer state, temporaries, and the peak = arguments + outputs - donated
aliases + temporaries), the trainable parameter count, and the step time
(median over repeats of `steps` steps with one batch reused, compile
excluded). Modes run interleaved within each repeat, since a shared
machine's load drifts; ratios are against full fine-tuning of the same model.
LoRA: rank 8 on attn/q, attn/v and mlp/* (the tiny_lora preset's targets);
on attn/q and attn/v for the MoE model (`moe`, Mixtral-shaped: 8 experts,
top-2, experts ~93% of the params), whose int8 base also stores the expert
kernels as int8 (one scale per expert and output channel).
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
from blox_scale.nn.config import MoEConfig
from blox_scale.parallel.sharding import batch_sharding, make_mesh, rules_from_config, with_shardings
from blox_scale.training import finetune
from blox_scale.training.config import FinetuneConfig, LoRAConfig, MeshConfig
from blox_scale.training.step import TrainState, make_train_step, train_state_shardings

MODELS = {
    'tiny': ModelConfig(d_model=128, num_layers=4, mlp_dim=512, num_heads=4, max_seq_len=128),
    'mid': ModelConfig(d_model=512, num_layers=8, mlp_dim=2048, num_heads=8, max_seq_len=128),
    # ~150M params: large enough that params and optimizer state, not activations, set the peak.
    # Memory only by default (--time-models): a step of it takes seconds on a CPU.
    'mid150m': ModelConfig(d_model=1024, num_layers=12, mlp_dim=4096, num_heads=16, max_seq_len=128),
    # Mixtral's shape scaled down (memory only by default): LoRA on attention, the experts frozen.
    'moe': ModelConfig(d_model=512, num_layers=4, mlp_dim=1024, num_heads=8, num_kv_heads=2, max_seq_len=128,
                       tie_embeddings=False, moe=MoEConfig(num_experts=8, top_k=2)),
}
LORA = LoRAConfig(rank=8, alpha=16, targets=('attn/q', 'attn/v', 'mlp/*'))
MODES = {
    'full f32': None,
    'lora f32 base': FinetuneConfig(init_from='bench', lora=LORA),
    'lora bf16 base': FinetuneConfig(init_from='bench', lora=LORA, base_dtype='bfloat16'),
    'lora int8 base': FinetuneConfig(init_from='bench', lora=LORA, base_dtype='bfloat16', quant='int8'),
}


def modes(model_cfg: ModelConfig) -> dict[str, FinetuneConfig | None]:
  """`MODES`, with LoRA on attention only for an MoE model (its MLPs are experts, not projections)."""
  if not model_cfg.moe.num_experts:
    return MODES
  lora = dataclasses.replace(LORA, targets=('attn/q', 'attn/v'))
  return {m: f if f is None else dataclasses.replace(f, lora=lora) for m, f in MODES.items()}


class Case:
  """One model in one mode: its compiled step on device 0 (and, to time it, its state and batch).

  The step is compiled from the abstract train state (`jax.eval_shape` of the
  init: nothing allocated), so XLA's memory figures of a model too large to run
  here cost one compile; `run=True` also creates the state and a batch.
  """

  def __init__(self, model_cfg: ModelConfig, f: FinetuneConfig | None, batch: int, seq: int, run: bool = True):
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    rules = rules_from_config(MeshConfig())
    optimizer = optax.adamw(1e-3, weight_decay=0.0)
    plain = DecoderLM(bx.Graph('lm'), model_cfg)
    if f is None:
      model = plain
    else:
      model_cfg = dataclasses.replace(model_cfg, param_dtype=f.base_dtype or model_cfg.param_dtype)
      model = finetune.build_model(model_cfg, f)

    def init() -> TrainState:
      base = plain.init(0)
      params = base if f is None else finetune.adapt(model, f, base)
      trainable, _ = params.split()
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(trainable))

    abstract = jax.eval_shape(init)
    shardings = train_state_shardings(abstract, mesh, rules)
    self.trainable = ft.count(abstract.params, trainable=True)
    self.params_bytes = ft.nbytes(abstract.params)
    self.opt_bytes = ft.nbytes(abstract.opt_state)
    step = make_train_step(model, optimizer, mesh, rules, shardings, batch_sharding(mesh, rules))
    batch_spec = {'inputs': jax.ShapeDtypeStruct((batch, seq), jnp.int32),
                  'targets': jax.ShapeDtypeStruct((batch, seq), jnp.int32),
                  'mask': jax.ShapeDtypeStruct((batch, seq), jnp.float32)}
    self.compiled = step.lower(with_shardings(abstract, shardings), batch_spec).compile()
    mem = self.compiled.memory_analysis()
    self.temp = mem.temp_size_in_bytes
    self.peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    if run:
      self.state = jax.jit(init, out_shardings=shardings)()
      tokens = np.random.default_rng(0).integers(0, 256, (batch, seq + 1)).astype(np.int32)
      self.batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': np.ones((batch, seq), np.float32)}

  def run(self, steps: int) -> float:
    """Seconds per step over `steps` steps (one sync at the end)."""
    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--models', default='tiny,mid,mid150m', help=f'comma-separated, of {", ".join(MODELS)}')
  ap.add_argument('--time-models', default='tiny,mid', help='the models whose steps are also timed (the others: '
                  'XLA memory analysis only, nothing allocated)')
  ap.add_argument('--steps', type=int, default=5, help='steps per timing')
  ap.add_argument('--repeats', type=int, default=3, help='timings per mode (median reported)')
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--seq', type=int, default=128)
  args = ap.parse_args()
  MiB = 1024 ** 2
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}; batch {args.batch} x {args.seq}; '
        f'LoRA rank {LORA.rank} on {", ".join(LORA.targets)} (MoE models: attn/q, attn/v)')
  timed = set(args.time_models.split(','))
  for name in args.models.split(','):
    run = name in timed
    cases = {mode: Case(MODELS[name], f, args.batch, args.seq, run=run) for mode, f in modes(MODELS[name]).items()}
    times: dict[str, list[float]] = {mode: [] for mode in cases}
    if run:
      for case in cases.values():
        case.run(1)  # warm
      for _ in range(args.repeats):
        for mode, case in cases.items():
          times[mode].append(case.run(args.steps))
    full = cases['full f32']
    full_time = statistics.median(times['full f32']) if run else 0.0
    total = ft.count(jax.eval_shape(DecoderLM(bx.Graph('lm'), MODELS[name]).init, 0))
    print(f'\n{name}: d_model {MODELS[name].d_model}, {MODELS[name].num_layers} layers, {total / 1e6:.1f}M params'
          + ('' if run else ' (memory analysis only)'))
    print(f'{"mode":<16}{"trainable":>11}{"params MiB":>12}{"opt MiB":>9}{"temp MiB":>10}{"peak MiB":>10}'
          f'{"peak/full":>10}' + (f'{"ms/step":>9}{"time/full":>10}' if run else ''))
    for mode, case in cases.items():
      line = (f'{mode:<16}{case.trainable:>11,}{case.params_bytes / MiB:>12.2f}{case.opt_bytes / MiB:>9.2f}'
              f'{case.temp / MiB:>10.2f}{case.peak / MiB:>10.2f}{case.peak / full.peak:>10.2f}')
      if run:
        t = statistics.median(times[mode])
        line += f'{1e3 * t:>9.1f}{t / full_time:>10.2f}'
      print(line)


if __name__ == '__main__':
  main()
