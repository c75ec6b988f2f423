"""Fine-tuning in the trainer: the model and the first train state come from a pretrained source.

    finetune:
      init_from: runs/tiny            # a blox-train workdir, or hf:DIR
      lora: {rank: 8, alpha: 16, targets: [attn/q, attn/v]}
      base_dtype: bfloat16            # '' = the source's
      quant: none                     # or int8

1. `resolve(cfg)`: the `model:` section is the source's (a key the run sets to
   something else is a ConfigError naming it); only the keys that change how
   the same weights run (`RUN_KEYS`: remat, compute dtype, scan, dropout,
   z-loss) stay the run's. `finetune.base_dtype` sets `model.param_dtype`.
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


def _hf_dir(init_from: str) -> str | None:
  return init_from[len('hf:'):] if init_from.startswith('hf:') else None


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
  the source's is a ConfigError naming it; `RUN_KEYS` stay the run's.
  """
  f = cfg.finetune
  if not f.init_from:
    return cfg
  source = source_model_config(f.init_from)
  default = ModelConfig()
  for field in dataclasses.fields(ModelConfig):
    name = field.name
    mine, theirs = getattr(cfg.model, name), getattr(source, name)
    if name in RUN_KEYS or mine == theirs or mine == getattr(default, name):
      continue
    fix = ("set finetune.base_dtype to store the base in another dtype" if name == 'param_dtype'
           else 'drop the override: a fine-tuned model has the shape of its source')
    raise ConfigError(f'model.{name}={mine!r} conflicts with the source model of finetune.init_from='
                      f'{f.init_from!r} ({name}={theirs!r}); {fix}')
  model = dataclasses.replace(source, **{k: getattr(cfg.model, k) for k in RUN_KEYS})
  if f.base_dtype:
    model = dataclasses.replace(model, param_dtype=f.base_dtype)
  return dataclasses.replace(cfg, model=model)


def build_model(model_cfg: ModelConfig, f: FinetuneConfig) -> DecoderLM:
  """`build_model(model_cfg)` with the adapters and the int8 base of `f` wrapped in."""
  model = build_base_model(model_cfg)
  if f.lora.rank > 0:
    try:
      ft.add_lora(model, f.lora.targets, rank=f.lora.rank, alpha=f.lora.alpha, dropout=f.lora.dropout)
    except ValueError as e:
      raise ConfigError(str(e)) from e
  if f.quant == 'int8':
    ft.add_int8_base(model)
  return model


def adapt(model: DecoderLM, f: FinetuneConfig, base: bx.Params, seed: int = 0) -> bx.Params:
  """Pretrained base params -> the params a fine-tuning run trains from (pure; jit it).

  Float base params are cast to the model's `param_dtype`; params the model
  has and the base lacks (the adapters) get their `model.init(seed)` values;
  then freezing (every base param with LoRA, else the `freeze` patterns) and
  int8 quantization of the frozen kernels.
  """
  dtype = jnp.dtype(model.config.param_dtype)
  cast = {k: (p.replace(value=p.value.astype(dtype)) if jnp.issubdtype(p.dtype, jnp.floating) else p)
          for k, p in base.items()}
  fresh = model.init(seed)
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
