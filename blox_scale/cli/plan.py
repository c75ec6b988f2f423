"""blox-plan: per-device memory of a preset's train step, before buying the devices.

  blox-plan --config configs/llama_7b.yaml --devices 64 --mesh data=1,fsdp=64,tensor=1 --hbm 80

Compiles the real sharded train step (the one `make_train_step` returns) on N
fake CPU devices with abstract inputs: `jax.ShapeDtypeStruct`s that carry
their shardings, so nothing is allocated and no parameter is initialised.
For every remat policy it prints, per device: params, optimizer state, the
batch, XLA's temporaries (activations saved for the backward pass, gradients,
workspace) and the peak (arguments + outputs - donated aliases + temporaries)
from `compiled.memory_analysis()`.

For a fine-tuning preset (`finetune.init_from` or `finetune.lora.rank > 0`) it
compares, per remat policy: full fine-tuning of the preset's model, and LoRA
(the preset's `finetune.lora`) on a bfloat16 and on an int8 frozen base. The
model is the preset's `model:` section (the source checkpoint is not read).

With `train.offload=[opt_state,frozen]` (an override) those parts are placed
in pinned_host memory as blox-train places them and a `host` column gives their
bytes per device; XLA's CPU memory analysis reports 0 host bytes and counts
them in the peak (on CPU host and device memory are the same RAM).

It answers within --time-limit seconds of its start (default 30): the rows not
compiled by then are printed as n/a, with their exact params / optimizer state
/ batch bytes, and it exits 1 with the flag to change.

Caveat: the numbers come from XLA's CPU compiler. GPU and TPU compilers
schedule and fuse differently (and the CPU backend may keep some bf16 math in
f32), so read the temporaries as an estimate within tens of percent; params
and optimizer state are exact.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import sys
import threading
import time
from typing import Any

from blox_scale import _startup

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class PlanRow:
  """Per-device bytes of one compiled train step."""
  remat: str
  params: int
  opt_state: int
  batch: int
  temp: int
  peak: int
  compile_s: float
  error: str = ''
  mode: str = 'train'
  host: int = 0      # of params + opt_state: the bytes train.offload keeps in pinned_host (exact, from the shardings)
  xla_host: int = 0  # XLA's own host figures (host_argument/output/temp sizes); 0 on the CPU backend


def _ensure_devices(n: int, argv: list[str]) -> None:
  """Gives this process `n` fake CPU devices; re-execs if JAX already started with another count."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax
  from jax._src import xla_bridge

  from blox_scale.parallel.distributed import xla_flags_with_cpu_devices
  if not xla_bridge.backends_are_initialized():
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', n)
    os.environ['XLA_FLAGS'] = xla_flags_with_cpu_devices(n)
    return
  if jax.device_count() != n:
    os.environ['XLA_FLAGS'] = xla_flags_with_cpu_devices(n)
    os.execv(sys.executable, [sys.executable, '-m', 'blox_scale.cli.plan', *argv])


def finetune_modes(cfg: Any) -> list[tuple[str, Any]]:
  """`[(label, FinetuneConfig or None)]` to compare: full fine-tuning, LoRA on a bf16 and an int8 base."""
  f = cfg.finetune
  lora = f.lora if f.lora.rank > 0 else dataclasses.replace(f.lora, rank=16)
  base = dataclasses.replace(f, init_from=f.init_from or 'plan', lora=lora, freeze=(), base_dtype='bfloat16')
  return [('full', None), ('lora bf16', dataclasses.replace(base, quant='none')),
          ('lora int8', dataclasses.replace(base, quant='int8'))]


