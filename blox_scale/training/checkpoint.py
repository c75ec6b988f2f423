"""Checkpoints with orbax: async, atomic, retained, restorable onto any mesh.

Layout of a run's workdir:

    <workdir>/config.yaml                the Config of the run (training/config.py writes and reads it)
    <workdir>/checkpoints/<step>/params  the params, one array per '/'-joined path
    <workdir>/checkpoints/<step>/state   the rest of the train state (step, optimizer state)
    <workdir>/checkpoints/<step>/meta    JSON: step, data iterator state, PRNG key impls

Why flat string keys: `Params` keys are tuples of names and optax states are
nested named tuples; orbax names each array by its tree path, so we give it
one readable name per array ('lm/embed/embedding', 'opt_state/1/mu/lm/...').
The tree structure itself is never stored: restore takes the *abstract*
train state of the current run (shapes, dtypes and the target shardings on
the current mesh) and puts the arrays back into it. That is what makes a
checkpoint restorable onto a different mesh or device count: orbax reads
each array straight into the requested sharding.

Atomicity is orbax's: a save is written to `<step>.orbax-checkpoint-tmp-*`
and renamed when complete (`commit_success.txt` on non-POSIX-rename stores),
and the manager lists only complete steps. A process killed mid-save leaves
a tmp directory that is never restored (tests/test_checkpoint.py kills one).

Typed PRNG keys (the `Rng` seed inside params) are stored as their raw
uint32 key data and re-wrapped on restore.

One restore path: `Checkpointer.restore` (the whole train state, for
training) and `restore_params` (params only, no optimizer: sampling,
conversion, fine-tuning) both read through `_restore_items`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

import blox as bx
from blox.rng import is_key
from blox_scale.models import build_model
from blox_scale.training import integrity
from blox_scale.training.disk import WriteFailed, describe_write_error, fix_for
from blox_scale.training.config import CONFIG_FILE, CheckpointConfig, Config, read_config, save_config

CHECKPOINT_DIR = 'checkpoints'
PARAMS = 'params'  # the train state's params field, and the checkpoint item that holds them

__all__ = ['Checkpointer', 'restore_params', 'load_for_inference', 'flat_names', 'save_config', 'read_config']


class CheckpointSaveError(WriteFailed):
  """A checkpoint could not be written (disk full, permissions); earlier checkpoints are untouched."""


# -----------------------------------------------------------------------------
# Naming: pytree <-> {name: array}
# -----------------------------------------------------------------------------


def flat_names(tree: Any) -> tuple[list[str], list[Any], Any]:
  """`tree` -> (names, leaves, treedef); names are unique '/'-joined paths.

  Named by `bx.key_path_to_str`: `'params/lm/embed/embedding'`; a '/' or '%'
  inside one name is escaped (`%2F`, `%25`), so names never collide by it.
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names, leaves = [], []
  for path, leaf in with_path:
    names.append(bx.key_path_to_str(path) or 'root')
    leaves.append(leaf)
  if len(set(names)) != len(names):
    dupes = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f'Checkpoint names collide: {dupes[:5]}: two leaves of the train state have the same path name. Rename one of them.')
  return names, leaves, treedef


