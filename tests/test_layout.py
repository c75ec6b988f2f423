"""Stacked <-> per-layer layout: round trips, paths, metadata, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_allclose

import blox as bx
import blox_scale as bs

D, H, L = 4, 6, 3


class Block(bx.Module):
  def __init__(self, graph, rng):
    super().__init__(graph)
    self.up = bx.Linear(graph.child('up'), H, rng=rng)
    self.down = bx.Linear(graph.child('down'), D, rng=rng)
    self.bn = bx.BatchNorm(graph.child('bn'))

  def __call__(self, params, x):
    h, params = self.up(params, x)
    h, params = self.down(params, jnp.tanh(h))
    h, params = self.bn(params, h)
    return x + h, params


def build():
  root = bx.Graph('m')
  rng = bx.Rng(root.child('rng'))
  stack = bs.Stack(root.child('stack'), lambda g: Block(g, rng), L, rng=rng)
  params = rng.seed(bx.Params(), seed=0)
  x = jax.random.normal(jax.random.key(1), (2, D))
  _, params = stack(params, x)
  return stack, params.locked(), x


def test_unstack_paths_shapes_and_metadata():
  stack, params, _ = build()
  flat = bs.unstack(params, stack)
  assert flat.is_locked
  assert ('m', 'rng', 'seed') in flat and ('m', 'rng', 'counter') in flat
  assert not any(p[:3] == ('m', 'stack', 'block') for p in flat)
  kernel = params[('m', 'stack', 'block', 'up', 'kernel')]
  for i in range(L):
    p = flat[('m', 'stack', f'layer_{i}', 'up', 'kernel')]
    np.testing.assert_array_equal(np.asarray(p.value), np.asarray(kernel.value[i]))
    assert p.metadata['sharding'] == ('embed', 'mlp')
    assert p.trainable
    assert not flat[('m', 'stack', f'layer_{i}', 'bn', 'running_mean')].trainable
  assert len(flat) == 2 + L * (len(params) - 2)


def test_round_trip_both_ways():
  stack, params, _ = build()
  back = bs.restack(bs.unstack(params, stack), stack)
  assert set(back.keys()) == set(params.keys())
  for path, param in params.items():
    assert back[path].trainable == param.trainable and back[path].metadata == param.metadata, path
  tree_allclose({p: q.value for p, q in params.items() if p[-1] != 'seed'},
                {p: q.value for p, q in back.items() if p[-1] != 'seed'}, rtol=0, atol=0)
  flat = bs.unstack(params, stack)
  again = bs.unstack(bs.restack(flat, stack), stack)
  assert set(again.keys()) == set(flat.keys())
  for path, param in flat.items():
    assert again[path].metadata == param.metadata
    if path[-1] != 'seed':
      np.testing.assert_array_equal(np.asarray(again[path].value), np.asarray(param.value))


def test_per_layer_params_drive_an_unrolled_model_to_the_same_output():
  stack, params, x = build()
  flat = bs.unstack(params, stack)
  root = bx.Graph('m')
  rng = bx.Rng(root.child('rng'))
  node = root.child('stack')
  blocks = [Block(node.child(f'layer_{i}'), rng) for i in range(L)]
  seed, counter = flat[('m', 'rng', 'seed')].value, flat[('m', 'rng', 'counter')].value
  key = jax.random.fold_in(seed, counter)
  h = x
  for i, blk in enumerate(blocks):
    data = dict(flat.items())
    data[('m', 'rng', 'seed')] = data[('m', 'rng', 'seed')].replace(value=jax.random.fold_in(key, i))
    data[('m', 'rng', 'counter')] = data[('m', 'rng', 'counter')].replace(value=jnp.uint32(0))
    p = bx.Params.from_items(data, locked=True)
    h, _ = blk(p, h)
  y, _ = stack(params, x)
  tree_allclose(y, h)


def test_restack_errors_name_the_difference():
  stack, params, _ = build()
  flat = bs.unstack(params, stack)
  data = dict(flat.items())
  path = ('m', 'stack', 'layer_1', 'up', 'kernel')
  data[path] = data[path].replace(value=jnp.zeros((D, H + 1)))
  with pytest.raises(ValueError, match=r'up/kernel differs between layer_0 and layer_1'):
    bs.restack(bx.Params(data), stack)
  data = dict(flat.items())
  del data[('m', 'stack', 'layer_2', 'bn', 'bias')]
  with pytest.raises(ValueError, match=r"layer_2 differ from layer_0.*\['bn/bias'\]"):
    bs.restack(bx.Params(data), stack)
  data = {p: q for p, q in flat.items() if 'layer_2' not in p}
  with pytest.raises(ValueError, match=r'num_layers=3, but the per-layer params hold layers \[0, 1\]'):
    bs.restack(bx.Params(data), stack)
  with pytest.raises(ValueError, match='need a leading layer axis of size num_layers=3'):
    bs.unstack(bs.restack(flat, stack).unlocked().merge(bx.Params({('m', 'stack', 'block', 'x'): bx.Param(jnp.zeros(2))})), stack)
