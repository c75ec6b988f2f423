"""One validation pass over a whole `Config`, before any device work or compile.

`check_config(config)` runs at config load (no JAX backend, no file written):
every field's range, every cross-field rule that needs no device, and the
paths that must exist. `check_devices(config, num_devices)` runs right after
`jax.distributed` is initialised (the device count is known then, nothing is
compiled yet): the mesh and the batch split. Both raise `ConfigError` with one
message of the form `key=value: what is wrong; the fix`.

The valid names come from the modules that own them (remat policies from
`stacking/remat.py`, activations from `nn/mlp.py`, norms from `nn/block.py`,
positions from `models/decoder.py`, schedules from `training/optim.py`, data
sources and token dtypes from `training/data.py`, tokenizer kinds from
`training/tokenizer.py`), so adding one there is all it takes.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from blox_scale.training.config import Config, ConfigError

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def _fail(key: str, value: Any, problem: str, fix: str) -> None:
  raise ConfigError(f'{key}={value!r}: {problem}; {fix}')


def _at_least(key: str, value: float, low: float, fix: str = '') -> None:
  if not value >= low:  # `not >=` also catches NaN
    _fail(key, value, f'must be >= {low}', fix or f'set {key} to {low} or more')


def _in_range(key: str, value: float, low: float, high: float, *, high_open: bool = False) -> None:
  ok = low <= value < high if high_open else low <= value <= high
  if not ok:
    _fail(key, value, f'must be in [{low}, {high}{")" if high_open else "]"}', f'pick a value in that range for {key}')


def _one_of(key: str, value: Any, valid: Any) -> None:
  if value not in valid:
    _fail(key, value, 'is not a known name', f'use one of {", ".join(map(str, valid))}')


def _float_dtype(key: str, value: str) -> None:
  try:
    ok = np.issubdtype(np.dtype(value), np.floating) or value == 'bfloat16'
  except TypeError:
    ok = value == 'bfloat16'
  if not ok:
    _fail(key, value, 'is not a floating-point dtype', 'use float32, bfloat16 or float16')


# -----------------------------------------------------------------------------
# Sections
# -----------------------------------------------------------------------------


def check_model(m: Any, tokenizer: str = 'byte') -> None:
  """`model.*`: ranges, names, heads vs width."""
  from blox_scale.models.decoder import POSITIONS
  from blox_scale.nn.block import NORMS
  from blox_scale.nn.mlp import ACTIVATIONS
  from blox_scale.stacking.remat import valid_names
  from blox_scale.models.plugin import PluginError, resolve

  if m.factory and m.block:
    _fail('model.block', m.block, f'cannot be combined with model.factory={m.factory!r} (a whole-model factory '
          'builds its own layers)', 'set only one of them')
  if m.factory and m.block_args:
    _fail('model.block_args', dict(m.block_args), f'is for model.block; model.factory={m.factory!r} takes its '
          'options from model.factory_args', 'write model.factory_args.NAME=VALUE')
  if m.factory_args and not m.factory:
    _fail('model.factory_args', dict(m.factory_args), 'is set but model.factory is empty',
          "name the model with model.factory='pkg.module:fn' (or drop the options)")
  # Import the user's factory and build the model now: a config error, not a crash after compile.
  moe_key = 'model.block' if m.block else 'model.moe'  # model.moe resolves to the MoE block (models/config.py)
  for key, spec in ((moe_key, m.block_factory), ('model.factory', m.factory)):
    if spec:
      try:
        resolve(spec, key)
      except PluginError as e:
        raise ConfigError(str(e)) from e
  for key in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'mlp_dim', 'max_seq_len'):
    _at_least(f'model.{key}', getattr(m, key), 1)
  for key in ('num_kv_heads', 'head_dim', 'sliding_window'):
    _at_least(f'model.{key}', getattr(m, key), 0, f'use 0 for the default or a positive size for model.{key}')
  _one_of('model.mlp_activation', m.mlp_activation, ACTIVATIONS)
  _one_of('model.norm', m.norm, NORMS)
  _one_of('model.position', m.position, POSITIONS)
  _one_of('model.remat', m.remat, (*valid_names(), 'auto'))
  _at_least('model.remat_budget_gib', m.remat_budget_gib, 0.0, "use 0 for the device's memory or a positive GiB figure")
  needs_names = ('save_names', 'offload_names', 'save_only_these_names', 'save_and_offload_only_these_names')
  if m.remat in needs_names and not m.remat_names:
    _fail('model.remat_names', list(m.remat_names), f'is empty but model.remat={m.remat!r} saves only named values',
          'set model.remat_names=[attn_out,mlp_out] (or pick another model.remat)')
  _float_dtype('model.dtype', m.dtype)
  _float_dtype('model.param_dtype', m.param_dtype)
  for key in ('norm_eps', 'rope_theta', 'init_std'):
    if not getattr(m, key) > 0:
      _fail(f'model.{key}', getattr(m, key), 'must be > 0', f'set a positive model.{key}')
  _at_least('model.z_loss', m.z_loss, 0.0)
  _in_range('model.dropout_rate', m.dropout_rate, 0.0, 1.0, high_open=True)
  if m.head_dim == 0 and m.d_model % m.num_heads:
    _fail('model.num_heads', m.num_heads, f'does not divide model.d_model={m.d_model}',
          'pick num_heads dividing d_model, or set model.head_dim explicitly')
  head_dim = m.head_dim or m.d_model // m.num_heads
  if m.position == 'rope' and head_dim % 2:
    _fail('model.head_dim', head_dim, 'must be even for rotary positions (model.position=rope)',
          'pick an even head_dim (d_model / num_heads), or model.position=learned')
  kv = m.num_kv_heads or m.num_heads
  if m.num_heads % kv:
    _fail('model.num_kv_heads', kv, f'does not divide model.num_heads={m.num_heads} (grouped-query attention)',
          'use a divisor of num_heads (1 = multi-query, 0 = num_heads)')
  if tokenizer == 'byte' and m.vocab_size < 256:  # a tokenizer file's vocab is checked where it is loaded
    _fail('model.vocab_size', m.vocab_size, 'is smaller than the byte tokenizer (256 ids)', 'set model.vocab_size=256 or more')
  check_moe(m)
  if m.block_factory or m.factory:
    _check_plugin(m)


def check_moe(m: Any) -> None:
  """`model.moe.*`: sizes, names, weights (only when model.moe.num_experts > 0)."""
  from blox_scale.nn.moe import DISPATCH, ROUTING

  e = m.moe
  _at_least('model.moe.num_experts', e.num_experts, 0, 'use 0 (no MoE) or the number of experts')
  if e.num_experts == 0:
    return
  if not 1 <= e.top_k <= e.num_experts:
    _fail('model.moe.top_k', e.top_k, f'must be in [1, model.moe.num_experts={e.num_experts}]', 'route each token to 1..num_experts experts')
  _at_least('model.moe.every_n_layers', e.every_n_layers, 1, 'use 1 (every layer MoE) or n (every n-th)')
  if m.num_layers % e.every_n_layers:
    _fail('model.moe.every_n_layers', e.every_n_layers, f'does not divide model.num_layers={m.num_layers}',
          'pick a divisor of num_layers (the Stack repeats n - 1 dense layers and one MoE layer)')
  _at_least('model.moe.mlp_dim', e.mlp_dim, 0, 'use 0 for model.mlp_dim or a positive expert width')
  if not e.capacity_factor > 0:
    _fail('model.moe.capacity_factor', e.capacity_factor, 'must be > 0', 'e.g. model.moe.capacity_factor=1.25')
  _one_of('model.moe.dispatch', e.dispatch, DISPATCH)
  _one_of('model.moe.routing', e.routing, ROUTING)
  _at_least('model.moe.aux_loss_weight', e.aux_loss_weight, 0.0)
  _at_least('model.moe.z_loss_weight', e.z_loss_weight, 0.0)


def _check_plugin(m: Any) -> None:
  """Constructs the model (modules only, no arrays), so the factory checks `model.block_args` /
  `model.factory_args` and a whole model's type is checked here."""
  from blox_scale.models import build_model

  key, spec = ('model.factory', m.factory) if m.factory else ('model.block', m.block_factory)
  try:
    build_model(m)
  except (ValueError, TypeError, KeyError) as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(message if message.startswith('model.') else f'{key}={spec!r}: {message}') from e


