"""blox-train: the training loop, top to bottom.

    blox-train                                   # tiny model, stdlib corpus, CPU, a few minutes
    blox-train --config configs/gpt2_124m.yaml train.steps=1000 data.batch_size=64
    python -m blox_scale.cli.train model.num_layers=2 train.workdir=runs/try

Sections, in the order they run:
  1. config           defaults <- preset YAML <- dotted overrides
  2. distributed      jax.distributed.initialize (multi-process), no-op alone
  3. mesh             (data, fsdp, tensor) over every device; 1 CPU = a 1-device mesh
  4. model            build_model (DecoderLM or model.factory), optimizer, the abstract train state (nothing allocated)
  5. state            restore the latest checkpoint onto this mesh, or a sharded init
  6. data             grain pipeline, resumed at the checkpoint's iterator state
  7. step             the jitted sharded train step, compiled ahead (time + memory; model.remat=auto
                      compiles each candidate policy and keeps the least recomputation that fits)
  8. loop             steps; at log steps: metrics, progress, non-finite check;
                      eval; checkpoints (async); SIGTERM -> save and exit
  9. end              final checkpoint, loss plot, samples

Exit codes: 0 done (or stopped by SIGTERM/SIGINT: before the loop with
nothing written, in the loop after saving), 2 a config error (found before
anything is compiled or written), non-finite loss/gradients or a diverging
loss (nothing bad was checkpointed), 1 other failures (e.g. a failed save).
Errors are one line on stderr; `--debug` (or BLOX_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import blox as bx
from blox_scale.parallel import distributed
from blox_scale import flops
from blox_scale.cli.common import ArgumentParser, run_cli
from blox_scale.training.checkpoint import CHECKPOINT_DIR, Checkpointer
from blox_scale.training.config import CONFIG_FILE, Config, ConfigError, load_config, merge_into, read_config, save_config, to_dict
from blox_scale.training.disk import WriteFailed, writing
from blox_scale.training.data import build_data, check_corpus, check_resume_state, check_stream, load_tokens, stream_identity
from blox_scale.training import integrity
from blox_scale.training.integrity import all_finite
from blox_scale.training import goodput, offload
from blox_scale.training.trackers import PROFILE_DIR, Profile, make_trackers, raised_in_tensorboardx
from blox_scale.training.guards import DivergenceError, LossSpikeGuard, config_changes, format_changes
from blox_scale.training.metrics import MetricsWriter, read_metrics, Progress, Throughput, format_bytes, memory_report, plot_losses
from blox_scale.models import Model
from blox_scale.models.protocol import cannot_decode
from blox_scale.training.optim import make_optimizer
from blox_scale.training.remat_auto import budget_bytes, candidate_config, choose_remat
from blox_scale.parallel.sharding import batch_sharding, make_mesh, rules_from_config, with_shardings
from blox_scale.training.step import (abstract_batch, abstract_train_state, init_train_state, make_eval_step,
                                      make_train_step, train_state_shardings)
from blox_scale.training import finetune
from blox_scale.training import tokenizer as tokenizers
from blox_scale.finetune import WithLoRADropout
from blox_scale.training.validation import check_devices

EXIT_OK, EXIT_ERROR, EXIT_NONFINITE = 0, 1, 2
EXIT_CONFIG = EXIT_DIVERGED = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteError(RuntimeError):
  """The loss or gradients became NaN/inf; the run stops before checkpointing it."""


class Stopped(BaseException):
  """SIGTERM/SIGINT outside the training loop: stop at once (nothing is being saved then).

  A BaseException, like KeyboardInterrupt: it passes every `except Exception`.
  """


class _OrbaxErrorsReported(logging.Filter):
  """Drops orbax's error logs (a failed async save logs hundreds of lines from its threads):
  the trainer reports the failure itself, in one line with the path and errno. BLOX_DEBUG=1 keeps them."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR or '/orbax/' not in record.pathname or bool(os.environ.get('BLOX_DEBUG'))


