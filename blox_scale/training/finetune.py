"""Fine-tuning in the trainer: the model and the first train state come from a pretrained source.

    finetune:
      init_from: runs/tiny            # a blox-train workdir, or hf:DIR (or a DIR with config.json)
      lora: {rank: 8, alpha: 16, targets: [attn/q, attn/v]}
      base_dtype: bfloat16            # '' = the source's
      quant: none                     # or int8

1. `resolve(cfg)`: the `model:` section is the source's (a key the run sets to
   something else is a ConfigError naming it); only the keys that change how
   the same weights run (`RUN_KEYS`: remat, compute dtype, scan, dropout,
   z-loss; `MOE_RUN_KEYS`: expert dispatch, capacity, router loss weights)
   stay the run's. A Hugging Face source's tokenizer becomes `data.tokenizer`. `finetune.base_dtype` sets `model.param_dtype`.
2. `build_model(model_cfg, ft)`: `DecoderLM` with LoRA / an int8 base wrapped in.
3. `adapt(model, ft, base_params)`: pure, jittable: base params cast to the
   storage dtype, adapters created (B = 0), everything but the adapters
   frozen (or the `freeze` patterns), kernels quantized.
4. `init_train_state`: the source read straight into its shards, then one
   jitted `adapt` + optimizer init with the train state's shardings; the
   optimizer sees the trainable (adapter) params only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import blox as bx
from blox_scale import finetune as ft
from blox_scale.models import DecoderLM, build_model as build_base_model
from blox_scale.models.config import ModelConfig
from blox_scale.parallel.sharding import param_shardings, use_mesh_rules
from blox_scale.training import offload
from blox_scale.training.config import Config, ConfigError, FinetuneConfig
from blox_scale.training.step import TrainState

# Model keys a fine-tuning run may set: they change how the weights run, not what they are.
RUN_KEYS = ('remat', 'remat_names', 'remat_nested', 'remat_budget_gib', 'scan_layers', 'dtype', 'dropout_rate', 'z_loss')
# The same for `model.moe`; a run that leaves one at its default keeps the source's (Mixtral: aux weight 0.04, no z-loss).
MOE_RUN_KEYS = ('dispatch', 'capacity_factor', 'aux_loss_weight', 'z_loss_weight')


def _hf_dir(init_from: str) -> str | None:
  """The Hugging Face directory of `init_from`: `hf:DIR`, or a directory with config.json and no config.yaml."""
  if init_from.startswith('hf:'):
    return init_from[len('hf:'):]
  path = Path(init_from).expanduser()
  if (path / 'config.json').is_file() and not (path / 'config.yaml').is_file():
    return init_from
  return None


def hf_tokenizer(init_from: str) -> str | None:
  """The directory of `init_from` when it is a Hugging Face directory shipping tokenizer.json or tokenizer.model."""
  from blox_scale.training.tokenizer import HF_FILE, SENTENCEPIECE_FILE
  hf_dir = _hf_dir(init_from)
  if hf_dir is None or not any((Path(hf_dir).expanduser() / n).is_file() for n in (HF_FILE, SENTENCEPIECE_FILE)):
    return None
  return hf_dir


def source_model_config(init_from: str) -> ModelConfig:
  """The `ModelConfig` of `finetune.init_from` (reads only config files)."""
  hf_dir = _hf_dir(init_from)
  try:
    if hf_dir is not None:
      from blox_scale.interop.hf import read_config as read_hf_config
      return read_hf_config(hf_dir)[1]
    from blox_scale.training.checkpoint import read_config
    source = read_config(init_from)
  except (OSError, ValueError) as e:
    raise ConfigError(f'finetune.init_from={init_from!r}: cannot read the source model ({str(e).splitlines()[0]}); '
                      'give a blox-train workdir (with config.yaml and checkpoints/) or hf:DIR') from e
  if source.finetune.lora.rank > 0 or source.finetune.quant != 'none':
    raise ConfigError(f'finetune.init_from={init_from!r} is a LoRA run; fold its adapters first '
                      '(bs.finetune.merge, or blox-convert blox-to-hf of the merged params) and fine-tune that')
  return source.model


def resolve(cfg: Config) -> Config:
  """`cfg` with the model section of `finetune.init_from` (unchanged when init_from is empty).

  A model key the run sets (differs from the default) to a value other than
  the source's is a ConfigError naming it; `RUN_KEYS` stay the run's. A
  Hugging Face source that ships a tokenizer is the run's `data.tokenizer`
  unless the run names another ('byte', the default, is replaced).
  """
  f = cfg.finetune
  if not f.init_from:
    return cfg
  source = source_model_config(f.init_from)
  model = _merged_section(cfg.model, source, ModelConfig(), 'model', f.init_from)
  if f.base_dtype:
    model = dataclasses.replace(model, param_dtype=f.base_dtype)
  data = cfg.data
  tokenizer = hf_tokenizer(f.init_from)
  if tokenizer is not None and data.tokenizer == type(data)().tokenizer:
    data = dataclasses.replace(data, tokenizer=tokenizer)  # the model's own tokenizer, not bytes
  return dataclasses.replace(cfg, model=model, data=data)


def _merged_section(mine: Any, theirs: Any, default: Any, prefix: str, init_from: str) -> Any:
  """The source's section `theirs` with the run's keys of `mine` (`RUN_KEYS`, `MOE_RUN_KEYS`); conflicts raise."""
  run_keys, keep_default = {'model': (RUN_KEYS, False), 'model.moe': (MOE_RUN_KEYS, True)}.get(prefix, ((), True))
  changes = {}
  for field in dataclasses.fields(default):
    name, key = field.name, f'{prefix}.{field.name}'
    a, b, d = getattr(mine, name), getattr(theirs, name), getattr(default, name)
    if name in run_keys:
      if not (keep_default and a == d):
        changes[name] = a
    elif dataclasses.is_dataclass(d) and a != d:
      changes[name] = _merged_section(a, b, d, key, init_from)
    elif a != b and a != d:
      fix = ('set finetune.base_dtype to store the base in another dtype' if key == 'model.param_dtype'
             else 'drop the override: a fine-tuned model has the shape of its source')
      if prefix == 'model.moe':
        fix += f' (a run may set model.moe.{{{",".join(MOE_RUN_KEYS)}}})'
      raise ConfigError(f'{key}={a!r} conflicts with the source model of finetune.init_from={init_from!r} '
                        f'({name}={b!r}); {fix}')
  return dataclasses.replace(theirs, **changes)


def build_model(model_cfg: ModelConfig, f: FinetuneConfig) -> DecoderLM:
  """`build_model(model_cfg)` with the adapters and the int8 base of `f` wrapped in."""
  model = build_base_model(model_cfg)
  if f.lora.rank > 0:
    try:
      ft.add_lora(model, f.lora.targets, rank=f.lora.rank, alpha=f.lora.alpha, dropout=f.lora.dropout)
    except ValueError as e:
      hint = ''
      if model_cfg.moe.num_experts > 0 and 'match no projection' in str(e):
        hint = (' In an MoE model the MLP of an MoE layer is moe/ (the router and the stacked expert kernels '
                'moe/wi_gate, moe/wi_up, moe/wo: [experts, in, out] arrays, not projections), so mlp/* matches only '
                'dense layers and LoRA does not adapt experts; target attention (attn/q, attn/v or attn/*), and use '
                'finetune.quant=int8 to shrink the frozen experts.')
      raise ConfigError(str(e) + hint) from e
  if f.quant == 'int8':
    ft.add_int8_base(model)
  return model


def adapt(model: DecoderLM, f: FinetuneConfig, base: bx.Params, seed: int = 0) -> bx.Params:
  """Pretrained base params -> the params a fine-tuning run trains from (pure; jit it).

  Float base params are cast to the dtype the model creates them in (`param_dtype`;
  float32 for an MoE router); params the model
  has and the base lacks (the adapters) get their `model.init(seed)` values;
  then freezing (every base param with LoRA, else the `freeze` patterns) and
  int8 quantization of the frozen kernels.
  """
  fresh = model.init(seed)
  # Each float param in the dtype the model creates it with: `param_dtype`, but an MoE router stays float32.
  dtype = lambda k: fresh[k].dtype if k in fresh else jnp.dtype(model.config.param_dtype)
  cast = {k: (p.replace(value=p.value.astype(dtype(k))) if jnp.issubdtype(p.dtype, jnp.floating) else p)
          for k, p in base.items()}
  params = bx.Params(cast, base.is_locked).merge(
      bx.Params({k: p for k, p in fresh.items() if k not in base}, base.is_locked))
  if f.lora.rank > 0:
    params = ft.freeze_base(params)
  if f.freeze:
    try:
      params = ft.freeze(params, f.freeze)
    except ValueError as e:
      raise ConfigError(str(e)) from e
  if f.quant == 'int8':
    params = ft.quantize(model, params)
  if not any(p.trainable for p in params.values()):
    raise ConfigError(f'finetune.freeze={list(f.freeze)} freezes every param: nothing would train')
  return params


def _init_fn(model: DecoderLM, optimizer: optax.GradientTransformation, f: FinetuneConfig, seed: int):
  def init(base: bx.Params) -> TrainState:
    params = adapt(model, f, base, seed)
    trainable, _ = params.split()
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(trainable))
  return init


def abstract_base(model_cfg: ModelConfig) -> bx.Params:
  """The pretrained model's params as ShapeDtypeStructs (the layout `init_from` must have)."""
  return jax.eval_shape(build_base_model(model_cfg).init, 0)