def plan(cfg: Any, mesh: Any, *, remats: list[str],
         remat_names: tuple[str, ...] = ('attn_out', 'mlp_out'),
         modes: list[tuple[str, Any]] | None = None, deadline: float | None = None) -> list[PlanRow]:
  """Compiles the train step of `cfg` on `mesh` once per remat policy (and per mode).

  The batch is `cfg.data`'s (`batch_size` x `seq_len`, `cfg.optimizer.grad_accum_steps`
  micro-batches; the command line's --batch-size/--seq-len are config overrides);
  `remat_names` are used for the name-based policies when `cfg.model.remat_names` is empty.

  Returns one PlanRow per policy (a policy that fails to compile, e.g.
  host offload on a backend without host memory, gets `error` set).
  `modes`: `finetune_modes(cfg)` to compare full fine-tuning with LoRA; the
  default is the plain train step of `cfg`.
  `deadline` (a `time.monotonic()` value): a row whose compile has not finished
  by then gets `error=LATE` (its params/opt state/batch bytes are still exact);
  its compile is not waited for.
  """
  import jax

  from blox_scale.models import build_model
  from blox_scale.training.remat_auto import candidate_config
  from blox_scale.parallel import sharding
  from blox_scale.training.optim import make_optimizer
  from blox_scale.training import finetune, offload
  from blox_scale.training.step import abstract_batch, abstract_train_state, make_train_step, train_state_shardings

  rules = sharding.rules_from_config(cfg.mesh)
  optimizer, _ = make_optimizer(cfg.optimizer, cfg.train.steps)  # the trainer's: its state is what training holds
  b, t, k = cfg.data.batch_size, cfg.data.seq_len, cfg.optimizer.grad_accum_steps
  shards = sharding.num_batch_shards(mesh, rules)
  if b % (shards * k):
    raise ValueError(f'data.batch_size={b} must be divisible by the batch shards ({shards}) x '
                     f'grad_accum_steps ({k}); change the batch size or the mesh.')
  batch_sh = sharding.batch_sharding(mesh, rules)
  batch = abstract_batch(b, t, batch_sh, packing=cfg.data.packing)

  sized: dict[str, PlanRow] = {}  # mode -> a row with its sizes
  lowering_s = [0.0]  # how long each lowering took

  def lowered_row(mode: str, ft: Any, remat: str) -> tuple[PlanRow, Any]:
    """(the row with its exact sizes, the lowered step, its error, or None past the deadline)."""
    late = deadline is not None and time.monotonic() + lowering_s[-1] >= deadline  # (no start it cannot finish)
    if late and mode in sized:  # the sizes depend on the mode only: no need to build the model again
      return dataclasses.replace(sized[mode], remat=remat, error=LATE), None
    if remat == 'nested':  # a remat=auto candidate: full remat in a nested sqrt(L) scan
      model_cfg = candidate_config(cfg.model, remat)
    else:
      names = cfg.model.remat_names or remat_names
      model_cfg = dataclasses.replace(cfg.model, remat=remat, remat_names=tuple(names), remat_nested=False)
    if ft is None:
      model = build_model(model_cfg)
      abstract = abstract_train_state(model, optimizer)
    else:
      model_cfg = dataclasses.replace(model_cfg, param_dtype=ft.base_dtype)
      model = finetune.build_model(model_cfg, ft)
      abstract = finetune.abstract_train_state(model, optimizer, ft)
    shardings = train_state_shardings(abstract, mesh, rules)
    if cfg.train.offload:  # these leaves in pinned_host, as blox-train places them
      shardings = offload.place(shardings, cfg.train.offload)
    host_b = sum(sharding.shard_bytes(x, s) for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
                 if s.memory_kind == offload.HOST)
    row = PlanRow(remat, sharding.shard_bytes(abstract.params, shardings.params),
                  sharding.shard_bytes(abstract.opt_state, shardings.opt_state),
                  sharding.shard_bytes(batch, {name: batch_sh for name in batch}), 0, 0, 0.0, mode=mode, host=host_b)
    sized.setdefault(mode, row)
    if late:
      return dataclasses.replace(row, error=LATE), None
    start = time.monotonic()
    try:
      step = make_train_step(model, optimizer, mesh, rules, shardings, batch_sh, grad_accum_steps=k)
      return row, step.lower(sharding.with_shardings(abstract, shardings), batch)
    except Exception as e:  # noqa: BLE001  (report the policy as unavailable, keep going)
      return row, e
    finally:
      lowering_s.append(time.monotonic() - start)

  jobs = [(mode, ft, remat) for mode, ft in (modes or [('train', None)]) for remat in remats]
  # Tracing is Python, one step at a time here; each lowered step compiles in a worker thread
  # while the next is traced (XLA releases the GIL), one compile per core.
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1)))
  try:
    futures = []
    for job in jobs:
      row, lowered = lowered_row(*job)
      futures.append((row, None if lowered is None else pool.submit(_compiled_row, row, lowered)))
    return [_finished_row(row, future, deadline) for row, future in futures]
  finally:  # a compile still running at the deadline is not waited for (the CLI exits without it)
    pool.shutdown(wait=False, cancel_futures=True)


