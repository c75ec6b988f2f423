"""orbax checkpoints: exact round trip, other meshes, retention, atomicity, inference load."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blox as bx
from blox_scale.training.checkpoint import Checkpointer, flat_names, load_for_inference, restore_params, save_config
from blox_scale.training.config import CheckpointConfig, Config, MeshConfig, ModelConfig, load_config
from blox_scale.models import DecoderLM
from blox_scale.training.optim import make_optimizer
from blox_scale.parallel.sharding import batch_sharding, make_mesh, rules_from_config, with_shardings
from blox_scale.training.step import abstract_train_state, init_train_state, make_train_step, train_state_shardings

from helpers import tree_allclose, xla_flags

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, max_seq_len=16, remat='none')


def _setup(mesh_cfg: MeshConfig, devices=None):
  mesh = make_mesh(mesh_cfg, devices)
  rules = rules_from_config(mesh_cfg)
  model = DecoderLM(bx.Graph('lm'), MODEL)
  optimizer, _ = make_optimizer(Config().optimizer, 10)
  return mesh, rules, model, optimizer


def _trained_state(mesh, rules, model, optimizer, steps=2):
  """A state with non-trivial optimizer moments and RNG counters."""
  state = init_train_state(model, optimizer, 0, mesh, rules)
  shardings = train_state_shardings(abstract_train_state(model, optimizer, 0), mesh, rules)
  step = make_train_step(model, optimizer, mesh, rules, shardings, batch_sharding(mesh, rules))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 9)), jnp.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': jnp.ones((8, 8), jnp.float32)}
  for _ in range(steps):
    state, _ = step(state, batch)
  return state


def _abstract_on(mesh, rules, model, optimizer):
  abstract = abstract_train_state(model, optimizer, 0)
  return with_shardings(abstract, train_state_shardings(abstract, mesh, rules))


def _host(tree):
  """Leaves as numpy (typed keys as their raw data) for exact comparison."""
  return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x), tree)


def test_names_are_readable_strings():
  mesh, rules, model, optimizer = _setup(MeshConfig(data=1), jax.devices()[:1])
  names, _, _ = flat_names(abstract_train_state(model, optimizer, 0))
  assert 'params/lm/embed/embedding' in names and 'step' in names
  assert 'params/lm/rng/seed' in names
  assert any(n.startswith('opt_state/') and n.endswith('/mu/lm/embed/embedding') for n in names), names


@pytest.fixture(scope='module')
def trained():
  """One compiled step on a (2, 2, 2) mesh, shared: compiling dominates these tests."""
  mesh, rules, model, optimizer = _setup(MeshConfig(data=2, fsdp=2, tensor=2))
  return mesh, rules, model, optimizer, _trained_state(mesh, rules, model, optimizer)


def test_round_trip_is_exact_including_rng_and_data_state(tmp_path, trained):
  mesh, rules, model, optimizer, state = trained
  ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=True))
  ckpt.save(2, state, {'next_index': 17})
  ckpt.wait()
  restored, data_state = ckpt.restore(2, _abstract_on(mesh, rules, model, optimizer))
  assert data_state == {'next_index': 17}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  seed = restored.params[('lm', 'rng', 'seed')].value
  assert jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key)
  tree_allclose(_host(restored), _host(state), rtol=0, atol=0)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
  ckpt.close()


@pytest.mark.parametrize('target', ['one_device', 'fsdp4'])
def test_restore_onto_a_different_mesh(tmp_path, target, trained):
  mesh, rules, model, optimizer, state = trained
  ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
  ckpt.save(2, state, None)
  if target == 'one_device':
    mesh2, rules2, *_ = _setup(MeshConfig(data=1), jax.devices()[:1])
  else:
    mesh2, rules2, *_ = _setup(MeshConfig(data=1, fsdp=4, tensor=1), jax.devices()[4:])
  restored, _ = ckpt.restore(2, _abstract_on(mesh2, rules2, model, optimizer))
  tree_allclose(_host(restored), _host(state), rtol=0, atol=0)
  want = train_state_shardings(restored, mesh2, rules2)
  for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)  # placed for the new mesh
  ckpt.close()


def test_keep_last_k_and_every_mth(tmp_path):
  ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=2, keep_every=4, async_save=True))
  state = {'params': bx.Params({('w',): bx.Param(jnp.zeros(3))}), 'step': jnp.int32(0)}
  for step in range(1, 10):
    ckpt.save(step, {**state, 'step': jnp.int32(step)})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8, 9]
  ckpt.close()
  # The cadence belongs to the same section: checkpoint.every (0 disables).
  assert [s for s in (99, 100, 150, 200) if ckpt.should_save(s)] == [100, 200]  # every=100
  off = Checkpointer(tmp_path / 'off', CheckpointConfig(every=0))
  assert not off.enabled and not off.should_save(100)
  off.close()


_CRASHING_SAVE = textwrap.dedent('''
    import os, signal, sys
    import jax.numpy as jnp
    import blox as bx
    from blox_scale.training.checkpoint import Checkpointer
    from blox_scale.training.config import CheckpointConfig
    from orbax.checkpoint._src.path import atomicity

    ckpt = Checkpointer(sys.argv[1], CheckpointConfig(async_save=True))
    state = lambda v: {'params': bx.Params({('w',): bx.Param(jnp.full((256, 256), v))}), 'step': jnp.int32(v)}
    ckpt.save(1, state(1.0), {'next_index': 1})
    ckpt.wait()
    # The next save dies after writing its arrays, right before orbax's
    # atomic rename makes it visible: what a kill or power loss mid-save does.
    async def die(self, *args, **kwargs):
      os.kill(os.getpid(), signal.SIGKILL)
    atomicity.AtomicRenameTemporaryPath.finalize = die
    ckpt.save(2, state(2.0), {'next_index': 2})
    ckpt.wait()
    print('not reached')
''')


@pytest.mark.slow
def test_crash_mid_save_never_leaves_a_good_looking_checkpoint(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags()}
  proc = subprocess.run([sys.executable, '-c', _CRASHING_SAVE, str(tmp_path)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert 'not reached' not in proc.stdout
  leftovers = [p.name for p in (tmp_path / 'checkpoints').iterdir()]
  assert any('tmp' in name for name in leftovers), leftovers  # the half-written step 2 is there...
  ckpt = Checkpointer(tmp_path, CheckpointConfig())
  assert ckpt.all_steps() == [1]  # ...but never listed
  abstract = {'params': bx.Params({('w',): bx.Param(jax.ShapeDtypeStruct((256, 256), jnp.float32))}),
              'step': jax.ShapeDtypeStruct((), jnp.int32)}
  restored, data_state = ckpt.restore(ckpt.latest_step(), abstract)
  assert data_state == {'next_index': 1}
  np.testing.assert_array_equal(np.asarray(restored['params'][('w',)].value), np.ones((256, 256)))
  # Saving again after the crash works.
  ckpt.save(2, restored, {'next_index': 2})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


def test_load_for_inference(tmp_path, trained):
  cfg = load_config(None, [f'model.{f.name}={getattr(MODEL, f.name)}' for f in dataclasses.fields(MODEL)
                           if f.name in ('d_model', 'num_layers', 'num_heads', 'mlp_dim', 'max_seq_len', 'remat')]
                    + ['data.seq_len=8'])
  *_, state = trained
  save_config(tmp_path, cfg)
  ckpt = Checkpointer(tmp_path, cfg.checkpoint)
  ckpt.save(2, state, {'next_index': 2})
  ckpt.close()
  for path in (tmp_path, tmp_path / 'checkpoints', tmp_path / 'checkpoints' / '2'):
    config, lm, params = load_for_inference(path)
    assert config == cfg
    tree_allclose(_host(params), _host(state.params), rtol=0, atol=0)
  logits, _ = lm(params, jnp.zeros((1, 4), jnp.int32))
  assert logits.shape == (1, 4, 256)
  # The params-only restore that load_for_inference (and conversion) use, from a model or abstract params.
  tree_allclose(_host(restore_params(tmp_path / 'checkpoints', lm)), _host(state.params), rtol=0, atol=0)
  tree_allclose(_host(restore_params(tmp_path, jax.eval_shape(lm.init, 0), step=2)), _host(state.params), rtol=0, atol=0)
  with pytest.raises(FileNotFoundError, match='config.yaml'):
    load_for_inference(tmp_path / 'checkpoints' / '2' / 'params' / 'nowhere')