def _drop_reported_write_errors() -> None:
  """Holds back the tracebacks that follow a failed write the run has already reported in one line.

  After a failed async save, tensorstore still completes the save's other writes and calls back into
  orbax's event loop, already closed: each callback's `RuntimeError: Event loop is closed` would print
  a traceback from tensorstore's threads (as an unraisable exception, or through sys.excepthook). On a
  full disk, tensorboardX's exit handler retries its flush and prints the OSError again. Exactly these
  are dropped; BLOX_DEBUG=1 keeps them.
  """
  def reported(value: BaseException | None, tb: Any) -> bool:
    if os.environ.get('BLOX_DEBUG'):
      return False
    return ((isinstance(value, RuntimeError) and str(value) == 'Event loop is closed')
            or (isinstance(value, OSError) and raised_in_tensorboardx(tb)))

  previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

  def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    if not reported(value, tb):
      previous_hook(kind, value, tb)

  def unraisable(report: Any) -> None:
    if not reported(report.exc_value, report.exc_traceback):
      previous_unraisable(report)

  sys.excepthook, sys.unraisablehook = hook, unraisable


def _raise_stopped(signum: int, frame: Any) -> None:
  raise Stopped(signal.Signals(signum).name)


def parse_args(argv: Sequence[str] | None) -> tuple[str | None, list[str]]:
  parser = ArgumentParser(
      prog='blox-train', description='Train a decoder LM. With no arguments: the tiny model on the stdlib corpus.',
      epilog='Overrides are dotted key=value pairs, e.g. model.num_layers=2 train.steps=100. '
             'The full reference is docs/training.md.')
  parser.add_argument('--config', default=None, help='A YAML preset, e.g. configs/tiny.yaml (default: built-in defaults).')
  parser.add_argument('--debug', action='store_true', help='Print the traceback of an error (also BLOX_DEBUG=1).')
  parser.add_argument('overrides', nargs='*', help='key=value overrides.')
  args = parser.parse_args(argv)
  return args.config, args.overrides


def evaluate(eval_step: Any, params: bx.Params, data: Any, mesh: Any, rules: Any) -> float | None:
  """Mean eval loss over the held-out batches, weighted by their token counts."""
  total, tokens = 0.0, 0.0
  for batch in data.eval_batches():
    m = jax.device_get(eval_step(params, distributed.make_global_batch(batch, mesh, rules)))
    w = float(m.get('tokens', 1.0))
    total, tokens = total + float(m['loss']) * w, tokens + w
  return total / tokens if tokens else None


def _abstract_state(cfg: Config, model: Model | None = None, optimizer: Any = None) -> Any:
  """The train state `cfg` describes, as ShapeDtypeStructs (nothing allocated or compiled).

  A fine-tuning run (`finetune.init_from`) holds its adapters, int8 kernels
  and the optimizer state of its trainable params only.
  """
  model = model or finetune.build_model(cfg.model, cfg.finetune)
  optimizer = optimizer or make_optimizer(cfg.optimizer, cfg.train.steps)[0]
  if cfg.finetune.init_from:
    return finetune.abstract_train_state(model, optimizer, cfg.finetune, cfg.train.seed)
  return abstract_train_state(model, optimizer, cfg.train.seed)