LATE = 'not compiled within the time limit'


def _finished_row(row: PlanRow, future: Any, deadline: float | None) -> PlanRow:
  """The compiled row, or `row` marked LATE if its compile is not done by `deadline`."""
  if future is None:
    return row
  try:
    return future.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
  except concurrent.futures.TimeoutError:
    return dataclasses.replace(row, error=LATE)


# The plan reads XLA's memory analysis and never runs the program. That analysis is the buffer
# assignment of the optimised HLO, made before LLVM generates machine code; LLVM's optimisation
# level changes the machine code only, so level 0 gives the same bytes (checked by
# tests/test_plan.py) in about 40% less compile time (Llama 2 7B on 8 devices: 3.7 s of CPU per
# policy instead of 6.3).
PLAN_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def _compiled_row(row: PlanRow, lowered: Any) -> PlanRow:
  """`row` with the temporaries and peak of `lowered` compiled (or its error)."""
  start = time.perf_counter()
  try:
    if isinstance(lowered, Exception):
      raise lowered
    mem = lowered.compile(compiler_options=PLAN_COMPILER_OPTIONS).memory_analysis()
  except Exception as e:  # noqa: BLE001  (report the policy as unavailable, keep going)
    return dataclasses.replace(row, compile_s=time.perf_counter() - start,
                               error=f'{type(e).__name__}: {str(e).splitlines()[0][:160]}')
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  xla_host = sum(getattr(mem, f'host_{n}_size_in_bytes', 0) for n in ('argument', 'output', 'temp'))
  xla_host -= getattr(mem, 'host_alias_size_in_bytes', 0)
  return dataclasses.replace(row, temp=mem.temp_size_in_bytes, peak=peak, compile_s=time.perf_counter() - start,
                             xla_host=xla_host)


def format_rows(rows: list[PlanRow], hbm_gib: float = 0.0) -> str:
  """A table; GiB for real presets, MiB when everything is under 1 GiB."""
  peak = max([r.peak for r in rows] + [r.params + r.opt_state for r in rows])
  unit, scale = ('GiB', GiB) if peak >= GiB else ('MiB', 1024 ** 2)
  show_mode = any(r.mode != 'train' for r in rows)
  show_host = any(r.host for r in rows)
  head = ((f'{"mode":<11}' if show_mode else '') + f'{"remat":<14}{"params":>10}{"opt state":>11}'
          + (f'{"host":>9}' if show_host else '') + f'{"batch":>9}{"temp":>10}{"peak":>10}{"compile":>9}')
  if hbm_gib:
    head += f'  fits {hbm_gib:g} GiB'
  lines = [head + f'   ({unit} per device)', '-' * len(head)]
  for r in rows:
    cells = ((f'{r.mode:<11}' if show_mode else '') + f'{r.remat:<14}{r.params / scale:>10.2f}{r.opt_state / scale:>11.2f}'
             + (f'{r.host / scale:>9.2f}' if show_host else '') + f'{r.batch / scale:>9.3f}')
    if r.error:
      lines.append(f'{cells}  n/a: {r.error}')
      continue
    line = f'{cells}{r.temp / scale:>10.2f}{r.peak / scale:>10.2f}{r.compile_s:>8.1f}s'
    if hbm_gib:
      line += '  yes' if r.peak <= hbm_gib * GiB else '  NO'
    lines.append(line)
  if show_host:
    if any(r.xla_host for r in rows if not r.error):
      lines.append("host: of params + opt state, what train.offload keeps in pinned_host memory; XLA's host "
                   'figures (arguments + outputs - aliases + temporaries): '
                   + ', '.join(f'{r.xla_host / scale:.2f}' for r in rows if not r.error) + f' {unit}')
    else:
      lines.append("host: of params + opt state, what train.offload keeps in pinned_host memory between steps. "
                   "XLA's memory analysis here reports 0 host bytes and counts them in peak (on CPU host and device "
                   'memory are the same RAM); the saving needs a GPU or TPU and is not measured here')
  return '\n'.join(lines)


