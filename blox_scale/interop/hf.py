"""Hugging Face checkpoints in and out (`bs.hf`).

```
model, params = bs.hf.load('dir', dtype='float32')   # DecoderLM + stacked Params
logits, _ = model(params, input_ids)                 # int[batch, seq] -> f32[batch, seq, vocab]
bs.hf.save(model, params, 'out_dir')                 # config.json + model.safetensors (+ index)
```

Loading streams: every destination array is built with
`jax.make_array_from_callback`, whose callback reads, for one device's slice,
the Hugging Face tensors of the layers that slice covers (one tensor at a
time), converts them to the blox layout and keeps only that slice. A process
reads only what its devices hold; host memory holds one tensor plus one
device slice. Saving pulls one layer slice of one param at a time and writes
one shard at a time. The name rules live in `families.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import blox as bx
from blox_scale.interop import safetensors_io as st
from blox_scale.interop.families import Family, Rule, UnsupportedConfig, family_for_hf, family_for_model
from blox_scale.models import build_model
from blox_scale.models.decoder import DecoderLM
from blox_scale.parallel.sharding import param_shardings
from blox_scale.training.config import MeshConfig, ModelConfig

DEFAULT_MAX_SHARD_SIZE = 5 * 2**30  # Hugging Face's default (5GB)
FLOAT_DTYPES = ('float32', 'bfloat16', 'float16')
Progress = Callable[[int], None]


class ConversionError(ValueError):
  """Names, shapes or dtypes do not match; `.problems` lists every offender as (key, what, fix)."""

  def __init__(self, problems: list[tuple[str, str, str]]):
    self.problems = problems
    super().__init__(f'{len(problems)} problem(s):\n' + '\n'.join(f'{k}: {what}; {fix}' for k, what, fix in problems))


# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------


def read_config(directory: str | Path, dtype: str = 'float32') -> tuple[Family, ModelConfig]:
  """`config.json` -> (family, ModelConfig with param_dtype = dtype = `dtype`)."""
  if dtype not in FLOAT_DTYPES:
    raise ValueError(f'dtype={dtype!r} is not one of {FLOAT_DTYPES}.')
  path = Path(directory) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found; a Hugging Face checkpoint directory holds config.json')
  hf = json.loads(path.read_text())
  family = family_for_hf(hf)
  config = family.from_hf(hf)
  return family, dataclasses.replace(config, param_dtype=dtype, dtype=dtype)


def hf_config(config: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
  """The config.json Hugging Face's `AutoModelForCausalLM` reads for this model."""
  family = family_for_model(config)
  return {**family.to_hf(config), 'torch_dtype': dtype or config.param_dtype}


# -----------------------------------------------------------------------------
# Name checks
# -----------------------------------------------------------------------------


Index = int | tuple[int, int] | None  # where a tensor goes in its stacked param: layer i, [i, expert e], or whole


def expected_tensors(family: Family, config: ModelConfig) -> dict[str, tuple[Rule, Index]]:
  """Every Hugging Face tensor name the model needs -> (its rule, index: layer i, (i, expert e) or None)."""
  out = {}
  for rule in family.rules(config):
    if rule.per_expert:
      for i in range(config.num_layers):
        for e in range(config.moe.num_experts):
          out[rule.hf.format(i=i, e=e)] = (rule, (i, e))
    elif rule.per_layer:
      for i in range(config.num_layers):
        out[rule.hf.format(i=i)] = (rule, i)
    else:
      out[rule.hf] = (rule, None)
  return out


def _strip(family: Family, name: str) -> str:
  for prefix in family.load_prefixes:
    if prefix and name.startswith(prefix):
      return name[len(prefix):]
  return name