def check_resume(workdir: Path, cfg: Config) -> dict[str, tuple[Any, Any]]:
  """Differences between the workdir's config.yaml and `cfg`; ConfigError if they change shapes or the data stream."""
  try:
    old = read_config(workdir)
  except Exception as e:  # noqa: BLE001  (unreadable or from an incompatible version)
    raise ConfigError(f'{workdir / CONFIG_FILE}: cannot be read to resume ({str(e).splitlines()[0]}); restore it, '
                      'or start fresh with checkpoint.resume=false or a new train.workdir') from e
  changes = config_changes(old, cfg)
  if not changes:
    return changes
  # The global batches stay, once some were trained on (a converted checkpoint, step 0, has consumed none).
  if any(p.name.isdigit() and int(p.name) > 0 for p in (workdir / CHECKPOINT_DIR).glob('*')):
    check_stream(stream_identity(old.data), stream_identity(cfg.data), str(workdir))
  shapes = lambda c: (lambda t: (jax.tree.structure(t), [(x.shape, str(x.dtype)) for x in jax.tree.leaves(t)]))(
      _abstract_state(c))
  before = shapes(old)
  if shapes(cfg) != before:
    # Name the keys that change shapes on their own (each tried alone on the old config).
    candidates = {k: v for k, v in changes.items() if k.startswith(('model.', 'optimizer.'))}
    culprits = {k: v for k, v in candidates.items()
                if shapes(merge_into(old, {k.split('.')[0]: {k.split('.', 1)[1]: v[1]}})) != before}
    raise ConfigError(f'{format_changes(culprits or candidates or changes)}: changes the shapes of the checkpointed '
                      f'train state in {workdir}; resume with the values the run was started with, or start fresh '
                      'with checkpoint.resume=false or a new train.workdir')
  return changes