def _split_params(names: list[str], leaves: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Train-state leaves -> ({param name: leaf}, {other name: leaf}): with `_join_params`, the one place of 'params/'."""
  params, rest = {}, {}
  prefix = PARAMS + '/'
  for name, leaf in zip(names, leaves):
    if name.startswith(prefix):
      params[name[len(prefix):]] = leaf
    else:
      rest[name] = leaf
  return params, rest


def _join_params(params: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
  """The inverse of `_split_params`."""
  return {**{f'{PARAMS}/{k}': v for k, v in params.items()}, **rest}


def _to_storable(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
  """Typed keys -> raw uint32 key data; returns (arrays, {name: key impl})."""
  out, impls = {}, {}
  for name, leaf in tree.items():
    if is_key(leaf):
      impls[name] = str(jax.random.key_impl(leaf))
      leaf = jax.random.key_data(leaf)
    out[name] = leaf
  return out, impls


def _abstract_storable(tree: dict[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract leaves (with target shardings) as they are stored (keys as uint32 data)."""
  out = {}
  for name, leaf in tree.items():
    sharding = getattr(leaf, 'sharding', None)
    if is_key(leaf):
      data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
      out[name] = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    else:
      out[name] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
  return out


def _from_storable(tree: dict[str, Any], impls: dict[str, str]) -> dict[str, Any]:
  return {k: jax.random.wrap_key_data(v, impl=impls[k]) if k in impls else v for k, v in tree.items()}


# -----------------------------------------------------------------------------
# The manager
# -----------------------------------------------------------------------------


class Checkpointer:
  """Saves and restores `(train_state, data_state)` under `<workdir>/checkpoints`.

  Every process calls `save` and `restore` (orbax coordinates; only the
  primary process commits). `train_state` is any pytree whose params live
  under a top-level `params` field (the `TrainState` of blox_scale.training.step).
  """

  def __init__(self, workdir: str | Path, cfg: CheckpointConfig):
    self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
    self.cfg = cfg
    if cfg.keep < 1:
      raise ValueError(f'checkpoint.keep={cfg.keep} must be >= 1.')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        keep_period=cfg.keep_every or None,  # orbax keeps steps with step % keep_period == 0
        enable_async_checkpointing=cfg.async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: int | None = None  # the step of the save in flight (checked by `check`)
    self._failed = False

  def check(self, block: bool = False) -> None:
    """Raises CheckpointSaveError as soon as a background save is known to have failed.

    Cheap (no I/O while a save is in flight): call it every step. orbax logs a
    failed async save and reports it only at the next save; a finished save
    whose step directory never appeared is a failure, and waiting on the
    manager then raises its cause.
    """
    if self._pending is None or (not block and self.manager.is_saving_in_progress()):
      return
    step, self._pending = self._pending, None
    cause: BaseException | None = None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001  (the write error, wrapped by orbax's threads)
      cause = e
    if cause is None and (self.directory / str(step)).is_dir():
      return
    self._failed = True
    detail = describe_write_error(cause) if cause is not None else 'the step directory was not committed'
    kept = ', '.join(map(str, self.all_steps())) or 'none'
    raise CheckpointSaveError(f'{self.directory}/{step}: saving the checkpoint failed: {detail}; the earlier '
                              f'checkpoints ({kept}) are intact; {fix_for(cause)}') from cause

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (tmp directories of interrupted saves are ignored)."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  @property
  def enabled(self) -> bool:
    """False with `checkpoint.every=0` (e.g. benchmarks): nothing is ever saved."""
    return self.cfg.every > 0

  def should_save(self, step: int) -> bool:
    """The cadence `checkpoint.every`: True at every multiple of it (never when disabled)."""
    return self.enabled and step % self.cfg.every == 0

  def save(self, step: int, train_state: Any, data_state: dict[str, Any] | None = None) -> None:
    """Starts an (async) save of `train_state` at `step`; returns once arrays are copied off device.

    The caller must make sure the state is finite first (the trainer does).
    """
    names, leaves, _ = flat_names(train_state)
    params, rest = _split_params(names, leaves)
    params, impls = _to_storable(params)
    rest, rest_impls = _to_storable(rest)
    meta = {'step': int(step), 'data': data_state, 'key_impls': _join_params(impls, rest_impls),
            # Content fingerprints of the arrays as stored, checked by every restore (integrity.py).
            integrity.FINGERPRINT_KEY: integrity.fingerprints(_join_params(params, rest))}
    # An earlier failed save is reported, not buried under this one (orbax waits for it anyway).
    self.check(block=True)
    try:
      self.manager.save(int(step), args=ocp.args.Composite(
          params=ocp.args.StandardSave(params),
          state=ocp.args.StandardSave(rest),
          meta=ocp.args.JsonSave(meta),
      ), force=True)
    except Exception as e:  # noqa: BLE001  (a synchronous write failure: same report)
      self._failed = True
      kept = ', '.join(str(s) for s in self.all_steps() if s != int(step)) or 'none'
      raise CheckpointSaveError(f'{self.directory}/{step}: saving the checkpoint failed: {describe_write_error(e)}; '
                                f'the earlier checkpoints ({kept}) are intact; {fix_for(e)}') from e
    self._pending = int(step)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any] | None]:
    """-> (train_state placed with the shardings of `abstract_state`, data iterator state).

    `abstract_state`: the train state as `jax.ShapeDtypeStruct`s carrying the
    target shardings (e.g. `jax.eval_shape` of the sharded init). The mesh
    may differ from the one that saved.
    """
    names, leaves, treedef = flat_names(abstract_state)
    params, rest = _split_params(names, leaves)
    (params_out, rest_out), meta = _restore_items(self.manager, step, params, rest)
    values = _join_params(params_out, rest_out)
    return jax.tree_util.tree_unflatten(treedef, [values[n] for n in names]), meta.get('data')

  def restore_latest(self, abstract_state: Any, report: Any = print) -> tuple[int, Any, dict[str, Any] | None] | None:
    """-> `(step, train_state, data_state)` of the newest checkpoint that verifies, or None if there is none.

    A checkpoint that cannot be read, does not match its fingerprints or has
    non-finite params is reported (`report`, one line) and moved to
    `<workdir>/checkpoints.corrupt/` (renamed, never deleted); the previous one
    is tried next. When checkpoints existed (or were set aside before) but
    none is good: CheckpointCorruptError, a one-line refusal with the fix.
    """
    for step in reversed(self.all_steps()):
      try:
        state, data_state = self.restore(step, abstract_state)
        return step, state, data_state
      except integrity.CheckpointCorruptError as e:
        moved = self._set_aside(step)
        report(f'blox: warning: checkpoint {step} is bad: {e}; moved to {moved}; trying the previous one')
    corrupt = self.directory.parent / integrity.CORRUPT_DIR
    if corrupt.is_dir() and any(corrupt.iterdir()):
      raise integrity.CheckpointCorruptError(
          self.directory, f'no good checkpoint left (the bad ones are in {corrupt}); start fresh with '
          'checkpoint.resume=false or a new train.workdir, or put a good checkpoint back')
    return None

  def _set_aside(self, step: int) -> Path:
    """Moves a bad step directory out of orbax's sight (the primary process; the others wait)."""
    from blox_scale.parallel import distributed
    step_dir = self.directory / str(step)
    moved = integrity.set_aside(step_dir) if jax.process_index() == 0 else self.directory.parent / integrity.CORRUPT_DIR / str(step)
    distributed.barrier(f'blox_set_aside_{step}')
    self.manager.reload()
    return moved

  def wait(self) -> None:
    """Blocks until background saves are committed; CheckpointSaveError if one failed."""
    self.check(block=True)

  def close(self) -> None:
    """Waits for saves and releases orbax's threads (after a failed save: without raising again)."""
    try:
      self.manager.wait_until_finished()
    except Exception:  # noqa: BLE001
      if not self._failed:
        raise
    self.manager.close()