def check_data(d: Any, max_seq_len: int, files: bool = True) -> None:
  """`data.*`: ranges, names, and (`files`) the files behind `data.path`."""
  from blox_scale.training.data import SOURCES, TOKEN_DTYPES
  from blox_scale.training.tokenizer import tokenizer_kind

  _one_of('data.source', d.source, SOURCES)
  _one_of('data.token_dtype', d.token_dtype, TOKEN_DTYPES)
  tokenizer_kind(d.tokenizer)  # 'byte', a tokenizer file or a directory (a TokenizerError names the key)
  if d.tokenizer != 'byte' and files and not Path(d.tokenizer).expanduser().exists():
    _fail('data.tokenizer', d.tokenizer, 'is neither byte nor an existing file or directory',
          'use byte, a Hugging Face tokenizer.json (or its directory) or a SentencePiece .model file')
  _at_least('data.seq_len', d.seq_len, 1)
  _at_least('data.batch_size', d.batch_size, 1)
  _at_least('data.shuffle_seed', d.shuffle_seed, 0)
  _at_least('data.worker_count', d.worker_count, 0, 'use 0 (load in the main process) or a positive number of workers')
  _in_range('data.eval_fraction', d.eval_fraction, 0.0, 1.0, high_open=True)
  if d.seq_len > max_seq_len:
    _fail('data.seq_len', d.seq_len, f'exceeds model.max_seq_len={max_seq_len}',
          'raise model.max_seq_len or shorten data.seq_len')
  if d.source == 'stdlib':
    _at_least('data.max_bytes', d.max_bytes, max(2, d.seq_len + 1),
              f'the stdlib corpus needs at least one window of data.seq_len+1={d.seq_len + 1} bytes')
  elif files:
    check_data_files(d)


