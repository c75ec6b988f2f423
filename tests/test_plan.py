"""blox-plan: abstract compilation of the sharded train step and its memory figures."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blox_scale.cli import plan as bplan
from blox_scale.parallel import sharding
from blox_scale.stacking.remat import POLICIES
from blox_scale.training.config import load_config
from helpers import xla_flags

ROOT = Path(__file__).resolve().parents[1]
SMALL = ['model.num_layers=2', 'model.d_model=64', 'model.num_heads=4', 'model.mlp_dim=256',
         'model.max_seq_len=64', 'data.seq_len=64', 'data.batch_size=8', 'optimizer.weight_decay=0']


def _param_bytes_by_hand(cfg, fsdp: int) -> tuple[int, int]:
  """(total f32 param bytes, bytes per device with embed split fsdp ways), from the shapes."""
  m = cfg.model
  d, f, v, l, h = m.d_model, m.mlp_dim, m.vocab_size, m.num_layers, m.num_heads
  hd = d // h
  # Sharded along 'embed': embedding, q/k/v/o, the three MLP kernels. Norm scales are replicated.
  sharded = v * d + l * (4 * d * h * hd + 3 * d * f)
  replicated = l * 2 * d + d
  return 4 * (sharded + replicated), 4 * (sharded // fsdp + replicated)


@pytest.mark.slow
def test_plan_reports_sharded_state_and_remat_tradeoff():
  cfg = load_config(None, SMALL + ['mesh.data=1', 'mesh.fsdp=8', 'mesh.tensor=1'])
  mesh = sharding.make_mesh(cfg.mesh)
  rows = {r.remat: r for r in bplan.plan(cfg, mesh, remats=['none', 'full'])}
  total, per_device = _param_bytes_by_hand(cfg, 8)
  for r in rows.values():
    assert not r.error, r.error
    # Params: exactly the hand count (the rng seed/counter add 12 bytes).
    assert per_device <= r.params <= per_device + 16
    assert r.params < total / 4
    # AdamW (clip + adam): two moments shaped like the params, plus counters.
    assert 2 * (r.params - 16) <= r.opt_state <= 2 * r.params + 64  # (the rng is not trainable)
    assert r.batch == 3 * 8 * 64 * 4 // 8  # inputs, targets, mask: 8 x 64, split 8 ways
    assert r.peak >= r.params + r.opt_state and r.temp > 0
  # Full remat keeps only layer inputs for the backward pass: fewer temporaries.
  assert rows['full'].temp < rows['none'].temp
  table = bplan.format_rows(list(rows.values()), hbm_gib=80)
  assert 'none' in table and 'full' in table and 'MiB per device' in table and 'yes' in table


def test_plan_names_the_param_that_does_not_divide():
  cfg = load_config(None, SMALL + ['mesh.data=1', 'mesh.fsdp=1', 'mesh.tensor=8'])
  with pytest.raises(ValueError, match=r"Param lm/.*\('(kv_)?heads', size 4\) is not divisible by mesh axis 'tensor' of size 8"):
    bplan.plan(cfg, sharding.make_mesh(cfg.mesh), remats=['full'])


@pytest.mark.slow
def test_cli_sets_its_own_device_count():
  # The command line asks for 4 devices; the test process has 8: plan.py must
  # start JAX with 4 (here, in a fresh process that has not started JAX yet).
  env = {**os.environ, 'XLA_FLAGS': xla_flags()}  # (no device count)
  out = subprocess.run(
      [sys.executable, '-m', 'blox_scale.cli.plan', '--config', 'configs/tiny.yaml', '--devices', '4',
       '--mesh', 'data=2,fsdp=2,tensor=1', '--remat', 'full,dots', '--hbm', '1', *SMALL],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 1} on 4 devices" in out.stdout, out.stdout
  lines = [l for l in out.stdout.splitlines() if l.startswith(('full', 'dots'))]
  assert len(lines) == 2 and all(l.rstrip().endswith('yes') for l in lines), out.stdout


def test_plan_compiler_options_leave_the_memory_analysis_unchanged():
  # blox-plan compiles at LLVM optimisation level 0 (faster); the bytes must be those of a default compile.
  from blox_scale.models import build_model
  from blox_scale.training.optim import make_optimizer
  from blox_scale.training.step import abstract_batch, abstract_train_state, make_train_step, train_state_shardings

  cfg = load_config(None, SMALL + ['mesh.data=2', 'mesh.fsdp=4', 'mesh.tensor=1'])
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  model, (optimizer, _) = build_model(cfg.model), make_optimizer(cfg.optimizer, 10)
  abstract = abstract_train_state(model, optimizer)
  shardings = train_state_shardings(abstract, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  lowered = make_train_step(model, optimizer, mesh, rules, shardings, batch_sh).lower(
      sharding.with_shardings(abstract, shardings), abstract_batch(8, 64, batch_sh))
  fields = lambda m: (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes)
  default = fields(lowered.compile(compiler_options={'xla_backend_optimization_level': 3}).memory_analysis())  # XLA's default
  assert fields(lowered.compile(compiler_options=bplan.PLAN_COMPILER_OPTIONS).memory_analysis()) == default
  [row] = bplan.plan(cfg, mesh, remats=[cfg.model.remat])
  assert row.temp == default[3] and row.peak == default[0] + default[1] - default[2] + default[3]


def test_plan_defaults_follow_the_preset():
  # A preset's own data.seq_len is what it trains at; without one, its model.max_seq_len.
  check = lambda *argv: bplan._check(bplan._parser().parse_args(list(argv)))
  cfg, remats = check('--config', str(ROOT / 'configs' / 'llama_7b_lora.yaml'), '--devices', '8')
  assert cfg.data.seq_len == 2048 and remats == [cfg.model.remat] == ['full']  # 3 modes at the preset's policy
  assert [label for label, _ in bplan.finetune_modes(cfg)] == ['full', 'lora bf16', 'lora int8']
  cfg, remats = check('--config', str(ROOT / 'configs' / 'llama_7b_lora.yaml'), '--devices', '8', '--remat', 'all')
  assert len(remats) == 6
  cfg, remats = check('--config', str(ROOT / 'configs' / 'llama_7b.yaml'), '--devices', '8')
  assert cfg.data.seq_len == 4096 and len(remats) == 6


def test_plan_past_its_deadline_keeps_the_exact_sizes_and_compiles_nothing():
  cfg = load_config(None, SMALL + ['mesh.data=1', 'mesh.fsdp=8', 'mesh.tensor=1'])
  mesh = sharding.make_mesh(cfg.mesh)
  [on_time] = bplan.plan(cfg, mesh, remats=['full'])
  late = bplan.plan(cfg, mesh, remats=['none', 'full'], deadline=time.monotonic())
  assert [(r.remat, r.error) for r in late] == [('none', bplan.LATE), ('full', bplan.LATE)]
  for r in late:
    assert (r.params, r.opt_state, r.batch, r.peak) == (on_time.params, on_time.opt_state, on_time.batch, 0)
  assert 'n/a: not compiled within the time limit' in bplan.format_rows(late)


@pytest.mark.slow
def test_cli_answers_within_its_time_limit():
  # Six 7B compiles (about 4 s of CPU each) cannot fit in 8 s: blox-plan prints what it compiled,
  # marks the rest, says which flag to change and exits 1 at the limit, not after the compiles.
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'} | {'XLA_FLAGS': xla_flags()}
  limit = 8
  start = time.monotonic()
  out = subprocess.run(
      [sys.executable, '-m', 'blox_scale.cli.plan', '--config', 'configs/llama_7b.yaml', '--devices', '8',
       '--time-limit', str(limit)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  wall = time.monotonic() - start
  assert out.returncode == 1, (out.stdout, out.stderr[-3000:])
  assert wall < limit + 3, wall  # (+ Python's own start-up before blox-plan's clock starts, on a loaded machine)
  [line] = out.stderr.strip().splitlines()
  assert line.startswith(f'blox-plan: error: --time-limit={limit}: ') and 'not compiled within' in line, line
  assert '--remat full' in line and '--time-limit ' in line, line
  rows = [l for l in out.stdout.splitlines() if l.split()[:1] and l.split()[0] in POLICIES]
  assert len(rows) == 6 and any('n/a: not compiled within the time limit' in l for l in rows), out.stdout


@pytest.mark.slow
def test_cli_stops_at_its_time_limit_even_while_tracing():
  # 2000 unscanned layers take far longer to trace than the limit: the watchdog ends blox-plan in one line.
  limit = 5
  start = time.monotonic()
  out = subprocess.run(
      [sys.executable, '-m', 'blox_scale.cli.plan', '--config', 'configs/llama_7b.yaml', '--devices', '8',
       '--remat', 'full', '--time-limit', str(limit), 'model.scan_layers=false', 'model.num_layers=2000'],
      cwd=ROOT, env={**os.environ, 'XLA_FLAGS': xla_flags()}, capture_output=True, text=True, timeout=120)
  wall = time.monotonic() - start
  assert out.returncode == 1 and wall < limit + 3, (wall, out.stderr[-2000:])
  assert out.stderr.strip() == (f'blox-plan: error: --time-limit={limit}: still tracing a train step after {limit} s; '
                                'allow more time (--time-limit 0 for none)'), out.stderr


def _mixtral_lora_tiny():
  """configs/mixtral_8x7b_lora.yaml at tiny shapes: LoRA on attn/*, int8 experts over the 8 devices' expert axis."""
  tiny = ['model.num_layers=1', 'model.d_model=32', 'model.num_heads=4', 'model.num_kv_heads=2', 'model.mlp_dim=64',
          'model.vocab_size=256', 'model.max_seq_len=16', 'data.seq_len=16', 'data.batch_size=8']
  cfg = load_config(ROOT / 'configs' / 'mixtral_8x7b_lora.yaml', tiny, files=False)
  return cfg, bplan.finetune_modes(cfg)


def test_plan_sizes_moe_finetuning_modes_with_int8_experts():
  cfg, modes = _mixtral_lora_tiny()
  assert [label for label, _ in modes] == ['full', 'lora bf16', 'lora int8']
  assert all('mlp' not in t for t in modes[1][1].lora.targets)  # an MoE model has no mlp/* kernels to adapt
  # Past its deadline: exact sizes, nothing compiled (the compiles: the slow test below).
  rows = {r.mode: r for r in bplan.plan(cfg, sharding.make_mesh(cfg.mesh), remats=['full'], modes=modes,
                                        deadline=time.monotonic())}
  m = cfg.model
  experts_per_device = m.num_layers * 3 * m.d_model * m.mlp_dim * m.moe.num_experts // cfg.mesh.expert
  # The experts' kernels go from 2 bytes (bf16 base) to 1 (int8) per element, less their f32 scales;
  # the attention kernels are int8 too, so the saving is at least the experts' elements.
  saved = rows['lora bf16'].params - rows['lora int8'].params
  assert saved >= experts_per_device, (saved, experts_per_device)
  assert rows['full'].params > rows['lora bf16'].params  # full fine-tuning: f32 params
  assert rows['lora int8'].opt_state == rows['lora bf16'].opt_state < rows['full'].opt_state


@pytest.mark.slow
def test_plan_compiles_every_moe_finetuning_mode():
  cfg, modes = _mixtral_lora_tiny()
  rows = bplan.plan(cfg, sharding.make_mesh(cfg.mesh), remats=['full'], modes=modes)
  assert [r.mode for r in rows] == ['full', 'lora bf16', 'lora int8']
  for r in rows:
    assert not r.error and r.peak > 0, (r.mode, r.error)