def check_tensors(reader: st.Reader, family: Family, config: ModelConfig) -> dict[str, str]:
  """-> {expected name: stored name}; raises ConversionError listing every offender."""
  expected = expected_tensors(family, config)
  stored = {_strip(family, n): n for n in reader.names()}
  problems = []
  for name, (rule, _) in expected.items():
    if name not in stored:
      problems.append((name, 'missing', f'expected shape {list(rule.hf_shape(config))} for {family.name} '
                       f'with num_layers={config.num_layers}; check the checkpoint is complete and config.json matches'))
      continue
    shape, dtype = reader.shapes[stored[name]], reader.dtypes[stored[name]]
    if shape != tuple(rule.hf_shape(config)):
      problems.append((stored[name], f'shape {list(shape)}, expected {list(rule.hf_shape(config))}',
                       'config.json and the tensors disagree'))
    if dtype not in st.DTYPES:
      problems.append((stored[name], f'dtype {dtype} is not a float dtype', f'store one of {sorted(st.DTYPES)}'))
  tied_head = config.tie_embeddings and 'lm_head.weight' in stored  # some tied checkpoints store it anyway
  for name, original in stored.items():
    if name in expected or name.endswith(family.ignore) or (tied_head and name == 'lm_head.weight'):
      continue
    hint = 'not a weight of this family'
    m = re.search(r'layers?\.(\d+)\.|h\.(\d+)\.', name)
    x = re.search(r'experts\.(\d+)\.', name)
    if m and int(m.group(1) or m.group(2)) >= config.num_layers:
      hint = f'layer index beyond num_layers={config.num_layers} in config.json'
    elif x and int(x.group(1)) >= config.moe.num_experts:
      hint = f'expert index beyond num_experts={config.moe.num_experts} in config.json'
    problems.append((original, 'unexpected', f'{hint}; remove it or fix config.json'))
  if problems:
    raise ConversionError(problems)
  return {name: stored[name] for name in expected}


# -----------------------------------------------------------------------------
# Load
# -----------------------------------------------------------------------------


def _path(model: DecoderLM, name: str) -> tuple[str, ...]:
  return model.graph.path + tuple(name.split('/'))


def _build_model(config: ModelConfig) -> tuple[DecoderLM, bx.Params]:
  model = build_model(config)
  return model, jax.eval_shape(model.init, 0)


Source = Callable[..., np.ndarray]  # (layer i or None, index=()) -> that param's row i (or whole), [index]


def param_sources(directory: str | Path, dtype: str = 'float32', progress: Progress | None = None
                  ) -> tuple[DecoderLM, bx.Params, dict[tuple[str, ...], tuple[bool, Source]]]:
  """Checks a checkpoint and plans its conversion without reading any tensor data.

  Returns `(model, abstract_params, sources)`: `sources[path] = (per_layer,
  source)` for every param the checkpoint fills, where `source(i)` reads the
  one Hugging Face tensor of layer `i` (`source(None)` for a param outside the
  stack) and returns it in blox layout and the param's dtype (`dtype`; the
  MoE router stays float32). A per-expert param's row `i` is `[experts, ...]`,
  read one expert tensor at a time. `source(i, index)` returns `row[index]`
  (a tuple of slices) and reads only the experts `index[0]` selects.
  The Rng params are not in `sources` (they are not stored by Hugging Face).
  """
  family, config = read_config(directory, dtype)
  reader = st.Reader(directory)
  stored = check_tensors(reader, family, config)
  model, abstract = _build_model(config)
  progress = progress or (lambda n: None)
  sources = {}
  for rule in family.rules(config):
    for which, name in enumerate(rule.blox):
      path = _path(model, name)
      if path not in abstract:
        raise AssertionError(f'{family.name} table names {name}, which {type(model).__name__} does not have')
      target = np.dtype(abstract[path].value.dtype)

      def read(name: str, rule: Rule = rule, which: int = which, target: np.dtype = target) -> np.ndarray:
        t = reader.read(stored[name])
        progress(t.nbytes)
        return rule.to_blox(t, config)[which].astype(target, copy=False)

      def source(i: int | None, index: tuple[slice, ...] = (), rule: Rule = rule, read: Callable = read) -> np.ndarray:
        if not rule.per_expert:
          return np.ascontiguousarray(read(rule.hf if i is None else rule.hf.format(i=i))[index])
        experts = range(config.moe.num_experts)[index[0] if index else slice(None)]
        return np.stack([np.ascontiguousarray(read(rule.hf.format(i=i, e=e))[index[1:]]) for e in experts])

      sources[path] = (rule.per_layer, source)
  rng_paths = set(model.rng.seed(bx.Params(), seed=0).keys())
  unfilled = sorted(bx.path_to_str(p) for p in abstract.keys() if p not in sources and p not in rng_paths)
  if unfilled:
    raise AssertionError(f'{family.name} table does not fill {unfilled}')
  return model, abstract, sources