def check_data_files(d: Any) -> None:
  """`data.path` must match files that exist, are non-empty and (for 'tokens') hold whole ids."""
  if not d.path:
    _fail('data.path', d.path, f"is empty but data.source={d.source!r} reads files", 'set data.path=FILE_OR_GLOB')
  paths = sorted(glob.glob(os.path.expanduser(d.path)))
  if not paths:
    _fail('data.path', d.path, 'matches no file', 'check the path (globs like data/*.txt are allowed)')
  for p in paths:
    if os.path.isdir(p):
      _fail('data.path', p, 'is a directory', 'point data.path at files (e.g. DIR/*.txt)')
    if not os.access(p, os.R_OK):
      _fail('data.path', p, 'is not readable', 'fix its permissions')
  sizes = {p: os.path.getsize(p) for p in paths}
  if not any(sizes.values()):
    _fail('data.path', d.path, 'only matches empty files', 'point data.path at files with data in them')
  if d.source == 'tokens':
    from blox_scale.training.data import token_file_dtype
    if len(paths) != 1:
      _fail('data.path', d.path, f"matches {len(paths)} files but data.source='tokens' reads one", 'concatenate them first')
    dtype = token_file_dtype(paths[0], d.token_dtype)  # from the blox-tokenize sidecar, if there is one
    itemsize = np.dtype(dtype).itemsize
    size = sizes[paths[0]]
    if size % itemsize:
      _fail('data.path', paths[0], f'holds {size} bytes, not a whole number of {dtype} ids',
            f"check data.token_dtype ({'uint32' if itemsize == 2 else 'uint16'}?) or the file")
    if size // itemsize < 2:
      _fail('data.path', paths[0], f'holds {size // itemsize} token(s); training needs at least 2', 'use a larger token file')


