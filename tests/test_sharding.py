"""Logical axis rules -> meshes, param / optimizer-state / batch shardings, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import blox as bx
from blox_scale.parallel import distributed
from blox_scale.parallel import sharding
from blox_scale.training.config import MeshConfig, load_config
from blox_scale.models import DecoderLM


def tiny(**model):
  overrides = {'num_layers': 2, 'd_model': 32, 'num_heads': 4, 'mlp_dim': 64, 'max_seq_len': 16, **model}
  cfg = load_config(None, [f'model.{k}={v}' for k, v in overrides.items()] + ['data.seq_len=16'])
  return cfg, DecoderLM(bx.Graph('lm'), cfg.model)


def mesh_of(data=1, fsdp=1, tensor=1, n=None):
  devices = jax.devices()[:n or data * fsdp * tensor]
  return sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices)


RULES = sharding.rules_from_config(MeshConfig())


# -- meshes -------------------------------------------------------------------


def test_make_mesh_fills_minus_one_and_names_axes():
  mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
  assert mesh.axis_names == ('data', 'fsdp', 'expert', 'tensor')
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 2}
  assert mesh.devices.size == 8
  one = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  assert dict(one.shape) == {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}


@pytest.mark.parametrize('sizes, match', [
    (dict(data=3, fsdp=1, tensor=1), r'multiply to 3, but there are 8 devices'),
    (dict(data=-1, fsdp=3, tensor=1), r'Cannot fill mesh.data: 8 devices are not divisible'),
    (dict(data=-1, fsdp=-1, tensor=1), r'at most one may be -1'),
    (dict(data=0, fsdp=8, tensor=1), r'each must be >= 1'),
])
def test_make_mesh_errors(sizes, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(MeshConfig(**sizes))


# -- params -------------------------------------------------------------------


def test_param_shardings_follow_logical_axes():
  _, model = tiny()
  abstract = jax.eval_shape(model.init, 0)
  mesh = mesh_of(2, 2, 2)
  shardings = sharding.param_shardings(abstract, mesh, RULES)
  # Same pytree structure as the Params (Param nodes keep their metadata).
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
  specs = {'/'.join(k): p.value.spec for k, p in shardings.items()}
  assert specs['lm/embed/embedding'] == P('tensor', 'fsdp')                   # (vocab, embed)
  assert specs['lm/layers/block/mlp/wi_up/kernel'] == P(None, 'fsdp', 'tensor')  # (layers, embed, mlp)
  assert specs['lm/layers/block/attn/q'] == P(None, 'fsdp', 'tensor', None)    # (layers, embed, heads, head_dim)
  assert specs['lm/rng/counter'] == P()
  for p in shardings.values():
    assert isinstance(p.value, NamedSharding) and p.value.mesh is mesh


def test_param_not_divisible_is_an_error_naming_path_dim_and_axis():
  _, model = tiny(num_heads=2, d_model=32)  # 2 heads cannot split over tensor=4
  abstract = jax.eval_shape(model.init, 0)
  with pytest.raises(ValueError) as e:
    sharding.param_shardings(abstract, mesh_of(1, 2, 4), RULES)
  msg = str(e.value)
  assert 'lm/layers/block/attn/' in msg
  assert re.search(r"dimension 2 \('(kv_)?heads', size 2\)", msg), msg
  assert "mesh axis 'tensor' of size 4" in msg
  assert re.search(r'mesh\.rules\.(kv_)?heads=null', msg)  # says how to fix it


def test_rank_mismatch_and_unknown_mesh_axis_are_errors():
  mesh = mesh_of(1, 2, 1)
  bad_rank = bx.Params({('m', 'w'): bx.Param(jax.ShapeDtypeStruct((4, 4), jnp.float32), metadata={'sharding': ('embed', None, None)})})
  with pytest.raises(ValueError, match=r"Param m/w: 3 logical axes \('embed', None, None\) for shape \(4, 4\)"):
    sharding.param_shardings(bad_rank, mesh, RULES)
  ok = bx.Params({('m', 'w'): bx.Param(jax.ShapeDtypeStruct((4,), jnp.float32), metadata={'sharding': ('embed',)})})
  with pytest.raises(ValueError, match=r"mesh.rules\['embed'\] maps to mesh axis 'pipeline'"):
    sharding.param_shardings(ok, mesh, {**RULES, 'embed': 'pipeline'})


def test_optimizer_state_shardings_mirror_params():
  _, model = tiny()
  abstract = jax.eval_shape(model.init, 0)
  trainable, _ = abstract.split()
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  opt_state = jax.eval_shape(opt.init, trainable)
  mesh = mesh_of(1, 4, 2)
  param_sh = sharding.param_shardings(trainable, mesh, RULES)
  state_sh = sharding.state_shardings(opt_state, mesh, RULES)
  adam = state_sh[1][0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(param_sh)
  for path, p in param_sh.items():
    assert adam.mu[path].value == p.value and adam.nu[path].value == p.value
  assert adam.count.spec == P()  # scalars replicated
  # Per-device bytes: Adam's two moments shard exactly like the params.
  per_device = sharding.shard_bytes(trainable, param_sh)
  total = sum(np.prod(p.shape) * 4 for p in trainable.values())
  assert per_device < total
  moments = (opt_state[1][0].mu, opt_state[1][0].nu)
  assert sharding.shard_bytes(moments, (adam.mu, adam.nu)) == 2 * per_device


# -- activations and batches -------------------------------------------------


def test_logical_to_spec_and_constrain():
  assert sharding.logical_to_spec(('batch', 'seq', 'embed'), RULES) == P(('data', 'fsdp', 'expert'), None, None)
  seq_rules = {**RULES, 'seq': 'tensor'}
  assert sharding.logical_to_spec(('batch', 'seq', 'embed'), seq_rules) == P(('data', 'fsdp', 'expert'), 'tensor', None)
  x = jnp.arange(8 * 4 * 2, dtype=jnp.float32).reshape(8, 4, 2)
  assert sharding.constrain(x, ('batch', 'seq', 'embed')) is x  # no rules: a no-op
  mesh = mesh_of(2, 2, 2)

  def f(x):
    with sharding.use_mesh_rules(mesh, seq_rules):
      return sharding.constrain(x * 2, ('batch', 'seq', 'embed'))

  y = jax.jit(f)(x)
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(('data', 'fsdp'), 'tensor', None)), 3)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
  with pytest.raises(ValueError, match='2 logical axes'):
    with sharding.use_mesh_rules(mesh, RULES):
      sharding.constrain(x, ('batch', 'seq'))


def test_batch_sharding_and_global_batch_on_one_process():
  mesh = mesh_of(2, 2, 2)
  assert sharding.num_batch_shards(mesh, RULES) == 4
  assert distributed.process_batch_slice(8, mesh, RULES) == slice(0, 8)  # one process: all rows
  local = {'inputs': np.arange(8 * 3, dtype=np.int32).reshape(8, 3), 'mask': np.ones((8, 3), np.float32)}
  batch = distributed.make_global_batch(local, mesh, RULES)
  assert batch['inputs'].shape == (8, 3)
  assert batch['inputs'].sharding.is_equivalent_to(NamedSharding(mesh, P(('data', 'fsdp'), None)), 2)
  np.testing.assert_array_equal(np.asarray(batch['inputs']), local['inputs'])
  assert distributed.is_primary()
  with pytest.raises(ValueError, match=r'data.batch_size=6 is not divisible by the 4 batch shards'):
    distributed.process_batch_slice(6, mesh, RULES)