def _callback(per_layer: bool, source: Source, num_layers: int, dtype: np.dtype) -> Callable[[Any], np.ndarray]:
  """The `make_array_from_callback` callback: index (a tuple of slices) -> that slice in blox layout."""

  def callback(index: tuple[slice, ...]) -> np.ndarray:
    if not per_layer:
      return source(None, index)
    layers = range(num_layers)[index[0]]
    out = None
    for k, i in enumerate(layers):
      piece = source(i, index[1:])
      if out is None:
        out = np.empty((len(layers),) + piece.shape, dtype)
      out[k] = piece
    return out

  return callback


def load(directory: str | Path, dtype: str = 'float32', *, mesh: jax.sharding.Mesh | None = None,
         rules: dict[str, Any] | None = None, progress: Progress | None = None) -> tuple[DecoderLM, bx.Params]:
  """A Hugging Face checkpoint directory -> `(DecoderLM, locked stacked Params)`.

  Args:
    directory: holds `config.json` and `model.safetensors` or
      `model.safetensors.index.json` + shards.
    dtype: param (and compute) dtype: 'float32', 'bfloat16' or 'float16'.
    mesh, rules: place every param with its logical sharding on `mesh`
      (rules default to the trainer's `mesh.rules`); default: the first device.
    progress: called with the bytes of every tensor read.
  Raises `ConversionError` listing every missing, unexpected, misshaped or
  non-float tensor, and `UnsupportedConfig` naming config fields the model
  cannot represent, before anything is read.
  """
  model, abstract, sources = param_sources(directory, dtype, progress)
  if mesh is not None:
    rules = rules if rules is not None else dict(MeshConfig().rules)
    shardings = param_shardings(abstract, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  else:
    replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: replicated, abstract)
  values: dict[tuple[str, ...], jax.Array] = {}
  for path, (per_layer, source) in sources.items():
    cb = _callback(per_layer, source, model.config.num_layers, np.dtype(abstract[path].value.dtype))
    values[path] = jax.make_array_from_callback(abstract[path].shape, shardings[path].value, cb)
  for path, param in model.rng.seed(bx.Params(), seed=0).items():
    values[path] = jax.device_put(param.value, replicated)
  params = bx.Params()
  for path, param in abstract.items():
    params[path] = param.replace(value=values[path])
  return model, params.locked()