def abstract_params(model: DecoderLM, f: FinetuneConfig, seed: int = 0) -> bx.Params:
  """The fine-tuning run's params as ShapeDtypeStructs (what its checkpoints hold)."""
  return jax.eval_shape(lambda b: adapt(model, f, b, seed), abstract_base(model.config))


def abstract_train_state(model: DecoderLM, optimizer: optax.GradientTransformation, f: FinetuneConfig,
                         seed: int = 0) -> TrainState:
  """The fine-tuning TrainState as ShapeDtypeStructs (nothing allocated)."""
  return jax.eval_shape(_init_fn(model, optimizer, f, seed), abstract_base(model.config))


def load_source(cfg: Config, mesh: Any, rules: Any) -> bx.Params:
  """The pretrained params of `finetune.init_from`, each read straight into its shards on `mesh`."""
  init_from = cfg.finetune.init_from
  hf_dir = _hf_dir(init_from)
  if hf_dir is not None:
    from blox_scale.interop import hf
    _, params = hf.load(hf_dir, dtype=cfg.model.param_dtype, mesh=mesh, rules=rules)
  else:
    from blox_scale.training.checkpoint import read_config, restore_params
    source_cfg = read_config(init_from).model
    abstract = abstract_base(source_cfg)
    shardings = param_shardings(abstract, mesh, rules)
    params = restore_params(init_from, jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings))
  want = abstract_base(cfg.model)
  if set(want.keys()) != set(params.keys()) or any(want[k].shape != params[k].shape for k in want.keys()):
    missing = sorted('/'.join(k) for k in set(want.keys()) - set(params.keys()))
    raise ConfigError(f'finetune.init_from={init_from!r}: its params do not match the model (missing {missing[:4]}).')
  return params