# A plan answers in about the time of its slowest compile (two at a time on a 2-core machine:
# Llama 2 7B's six policies on 8 devices take 16 s); one that asks for more (every policy of a
# fine-tuning preset is 18 compiles, about a minute) prints what it compiled in time and says so.
DEFAULT_TIME_LIMIT = 30.0
TIME_LIMIT_ENV = 'BLOX_PLAN_TIME_LIMIT'
EXIT_S = 0.5  # of the limit, kept for printing the table and exiting (Python's own start-up is before the clock)


# Fake CPU devices cost XLA about a second per thousand to create (4096: ~7 s) and compiles grow
# with them; plans beyond this are refused at once rather than left to run for minutes.
MAX_DEVICES = 1024


def _parser() -> Any:
  from blox_scale.cli.common import ArgumentParser
  ap = ArgumentParser(prog='blox-plan', description=__doc__.split('\n\n')[0])
  ap.add_argument('--config', required=True, help='preset YAML, e.g. configs/llama_7b.yaml')
  ap.add_argument('--devices', type=int, required=True, help=f'number of (fake CPU) devices to plan for (1..{MAX_DEVICES})')
  ap.add_argument('--mesh', default='', help='data=..,fsdp=..,tensor=.. (default: the config\'s mesh)')
  ap.add_argument('--remat', default='', help="comma-separated policies, 'all', or 'auto' (the candidates of "
                  "model.remat=auto and the one it would choose for --hbm); default: all, or for a fine-tuning "
                  "config (three modes compared per policy) the config's model.remat")
  ap.add_argument('--batch-size', type=int, default=0, help='global batch (default: data.batch_size)')
  ap.add_argument('--seq-len', type=int, default=0, help='sequence length (default: data.seq_len)')
  ap.add_argument('--hbm', type=float, default=0.0, help='device memory in GiB, to print whether each policy fits')
  ap.add_argument('--time-limit', type=float, default=float(os.environ.get(TIME_LIMIT_ENV, DEFAULT_TIME_LIMIT)),
                  help=f'seconds from the start: rows still compiling then are shown as n/a and blox-plan '
                  f'exits 1 (default {DEFAULT_TIME_LIMIT:g}, or ${TIME_LIMIT_ENV}; 0: no limit)')
  ap.add_argument('--debug', action='store_true', help='Print the traceback of an error (also BLOX_DEBUG=1).')
  ap.add_argument('overrides', nargs='*', help='dotted key=value config overrides')
  return ap


