"""Core: Graph, Param/Params, Module.get_param/set_param, Rng, strict errors, abstract and sharded init."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import blox as bx
from helpers import tree_allclose


# -- Graph -------------------------------------------------------------------


def test_graph_child_slash_path_parent_root():
  root = bx.Graph('net')
  a = root.child('a')
  b = a / 'b'
  assert (root.path, a.path, b.path) == (('net',), ('net', 'a'), ('net', 'a', 'b'))
  assert b.name == 'b' and b.parent is a and a.parent is root and root.parent is None
  assert b.root is root and root.root is root


def test_graph_duplicate_name_is_an_error():
  root = bx.Graph('net')
  root.child('a')
  with pytest.raises(ValueError, match=r"^Graph node '\('net',\)' already has a child named 'a'\..*a_1"):
    root.child('a')
  with pytest.raises(ValueError, match='already has a child'):
    root / 'a'


def test_graph_module_binding_and_walk_depth_first():
  root = bx.Graph('net')
  rng = bx.Rng(root.child('rng'))
  block = root.child('block')  # unbound intermediate node
  l1 = bx.Linear(block.child('l1'), 3, rng)
  l2 = bx.Linear(block.child('l2'), 3, rng)
  head = bx.Linear(root.child('head'), 1, rng)
  assert root.module is None and block.module is None and l1.graph.module is l1
  walked = list(root.walk())
  assert [p for p, _ in walked] == [('net', 'rng'), ('net', 'block', 'l1'), ('net', 'block', 'l2'), ('net', 'head')]
  assert [m for _, m in walked] == [rng, l1, l2, head]


def test_graph_walk_visits_parent_before_children():
  root = bx.Graph('r')
  outer = bx.Sequential(root.child('outer'), [])
  inner = bx.Sequential(outer.graph.child('inner'), [])
  assert [m for _, m in root.walk()] == [outer, inner]


def test_module_cannot_bind_root_or_twice():
  root = bx.Graph('net')
  with pytest.raises(ValueError, match='root'):
    bx.Linear(root, 3, None)
  node = root.child('x')
  bx.Linear(node, 3, None)
  with pytest.raises(ValueError, match='already bound'):
    bx.Linear(node, 3, None)


# -- Param / Params ----------------------------------------------------------


def _params():
  return bx.Params({
      ('m', 'w'): bx.Param(jnp.ones((2,)), True, {'sharding': ('embed',)}),
      ('m', 'stat'): bx.Param(jnp.zeros((2,)), False),
  }, False)


def test_param_is_pytree_with_static_fields():
  p = bx.Param(jnp.ones(3), trainable=False, metadata={'sharding': ('mlp',)})
  leaves, treedef = jax.tree.flatten(p)
  assert len(leaves) == 1
  q = jax.tree.unflatten(treedef, [jnp.zeros(3)])
  assert q.trainable is False and q.sharding == ('mlp',)
  assert p.replace(trainable=True).trainable and p.replace(trainable=True).metadata == p.metadata
  with pytest.raises(TypeError, match='read-only'):
    p.metadata['x'] = 1


def test_params_mapping_split_merge():
  params = _params()
  assert len(params) == 2 and ('m', 'w') in params and ('m', 'nope') not in params
  assert set(params.keys()) == {('m', 'w'), ('m', 'stat')}
  assert all(isinstance(v, bx.Param) for v in params.values())
  trainable, rest = params.split()
  assert list(trainable) == [('m', 'w')] and list(rest) == [('m', 'stat')]
  named, other = params.split(lambda path, p: path[-1] == 'stat')
  assert list(named) == [('m', 'stat')] and list(other) == [('m', 'w')]
  merged = trainable.merge(rest)
  assert set(merged) == set(params)
  # b wins on equal paths.
  newer = bx.Params({('m', 'w'): bx.Param(jnp.full((2,), 5.0))}, False)
  assert float(params.merge(newer)[('m', 'w')].value[0]) == 5.0
  with pytest.raises(ValueError, match='different lock states'):
    params.locked().merge(newer)
  with pytest.raises(KeyError, match=r'No param at m/ww\. Did you mean m/w'):
    params[('m', 'ww')]


def test_params_lock_and_setitem_only_when_unlocked():
  params = _params()
  assert not params.is_locked
  locked = params.locked()
  assert locked.is_locked and not params.is_locked  # a copy
  assert not locked.unlocked().is_locked
  params[('m', 'new')] = bx.Param(jnp.ones(1))
  assert ('m', 'new') in params
  with pytest.raises(RuntimeError, match='params are locked.*unlocked'):
    locked[('m', 'new2')] = bx.Param(jnp.ones(1))
  with pytest.raises(TypeError, match='must be Param'):
    params[('m', 'x')] = jnp.ones(1)
  # The lock flag is static pytree data: it survives jit.
  assert jax.jit(lambda p: p)(locked).is_locked


# -- get_param / set_param strictness ----------------------------------------


class _Own(bx.Module):

  def __init__(self, graph, shape, dtype=None):
    super().__init__(graph)
    self.shape, self.dtype = shape, dtype

  def __call__(self, params):
    return self.get_param(params, 'w', self.shape, jax.nn.initializers.ones, dtype=self.dtype)


def test_existing_param_with_other_shape_is_an_error():
  g = bx.Graph('net')
  a = _Own(g.child('a'), (2, 3))
  _, params = a(bx.Params())
  b_graph = bx.Graph('net')
  b = _Own(b_graph.child('a'), (2, 4))
  with pytest.raises(bx.ParamMismatchError, match=re.escape('Param net/a/w exists with shape (2, 3) but was requested with shape (2, 4)')):
    b(params)


def test_existing_param_with_other_dtype_is_an_error():
  _, params = _Own(bx.Graph('net').child('a'), (2,))(bx.Params())
  b = _Own(bx.Graph('net').child('a'), (2,), dtype=jnp.bfloat16)
  with pytest.raises(bx.ParamMismatchError, match='Param net/a/w exists with dtype float32 but was requested with dtype bfloat16.*param_dtype=float32'):
    b(params)


def test_layer_with_other_param_dtype_than_stored_is_an_error():
  g = bx.Graph('net')
  lin = bx.Linear(g.child('lin'), 3, None, kernel_init=jax.nn.initializers.ones)
  _, params = lin(bx.Params(), jnp.ones((1, 2)))
  g2 = bx.Graph('net')
  lin16 = bx.Linear(g2.child('lin'), 3, None, param_dtype=jnp.bfloat16)
  with pytest.raises(bx.ParamMismatchError, match='net/lin/kernel exists with dtype float32'):
    lin16(params, jnp.ones((1, 2)))


def test_creating_a_param_in_locked_params_is_an_error():
  g = bx.Graph('net')
  lin = bx.Linear(g.child('lin'), 3, None)
  with pytest.raises(bx.ParamsLockedError, match='Param net/lin/kernel does not exist and params are locked.*params.unlocked'):
    lin(bx.Params().locked(), jnp.ones((1, 2)))
  # Subclasses KeyError like jax-blox's error, so old except clauses still work.
  assert issubclass(bx.ParamsLockedError, KeyError)


def test_missing_param_without_shape_or_init():
  m = bx.Linear(bx.Graph('n').child('l'), 2, None)
  with pytest.raises(bx.ParamNotFoundError, match='Param n/l/kernel does not exist and cannot be created'):
    m.get_param(bx.Params(), 'kernel')


def test_set_param_checks_shape_and_works_on_locked():
  m = _Own(bx.Graph('n').child('a'), (2,))
  _, params = m(bx.Params())
  params = params.locked()
  params = m.set_param(params, 'w', jnp.full((2,), 3.0), metadata={'note': 'x'})
  assert params.is_locked and float(params[('n', 'a', 'w')].value[0]) == 3.0
  assert params[('n', 'a', 'w')].metadata['note'] == 'x'
  with pytest.raises(bx.ParamMismatchError, match='set_param with shape \\(3,\\)'):
    m.set_param(params, 'w', jnp.ones(3))


def test_sharding_axes_beyond_rank_are_an_error():
  g = bx.Graph('n')
  lin = bx.Linear(g.child('l'), 3, None, kernel_metadata={'sharding': ('a', None, 'b')})
  with pytest.raises(ValueError, match="n/l/kernel.*names 3 axes but the param has shape \\(2, 3\\)"):
    lin(bx.Params(), jnp.ones((1, 2)))


# -- Rng ---------------------------------------------------------------------


def test_unseeded_rng_is_an_error():
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  lin = bx.Linear(g.child('lin'), 3, rng)
  with pytest.raises(bx.RngNotSeededError, match=r'Rng net/rng is not seeded.*rng.seed\(params, seed=0\)'):
    lin(bx.Params(), jnp.ones((1, 2)))
  with pytest.raises(ValueError, match='pass seed='):
    rng.seed(bx.Params())


@pytest.mark.parametrize('seed, pattern', [
    (np.float32(1.0), 'expected an int, an integer scalar array or a typed key.*float32'),
    (1.5, 'expected an int.*got float'),
    (True, 'a bool is not a seed'),
    (jax.random.PRNGKey(0), 'raw uint32\\[2\\] key.*wrap_key_data'),
])
def test_bad_seeds_are_errors(seed, pattern):
  rng = bx.Rng(bx.Graph('net').child('rng'))
  with pytest.raises(TypeError, match=pattern):
    rng.seed(bx.Params(), seed=seed)


def test_numpy_int64_seed_works_like_int():
  rng = bx.Rng(bx.Graph('net').child('rng'))
  a = rng.seed(bx.Params(), seed=np.int64(7))
  b = rng.seed(bx.Params(), seed=7)
  ka, _ = rng(a)
  kb, _ = rng(b)
  np.testing.assert_array_equal(jax.random.key_data(ka), jax.random.key_data(kb))
  np.testing.assert_array_equal(jax.random.key_data(kb), jax.random.key_data(jax.random.fold_in(jax.random.key(7), 0)))


def test_rng_is_deterministic_in_seed_and_counter():
  rng = bx.Rng(bx.Graph('net').child('rng'))
  params = rng.seed(bx.Params(), seed=3)
  k0, params = rng(params)
  k1, params = rng(params)
  assert int(rng.get_counter(params)) == 2
  assert not np.array_equal(jax.random.key_data(k0), jax.random.key_data(k1))
  again = rng.seed(params, counter=1)
  k1b, _ = rng(again)
  np.testing.assert_array_equal(jax.random.key_data(k1), jax.random.key_data(k1b))
  # jitted calls give the same key as eager ones.
  k1c, _ = jax.jit(rng)(again)
  np.testing.assert_array_equal(jax.random.key_data(k1), jax.random.key_data(k1c))


def test_rng_draws_a_key_even_for_constant_init():
  """Changing one initializer must not reshuffle the others (jax-blox's order)."""
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  lin = bx.Linear(g.child('lin'), 3, rng)
  _, params = lin(rng.seed(bx.Params(), seed=0), jnp.ones((1, 2)))
  assert int(rng.get_counter(params)) == 2  # kernel and (zeros) bias
  expected = jax.nn.initializers.lecun_normal()(jax.random.fold_in(jax.random.key(0), 0), (2, 3), jnp.float32)
  tree_allclose(params[('net', 'lin', 'kernel')].value, expected, rtol=0, atol=0)


# -- init without allocation and with shardings ------------------------------


def _model():
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  mlp = bx.Sequential(g.child('mlp'), [
      bx.Linear(g.child('up'), 8, rng), jax.nn.gelu,
      bx.Linear(g.child('down'), 4, rng, kernel_metadata={'sharding': ('mlp', 'embed')}, bias_metadata={'sharding': ('embed',)}),
      bx.LayerNorm(g.child('norm')),
  ])

  def init(x):
    _, params = mlp(rng.seed(bx.Params(), seed=0), x)
    return params.locked()
  return g, mlp, init


def test_init_under_eval_shape_allocates_nothing():
  _, _, init = _model()
  abstract = jax.eval_shape(init, jax.ShapeDtypeStruct((2, 4), jnp.float32))
  assert abstract.is_locked
  leaves = jax.tree.leaves(abstract)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert abstract[('net', 'up', 'kernel')].value.shape == (4, 8)
  assert abstract[('net', 'down', 'kernel')].sharding == ('mlp', 'embed')


def test_init_under_jit_with_out_shardings_on_2x2_mesh():
  _, mlp, init = _model()
  mesh = jax.make_mesh((2, 2), ('data', 'model'), devices=jax.devices()[:4])
  rules = {'embed': None, 'mlp': 'model', 'norm': None}
  x = jnp.ones((2, 4))
  abstract = jax.eval_shape(init, x)
  shardings = jax.tree.map(
      lambda p: NamedSharding(mesh, P(*(rules[a] for a in p.sharding))), abstract,
      is_leaf=lambda v: isinstance(v, bx.Param))
  params = jax.jit(init, out_shardings=shardings)(x)
  kernel = params[('net', 'up', 'kernel')].value
  assert kernel.sharding.spec == P(None, 'model')
  assert len(kernel.addressable_shards) == 4 and kernel.addressable_shards[0].data.shape == (4, 4)
  assert params[('net', 'down', 'kernel')].value.sharding.spec == P('model', None)
  # Same numbers as an unsharded init.
  plain = init(x)
  for path in plain:
    if path[-1] != 'seed':
      tree_allclose(params[path].value, plain[path].value, rtol=1e-6, atol=1e-6)


# -- raw JAX transforms on module calls ----------------------------------------


def _mlp():
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  model = bx.Sequential(g.child('mlp'), [
      bx.Linear(g.child('l1'), 8, rng, bias_init=jax.nn.initializers.normal(0.1)), jnp.tanh,
      bx.Linear(g.child('l2'), 2, rng)])
  x = jax.random.normal(jax.random.key(0), (4, 3))
  _, params = model(rng.seed(bx.Params(), seed=0), x)
  return rng, model, params.locked(), x


def _ref_mlp(params, x):
  v = lambda n, k: params[('net', n, k)].value  # noqa: E731
  return jnp.tanh(x @ v('l1', 'kernel') + v('l1', 'bias')[None, :]) @ v('l2', 'kernel') + v('l2', 'bias')[None, :]


def test_raw_jit_grad_vmap_checkpoint():
  _, model, params, x = _mlp()
  y, _ = model(params, x)
  tree_allclose(y, _ref_mlp(params, x))
  y_jit, p_jit = jax.jit(model)(params, x)
  tree_allclose(y_jit, y)
  assert p_jit.is_locked and set(p_jit) == set(params)
  # vmap over the batch with shared params (in_axes=None), one example per lane.
  y_vmap, _ = jax.vmap(model, in_axes=(None, 0), out_axes=(0, None))(params, x)
  tree_allclose(y_vmap, y)
  trainable, rest = params.split()
  loss = lambda t, x: jnp.sum(model(t.merge(rest), x)[0] ** 2)  # noqa: E731
  grads = jax.grad(loss)(trainable, x)
  ref_grads = jax.grad(lambda t: jnp.sum(_ref_mlp(t.merge(rest), x) ** 2))(trainable)
  tree_allclose(grads, ref_grads)
  ckpt_grads = jax.grad(jax.checkpoint(loss))(trainable, x)
  tree_allclose(ckpt_grads, grads)
  assert 'remat' in str(jax.make_jaxpr(jax.grad(jax.checkpoint(loss)))(trainable, x)) or 'checkpoint' in str(
      jax.make_jaxpr(jax.grad(jax.checkpoint(loss)))(trainable, x))


def test_raw_lax_scan_over_stacked_params():
  """Params stack like any pytree: vmap the init over a layer axis, scan the layers."""
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  layer = bx.Linear(g.child('layer'), 3, rng)
  x = jax.random.normal(jax.random.key(1), (2, 3))

  def init(i):
    params = rng.seed(bx.Params(), seed=jax.random.fold_in(jax.random.key(0), i))
    return layer(params, x)[1].locked()

  stacked = jax.vmap(init)(jnp.arange(4))
  assert stacked[('net', 'layer', 'kernel')].value.shape == (4, 3, 3)

  def body(h, layer_params):
    h, _ = layer(layer_params, h)
    return jnp.tanh(h), None

  y, _ = jax.lax.scan(body, x, stacked)
  h = x
  for i in range(4):
    p = jax.tree.map(lambda v: v[i], stacked)
    h = jnp.tanh(h @ p[('net', 'layer', 'kernel')].value + p[('net', 'layer', 'bias')].value[None, :])
  tree_allclose(y, h)
  # Layers start different.
  k = stacked[('net', 'layer', 'kernel')].value
  assert not np.allclose(k[0], k[1])


def test_jitted_train_step_traces_once_over_five_steps():
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  model = bx.Sequential(g.child('mlp'), [bx.Linear(g.child('l1'), 8, rng), jax.nn.relu,
                                          bx.Dropout(g.child('drop'), 0.1, rng), bx.Linear(g.child('l2'), 1, rng)])
  x = jax.random.normal(jax.random.key(0), (8, 3))
  target = x.sum(-1, keepdims=True)
  _, params = model(rng.seed(bx.Params(), seed=0), x)
  params = params.locked()
  traces = []

  @jax.jit
  def train_step(params, x, target):
    traces.append(1)  # Python side effect: runs only while tracing
    trainable, rest = params.split()

    def loss_fn(t):
      y, new_params = model(t.merge(rest), x)
      return jnp.mean((y - target) ** 2), new_params.split()[1]

    (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    trainable = jax.tree.map(lambda w, g: w - 0.05 * g, trainable, grads)
    return trainable.merge(new_rest), loss

  losses = []
  for _ in range(5):
    params, loss = train_step(params, x, target)
    losses.append(float(loss))
  assert len(traces) == 1, f'train step traced {len(traces)} times'
  # 4 init keys (2 kernels, 2 biases) + 1 dropout key at init + 1 per step.
  assert params.is_locked and int(rng.get_counter(params)) == 4 + 1 + 5
  assert losses[-1] < losses[0]
  # A change of static structure (the lock flag) is a new program: one retrace.
  train_step(params.unlocked(), x, target)
  assert len(traces) == 2


def test_reseeding_with_a_typed_key_and_key_dtype_mismatch():
  """Regression: updating the seed with a typed key compared key dtypes via jnp.dtype and crashed."""
  rng = bx.Rng(bx.Graph('net').child('rng'))
  params = rng.seed(bx.Params(), seed=0)
  params = rng.seed(params, seed=jax.random.fold_in(jax.random.key(0), 5))
  key, _ = rng(params)
  expected = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 5), 0)
  np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(expected))
  with pytest.raises(bx.ParamMismatchError, match='net/rng/seed exists with dtype key<fry> but was set_param with dtype key<rbg>'):
    rng.seed(params, seed=jax.random.key(0, impl='rbg'))