def check_optimizer(o: Any) -> None:
  from blox_scale.training.optim import SCHEDULES

  _one_of('optimizer.schedule', o.schedule, SCHEDULES)
  if not o.learning_rate > 0:
    _fail('optimizer.learning_rate', o.learning_rate, 'must be > 0', 'use a positive peak learning rate (e.g. 3e-4)')
  _at_least('optimizer.warmup_steps', o.warmup_steps, 0, 'use 0 (no warmup) or a positive number of steps')
  _in_range('optimizer.min_lr_ratio', o.min_lr_ratio, 0.0, 1.0)
  _in_range('optimizer.b1', o.b1, 0.0, 1.0, high_open=True)
  _in_range('optimizer.b2', o.b2, 0.0, 1.0, high_open=True)
  if not o.eps > 0:
    _fail('optimizer.eps', o.eps, 'must be > 0', 'use e.g. 1e-8')
  _at_least('optimizer.weight_decay', o.weight_decay, 0.0)
  _at_least('optimizer.grad_clip', o.grad_clip, 0.0, 'use 0 to disable clipping or a positive norm')
  _at_least('optimizer.grad_accum_steps', o.grad_accum_steps, 1)


def check_train(t: Any, data: Any, files: bool = True) -> None:
  _at_least('train.steps', t.steps, 1)
  _at_least('train.seed', t.seed, 0)
  _at_least('train.log_every', t.log_every, 1, 'log at least every train.steps steps (e.g. train.log_every=10)')
  _at_least('train.eval_every', t.eval_every, 0, 'use 0 to disable eval')
  _at_least('train.eval_batches', t.eval_batches, 0)
  if t.eval_every > 0 and t.eval_batches == 0:
    _fail('train.eval_batches', 0, f'is 0 but train.eval_every={t.eval_every} asks for evals', 'set train.eval_batches>=1 or train.eval_every=0')
  if t.eval_every > 0 and data.eval_fraction == 0:
    _fail('data.eval_fraction', 0.0, f'holds out no data but train.eval_every={t.eval_every} asks for evals',
          'set data.eval_fraction>0 (e.g. 0.02) or train.eval_every=0')
  _at_least('train.sample_tokens', t.sample_tokens, 0)
  _at_least('train.sample_temperature', t.sample_temperature, 0.0)
  if t.divergence_factor and not t.divergence_factor > 1:
    _fail('train.divergence_factor', t.divergence_factor, 'must be > 1 (or 0 to disable the guard)', 'use e.g. 3.0')
  _at_least('train.divergence_patience', t.divergence_patience, 1)
  if t.profile and (len(t.profile) != 2 or not 0 <= t.profile[0] < t.profile[1]):
    _fail('train.profile', list(t.profile), 'must be [start, stop] steps with 0 <= start < stop',
          'e.g. train.profile=[5,8] traces steps 5, 6 and 7; train.profile=[] for no trace')
  if t.wandb and not t.wandb_project.strip():
    _fail('train.wandb_project', t.wandb_project, 'is empty', 'set train.wandb_project=NAME')
  if files:
    check_workdir(t.workdir)
    if t.wandb:
      _check_wandb()


def _check_wandb() -> None:
  try:
    import wandb  # noqa: F401  (only when asked for: importing it takes a second)
  except ImportError:
    _fail('train.wandb', True, 'needs the wandb package, which is not installed',
          'pip install wandb, or set train.wandb=false')


def check_workdir(workdir: str) -> None:
  """Non-empty, not a file, and inside a directory this process can write."""
  if not workdir.strip():
    _fail('train.workdir', workdir, 'is empty (it would write into the current directory)', 'set train.workdir=runs/NAME')
  if '://' in workdir:
    _fail('train.workdir', workdir, 'remote URLs are not supported (checkpoints, metrics and config.yaml are written '
          'with local file I/O)', 'use a local or shared mounted directory, e.g. a gcsfuse or NFS mount (docs/scaling.md)')
  path = Path(workdir).expanduser().absolute()
  if path.exists() and not path.is_dir():
    _fail('train.workdir', workdir, 'exists and is not a directory', 'pick another train.workdir')
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    _fail('train.workdir', workdir, f'cannot be created: {existing} is a file', 'pick another train.workdir')
  if not os.access(existing, os.W_OK | os.X_OK):
    _fail('train.workdir', workdir, f'is not writable ({existing} denies write access)', 'pick a writable train.workdir')