def _check(args: Any) -> tuple[Any, list[str]]:
  """Every argument and the config, before JAX starts; returns (config, remat policies)."""
  from blox_scale.cli.common import UsageError
  from blox_scale.stacking.remat import POLICIES, valid_names
  from blox_scale.training.config import load_config
  from blox_scale.training.remat_auto import CANDIDATES
  from blox_scale.training.validation import MESH_AXES, check_devices

  if not 1 <= args.devices <= MAX_DEVICES:
    raise UsageError(f'--devices={args.devices}: must be in [1, {MAX_DEVICES}] (fake CPU devices on this machine); '
                     'plan a larger pod by its per-device shard: the same mesh axes at a smaller data size')
  for flag, value in (('--batch-size', args.batch_size), ('--seq-len', args.seq_len), ('--hbm', args.hbm),
                      ('--time-limit', args.time_limit)):
    if not value >= 0:
      raise UsageError(f'{flag}={value}: must be >= 0; use 0 for the default')
  if args.remat == 'auto':  # the candidates blox-train compiles for model.remat=auto, least recomputation first
    remats = list(CANDIDATES)
  else:
    remats = list(POLICIES) if args.remat in ('all', '') else [r.strip() for r in args.remat.split(',') if r.strip()]
  unknown = [r for r in remats if r not in valid_names() and r not in CANDIDATES]
  if unknown or not remats:
    raise UsageError(f'--remat={args.remat}: unknown polic{"ies" if len(unknown) > 1 else "y"} {", ".join(unknown)}; '
                     f'use all, auto or a comma-separated list of {", ".join(POLICIES)} (or JAX\'s policy names)')
  mesh_overrides = []
  for item in filter(None, (kv.strip() for kv in args.mesh.split(','))):
    key, _, value = item.partition('=')
    if key.strip() not in MESH_AXES or not value.strip().lstrip('-').isdigit():
      raise UsageError(f'--mesh={args.mesh}: {item!r} is not AXIS=SIZE; use e.g. data=2,fsdp=4,tensor=1 '
                       f'(axes {", ".join(MESH_AXES)})')
    mesh_overrides.append(f'mesh.{key.strip()}={value.strip()}')
  overrides = [*args.overrides, *mesh_overrides]
  if args.batch_size:
    overrides.append(f'data.batch_size={args.batch_size}')
  if args.seq_len:
    overrides.append(f'data.seq_len={args.seq_len}')
  cfg = load_config(args.config, overrides, files=False)  # seq_len vs max_seq_len, heads, ...
  cfg, assumed = _planned_shape(cfg, args)
  check_devices(cfg, args.devices)  # the mesh fits the devices, the batch splits
  if not args.remat and (cfg.finetune.init_from or cfg.finetune.lora.rank > 0) and cfg.model.remat != 'auto':
    remats = [cfg.model.remat]  # full vs LoRA bf16 vs LoRA int8 at every policy would be 18 compiles
    assumed.append(f'remat {cfg.model.remat} (the config\'s model.remat; --remat all for every policy)')
  for line in assumed:
    print(f'assumed: {line}', flush=True)
  if args.remat == 'auto' and not (args.hbm or cfg.model.remat_budget_gib):
    raise UsageError('--remat auto: needs the per-device memory to plan for; pass --hbm GiB '
                     '(or model.remat_budget_gib=GiB)')
  return cfg, remats