def test_rng_under_shard_map_needs_fold_in_of_the_axis_index():
  """Replicated params give every device the same key; fold in the axis index (docs/sharp_bits.md)."""
  from jax.sharding import NamedSharding
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  dropout = bx.Dropout(g.child('dropout'), rate=0.5, rng=rng)
  params = rng.seed(bx.Params(), seed=0).locked()
  mesh = jax.make_mesh((4,), ('data',), devices=jax.devices()[:4])
  x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P('data')))

  def folded(params, x):
    seed = rng.get_seed(params)
    params = rng.seed(params, seed=jax.random.fold_in(seed, jax.lax.axis_index('data')))
    y, params = dropout(params, x)
    return y, rng.seed(params, seed=seed)  # replicated params must agree across devices

  def naive(params, x):
    return dropout(params, x)

  run = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P('data')), out_specs=(P('data'), P())))(params, x)  # noqa: E731
  y_naive, _ = run(naive)
  y_folded, new_params = run(folded)
  blocks = lambda y: {(np.asarray(y)[i:i + 2] != 0).tobytes() for i in range(0, 8, 2)}  # noqa: E731
  assert len(blocks(y_naive)) == 1  # every device drew the same mask
  assert len(blocks(y_folded)) == 4
  assert int(rng.get_counter(new_params)) == 1
