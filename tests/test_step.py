"""The sharded train step: same numbers on any mesh, accumulation, safety, sharded init."""

import jax
import numpy as np
import optax
import pytest
from helpers import tree_allclose
from jax.sharding import NamedSharding, PartitionSpec as P

import blox as bx
from blox_scale.parallel import sharding
from blox_scale.training.config import MeshConfig, load_config
from blox_scale.models import DecoderLM
from blox_scale.training.step import (TrainState, abstract_train_state, init_train_state, make_eval_step,
                                      make_train_step, sharded_init_fn, train_state_shardings)

RULES = sharding.rules_from_config(MeshConfig())
SEQ = 16


def tiny_model(**model):
  overrides = {'num_layers': 2, 'd_model': 32, 'num_heads': 4, 'mlp_dim': 64, 'max_seq_len': SEQ, **model}
  cfg = load_config(None, [f'model.{k}={v}' for k, v in overrides.items()] + [f'data.seq_len={SEQ}'])
  return DecoderLM(bx.Graph('lm'), cfg.model)


def mesh_of(data=1, fsdp=1, tensor=1):
  return sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:data * fsdp * tensor])


def make_batch(step, batch=8, ragged=False):
  rng = np.random.default_rng(step)
  tokens = rng.integers(0, 256, (batch, SEQ + 1), dtype=np.int32)
  mask = np.ones((batch, SEQ), np.float32)
  if ragged:  # different token counts per row: accumulation must weight by tokens
    for i in range(batch):
      mask[i, rng.integers(2, SEQ):] = 0
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': mask}


def plain(tree):
  """Host numpy copies; typed RNG keys as their raw key data."""
  def one(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


# One model and optimizer for the whole file, and one compiled step per
# (mesh, rules): compiles dominate this file's run time on 2 shared cores.
MODEL = tiny_model()
OPTIMIZER = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2)
_STEPS: dict = {}


def train_step_of(model, optimizer, mesh, rules, **kw):
  """`make_train_step` with the shardings computed once, as blox-train does."""
  shardings = train_state_shardings(abstract_train_state(model, optimizer), mesh, rules)
  return make_train_step(model, optimizer, mesh, rules, shardings, sharding.batch_sharding(mesh, rules), **kw)


def step_for(mesh, rules):
  key = (tuple(mesh.shape.items()), tuple(mesh.devices.flat), tuple(sorted((k, str(v)) for k, v in rules.items())))
  if key not in _STEPS:
    _STEPS[key] = train_step_of(MODEL, OPTIMIZER, mesh, rules)
  return _STEPS[key]


def train(mesh, rules, steps=3):
  state = init_train_state(MODEL, OPTIMIZER, 0, mesh, rules)
  step = step_for(mesh, rules)
  history = []
  for i in range(steps):
    state, metrics = step(state, make_batch(i))
    history.append(jax.device_get(metrics))
  return state, history


@pytest.fixture(scope='module')
def reference():
  """Three steps on one device: the numbers every mesh must reproduce."""
  return train(mesh_of(), RULES)


@pytest.mark.slow
@pytest.mark.parametrize('rules', [RULES, {**RULES, 'seq': 'tensor'}], ids=['dp-fsdp-tp', 'plus-seq-sharding'])
def test_2x2x2_mesh_matches_one_device(reference, rules):
  ref_state, ref_hist = reference
  mesh = mesh_of(2, 2, 2)
  state, hist = train(mesh, rules)
  # Collectives change the f32 summation order only.
  for got, want in zip(hist, ref_hist):
    np.testing.assert_allclose(got['loss'], want['loss'], rtol=2e-6)
    np.testing.assert_allclose(got['grad_norm'], want['grad_norm'], rtol=1e-4)
    assert got['finite'] and got['tokens'] == want['tokens']
  assert ref_hist[-1]['loss'] < ref_hist[0]['loss']
  # Adam divides by sqrt(v): for a rarely seen token's embedding row the
  # gradient is tiny and summation-order noise moves the update by ~1e-5
  # (against updates of ~1e-2), hence the absolute tolerance.
  tree_allclose(plain(state.params.values_dict()), plain(ref_state.params.values_dict()), rtol=1e-4, atol=1e-4)
  # The params stayed sharded as the rules say (not gathered by the step).
  emb = state.params[('lm', 'embed', 'embedding')].value
  assert emb.sharding.is_equivalent_to(NamedSharding(mesh, P('tensor', 'fsdp')), 2)
  assert int(state.step) == 3


