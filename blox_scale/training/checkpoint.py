"""Checkpoints with orbax: async, atomic, retained, restorable onto any mesh.

Layout of a run's workdir:

    <workdir>/config.yaml                the Config of the run (load_for_inference reads it)
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
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml

import blox as bx
from blox.rng import is_key
from blox_scale.training.config import CheckpointConfig, Config, merge_into, to_yaml, validate

CONFIG_FILE = 'config.yaml'
CHECKPOINT_DIR = 'checkpoints'


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions); earlier checkpoints are untouched."""


def describe_write_error(exc: BaseException) -> str:
  """`<path>: <strerror> (errno N, ENAME)` from an OSError or tensorstore's message, else its first line."""
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno:
      return f'{e.filename or "?"}: {e.strerror} (errno {e.errno}, {errno.errorcode.get(e.errno, "?")})'
  text = ' '.join(str(exc).split())
  code = re.search(r"os_error_code='?(\d+)", text)
  path = re.search(r'Failed writing: "([^"]+)"', text) or re.search(r'local file "([^"]+)"', text)
  if code:
    n = int(code.group(1))
    return f'{path.group(1) if path else "?"}: {os.strerror(n)} (errno {n}, {errno.errorcode.get(n, "?")})'
  return text[:300]


def _chain(exc: BaseException | None) -> list[BaseException]:
  out = []
  while exc is not None and exc not in out:
    out.append(exc)
    exc = exc.__cause__ or exc.__context__
  return out


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
  """Train-state leaves -> ({param name: leaf}, {other name: leaf})."""
  params, rest = {}, {}
  for name, leaf in zip(names, leaves):
    if name.startswith('params/'):
      params[name[len('params/'):]] = leaf
    else:
      rest[name] = leaf
  return params, rest


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
                              f'checkpoints ({kept}) are intact. Free space or fix permissions, then rerun to resume') from cause

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (tmp directories of interrupted saves are ignored)."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, train_state: Any, data_state: dict[str, Any] | None = None) -> None:
    """Starts an (async) save of `train_state` at `step`; returns once arrays are copied off device.

    The caller must make sure the state is finite first (the trainer does).
    """
    names, leaves, _ = flat_names(train_state)
    params, rest = _split_params(names, leaves)
    params, impls = _to_storable(params)
    rest, rest_impls = _to_storable(rest)
    meta = {'step': int(step), 'data': data_state, 'key_impls': {**{f'params/{k}': v for k, v in impls.items()}, **rest_impls}}
    self.check()  # an earlier failed save is reported, not buried under this one
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
                                f'the earlier checkpoints ({kept}) are intact. Free space or fix permissions, then '
                                'rerun to resume') from e
    self._pending = int(step)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any] | None]:
    """-> (train_state placed with the shardings of `abstract_state`, data iterator state).

    `abstract_state`: the train state as `jax.ShapeDtypeStruct`s carrying the
    target shardings (e.g. `jax.eval_shape` of the sharded init). The mesh
    may differ from the one that saved.
    """
    names, leaves, treedef = flat_names(abstract_state)
    params, rest = _split_params(names, leaves)
    restored = self.manager.restore(int(step), args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract_storable(params)),
        state=ocp.args.StandardRestore(_abstract_storable(rest)),
        meta=ocp.args.JsonRestore(),
    ))
    meta = restored['meta']
    impls = meta.get('key_impls', {})
    params_out = _from_storable(dict(restored['params']), {k[len('params/'):]: v for k, v in impls.items() if k.startswith('params/')})
    rest_out = _from_storable(dict(restored['state']), impls)
    _check_names(set(params), set(params_out), 'params', step, self.directory)
    _check_names(set(rest), set(rest_out), 'state', step, self.directory)
    values = [params_out[n[len('params/'):]] if n.startswith('params/') else rest_out[n] for n in names]
    return jax.tree_util.tree_unflatten(treedef, values), meta.get('data')

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


def _check_names(wanted: set[str], got: set[str], item: str, step: int, directory: Path) -> None:
  if wanted != got:
    missing, extra = sorted(wanted - got), sorted(got - wanted)
    raise ValueError(f'Checkpoint {directory}/{step}/{item} does not match the model: missing {missing[:5]}, '
                     f'unexpected {extra[:5]}. Was it written by a different config?')


# -----------------------------------------------------------------------------
# Config and inference loading
# -----------------------------------------------------------------------------


def save_config(workdir: str | Path, config: Config) -> None:
  """Writes `<workdir>/config.yaml` (primary process only)."""
  path = Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.yaml.tmp')
  tmp.write_text(to_yaml(config))
  tmp.replace(path)  # atomic: a reader never sees half a file


def read_config(workdir: str | Path) -> Config:
  path = Path(workdir) / CONFIG_FILE
  config = merge_into(Config(), yaml.safe_load(path.read_text()))
  validate(config, files=False)  # the run's data may have moved since; sampling does not read it
  return config


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

  Restores the params only (no optimizer state). `step` defaults to the
  latest complete checkpoint (or the step dir given as `path`).
  """
  from blox_scale.models import DecoderLM

  workdir, step_from_path = find_workdir(Path(path))
  config = read_config(workdir)
  model = DecoderLM(bx.Graph('lm'), config.model)
  abstract = jax.eval_shape(model.init, config.train.seed)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  # Not read_only=True: that only adds warnings; this manager never saves.
  manager = ocp.CheckpointManager(workdir / CHECKPOINT_DIR, options=ocp.CheckpointManagerOptions(create=False))
  step = step if step is not None else step_from_path if step_from_path is not None else manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'No complete checkpoint in {workdir / CHECKPOINT_DIR}.')
  names, leaves, treedef = flat_names(abstract)
  wanted = dict(zip(names, leaves))
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract_storable(wanted)), meta=ocp.args.JsonRestore()))
  impls = {k[len('params/'):]: v for k, v in restored['meta'].get('key_impls', {}).items() if k.startswith('params/')}
  values = _from_storable(dict(restored['params']), impls)
  _check_names(set(names), set(values), 'params', step, workdir / CHECKPOINT_DIR)
  manager.close()
  params = jax.tree_util.tree_unflatten(treedef, [values[n] for n in names])
  return config, model, params