def check_checkpoint(c: Any) -> None:
  _at_least('checkpoint.every', c.every, 0, 'use 0 to disable checkpoints')
  _at_least('checkpoint.keep', c.keep, 1, 'keep at least the latest checkpoint (checkpoint.keep=1)')
  _at_least('checkpoint.keep_every', c.keep_every, 0, 'use 0 to disable')


def check_mesh(mesh: Any) -> None:
  sizes = {k: getattr(mesh, k) for k in MESH_AXES}
  for key, value in sizes.items():
    if value == 0 or value < -1:
      _fail(f'mesh.{key}', value, 'must be >= 1, or -1 for "whatever devices remain"', f'set mesh.{key}=1 (or -1)')
  if sum(v == -1 for v in sizes.values()) > 1:
    fills = ' '.join(f'mesh.{k}=-1' for k, v in sizes.items() if v == -1)
    raise ConfigError(f'{fills}: at most one mesh axis may be -1 (fill the remaining devices); give the others a size')
  for name, target in mesh.rules.items():
    targets = [] if target is None else [target] if isinstance(target, str) else list(target) if isinstance(target, (list, tuple)) else None
    if targets is None or any(t not in MESH_AXES for t in targets):
      _fail(f'mesh.rules.{name}', target, 'is not a mesh axis, a list of them or null', f'use {", ".join(MESH_AXES)} or null')


def check_distributed(d: Any) -> None:
  _at_least('distributed.num_processes', d.num_processes, 0, 'use 0 (from the environment) or the process count')
  _at_least('distributed.process_id', d.process_id, -1, 'use -1 (from the environment) or 0..num_processes-1')
  if d.num_processes and d.process_id >= d.num_processes:
    _fail('distributed.process_id', d.process_id, f'is not below distributed.num_processes={d.num_processes}',
          'use 0..num_processes-1')
  _at_least('distributed.local_device_count', d.local_device_count, 0)
  for key in ('initialization_timeout', 'heartbeat_timeout', 'shutdown_timeout'):
    _at_least(f'distributed.{key}', getattr(d, key), 1, f'give distributed.{key} in whole seconds')


def check_finetune(f: Any) -> None:
  """`finetune.*`: ranges, names, and what needs `init_from`."""
  from blox_scale.finetune import QUANT_MODES

  _at_least('finetune.lora.rank', f.lora.rank, 0, 'use 0 (no LoRA) or a positive rank such as 8')
  if not f.lora.alpha > 0:
    _fail('finetune.lora.alpha', f.lora.alpha, 'must be > 0', 'set e.g. finetune.lora.alpha=16')
  _in_range('finetune.lora.dropout', f.lora.dropout, 0.0, 1.0, high_open=True)
  _one_of('finetune.quant', f.quant, QUANT_MODES)
  if f.base_dtype:
    _float_dtype('finetune.base_dtype', f.base_dtype)
  if f.lora.rank > 0 and not f.lora.targets:
    _fail('finetune.lora.targets', [], 'is empty but finetune.lora.rank > 0', 'name projections, e.g. [attn/q, attn/v]')
  if f.quant != 'none' and f.lora.rank == 0:
    _fail('finetune.quant', f.quant, 'quantizes frozen kernels, but with finetune.lora.rank=0 they are trained',
          'set finetune.lora.rank > 0, or finetune.quant=none')
  used = [k for k, on in (('finetune.lora.rank', f.lora.rank > 0), ('finetune.freeze', bool(f.freeze)),
                          ('finetune.quant', f.quant != 'none'), ('finetune.base_dtype', bool(f.base_dtype))) if on]
  if used and not f.init_from:
    _fail(used[0], getattr(f.lora, 'rank') if used[0].endswith('rank') else getattr(f, used[0].split('.')[1]),
          'fine-tunes pretrained weights, but finetune.init_from is empty',
          'set finetune.init_from to a blox-train workdir or hf:DIR')