def _planned_shape(cfg: Any, args: Any) -> tuple[Any, list[str]]:
  """The batch to plan: the preset's sequence length and a batch every batch shard gets rows of.

  A preset's `model.max_seq_len` is the length it is meant to train at
  (`data.seq_len` defaults to a short 128 for CPU runs): planning at 128
  would show every remat policy with the same memory. The global batch is
  rounded up to a multiple of the batch shards x accumulation steps, so any
  device count can be planned. Returns the config and what was assumed.
  """
  import dataclasses

  from blox_scale.training.validation import batch_shards, mesh_sizes

  assumed = []
  data = cfg.data
  default_seq_len = type(data)().seq_len  # a preset that sets data.seq_len trains (and is planned) at it
  if not args.seq_len and data.seq_len == default_seq_len and data.seq_len != cfg.model.max_seq_len:
    assumed.append(f'seq_len {cfg.model.max_seq_len} (the preset\'s model.max_seq_len, not data.seq_len={data.seq_len}; '
                   '--seq-len to change)')
    data = dataclasses.replace(data, seq_len=cfg.model.max_seq_len)
  if not args.batch_size:
    multiple = batch_shards(cfg.mesh, mesh_sizes(cfg.mesh, args.devices)) * cfg.optimizer.grad_accum_steps
    batch = -(-data.batch_size // multiple) * multiple
    if batch != data.batch_size:
      assumed.append(f'batch {batch} (data.batch_size={data.batch_size} rounded up to a multiple of '
                     f'{multiple} batch shards x accumulation steps; --batch-size to change)')
      data = dataclasses.replace(data, batch_size=batch)
  return dataclasses.replace(cfg, data=data), assumed


def _main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  cfg, remats = _check(args)
  _ensure_devices(args.devices, argv)

  import jax

  from blox_scale.parallel import sharding
  from blox_scale.training import remat_auto
  from blox_scale.training.config import ConfigError

  mesh = sharding.make_mesh(cfg.mesh)
  m = cfg.model
  print(f'{args.config}: {m.num_layers} layers, d_model {m.d_model}, params {m.param_dtype}, compute {m.dtype}; '
        f'batch {cfg.data.batch_size} x {cfg.data.seq_len}; '
        f'mesh {dict(mesh.shape)} on {jax.device_count()} devices', flush=True)
  auto = args.remat == 'auto'
  modes = finetune_modes(cfg) if (cfg.finetune.init_from or cfg.finetune.lora.rank > 0) and not auto else None
  if modes:
    print(f'fine-tuning: full (params {m.param_dtype}) vs LoRA rank {modes[1][1].lora.rank} on '
          f'{", ".join(modes[1][1].lora.targets)} with a bfloat16 / int8 frozen base', flush=True)
  deadline = _startup.STARTED + args.time_limit - EXIT_S if args.time_limit else None
  try:
    with _Watchdog(args.time_limit if _STANDALONE else 0):
      rows = plan(cfg, mesh, remats=remats, modes=modes, deadline=deadline,
                  **({'remat_names': remat_auto.BLOCK_NAMES} if auto else {}))
  except ValueError as e:  # a param that does not divide over the mesh: the message names it
    raise ConfigError(str(e)) from e
  budget_gib = (args.hbm or cfg.model.remat_budget_gib) if auto else args.hbm
  print(format_rows(rows, budget_gib), flush=True)
  late = [r for r in rows if r.error == LATE]
  if late:
    done = [r for r in rows if r.error != LATE]
    one = cfg.model.remat if cfg.model.remat in remats else remats[0]
    fewer = f'plan fewer policies (--remat {one}) or ' if len(remats) > 1 else ''
    raise PlanTimeout(f'--time-limit={args.time_limit:g}: {len(late)} of {len(rows)} train steps were not compiled '
                      f'within {args.time_limit:g} s (the rows marked n/a; {len(done)} done); {fewer}allow more time '
                      f'(--time-limit {_more_time(args.time_limit, len(rows), len(done))})')
  if auto:
    measured = [remat_auto.Measured(r.remat, r.peak, r.temp, error=r.error) for r in rows]
    try:
      chosen = remat_auto.pick(measured, int(budget_gib * GiB))
    except remat_auto.RematBudgetError as e:
      print(f'blox-plan: {e}', file=sys.stderr, flush=True)
      return 1
    print(f'remat=auto would choose {chosen.remat!r}: the least recomputation whose peak fits {budget_gib:g} GiB per device.')
  return 0


class _Watchdog:
  """Ends the process at --time-limit if planning is still in Python then.

  `plan` checks its deadline between lowerings and waits for compiles only
  until it; a single lowering can still outlast the limit (tracing a huge
  model with model.scan_layers=false). Then this timer reports it in one line
  and exits 1 (a command-line process only: `limit` 0 disables it).
  """

  def __init__(self, limit: float) -> None:
    self._limit, self._lock, self._done = limit, threading.Lock(), False
    self._timer = threading.Timer(max(0.0, _startup.STARTED + limit - 0.2 - time.monotonic()), self._fire)
    self._timer.daemon = True

  def __enter__(self) -> '_Watchdog':
    if self._limit:
      self._timer.start()
    return self

  def __exit__(self, *exc: Any) -> None:
    with self._lock:
      self._done = True
    self._timer.cancel()

  def _fire(self) -> None:
    with self._lock:
      if self._done:
        return
      sys.stdout.flush()
      os.write(2, f'blox-plan: error: --time-limit={self._limit:g}: still tracing a train step after '
                  f'{self._limit:g} s; allow more time (--time-limit 0 for none)\n'.encode())
      os._exit(1)


_STANDALONE = False  # True in a blox-plan process (main() without argv): the watchdog may end it


class PlanTimeout(RuntimeError):
  """Some train steps were not compiled within --time-limit (exit status 1)."""


def _more_time(limit: float, total: int, done: int) -> str:
  """A --time-limit that would likely fit `total` compiles, from the pace of the `done` ones (0: none)."""
  if not done:
    return '0 for none'
  return f'{30 * -(-limit * total / done // 30):g}'


def main(argv: list[str] | None = None) -> int:
  """`blox-plan --config FILE --devices N [...]`; returns the exit status."""
  from blox_scale.cli.common import run_cli
  global _STANDALONE
  _STANDALONE = argv is None
  code = run_cli('blox-plan', _main, argv)
  if argv is None and code == 1 and threading.active_count() > 1:  # a compile past --time-limit: exit without waiting for it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  return code


if __name__ == '__main__':
  raise SystemExit(main())
