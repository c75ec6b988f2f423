"""blox-convert: Hugging Face checkpoints <-> blox workdirs.

    blox-convert hf-to-blox SRC WORKDIR [--dtype float32]
    blox-convert blox-to-hf WORKDIR DST [--dtype ...] [--step N] [--max-shard-size 5GB]

`hf-to-blox` writes `WORKDIR/config.yaml` and a step-0 checkpoint (the params
plus a fresh optimizer state of the default optimizer), so that
`blox-sample --checkpoint WORKDIR` samples from it and
`blox-train --config WORKDIR/config.yaml` trains on from it. `blox-to-hf`
writes config.json + safetensors (sharded with an index above
--max-shard-size) that Hugging Face's `from_pretrained` reads, plus the run's
recorded tokenizer files if it has them.

Neither holds the model in host memory: hf-to-blox writes each stacked
param into the orbax checkpoint one layer at a time (`interop/lazy_save.py`),
blox-to-hf restores one param at a time and writes one shard at a time.
Both write into a temporary directory next to the destination and rename it
at the end: a failure (a missing, unexpected or misshaped tensor is reported
for every offender before anything is read) leaves no partial output.
Errors print as `blox-convert: error: <path/key>: <what>; <fix>`; exit code 2
for usage errors, 1 for failures during the conversion.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from blox_scale.cli.common import EXIT_FAILURE, ArgumentParser, UsageError, run_cli

PROG = 'blox-convert'


def _bar(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit='B', unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
              disable=not enabled)


def _check_destination(path: Path) -> None:
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise UsageError(f'{path}: exists and is not an empty directory; choose a new destination or remove it')


def _zero_optimizer_state(optimizer, abstract_trainable) -> None:
  """The lazy writer stores the optimizer state as zeros: check that `optimizer.init` gives exactly that."""
  import jax
  import jax.numpy as jnp
  tiny = jax.tree.map(lambda x: jnp.zeros((1,) * x.ndim, x.dtype), abstract_trainable)
  names_leaves = jax.tree_util.tree_leaves_with_path(optimizer.init(tiny))
  nonzero = [jax.tree_util.keystr(k) for k, v in names_leaves if jnp.any(v != 0)]
  if nonzero:
    raise ValueError(f'optimizer: the initial state of {nonzero[:3]} is not zero; hf-to-blox writes a zero '
                     'optimizer state (use the default optimizer section)')


def _lazy(param, source=None):
  """A Param whose value is a LazyArray: by layer (stacked params) or whole."""
  import numpy as np

  from blox_scale.interop.lazy_save import LazyArray
  shape, dtype = tuple(param.value.shape), np.dtype(param.value.dtype)
  stacked = param.sharding[:1] == ('layers',)
  if source is None:
    if not shape:
      return param.replace(value=np.zeros((), dtype))
    source = lambda i: np.zeros(shape[1:] if i is not None else shape, dtype)
  if stacked:
    return param.replace(value=LazyArray(shape, dtype, rows=source))
  return param.replace(value=LazyArray(shape, dtype, whole=lambda: source(None)))


def hf_to_blox(src: Path, workdir: Path, dtype: str, progress: bool) -> None:
  """Streams SRC into a step-0 checkpoint: one layer of one param in memory at a time."""
  import jax
  import numpy as np

  import blox as bx
  from blox_scale.interop import hf, lazy_save, safetensors_io
  from blox_scale.training import tokenizer as tokenizers
  from blox_scale.training.checkpoint import Checkpointer, save_config
  from blox_scale.training.config import CheckpointConfig, Config, TrainConfig, validate
  from blox_scale.training.optim import make_optimizer
  from blox_scale.training.step import TrainState

  _check_destination(workdir)
  tokenizer = None
  if any((src / name).is_file() for name in (tokenizers.HF_FILE, tokenizers.SENTENCEPIECE_FILE)):
    tokenizer = tokenizers.get_tokenizer(str(src), key='SRC')  # the model's own tokenizer, checked before reading
    tokenizers.check_vocab(tokenizer, hf.read_config(src, dtype)[1].vocab_size, str(src), key='SRC',
                           model_key='vocab_size of its config.json')
  lazy_save.register()
  total = safetensors_io.Reader(src).nbytes()
  with _bar(total, 'convert', progress) as bar:
    model, abstract, sources = hf.param_sources(src, dtype, progress=bar.update)  # checks before writing
    defaults = Config()
    data = dataclasses.replace(defaults.data, seq_len=min(defaults.data.seq_len, model.config.max_seq_len))
    if tokenizer is not None:  # the workdir's own copy (recorded below) is the run's tokenizer
      data = dataclasses.replace(data, tokenizer=str(workdir.absolute() / tokenizers.RUN_TOKENIZER_DIR))
    config = Config(model=model.config, train=TrainConfig(workdir=str(workdir.absolute())), data=data)
    validate(config, files=False)  # no data is read; the destination was checked, the tokenizer copy is made below
    # A fresh (zero) optimizer state, exactly as blox-train would create it, so
    # that `blox-train` resumes at step 0 from these params.
    optimizer, _ = make_optimizer(config.optimizer, config.train.steps)
    abstract_trainable, _ = abstract.split()
    _zero_optimizer_state(optimizer, abstract_trainable)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_trainable)
    is_param = lambda x: isinstance(x, bx.Param)
    opt_state = jax.tree.map(lambda p: _lazy(p) if is_param(p) else np.zeros(p.shape, p.dtype), abstract_opt,
                             is_leaf=is_param)
    rng = model.rng.seed(bx.Params(), seed=0)
    params = bx.Params()
    for path, param in abstract.items():
      params[path] = rng[path] if path in rng else _lazy(param, sources[path][1])
    state = TrainState(step=np.zeros((), np.int32), params=params.locked(), opt_state=opt_state)

    tmp = hf.temp_dir_for(workdir)
    try:
      checkpointer = Checkpointer(tmp, dataclasses.replace(CheckpointConfig(), async_save=False))
      checkpointer.save(0, state)
      checkpointer.close()
      save_config(tmp, config)
      if tokenizer is not None:  # blox-sample and blox-train use this copy
        tokenizers.record(tokenizer, tmp)
      if workdir.exists():
        workdir.rmdir()  # empty (checked above)
      os.replace(tmp, workdir)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  print(f'wrote {workdir} (step 0): blox-sample --checkpoint {workdir} --prompt ...')


def checkpoint_fetch(workdir: Path, step: int | None):
  """-> (model, step, fetch): `fetch(path)` restores that one param of the checkpoint (orbax placeholders
  skip every other array), so an export holds one stacked param at a time, not the model.

  A fine-tuning run's workdir (LoRA, an int8 base) gives its base model and a `fetch` of merged
  arrays: each kernel dequantized with its adapters folded in (`bs.finetune.merged_reader`).
  """
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  import blox as bx
  from blox_scale.models import build_model
  from blox_scale.training.checkpoint import CHECKPOINT_DIR, find_workdir, flat_names, read_config

  workdir, step_from_path = find_workdir(workdir)
  step = step if step is not None else step_from_path
  config = read_config(workdir)
  if config.model.factory:  # before anything is built or read: one line
    raise UsageError(f'model.factory={config.model.factory!r}: {workdir} holds a model built by model.factory, '
                     'not a DecoderLM; blox-to-hf writes only DecoderLM layouts (Llama, Mistral, GPT-2, Mixtral), '
                     "so export this model's params yourself (blox_scale.training.checkpoint.restore_params)")
  model = build_model(config.model)
  adapted = config.finetune.lora.rank > 0 or config.finetune.quant != 'none'
  if adapted:  # a LoRA / int8-base run: its checkpoints hold the adapted model's params
    from blox_scale.training import finetune
    adapted_model = finetune.build_model(config.model, config.finetune)
    stored = finetune.abstract_params(adapted_model, config.finetune, config.train.seed)
  else:
    stored = jax.eval_shape(model.init, 0)
  names, leaves, _ = flat_names(stored)
  abstract = {n: jax.ShapeDtypeStruct(x.shape, x.dtype) for n, x in zip(names, leaves)}
  manager = ocp.CheckpointManager(workdir.absolute() / CHECKPOINT_DIR, options=ocp.CheckpointManagerOptions(create=False))
  step = step if step is not None else manager.latest_step()
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f'{workdir / CHECKPOINT_DIR}: no complete checkpoint at step {step} '
                            f'(available: {sorted(manager.all_steps())})')

  def fetch(path: tuple[str, ...]) -> np.ndarray:
    name = bx.path_to_str(path)
    item = {n: (v if n == name else ocp.PLACEHOLDER) for n, v in abstract.items()}
    restore_args = {n: (ocp.RestoreArgs(restore_type=np.ndarray) if n == name else ocp.PLACEHOLDER) for n in abstract}
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
        item, restore_args=restore_args)))  # host NumPy: no device copy
    return restored['params'][name]

  if adapted:  # the base model's arrays: int8 kernels dequantized, adapters folded in, one kernel at a time
    from blox_scale.finetune import merged_reader
    return model, step, merged_reader(adapted_model, stored, fetch)
  return model, step, fetch


def blox_to_hf(workdir: Path, dst: Path, dtype: str | None, step: int | None, max_shard_size: str,
               progress: bool) -> None:
  """Streams a checkpoint into safetensors: one stacked param and one shard in memory at a time."""
  import jax.numpy as jnp
  import numpy as np

  from blox_scale.interop import hf
  from blox_scale.training.checkpoint import find_workdir
  from blox_scale.training.tokenizer import RUN_TOKENIZER_DIR

  _check_destination(dst)
  try:
    size = hf.parse_size(max_shard_size)
  except ValueError as e:
    raise UsageError(f'--max-shard-size: {e}') from None
  model, step, fetch = checkpoint_fetch(workdir, step)
  plan = hf.expected_tensors(hf.family_for_model(model.config), model.config)
  itemsize = jnp.dtype(dtype or model.config.param_dtype).itemsize
  total = sum(int(np.prod(rule.hf_shape(model.config))) * itemsize for rule, _ in plan.values())
  with _bar(total, 'write', progress) as bar:
    hf.save_from(model, fetch, dst, max_shard_size=size, dtype=dtype, overwrite=True, progress=bar.update)
  recorded = find_workdir(workdir)[0] / RUN_TOKENIZER_DIR
  if recorded.is_dir():  # the run's tokenizer ships with the model, as Hugging Face directories do
    for path in sorted(recorded.glob('tokenizer*')):
      shutil.copyfile(path, dst / path.name)
  print(f'wrote {dst} (step {step}): AutoModelForCausalLM.from_pretrained({str(dst)!r}) reads it')


def _main(argv: list[str]) -> int:
  parser = ArgumentParser(prog=PROG, description='Convert Hugging Face checkpoints to and from blox workdirs.')
  sub = parser.add_subparsers(dest='command', required=True)
  dtypes = ('float32', 'bfloat16', 'float16')
  a = sub.add_parser('hf-to-blox', help='A Hugging Face directory (config.json + safetensors) -> a blox workdir.')
  a.add_argument('src', type=Path, help='Directory with config.json and model.safetensors (or the sharded index).')
  a.add_argument('workdir', type=Path, help='New blox workdir (must not exist or be empty).')
  a.add_argument('--dtype', default='float32', choices=dtypes, help='Param dtype of the blox model.')
  b = sub.add_parser('blox-to-hf', help='A blox workdir -> a Hugging Face directory.')
  b.add_argument('workdir', type=Path, help='A blox workdir (or one of its checkpoint step directories).')
  b.add_argument('dst', type=Path, help='New output directory (must not exist or be empty).')
  b.add_argument('--dtype', default=None, choices=dtypes, help='Stored dtype (default: the params dtype).')
  b.add_argument('--step', type=int, default=None, help='Checkpoint step (default: the latest).')
  b.add_argument('--max-shard-size', default='5GB', help="Shard above this size, e.g. '5GB', '500MiB' or bytes.")
  for p in (a, b):
    p.add_argument('--no-progress', dest='progress', action='store_false', help='No progress bar.')
  args = parser.parse_args(argv)

  from blox_scale.interop.families import UnsupportedConfig
  from blox_scale.interop.hf import ConversionError
  try:
    if args.command == 'hf-to-blox':
      hf_to_blox(args.src, args.workdir, args.dtype, args.progress)
    else:
      blox_to_hf(args.workdir, args.dst, args.dtype, args.step, args.max_shard_size, args.progress)
  except (ConversionError, UnsupportedConfig) as e:  # every offender, one line each
    for key, what, fix in e.problems:
      print(f'{PROG}: error: {key}: {what}; {fix}', file=sys.stderr)
    return EXIT_FAILURE
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run_cli(PROG, _main, argv)


if __name__ == '__main__':
  sys.exit(main())