@pytest.mark.slow
def test_grad_accumulation_equals_the_full_batch_gradient():
  # Reference: plain value_and_grad of the model's loss on the whole batch,
  # with SGD(lr=1) so that params_before - params_after is the gradient.
  model = MODEL
  batch = make_batch(0, ragged=True)
  params = model.init(0)
  t, nt = params.split()
  (ref_loss, _), ref_grads = jax.jit(jax.value_and_grad(
      lambda t: model.loss(t.merge(nt), batch, is_training=True), has_aux=True))(t)

  mesh = mesh_of(2, 2, 1)
  opt = optax.sgd(1.0)
  for k in (1, 2):
    state = init_train_state(model, opt, 0, mesh, RULES)
    before = jax.device_get(state.params.split()[0].values_dict())
    state, metrics = train_step_of(model, opt, mesh, RULES, grad_accum_steps=k)(state, batch)
    after = jax.device_get(state.params.split()[0].values_dict())
    grads = {p: before[p] - after[p] for p in before}
    np.testing.assert_allclose(metrics['loss'], ref_loss, rtol=1e-5)
    assert metrics['tokens'] == batch['mask'].sum()
    tree_allclose(grads, jax.device_get(ref_grads.values_dict()), rtol=2e-4, atol=1e-6)


def test_non_finite_step_is_not_applied():
  mesh = mesh_of(2, 2, 2)
  state = init_train_state(MODEL, OPTIMIZER, 0, mesh, RULES)
  step = step_for(mesh, RULES)
  state, _ = step(state, make_batch(0))
  before = plain(state)
  bad = make_batch(1)
  bad['mask'][0, 0] = np.nan
  state, metrics = step(state, bad)
  assert not bool(metrics['finite']) and not np.isfinite(metrics['loss'])
  after = plain(state)
  assert int(after.step) == 1
  tree_allclose(after.params.values_dict(), before.params.values_dict(), rtol=0, atol=0)
  tree_allclose(after.opt_state, before.opt_state, rtol=0, atol=0)
  state, metrics = step(state, make_batch(1))  # and training goes on
  assert bool(metrics['finite']) and int(state.step) == 2


def test_init_creates_every_array_in_its_shards():
  model = tiny_model(d_model=64, mlp_dim=256)
  mesh = mesh_of(1, 4, 2)
  opt = optax.adamw(1e-3)
  init = sharded_init_fn(model, opt, 0, mesh, RULES)
  abstract = jax.eval_shape(init)
  shardings = train_state_shardings(abstract, mesh, RULES)
  state = init()
  # Every output leaf has its planned sharding, and each device holds a shard only.
  for arr, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert arr.sharding.is_equivalent_to(sh, arr.ndim)
    for shard in arr.addressable_shards:
      assert shard.data.shape == sh.shard_shape(arr.shape)
  emb = state.params[('lm', 'embed', 'embedding')].value
  assert emb.addressable_shards[0].data.shape == (256 // 2, 64 // 4)
  mu = state.opt_state[0].mu[('lm', 'embed', 'embedding')].value
  assert mu.sharding.is_equivalent_to(emb.sharding, 2)
  # XLA's own accounting of the init program: per device, outputs plus
  # temporaries stay far below the whole state (no device builds a full weight).
  total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract)
              if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
  mem = init.lower().compile().memory_analysis()
  per_device = sharding.shard_bytes(abstract, shardings)
  assert mem.output_size_in_bytes <= per_device + 16 * len(jax.tree.leaves(abstract))  # + buffer table
  assert mem.output_size_in_bytes + mem.temp_size_in_bytes < total / 4


def test_eval_step_and_user_loop_contract():
  mesh = mesh_of(2, 2, 2)
  state = init_train_state(MODEL, OPTIMIZER, 0, mesh, RULES)
  assert isinstance(state, TrainState)
  batch = make_batch(5)
  unsharded = jax.device_get(state.params)
  want, _ = jax.jit(lambda p: MODEL.loss(p, batch, is_training=False))(unsharded)
  got = make_eval_step(MODEL, mesh, RULES, sharding.batch_sharding(mesh, RULES))(state.params, batch)
  np.testing.assert_allclose(got['loss'], want, rtol=1e-5)
  old_param = state.params[('lm', 'embed', 'embedding')].value
  state, metrics = step_for(mesh, RULES)(state, batch)
  np.testing.assert_allclose(metrics['learning_rate'], 1e-2, rtol=1e-6)  # from inject_hyperparams
  assert old_param.is_deleted()  # the input state was donated
  # Non-trainable state (the RNG counter) comes back updated, not frozen.
  assert jax.tree.structure(state.params) == jax.tree.structure(unsharded)