def _restore_items(manager: ocp.CheckpointManager, step: int, params: dict[str, Any],
                   rest: dict[str, Any] | None = None) -> tuple[tuple[dict[str, Any], dict[str, Any]], dict[str, Any]]:
  """Reads `params` (and, unless None, the other train-state leaves `rest`) of checkpoint `step`.

  params/rest: {name: abstract leaf with its target sharding}. Returns
  `((params, rest), meta)` as {name: array}, typed keys re-wrapped; a name
  missing from the checkpoint or left over in it is an error.
  """
  items = {PARAMS: params} if rest is None else {PARAMS: params, 'state': rest}
  path = Path(manager.directory) / str(step)
  reason = None
  with integrity.quiet_unraisable():  # orbax's abandoned coroutines would each print a traceback
    try:
      restored = manager.restore(int(step), args=ocp.args.Composite(
          **{item: ocp.args.StandardRestore(_abstract_storable(tree)) for item, tree in items.items()},
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001  (orbax/tensorstore: missing, truncated or garbled files)
      reason = 'cannot be read: ' + ' '.join(str(e).split('See full TensorStore details')[0].split())[:200]
  if reason is not None:
    raise integrity.CheckpointCorruptError(path, reason)
  meta = restored['meta']
  stored = _join_params(dict(restored[PARAMS]), dict(restored['state']) if rest is not None else {})
  integrity.verify(path, stored, meta.get(integrity.FINGERPRINT_KEY), restored[PARAMS])
  impls = meta.get('key_impls', {})
  params_impls, state_impls = _split_params(list(impls), list(impls.values()))
  out = {PARAMS: _from_storable(dict(restored[PARAMS]), params_impls)}
  if rest is not None:
    out['state'] = _from_storable(dict(restored['state']), state_impls)
  for item, tree in items.items():
    wanted, got = set(tree), set(out[item])
    if wanted != got:
      missing, extra = sorted(wanted - got), sorted(got - wanted)
      raise ValueError(f'Checkpoint {manager.directory}/{step}/{item} does not match the model: missing {missing[:5]}, '
                       f'unexpected {extra[:5]}. Was it written by a different config?')
  return (out[PARAMS], out.get('state', {})), meta


# -----------------------------------------------------------------------------
# Params only: inference, conversion
# -----------------------------------------------------------------------------


def _locate(path: Path) -> tuple[Path, int | None]:
  """`path` may be a workdir, its checkpoints/ dir, or one step dir -> (checkpoints dir, step or None)."""
  path = path.absolute()
  if (path / CHECKPOINT_DIR).is_dir():
    return path / CHECKPOINT_DIR, None
  if path.name == CHECKPOINT_DIR:
    return path, None
  if path.parent.name == CHECKPOINT_DIR and path.name.isdigit():
    return path.parent, int(path.name)
  raise FileNotFoundError(f'No {CHECKPOINT_DIR}/ at {path}: pass a run workdir (the train.workdir of the run), '
                          'its checkpoints/ directory or one step directory.')


def restore_params(path: str | Path, target: Any, step: int | None = None) -> Any:
  """Params only (no optimizer state) of a checkpoint.

  path: a run workdir, its checkpoints/ dir, or one step dir.
  target: the abstract params (`jax.ShapeDtypeStruct`s; a leaf's `sharding`,
    if set, is where it is placed, else this process's first device), or a
    model with `init(seed)` (e.g. `build_model(config.model)`).
  step: defaults to the step dir given as `path`, else the latest complete
    checkpoint.
  """
  directory, step_from_path = _locate(Path(path))
  abstract = jax.eval_shape(target.init, 0) if hasattr(target, 'init') else target
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None) or device), abstract)
  # Not read_only=True: that only adds warnings; this manager never saves.
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    pinned = step if step is not None else step_from_path
    candidates = [pinned] if pinned is not None else sorted(manager.all_steps(), reverse=True)
    if not candidates:
      raise FileNotFoundError(f'No complete checkpoint in {directory}.')
    names, leaves, treedef = flat_names(abstract)
    for i, step in enumerate(candidates):
      try:
        (values, _), _ = _restore_items(manager, step, dict(zip(names, leaves)))
        break
      except integrity.CheckpointCorruptError as e:
        if i + 1 == len(candidates):
          raise  # a pinned step, or no good one left: one line, the path and what is wrong
        print(f'blox: warning: checkpoint {step} is bad: {e}; using checkpoint {candidates[i + 1]}',
              file=sys.stderr, flush=True)
  finally:
    manager.close()
  return jax.tree_util.tree_unflatten(treedef, [values[n] for n in names])