def init_train_state(model: DecoderLM, optimizer: optax.GradientTransformation, cfg: Config, mesh: Any,
                     rules: Any, shardings: TrainState) -> TrainState:
  """The first fine-tuning TrainState, created in its shards from `finetune.init_from`."""
  base = load_source(cfg, mesh, rules)
  init = _init_fn(model, optimizer, cfg.finetune, cfg.train.seed)

  def sharded_init(base: bx.Params) -> TrainState:
    with use_mesh_rules(mesh, rules):
      return init(base)

  # Made in device memory (where the base is read: donation reuses its buffers), then moved to the
  # memory kinds of `shardings` (train.offload puts parts of it in pinned_host).
  state = jax.jit(sharded_init, out_shardings=offload.device_shardings(shardings), donate_argnums=0)(base)
  return jax.device_put(state, shardings)


def merged(config: Config, model: DecoderLM, params: bx.Params) -> tuple[DecoderLM, bx.Params]:
  """The plain model of `config` and `params` with the adapters folded in (unchanged without LoRA/int8)."""
  if config.finetune.lora.rank == 0 and config.finetune.quant == 'none':
    return model, params
  return DecoderLM(bx.Graph('lm'), config.model), ft.merge(model, params)


def describe(params: Any, opt_state: Any) -> dict[str, int]:
  """Sizes for the start record: trainable/frozen scalars, optimizer-state bytes, frozen bytes."""
  return {'trainable_params': ft.count(params, trainable=True), 'frozen_params': ft.count(params, trainable=False),
          'opt_state_bytes': ft.nbytes(opt_state),
          'frozen_bytes': ft.nbytes([p.value for p in params.values() if not p.trainable])}


def full_finetune_opt_state_bytes(model_cfg: ModelConfig, optimizer: optax.GradientTransformation) -> int:
  """Optimizer-state bytes if every param of the base model were trained (f32 master weights)."""
  base = abstract_base(dataclasses.replace(model_cfg, param_dtype='float32'))
  trainable, _ = base.split()
  return ft.nbytes(jax.eval_shape(optimizer.init, trainable))
