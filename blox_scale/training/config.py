"""Configuration: frozen dataclasses, YAML presets, dotted overrides.

Every default lives in these dataclasses, once, with a one-line doc (the
`model:` section is `ModelConfig` from blox_scale/models/config.py, re-exported
here: model code never imports training code). A preset in `configs/`
is a small YAML file that sets only what differs; the command line adds
dotted overrides (`model.num_layers=4 optimizer.learning_rate=1e-3`).
Unknown keys, wrong types and a key given twice with different values are
errors that name the key and suggest the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from blox_scale.models.config import ModelConfig
from blox_scale.nn.config import field


class ConfigError(ValueError):
  """A config file or override is invalid; the message names the key."""


# -----------------------------------------------------------------------------
# Sections
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where tokens come from and how batches are made."""
  source: str = field('stdlib', "'stdlib' (embedded corpus: this Python's own standard library source), 'text', 'tokens' or 'array_record'.")
  path: str = field('', "File or glob for 'text' (UTF-8), 'tokens' (raw uint16/uint32 file) or 'array_record'.")
  token_dtype: str = field('auto', "dtype of a 'tokens' file: 'auto' (from its .json sidecar written by blox-tokenize; uint16 without one), uint16 or uint32.")
  tokenizer: str = field('byte', "Tokenizer: 'byte' (UTF-8 bytes, vocab 256), a Hugging Face tokenizer.json (or a directory holding one) or a SentencePiece .model; a file is copied into the workdir.")
  seq_len: int = field(128, 'Tokens per training sequence (packed).')
  batch_size: int = field(16, 'Global batch size in sequences (split across processes and data shards).')
  shuffle_seed: int = field(0, 'Seed of the deterministic shuffle.')
  eval_fraction: float = field(0.02, 'Fraction of the corpus held out for eval loss.')
  max_bytes: int = field(4_000_000, "Cap on the bytes read for the 'stdlib' corpus (keeps start-up fast).")
  worker_count: int = field(0, 'grain worker processes (0 = in the main process).')
  packing: str = field('concat', "'concat': windows of the plain token stream (tokens attend across documents); 'document': windows also carry segment_ids and positions, attention is block-causal within each document, positions restart per document and the cross-document target is not counted.")
  log_hashes: bool = field(False, 'Append a hash of each row of each train batch this process loads to <workdir>/data_hashes/process_<i>.jsonl, by global batch index (shows that a resumed or rescaled run reads the same global batches).')


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with warmup and decay, clipping and accumulation (optax)."""
  learning_rate: float = field(3e-3, 'Peak learning rate.')
  warmup_steps: int = field(50, 'Linear warmup steps from 0 to the peak.')
  schedule: str = field('cosine', "Decay after warmup: 'cosine', 'linear' or 'constant'.")
  min_lr_ratio: float = field(0.1, 'Final learning rate as a fraction of the peak.')
  b1: float = field(0.9, 'Adam beta1.')
  b2: float = field(0.95, 'Adam beta2.')
  eps: float = field(1e-8, 'Adam epsilon.')
  weight_decay: float = field(0.1, 'Decoupled weight decay (not applied to norms, biases or 1-d params).')
  grad_clip: float = field(1.0, 'Clip gradients to this global norm (0 disables).')
  grad_accum_steps: int = field(1, 'Micro-batches accumulated per optimizer step.')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop: length, seeds, logging, eval and samples."""
  steps: int = field(300, 'Optimizer steps to train for (the default run: about 2 minutes on 2 CPU cores).')
  seed: int = field(0, 'Seed of params init and dropout.')
  workdir: str = field('runs/tiny', 'Directory for checkpoints, metrics.jsonl and plots (with --config and no workdir given: runs/<preset name>). Multi-host runs need a directory every host shares.')
  log_every: int = field(10, 'Write a metrics line every N steps.')
  eval_every: int = field(100, 'Eval loss every N steps (0 disables).')
  eval_batches: int = field(4, 'Batches per eval.')
  progress: bool = field(True, 'Show a live progress bar when stderr is a terminal (plain log lines otherwise, e.g. in SLURM logs).')
  sample_prompt: str = field('def ', 'Prompt for the samples printed at the end.')
  sample_tokens: int = field(120, 'Tokens sampled at the end (0 disables).')
  sample_temperature: float = field(0.8, 'Sampling temperature (0 = greedy).')
  plot: bool = field(True, 'Write loss.png to the workdir at the end.')
  divergence_factor: float = field(2.0, 'Loss-spike guard: stop (exit 2, before checkpointing) when the logged loss stays above this multiple of its running median (0 disables).')
  divergence_patience: int = field(3, 'Consecutive log steps above train.divergence_factor x median that stop the run.')
  tensorboard: bool = field(True, 'Also write the train/eval/goodput scalars of metrics.jsonl as TensorBoard event files to <workdir>/tensorboard (primary process; tensorboardX).')
  wandb: bool = field(False, 'Also log those scalars to Weights & Biases (needs `pip install wandb`; one W&B run per workdir, continued on resume).')
  wandb_project: str = field('blox', 'W&B project of train.wandb.')
  profile: tuple[int, ...] = field((), 'Capture a jax.profiler trace of steps [start, stop) into <workdir>/profile, e.g. [5,8] (empty = off; primary process).')
  offload: tuple[str, ...] = field((), "Parts of the train state kept in host memory (pinned_host) between steps and moved to the device inside each step: 'opt_state' and/or 'frozen' (the frozen params of a fine-tuning run), e.g. [opt_state,frozen]; needs a backend with host memory kinds (GPU, TPU).")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """orbax checkpoints: cadence, retention, resume."""
  every: int = field(100, 'Save every N steps and at the end (0: no checkpoints, e.g. for benchmarks).')
  keep: int = field(3, 'Keep the last K checkpoints.')
  keep_every: int = field(0, 'Also keep every M-th step forever (0 disables).')
  async_save: bool = field(True, 'Save in the background, off the training critical path.')
  resume: bool = field(True, 'Resume from the latest checkpoint in the workdir if there is one.')


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh and logical-to-mesh axis rules."""
  data: int = field(-1, 'Data-parallel axis size (-1 = whatever devices remain).')
  fsdp: int = field(1, 'Fully-sharded data-parallel axis size (params sharded, batch split).')
  expert: int = field(1, 'Expert-parallel axis size (MoE experts split; the batch is split over it too).')
  tensor: int = field(1, 'Tensor-parallel axis size (heads and mlp split).')
  rules: dict = field({
      'batch': ['data', 'fsdp', 'expert'],
      'vocab': 'tensor',
      'embed': 'fsdp',
      'mlp': 'tensor',
      'expert': 'expert',
      'heads': 'tensor',
      'kv_heads': 'tensor',
      'head_dim': None,
      'layers': None,
      'norm': None,
      'seq': None,
  }, 'Logical axis name -> mesh axis (or list of axes, or null for replicated).')


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """jax.distributed: multi-process (multi-host) runs."""
  coordinator_address: str = field('', "host:port of process 0 ('' = let JAX detect SLURM / Cloud TPU, or single process).")
  num_processes: int = field(0, 'Total processes (0 = from the environment).')
  process_id: int = field(-1, 'This process (-1 = from the environment).')
  local_device_count: int = field(0, 'Fake CPU devices per process for local tests (0 = leave XLA alone).')
  initialization_timeout: int = field(120, 'Seconds to wait for all processes to join.')
  heartbeat_timeout: int = field(30, 'Seconds without a heartbeat after which a process counts as dead and every other process exits with an error.')
  shutdown_timeout: int = field(30, 'Seconds a finishing process waits for the others at shutdown.')
  cluster_detection: str = field('auto', "'auto' (SLURM / Open MPI / Cloud TPU from the environment), 'off' (single process unless coordinator_address is set), or a JAX method name (e.g. mpi4py).")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Low-rank adapters on the projections named by `targets` (blox_scale/finetune/lora.py)."""
  rank: int = field(0, 'Adapter rank r; LoRA is on when > 0 (0: full fine-tuning of what finetune.freeze leaves trainable).')
  alpha: float = field(16.0, 'The adapter output is scaled by alpha / rank.')
  dropout: float = field(0.0, "Dropout on the adapters' input during training.")
  targets: tuple[str, ...] = field(('attn/q', 'attn/v'), 'Path patterns of the projections that get adapters (e.g. attn/q, attn/v, mlp/*).')


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Fine-tuning from a pretrained model: LoRA, freezing, the frozen base's storage."""
  init_from: str = field('', "Pretrained weights: a blox-train workdir, or hf:DIR (a Hugging Face checkpoint; a directory with config.json and no config.yaml is one without the prefix, and its tokenizer, if it ships one, replaces data.tokenizer=byte); '' = train from scratch.")
  lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig, metadata={'doc': 'Low-rank adapters.'})
  freeze: tuple[str, ...] = field((), 'Path patterns of params kept frozen (with LoRA on, every base param is frozen).')
  base_dtype: str = field('', "Storage dtype of the base params ('' = the source's; 'bfloat16' halves a frozen base).")
  quant: str = field('none', "Frozen base kernels: 'none' or 'int8' (weight-only, per-channel scales, MoE expert kernels included; needs LoRA).")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs."""
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={'doc': 'The model.'})
  data: DataConfig = dataclasses.field(default_factory=DataConfig, metadata={'doc': 'The data.'})
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig, metadata={'doc': 'The optimizer.'})
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig, metadata={'doc': 'The loop.'})
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig, metadata={'doc': 'Checkpoints.'})
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig, metadata={'doc': 'The mesh.'})
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig, metadata={'doc': 'Multi-process.'})
  finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig, metadata={'doc': 'Fine-tuning.'})


# -----------------------------------------------------------------------------
# Loading
# -----------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
  """A YAML loader that refuses duplicate keys (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
  seen: dict[Any, Any] = {}
  for key_node, value_node in node.value:
    key = loader.construct_object(key_node, deep=deep)
    if key in seen:
      raise ConfigError(f'Key {key!r} appears twice in the same mapping (line {key_node.start_mark.line + 1}). Keep one.')
    seen[key] = loader.construct_object(value_node, deep=deep)
  return seen


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _type_name(tp: Any) -> str:
  return getattr(tp, '__name__', str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
  """Checks `value` against the annotation `tp`; converts lists to tuples."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    errors = []
    for option in typing.get_args(tp):
      if option is type(None):
        if value is None:
          return None
        continue
      try:
        return _coerce(value, option, key)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(f'{key}: {value!r} matches none of {tp}.')
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      value = (value,) if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f'{key}: expected a list, got {type(value).__name__} {value!r}.')
    args = typing.get_args(tp)
    item = args[0] if args else Any
    return tuple(_coerce(v, item, f'{key}[{i}]') for i, v in enumerate(value))
  if tp is Any:
    return value
  if tp is dict or origin is dict:
    if not isinstance(value, dict):
      raise ConfigError(f'{key}: expected a mapping, got {type(value).__name__} {value!r}.')
    return dict(value)
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f'{key}: expected true/false, got {type(value).__name__} {value!r}.')
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    raise ConfigError(f'{key}: expected an integer, got {type(value).__name__} {value!r}.')
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
      try:
        return float(value)
      except ValueError:
        pass
    raise ConfigError(f'{key}: expected a number, got {type(value).__name__} {value!r}.')
  if tp is str:
    if isinstance(value, str):
      return value
    raise ConfigError(f'{key}: expected a string, got {type(value).__name__} {value!r} (quote it in YAML).')
  raise ConfigError(f'{key}: unsupported field type {_type_name(tp)}.')


def _unknown_key(key: str, valid: list[str], prefix: str) -> ConfigError:
  close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  hint = f" Did you mean '{prefix}{close[0]}'?" if close else ''
  return ConfigError(f"Unknown config key '{prefix}{key}'.{hint} Valid keys here: {', '.join(valid)}.")


def merge_into(config: Any, data: dict[str, Any], prefix: str = '') -> Any:
  """Returns `config` (a dataclass) with the nested dict `data` applied."""
  if not isinstance(data, dict):
    raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {type(data).__name__}.")
  hints = typing.get_type_hints(type(config))
  names = [f.name for f in dataclasses.fields(config)]
  changes = {}
  for key, value in data.items():
    if key not in hints:
      raise _unknown_key(str(key), names, prefix)
    current = getattr(config, key)
    if isinstance(value, CommandLineValue):
      value = value.for_field(hints[key])
    if dataclasses.is_dataclass(current):
      changes[key] = merge_into(current, value, f'{prefix}{key}.')
    elif isinstance(current, dict):
      # Mapping fields (mesh.rules) are updated key by key, not replaced.
      value = {k: v.value if isinstance(v, CommandLineValue) else v for k, v in value.items()} if isinstance(value, dict) else value
      changes[key] = {**current, **_coerce(value, hints[key], f'{prefix}{key}')}
    else:
      changes[key] = _coerce(value, hints[key], f'{prefix}{key}')
  return dataclasses.replace(config, **changes)


class CommandLineValue:
  """A `key=value` override: the YAML-parsed value and the text as typed.

  The text is kept because YAML reads some strings as other things (`'## '`
  is a comment, i.e. null; `yes` is true): for a field whose type is `str` the
  typed text is the value, unless YAML itself read a string (quoted input).
  """

  def __init__(self, raw: str, value: Any) -> None:
    self.raw, self.value = raw, value

  def for_field(self, annotation: Any) -> Any:
    return self.raw if annotation is str and not isinstance(self.value, str) else self.value

  def __eq__(self, other: Any) -> bool:  # compares as the parsed value (`{'d_model': 64}` equals the override)
    return self.value == (other.value if isinstance(other, CommandLineValue) else other)

  __hash__ = None  # type: ignore[assignment]

  def __repr__(self) -> str:
    return repr(self.value)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
  """`['a.b=1', 'c=x']` -> nested dict; a key set twice differently is an error."""
  nested: dict[str, Any] = {}
  flat: dict[str, Any] = {}
  for item in overrides:
    if '=' not in item:
      raise ConfigError(f"Override {item!r} is not of the form key=value (e.g. model.num_layers=4).")
    key, raw = item.split('=', 1)
    key = key.strip().lstrip('-')
    try:
      value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else ''
    except yaml.YAMLError as e:
      raise ConfigError(f'{key}={raw}: not a valid YAML value ({getattr(e, "problem", e)}); quote strings, '
                        'write lists as [a,b]') from e
    if key in flat and flat[key] != value:
      raise ConfigError(f'Override {key} is set twice with different values ({flat[key]!r} and {value!r}). Keep one.')
    flat[key] = value
    value = CommandLineValue(raw, value)
    node = nested
    parts = key.split('.')
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ConfigError(f'Override {key}: {part} is a value, not a section.')
    node[parts[-1]] = value
  return nested


def _deep_merge(base: dict, extra: dict) -> dict:
  out = dict(base)
  for k, v in extra.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = _deep_merge(out[k], v)
    else:
      out[k] = v
  return out


def load_yaml(path: str | Path) -> dict[str, Any]:
  """Reads a preset; `base: other.yaml` (relative to the file) is applied first."""
  path = Path(path)
  if not path.exists():
    raise ConfigError(f'Config file {path} does not exist. Presets live in configs/ (e.g. configs/tiny.yaml).')
  if not path.is_file():
    raise ConfigError(f'{path}: is not a file; pass a YAML preset (e.g. configs/tiny.yaml).')
  try:
    data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
  except ConfigError as e:
    raise ConfigError(f'{path}: {e}') from e
  except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
    mark = getattr(e, 'problem_mark', None)
    where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
    problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
    raise ConfigError(f'{path}: not valid YAML{where} ({problem}); fix the file') from e
  if not isinstance(data, dict):
    raise ConfigError(f'{path}: the top level must be a mapping of sections (model:, data:, ...).')
  base = data.pop('base', None)
  if base is not None:
    data = _deep_merge(load_yaml(path.parent / base), data)
  return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                files: bool = True) -> Config:
  """Defaults, then the YAML preset at `path`, then dotted overrides; validated.

  files: also check the paths the config names (False for tools that read no data and write nothing).
  """
  config = Config()
  sets_workdir = False  # train.workdir given by the preset or the command line
  if path is not None:
    data = load_yaml(path)
    sets_workdir = isinstance(data.get('train'), dict) and 'workdir' in data['train']
    config = merge_into(config, data)
  if overrides:
    data = parse_overrides(overrides)
    sets_workdir = sets_workdir or (isinstance(data.get('train'), dict) and 'workdir' in data['train'])
    config = merge_into(config, data)
  if path is not None and not sets_workdir:
    # Each preset trains into its own runs/<preset name>: two presets never resume each other's checkpoints.
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, workdir=f'runs/{Path(path).stem}'))
  validate(config, files)
  return config


def validate(config: Config, files: bool = True) -> None:
  """Every field's range and every cross-field rule that needs no device (training/validation.py).

  files: also check paths (data files exist, the workdir is writable).
  """
  from blox_scale.training.validation import check_config  # imports the modules that own the valid names
  check_config(config, files)


# -----------------------------------------------------------------------------
# A run's config file
# -----------------------------------------------------------------------------

CONFIG_FILE = 'config.yaml'


def save_config(workdir: str | Path, config: Config) -> None:
  """Writes `<workdir>/config.yaml` (primary process only), atomically: a reader never sees half a file."""
  path = Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.yaml.tmp')
  tmp.write_text(to_yaml(config))
  tmp.replace(path)


def read_config(workdir: str | Path) -> Config:
  """The `Config` a run wrote to `<workdir>/config.yaml` (read like any preset: strict, validated).

  Paths are not checked: the run's data may have moved since, and sampling does not read it.
  """
  return load_config(Path(workdir) / CONFIG_FILE, files=False)


def to_dict(config: Any) -> dict[str, Any]:
  """Plain nested dict (tuples as lists), e.g. to write config.yaml."""
  out = {}
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else _plain(v)
  return out


def _plain(v: Any) -> Any:
  if isinstance(v, (tuple, list)):
    return [_plain(x) for x in v]
  if isinstance(v, dict):
    return {k: _plain(x) for k, x in v.items()}
  return v


def to_yaml(config: Config) -> str:
  return yaml.safe_dump(to_dict(config), sort_keys=False)


def reference_markdown() -> str:
  """The config reference, generated from the dataclasses (docs/training.md)."""
  lines = []
  for section in dataclasses.fields(Config):
    cls = typing.get_type_hints(Config)[section.name]
    lines.append(f'### `{section.name}`: {cls.__doc__.strip()}\n')
    lines.append('| key | type | default | meaning |')
    lines.append('|---|---|---|---|')
    lines.extend(_reference_rows(cls, section.name))
    lines.append('')
  return '\n'.join(lines)


def _reference_rows(cls: type, prefix: str) -> list[str]:
  """One table row per field; a nested section (finetune.lora) lists its own fields."""
  rows = []
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[f.name]):
      rows.extend(_reference_rows(hints[f.name], f'{prefix}.{f.name}'))
      continue
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    tp = _type_name(hints[f.name]).replace('|', '\\|')
    shown = repr(default).replace('|', '\\|')
    rows.append(f'| `{prefix}.{f.name}` | {tp} | `{shown}` | {f.metadata.get("doc", "")} |')
  return rows