def find_workdir(path: str | Path) -> tuple[Path, int | None]:
  """`(workdir, step or None)`; `path` may be a workdir, its checkpoints/ dir, or one step dir."""
  path = Path(path).absolute()
  for candidate, step in ((path, None), (path.parent, None), (path.parent.parent, path.name)):
    if (candidate / CONFIG_FILE).exists():
      return candidate, int(step) if step is not None and str(step).isdigit() else None
  raise FileNotFoundError(f'No {CONFIG_FILE} found at {path} or its parents: pass the run workdir '
                          '(the train.workdir of the run, e.g. runs/tiny).')


def load_for_inference(path: str | Path, step: int | None = None) -> tuple[Config, Any, Any]:
  """`(config, model, params)` from a run's workdir, on this process's first device.

  The model is `build_model(config.model)` (a fine-tuning run's with its
  LoRA / int8 base wrapped in: `bs.finetune.merge` folds them); the params
  come from `restore_params` (no optimizer state). `step` defaults to the
  latest complete checkpoint (or the step dir given as `path`).
  """
  from blox_scale.training import finetune

  workdir, step_from_path = find_workdir(Path(path))
  config = read_config(workdir)
  model = finetune.build_model(config.model, config.finetune)
  target = finetune.abstract_params(model, config.finetune, config.train.seed) if config.finetune.init_from else model
  params = restore_params(workdir, target, step if step is not None else step_from_path)
  return config, model, params