# -----------------------------------------------------------------------------
# Save
# -----------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
  """5_000_000_000, '5GB' (10**9) or '5GiB' (2**30) -> bytes."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*', str(size), re.IGNORECASE)
  if not m:
    raise ValueError(f"max_shard_size={size!r}: expected bytes or a size such as '5GB' or '500MiB'.")
  unit = (m.group(2) or 'B').upper()
  base = 1024 if 'I' in unit else 1000
  return int(float(m.group(1)) * base ** ('BKMGT'.index(unit[0])))


def temp_dir_for(out_dir: Path) -> Path:
  """A new directory next to `out_dir` (same filesystem, so the final rename is atomic)."""
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.tmp-', dir=out_dir.parent))
  umask = os.umask(0)
  os.umask(umask)
  tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the output should look like any new directory
  return tmp


def _tensor_plan(model: DecoderLM, family: Family) -> list[tuple[str, Rule, Index]]:
  """(hf name, rule, index) in writing order: embeddings, then each per-layer rule for layers
  0..L-1 (and experts 0..E-1 of each; one stacked param is needed at a time), then the final
  norm and the head."""
  c = model.config
  expected = expected_tensors(family, c)
  head = [(family.save_prefix + name, r, i) for name, (r, i) in expected.items() if i is None]
  layers = [(family.save_prefix + name, r, i) for name, (r, i) in expected.items() if i is not None]
  first = [t for t in head if t[1].blox[0] in ('embed/embedding', 'pos_embed/embedding')]
  last = [t for t in head if t not in first]
  return first + layers + last


Fetch = Callable[[tuple[str, ...]], Any]


def save(model: DecoderLM, params: bx.Params, out_dir: str | Path, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
         dtype: str | None = None, overwrite: bool = False, progress: Progress | None = None) -> Path:
  """Writes `config.json` + safetensors that Hugging Face's loaders read; returns `out_dir`.

  Args:
    max_shard_size: bytes (or '5GB'); above it the tensors go to
      `model-0000k-of-0000N.safetensors` with `model.safetensors.index.json`.
    dtype: stored dtype (default: the params' dtype).
    overwrite: replace an existing `out_dir` (else it is an error).
  The directory is written under a temporary name and renamed when complete,
  so a failed save leaves no partial output. Host memory: one layer slice of
  one param (pulled from the devices when it is written); shards are streamed.
  """
  c = model.config
  missing = sorted(bx.path_to_str(_path(model, n)) for r in family_for_model(c).rules(c) for n in r.blox
                   if _path(model, n) not in params)
  if missing:
    raise ConversionError([(m, 'missing from params', 'pass the params of this model') for m in missing])
  dtype = dtype or str(jnp.dtype(params[_path(model, 'embed/embedding')].value.dtype))
  return save_from(model, lambda path: params[path].value, out_dir, max_shard_size=max_shard_size, dtype=dtype,
                   overwrite=overwrite, progress=progress)


def save_from(model: DecoderLM, fetch: Fetch, out_dir: str | Path, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
              dtype: str | None = None, overwrite: bool = False, progress: Progress | None = None) -> Path:
  """`save` with the params given by `fetch(path) -> array` (jax or NumPy, indexable by layer).

  `fetch` is called once per param, in writing order, and its result is
  dropped once that param's tensors are written: a fetch that restores one
  param from a checkpoint (`blox-convert blox-to-hf`) keeps one stacked param
  (three for GPT-2's fused qkv) plus one tensor in host memory.
  `dtype` defaults to `model.config.param_dtype`.
  """
  c = model.config
  family = family_for_model(c)
  limit = parse_size(max_shard_size)
  out_dir = Path(out_dir)
  if out_dir.exists() and not overwrite and any(out_dir.iterdir()):
    raise FileExistsError(f'{out_dir}: exists and is not empty; pass overwrite=True or choose a new directory')
  dtype = dtype or c.param_dtype
  if dtype not in FLOAT_DTYPES:
    raise ValueError(f'dtype={dtype!r} is not one of {FLOAT_DTYPES}.')
  np_dtype = np.dtype(jnp.dtype(dtype))
  plan = _tensor_plan(model, family)
  by_name = {name: (rule, i) for name, rule, i in plan}
  sizes = [(name, int(np.prod(rule.hf_shape(c))) * np_dtype.itemsize) for name, rule, i in plan]
  shards = st.plan_shards(sizes, limit)
  cache: dict[tuple[str, ...], Any] = {}

  def tensors(names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    for name in names:
      rule, i = by_name[name]
      paths = [_path(model, blox) for blox in rule.blox]
      if set(paths) != set(cache):
        cache.clear()  # the previous param is written: release it before fetching the next
        cache.update({p: fetch(p) for p in paths})
      parts = tuple(np.asarray(jax.device_get(cache[p][i] if i is not None else cache[p])) for p in paths)
      yield name, rule.to_hf(parts, c).astype(np_dtype, copy=False)

  tmp = temp_dir_for(out_dir)
  try:
    (tmp / 'config.json').write_text(json.dumps(hf_config(c, dtype), indent=2) + '\n')
    specs = {name: (rule.hf_shape(c), np_dtype) for name, rule, i in plan}
    st.write(tmp, shards, specs, tensors, progress or (lambda n: None))
    cache.clear()
    if out_dir.exists():
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


__all__ = ['load', 'save', 'save_from', 'param_sources', 'read_config', 'hf_config', 'check_tensors', 'expected_tensors', 'ConversionError',
           'UnsupportedConfig', 'DEFAULT_MAX_SHARD_SIZE']