def check_offload(config: Config) -> None:
  """`train.offload`: known parts, each once; 'frozen' needs frozen params (LoRA or finetune.freeze)."""
  from blox_scale.training.offload import PARTS
  parts = list(config.train.offload)
  for p in parts:
    _one_of('train.offload', p, PARTS)
  if len(set(parts)) != len(parts):
    _fail('train.offload', parts, 'names a part twice', f'list each of {list(PARTS)} at most once')
  f = config.finetune
  if 'frozen' in parts and not (f.lora.rank > 0 or f.freeze):
    _fail('train.offload', parts, "offloads 'frozen' params, but nothing is frozen (finetune.lora.rank=0 and no finetune.freeze)",
          "drop 'frozen', or fine-tune with LoRA or finetune.freeze patterns")


def check_config(config: Config, files: bool = True) -> None:
  """Every rule that needs neither a device nor a compile. Raises ConfigError.

  files: also check the paths (data files, a writable workdir); False for the
  config of a finished run read back for sampling or resuming.
  """
  check_model(config.model, config.data.tokenizer)
  check_data(config.data, config.model.max_seq_len, files)
  check_optimizer(config.optimizer)
  check_train(config.train, config.data, files)
  check_checkpoint(config.checkpoint)
  check_mesh(config.mesh)
  check_distributed(config.distributed)
  check_finetune(config.finetune)
  check_offload(config)
  o, d = config.optimizer, config.data
  if d.batch_size % o.grad_accum_steps:
    _fail('data.batch_size', d.batch_size, f'is not divisible by optimizer.grad_accum_steps={o.grad_accum_steps}',
          'make the batch a multiple of the accumulation steps')


# -----------------------------------------------------------------------------
# Devices (after jax.distributed, before any compile)
# -----------------------------------------------------------------------------


def mesh_sizes(mesh: Any, num_devices: int) -> dict[str, int]:
  """`{'data': ., 'fsdp': ., 'expert': ., 'tensor': .}` for `num_devices`, the -1 axis filled; ConfigError if impossible."""
  sizes = {k: getattr(mesh, k) for k in MESH_AXES}
  given = ' '.join(f'mesh.{k}={v}' for k, v in sizes.items())
  known = math.prod(v for v in sizes.values() if v != -1)
  fill = [k for k, v in sizes.items() if v == -1]
  if fill:
    if num_devices % known:
      _fail(f'mesh.{fill[0]}', -1, f'cannot fill: {num_devices} device(s) are not divisible by the other axes ({given})',
            f'pick sizes whose product divides {num_devices}')
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ConfigError(f'{given}: the mesh multiplies to {known} but there are {num_devices} device(s); '
                      f'make data*fsdp*expert*tensor={num_devices} or set one axis to -1')
  return sizes


def batch_shards(mesh: Any, sizes: dict[str, int]) -> int:
  """How many ways `mesh.rules.batch` splits the batch dimension."""
  target = mesh.rules.get('batch')
  names = [] if target is None else [target] if isinstance(target, str) else list(target)
  return math.prod(sizes[n] for n in names)


def check_devices(config: Config, num_devices: int) -> dict[str, int]:
  """The mesh against the device count, and the batch against its shards. Returns the mesh sizes."""
  sizes = mesh_sizes(config.mesh, num_devices)
  shards = batch_shards(config.mesh, sizes)
  k = config.optimizer.grad_accum_steps
  if config.data.batch_size % (shards * k):
    _fail('data.batch_size', config.data.batch_size,
          f'does not split into {shards} batch shard(s) (mesh {sizes}) x optimizer.grad_accum_steps={k}',
          f'use a multiple of {shards * k}')
  return sizes