def train(config: Config) -> int:
  """Runs (or resumes) the training described by `config`; returns the exit code.

  Every check that can fail on user input runs before the first write to the
  workdir and before anything is compiled (a ConfigError, exit 2).
  """
  # -- 1. config (validated at load) ----------------------------------------------------------------
  started = time.perf_counter()
  clock = goodput.Clock()  # this process's wall time by category (training/goodput.py)
  cfg = finetune.resolve(config)  # fine-tuning: the model section is the source checkpoint's
  workdir = Path(cfg.train.workdir)
  tokenizer = load_tokenizer(cfg)

  # -- 2. distributed -------------------------------------------------------------------------------
  distributed.initialize(cfg.distributed)  # no-op for one process on one machine
  primary = distributed.is_primary()
  log = print if primary else (lambda *a, **k: None)
  check_devices(cfg, jax.device_count())  # the mesh and the batch split, before any compile

  # -- 3. mesh --------------------------------------------------------------------------------------
  mesh = make_mesh(cfg.mesh)
  rules = rules_from_config(cfg.mesh)
  log(f'mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s), '
      f'{jax.process_count()} process(es)')

  # -- 4. model, optimizer, abstract state -----------------------------------------------------------
  # model.remat=auto: params and optimizer state do not depend on the policy, so any candidate
  # gives the abstract state; section 7 compiles the candidates and keeps the one that fits.
  auto_remat = cfg.model.remat == 'auto'
  build = lambda model_cfg: finetune.build_model(model_cfg, cfg.finetune)  # + LoRA / int8 base when fine-tuning
  model = build(candidate_config(cfg.model, 'full') if auto_remat else cfg.model)
  optimizer, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
  abstract = _abstract_state(cfg, model, optimizer)
  try:
    state_shardings = train_state_shardings(abstract, mesh, rules)  # names a param that does not divide
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if cfg.train.offload:  # these leaves live in host memory between steps (init, restore and the step keep them there)
    offload.check_supported(cfg.train.offload)
    state_shardings = offload.place(state_shardings, cfg.train.offload)
  batch_shardings = batch_sharding(mesh, rules)
  abstract = with_shardings(abstract, state_shardings)
  num_params = sum(int(np.prod(p.shape)) for p in abstract.params.values() if p.trainable)
  log(f'model: {num_params / 1e6:.2f}M trainable params, {cfg.model.num_layers} layers, d_model {cfg.model.d_model}')
  sizes: dict[str, int] = {}
  if cfg.finetune.init_from:
    sizes = finetune.describe(abstract.params, abstract.opt_state)
    sizes['full_finetune_opt_state_bytes'] = finetune.full_finetune_opt_state_bytes(cfg.model, optimizer)
    log(f"finetune: from {cfg.finetune.init_from}; trainable {sizes['trainable_params']:,} of "
        f"{sizes['trainable_params'] + sizes['frozen_params']:,} params, optimizer state "
        f"{format_bytes(sizes['opt_state_bytes'])} (full fine-tuning: "
        f"{format_bytes(sizes['full_finetune_opt_state_bytes'])}), frozen base {format_bytes(sizes['frozen_bytes'])}")
  if cfg.train.offload:
    sizes['offload_host_bytes'] = offload.host_bytes(abstract)  # all shards, global
    log(f"offload: {', '.join(cfg.train.offload)} in pinned_host memory between steps "
        f"({format_bytes(sizes['offload_host_bytes'])})")
  tokens = load_tokens(cfg.data, tokenizer)  # host only; a corpus too small for one window is a config error
  check_corpus(tokens, cfg.data, cfg.model.vocab_size)
  rows = distributed.process_batch_slice(cfg.data.batch_size, mesh, rules)  # this process's rows of each batch
  resuming = cfg.checkpoint.resume and (workdir / CONFIG_FILE).exists()
  changes = check_resume(workdir, cfg) if resuming else {}

  # -- 5. state: restore or init (the first writes to the workdir) ------------------------------------
  logging.getLogger('absl').addFilter(_OrbaxErrorsReported())
  integrity.drop_abandoned_orbax_errors()  # asyncio's reports of a failed save's other writes
  _drop_reported_write_errors()
  checkpoints = Checkpointer(workdir, cfg.checkpoint)
  # The newest checkpoint that verifies (fingerprints, finite params); bad ones are reported and set aside.
  report = lambda line: print(line, file=sys.stderr, flush=True) if primary else None
  restored = checkpoints.restore_latest(abstract, report) if cfg.checkpoint.resume else None
  latest, data_state = None, None
  if restored is not None:
    latest, state, data_state = restored
    try:  # the global batches continue as the checkpoint recorded them (config.yaml may be gone or edited)
      check_resume_state(data_state, cfg.data, tokens, f'{checkpoints.directory}/{latest}')
    except ConfigError:
      checkpoints.close()
      raise
    log(f'resumed from {checkpoints.directory}/{latest}')
  elif cfg.finetune.init_from:
    state = finetune.init_train_state(model, optimizer, cfg, mesh, rules, state_shardings)
    log(f'loaded {cfg.finetune.init_from}')
  else:
    state = init_train_state(model, optimizer, cfg.train.seed, mesh, rules, state_shardings)
  step = int(latest or 0)
  if primary:
    if changes:
      kept = workdir / 'config_history' / f'config.before_step_{step}.{time.strftime("%Y%m%dT%H%M%S")}.yaml'
      with writing(kept, 'the previous config'):
        kept.parent.mkdir(parents=True, exist_ok=True)
        (workdir / CONFIG_FILE).replace(kept)
      print(f'blox-train: warning: resuming with a changed config: {format_changes(changes)} '
            f'(the previous config is kept as {kept})', file=sys.stderr, flush=True)
    with writing(workdir / CONFIG_FILE, 'the config'):
      save_config(workdir, cfg)
    with writing(workdir / tokenizers.RUN_TOKENIZER_DIR, 'the tokenizer copy'):
      tokenizers.record(tokenizer, workdir)  # a tokenizer file is copied: the workdir is self-contained

  # -- 6. data --------------------------------------------------------------------------------------
  data = build_data(cfg.data, cfg.model.vocab_size, rows=rows, eval_batches=cfg.train.eval_batches, state=data_state,
                    tokens=tokens, tokenizer=tokenizer,
                    hash_log=workdir / 'data_hashes' / f'process_{jax.process_index()}.jsonl' if cfg.data.log_hashes else None)
  log(f'data: {cfg.data.source}, {data.num_tokens:,} tokens, {data.num_train_windows:,} train / '
      f'{data.num_eval_windows:,} eval windows of {cfg.data.seq_len}; unigram entropy {data.unigram_entropy:.3f} nats')

  # -- 7. step: compile ahead of time ---------------------------------------------------------------
  batch_spec = abstract_batch(cfg.data.batch_size, cfg.data.seq_len, batch_shardings,
                              packing=cfg.data.packing)

  def lower_step(model: Model) -> Any:
    train_step = make_train_step(WithLoRADropout(model), optimizer, mesh, rules, state_shardings, batch_shardings,
                                 grad_accum_steps=cfg.optimizer.grad_accum_steps, learning_rate_fn=schedule)
    return train_step.lower(abstract, batch_spec)

  clock.lap('other')
  t0 = time.perf_counter()
  auto_record: dict[str, Any] = {}
  if auto_remat:  # XLA's memory analysis of each candidate, least recomputation first
    choice = choose_remat(lambda name: lower_step(build(candidate_config(cfg.model, name))),
                          budget_bytes(cfg.model.remat_budget_gib), log=log)
    log(choice.summary())
    model = build(candidate_config(cfg.model, choice.remat))
    compiled, auto_record = choice.compiled, choice.record()
  else:
    compiled = lower_step(model).compile()
  compile_s = time.perf_counter() - t0
  clock.lap('compile')
  eval_step = make_eval_step(model, mesh, rules, batch_shardings)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  flops_per_token = flops.flops_per_token(cfg.model, cfg.data.seq_len)
  writer = MetricsWriter(workdir, enabled=primary,
                         trackers=make_trackers(workdir, cfg.train, to_dict(cfg)) if primary else ())
  profile = Profile(workdir / PROFILE_DIR, cfg.train.profile, enabled=primary)
  memory = memory_report(compiled)
  if changes:
    writer.write({'kind': 'config_change', 'step': step, 'changes': {k: list(v) for k, v in changes.items()}})
  start_step = step
  writer.write({'kind': 'start', 'step': step, 'started': clock.started, 'compile_time_s': compile_s,
                'num_params': num_params, 'num_devices': jax.device_count(), 'flops_per_token': flops_per_token,
                'unigram_entropy': data.unigram_entropy, **memory, **auto_record, **sizes})
  writer.write(clock.record(step, start_step, 'other'))
  log(f'compiled train step in {compile_s:.1f}s; ' + ', '.join(f'{k} {format_bytes(v)}' for k, v in memory.items()))
  all_finite(state.params)  # compile the pre-save check now, not inside the first save

  # -- 8. loop --------------------------------------------------------------------------------------
  stop_signal: list[int] = []  # from here on a signal is noted and the loop saves, then stops
  previous_handlers = {sig: signal.signal(sig, lambda signum, frame: stop_signal.append(signum)) for sig in STOP_SIGNALS}
  spikes = LossSpikeGuard(cfg.train.divergence_factor, cfg.train.divergence_patience)
  if latest is not None and primary:  # the guard continues across restarts
    spikes.extend([r['loss'] for r in read_metrics(workdir, 'train') if r['step'] <= step])
  # A bar only on a terminal: carriage returns garble log files and launch/local.sh's prefixed output.
  progress = Progress(cfg.train.steps, step, enabled=primary and cfg.train.progress and sys.stderr.isatty())
  throughput = Throughput(tokens_per_step, flops_per_token,
                          lambda tokens_per_sec: flops.mfu(tokens_per_sec, flops_per_token, jax.device_count()))
  pending: list[tuple[int, dict[str, jax.Array]]] = []  # device metrics since the last log (no sync per step)
  exit_code = EXIT_OK
  last_eval, eval_loss, last_loss = -1, None, None
  saved = {step} if latest is not None else set()

  def flush() -> None:
    """Reads the pending metrics (one device sync), logs them, raises on non-finite."""
    nonlocal last_loss
    if not pending:
      return
    values = jax.device_get([m for _, m in pending])
    rates = throughput.read()
    bad = [s for (s, _), v in zip(pending, values) if not bool(v['finite'])]
    last_step, last = pending[-1][0], values[-1]
    record = {'kind': 'train', 'step': last_step, 'time': time.time(),
              'loss': float(np.mean([v['loss'] for v in values])),
              'learning_rate': float(last['learning_rate']),
              'grad_norm': float(last['grad_norm']), **rates}
    record.update({k: float(v) for k, v in last.items() if k not in record and k != 'finite'})
    pending.clear()
    last_loss = record['loss']
    writer.write(record)
    writer.write(clock.record(last_step, start_step))  # the wait for the metrics above was step time
    progress.update(last_step, record)
    if progress.bar is None:  # no bar (CI logs, progress=false): one plain line per log step
      moe = ''.join(f', {k} {record[k]:.4g}' for k in sorted(record) if k.startswith('moe_'))  # model.moe
      log(f"step {last_step}: loss {record['loss']:.4f}, lr {record['learning_rate']:.2e}, "
          f"{record['tokens_per_sec']:,.0f} tok/s, mfu {100 * record['mfu']:.1f}%{moe}")
    if bad:
      raise NonFiniteError(f'non-finite loss or gradients at step {bad[0]} (loss={record["loss"]}, '
                           f'grad_norm={record["grad_norm"]}); the update was skipped and the run stops. '
                           'Lower optimizer.learning_rate, raise optimizer.warmup_steps or check the data.')
    spikes.update(last_step, record['loss'])

  def save(at: int) -> None:
    flush()  # any non-finite step since the last log raises here, before saving
    clock.lap('step')  # the device is done with the steps so far (the flush waited for them)
    if at in saved or not checkpoints.enabled:
      return
    if not bool(all_finite(state.params)):
      raise NonFiniteError(f'params are not finite at step {at}; not checkpointing them.')
    checkpoints.save(at, state, data.train.get_state())
    saved.add(at)
    clock.lap('checkpoint')

  def should_stop() -> bool:
    """SIGTERM seen (by any process: all must stop at the same step to save together)."""
    if jax.process_count() == 1:
      return bool(stop_signal)
    if step % cfg.train.log_every:  # agree only at log steps: one tiny all-gather, not one per step
      return False
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(np.int32(bool(stop_signal))).max())

  def run_eval() -> float | None:
    jax.block_until_ready(state)  # eval waits for the last step anyway: the time until then was step time
    clock.lap('step')
    loss = evaluate(eval_step, state.params, data, mesh, rules)
    clock.lap('eval')
    return loss

  clock.lap('other')
  ended = None  # how this segment ends, for the goodput record: done, stopped, nonfinite, diverged, error
  try:
    while step < cfg.train.steps:
      profile.before(step, state)
      clock.lap('step')
      batch = distributed.make_global_batch(next(data.train), mesh, rules)
      clock.lap('data')
      state, metrics = compiled(state, batch)  # async: returns before the device is done
      checkpoints.check()  # a failed background save stops the run now, not at the next save
      step += 1
      throughput.tick()
      pending.append((step, metrics))

      if step % cfg.train.log_every == 0 or step == cfg.train.steps:
        flush()
      if cfg.train.eval_every and step % cfg.train.eval_every == 0:
        paused = throughput.pause()
        eval_loss, last_eval = run_eval(), step
        throughput.resume(paused)
        if eval_loss is not None:
          writer.write({'kind': 'eval', 'step': step, 'eval_loss': eval_loss})
          progress.write(f'step {step}: eval loss {eval_loss:.4f}')
      if checkpoints.should_save(step) and step < cfg.train.steps:
        paused = throughput.pause()
        save(step)
        throughput.resume(paused)
      if should_stop():
        name = signal.Signals(stop_signal[0]).name if stop_signal else 'SIGTERM'
        progress.write(f'{name} at step {step}: saving a checkpoint and exiting.')
        break

    # -- 9. end -------------------------------------------------------------------------------------
    profile.before(max(step, cfg.train.steps), state)  # a trace still open ends here
    save(step)
    checkpoints.wait()
    clock.lap('checkpoint')
    progress.close()
    if checkpoints.enabled:
      log(f'saved checkpoint {checkpoints.directory}/{step}')
    if stop_signal or step < cfg.train.steps:
      return EXIT_OK
    if cfg.train.eval_every and last_eval != step:
      eval_loss, last_eval = run_eval(), step
      if eval_loss is not None:
        writer.write({'kind': 'eval', 'step': step, 'eval_loss': eval_loss})
    summary = f'done: {step} steps in {time.perf_counter() - started:.0f}s'
    if last_loss is not None:
      summary += f', train loss {last_loss:.4f}'
    if eval_loss is not None and last_eval == step:
      summary += f', eval loss {eval_loss:.4f}'
    log(summary + f' nats/token (unigram entropy of the corpus: {data.unigram_entropy:.4f})')
    if primary and cfg.train.plot:
      path = plot_losses(workdir, data.unigram_entropy)
      log(f'loss curve: {path}')
    if cfg.train.sample_tokens > 0 and jax.process_count() == 1:
      reason = cannot_decode(model)
      if reason is None:
        print_samples(cfg, model, offload.on_device(state.params), tokenizer)  # sampling runs in device memory
      else:
        log(f'samples skipped: {reason}')
    ended = 'done'
  except WriteFailed:
    ended = 'error'
    progress.close()
    if checkpoints.enabled:
      # A full disk is often hit first by a metrics write while a save is filling it: report the save
      # (it names the checkpoint and the intact earlier ones) whichever of the two failed first.
      checkpoints.check(block=True)
    raise
  except (NonFiniteError, DivergenceError) as e:
    ended = 'diverged' if isinstance(e, DivergenceError) else 'nonfinite'
    progress.close()
    if primary:
      print(f'blox-train: error: {e}', file=sys.stderr, flush=True)
    exit_code = EXIT_NONFINITE
  except BaseException:
    ended = 'error'
    raise
  finally:
    for sig, handler in previous_handlers.items():
      signal.signal(sig, handler)
    profile.stop()
    with contextlib.suppress(OSError, WriteFailed) if ended == 'error' else contextlib.nullcontext():  # keep the first error
      summary = goodput.finish(writer, clock, step, start_step, ended or 'stopped')  # the stop path returned early
      if summary:
        log(summary)
    writer.close()
    checkpoints.close()
  return exit_code


def load_tokenizer(cfg: Config) -> tokenizers.Tokenizer:
  """`data.tokenizer`, checked against `model.vocab_size` and the tokenizer recorded in the workdir."""
  tokenizer = tokenizers.get_tokenizer(cfg.data.tokenizer)
  tokenizers.check_vocab(tokenizer, cfg.model.vocab_size, cfg.data.tokenizer)
  tokenizers.check_recorded(tokenizer, cfg.train.workdir)
  return tokenizer


def print_samples(cfg: Config, model: Model, params: bx.Params, tokenizer: tokenizers.Tokenizer) -> None:
  """Continues `train.sample_prompt` (the same code as blox-sample)."""
  from blox_scale.cli.sample import sample_text

  room = cfg.model.max_seq_len - len(tokenizer.encode_prompt(cfg.train.sample_prompt) or [0])
  text = sample_text(model, params, tokenizer, cfg.train.sample_prompt, max_new_tokens=min(cfg.train.sample_tokens, room),
                     temperature=cfg.train.sample_temperature, seed=cfg.train.seed)
  print('sample ' + '-' * 60)
  print(cfg.train.sample_prompt + text)
  print('-' * 67, flush=True)


def _main(argv: list[str]) -> int:
  config_path, overrides = parse_args(argv)
  config = load_config(config_path, overrides)
  return train(config)


def main(argv: Sequence[str] | None = None) -> int:
  """`blox-train [--config FILE] [--debug] [key=value ...]`; returns the exit status.

  SIGTERM/SIGINT are handled from here on: before the training loop they stop
  the run at once with status 0 (nothing is half-written: config.yaml is
  replaced atomically and no checkpoint is being saved); inside the loop the
  run saves a checkpoint and exits 0.
  """
  previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
  try:
    return run_cli('blox-train', _main, argv)
  except Stopped as e:
    print(f'blox-train: {e} outside the training loop: stopped at once; no checkpoint was being written',
          file=sys.stderr, flush=True)
    return EXIT_OK
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


if __name__ == '__main__':
  sys.exit(main())
