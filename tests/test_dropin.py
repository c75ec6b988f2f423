"""Code written against jax-blox 0.1.6 runs unchanged: its module paths, the inputs it accepts,
tensor-parallel layers inside shard_map, and its error wording (blox adds path, values and fix
after jax-blox's sentence)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import blox as bx
from helpers import tree_allclose

# What jax-blox 0.1.6 defined in each module (its public, non-underscore names).
JAXBLOX_MODULES = {
    'blox.interfaces': [
        'Graph', 'Param', 'Params', 'Module', 'Rng', 'SequenceBase', 'RecurrenceBase', 'static_scan',
        'dynamic_scan', 'Shape', 'Path', 'Initializer', 'StepFn', 'InputsT', 'StateT', 'OutputsT', 'ResetT',
    ],
    'blox.blocks': [
        'Embed', 'Linear', 'Sequential', 'LSTMState', 'LSTM', 'GRUState', 'GRU', 'Dropout', 'LayerNorm',
        'RMSNorm', 'BatchNorm', 'Conv', 'ConvTranspose', 'max_pool', 'min_pool', 'avg_pool',
        'Initializer', 'PaddingLike',
    ],
    'blox.visualize': ['display'],
}


@pytest.mark.parametrize('module_name', sorted(JAXBLOX_MODULES))
def test_jaxblox_module_paths_reexport_the_root_objects(module_name):
  import importlib
  module = importlib.import_module(module_name)
  for name in JAXBLOX_MODULES[module_name]:
    obj = getattr(module, name)
    if name in bx.__all__:
      assert obj is getattr(bx, name), (module_name, name)


def test_jaxblox_style_imports():
  from blox.blocks import Linear, max_pool
  from blox.interfaces import Graph, Module, Param, Params, Rng
  from blox.visualize import display
  assert (Linear, max_pool, Graph, Module, Param, Params, Rng, display) == (
      bx.Linear, bx.max_pool, bx.Graph, bx.Module, bx.Param, bx.Params, bx.Rng, bx.display)

  class Scale(Module):  # a jax-blox user's own layer, subclassing the interfaces path's Module
    def __call__(self, params, x):
      return 2 * x, params

  graph = Graph('net')
  assert isinstance(Scale(graph.child('s')), bx.Module)


# -- metadata['sharding'] shorter than the param's rank (PartitionSpec semantics) ---------------


def test_short_sharding_tuple_is_stored_as_given_and_shards_like_a_partition_spec():
  from blox_scale.parallel import sharding
  from blox_scale.training.config import MeshConfig
  graph = bx.Graph('net')
  rng = bx.Rng(graph.child('rng'))
  lin = bx.Linear(graph.child('lin'), 16, rng, kernel_metadata={'sharding': ('mlp',)},
                  bias_metadata={'sharding': ()})
  params = rng.seed(bx.Params(), seed=0)
  _, params = lin(params, jnp.ones((2, 8)))
  kernel = params[('net', 'lin', 'kernel')]
  assert kernel.shape == (8, 16) and kernel.sharding == ('mlp',)  # as given, like jax-blox
  assert params[('net', 'lin', 'bias')].sharding == ()

  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
  rules = sharding.rules_from_config(MeshConfig())
  shardings = sharding.param_shardings(params, mesh, rules)
  # ('mlp',) on a 2-d kernel is P('tensor', None); () is replicated.
  assert shardings[('net', 'lin', 'kernel')].value.spec == P('tensor', None)
  assert shardings[('net', 'lin', 'bias')].value.spec == P()
  placed = jax.device_put(params, shardings)
  k = placed[('net', 'lin', 'kernel')].value
  assert k.sharding.is_equivalent_to(NamedSharding(mesh, P('tensor')), 2)
  assert {s.data.shape for s in k.addressable_shards} == {(2, 16)}
  # Optimizer state (Adam's mu/nu carry the param's metadata) follows the same rule.
  state = optax.adam(1e-3).init(params.split()[0])
  state_sh = sharding.state_shardings(state, mesh, rules)
  mu = state_sh[0].mu[('net', 'lin', 'kernel')].value
  assert mu.spec == P('tensor', None)


def test_short_sharding_tuple_in_a_stack_gains_the_leading_layers_axis():
  import blox_scale as bs
  from blox_scale.parallel import sharding
  from blox_scale.training.config import MeshConfig
  graph = bx.Graph('net')
  rng = bx.Rng(graph.child('rng'))

  class Block(bx.Module):
    def __init__(self, g):
      super().__init__(g)
      self.lin = bx.Linear(g.child('lin'), 8, rng, kernel_metadata={'sharding': ('mlp',)})

    def __call__(self, params, x):
      y, params = self.lin(params, x)
      return x + y, params

  stack = bs.Stack(graph.child('stack'), Block, 2, rng=rng)
  params = rng.seed(bx.Params(), seed=0)
  _, params = jax.eval_shape(stack, params, jnp.ones((2, 8)))
  path = stack.block.graph.path + ('lin', 'kernel')
  assert params[path].shape == (2, 8, 8) and params[path].sharding == ('layers', 'mlp')
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
  shardings = sharding.param_shardings(params, mesh, sharding.rules_from_config(MeshConfig()))
  assert shardings[path].value.spec == P(None, 'tensor', None)  # ('layers', 'mlp', None)


def test_sharding_tuple_longer_than_rank_is_an_error_naming_the_param():
  graph = bx.Graph('net')
  lin = bx.Linear(graph.child('lin'), 4, None, kernel_metadata={'sharding': (None, 'model', 'extra')})
  with pytest.raises(ValueError, match=r"net/lin/kernel: metadata\['sharding'\]=\(None, 'model', 'extra'\) names 3 axes"):
    lin(bx.Params(), jnp.ones((1, 2)))


# -- tensor parallelism inside jax.shard_map ----------------------------------------------------


def _tp_mlp():
  graph = bx.Graph('mlp')
  rng = bx.Rng(graph.child('rng'))
  # Megatron: the first kernel split by columns, the second by rows (its partial sums are psum'd).
  up = bx.Linear(graph.child('up'), 16, rng, kernel_metadata={'sharding': (None, 'model')},
                 bias_metadata={'sharding': ('model',)})
  down = bx.Linear(graph.child('down'), 8, rng, use_bias=False, kernel_metadata={'sharding': ('model',)})

  def mlp(params, x):
    h, params = up(params, x)
    y, params = down(params, jax.nn.relu(h))
    return y, params

  return rng, mlp, up


def test_column_then_row_parallel_linear_in_shard_map_equals_single_device_mlp():
  rng, mlp, _ = _tp_mlp()
  x = jax.random.normal(jax.random.key(1), (4, 8))
  params = rng.seed(bx.Params(), seed=0)
  _, params = mlp(params, x)
  trainable, _ = params.locked().split()

  mesh = jax.make_mesh((2, 4), ('data', 'model'))  # 8 fake devices
  is_param = lambda p: isinstance(p, bx.Param)
  specs = jax.tree.map(lambda p: p.replace(value=P(*p.sharding)), trainable, is_leaf=is_param)
  placed = jax.device_put(trainable, jax.tree.map(lambda p: p.replace(value=NamedSharding(mesh, p.value)),
                                                  specs, is_leaf=is_param))
  xs = jax.device_put(x, NamedSharding(mesh, P('data')))

  def local(tr, x):  # tr holds this device's slices: up/kernel (8, 4), up/bias (4,), down/kernel (4, 8)
    y, _ = mlp(tr, x)
    return jax.lax.psum(y, 'model')

  def sharded(tr, x):
    return jax.shard_map(local, mesh=mesh, in_specs=(specs, P('data')), out_specs=P('data'))(tr, x)

  def reference(w1, b1, w2, x):  # the same MLP by hand, on one device
    return jnp.maximum(x @ w1 + b1[None], 0) @ w2

  w = [trainable[('mlp', *k)].value for k in [('up', 'kernel'), ('up', 'bias'), ('down', 'kernel')]]
  np.testing.assert_allclose(jax.jit(sharded)(placed, xs), reference(*w, x), rtol=1e-5, atol=1e-6)

  grads = jax.jit(jax.grad(lambda tr: jnp.sum(jnp.sin(sharded(tr, xs)))))(placed)
  ref_grads = jax.grad(lambda w1, b1, w2: jnp.sum(jnp.sin(reference(w1, b1, w2, x))), argnums=(0, 1, 2))(*w)
  for k, g in zip([('up', 'kernel'), ('up', 'bias'), ('down', 'kernel')], ref_grads):
    np.testing.assert_allclose(grads[('mlp', *k)].value, g, rtol=1e-5, atol=1e-6)


def test_shape_mismatch_in_shard_map_not_explained_by_sharding_stays_an_error():
  rng, mlp, up = _tp_mlp()
  params = rng.seed(bx.Params(), seed=0)
  _, params = mlp(params, jnp.ones((4, 8)))
  trainable, _ = params.locked().split()
  mesh = jax.make_mesh((8,), ('model',))
  # Replicated in_specs: every device sees the whole (8, 16) kernel, so a 12-feature input is wrong.
  f = jax.shard_map(lambda tr, x: mlp(tr, x)[0], mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
  with pytest.raises(bx.ParamMismatchError, match=r"mlp/up/kernel exists with shape \(8, 16\) but was requested "
                                                   r"with shape \(12, 16\).*Inside shard_map over manual mesh axes"):
    f(trainable, jnp.ones((4, 12)))
  with pytest.raises(bx.ParamMismatchError, match=r'mlp/up/kernel exists with shape \(8, 16\)'):
    mlp(params.locked(), jnp.ones((4, 12)))  # outside shard_map: strict as always
  # set_param stores what it gets: inside shard_map a global-shaped value for a sharded param is wrong.
  is_param = lambda p: isinstance(p, bx.Param)
  up_params = trainable.filter(prefix=('mlp', 'up'))
  specs = jax.tree.map(lambda p: p.replace(value=P(*p.sharding)), up_params, is_leaf=is_param)
  placed = jax.device_put(up_params, jax.tree.map(lambda p: p.replace(value=NamedSharding(mesh, p.value)),
                                                  specs, is_leaf=is_param))
  g = jax.shard_map(lambda tr: up.set_param(tr, 'kernel', jnp.zeros((8, 16))), mesh=mesh, in_specs=(specs,),
                    out_specs=specs, check_vma=False)
  with pytest.raises(bx.ParamMismatchError, match=r'exists with shape \(8, 2\) but was set_param with shape \(8, 16\)'):
    g(placed)


# -- error wording: jax-blox's sentence first, then blox's path, values and fix -----------------


def _net():
  graph = bx.Graph('net')
  rng = bx.Rng(graph.child('rng'))
  return graph, rng, rng.seed(bx.Params(), seed=0)


class _Plain(bx.Module):
  def __call__(self, params, x):
    return x, params


class _NoSuper(bx.Module):
  def __init__(self, graph):  # forgets super().__init__(graph)
    self.g = graph

  def __call__(self, params, x):
    return x, params


def _bind_twice():
  g = bx.Graph('net')
  _Plain(g.child('a')).graph._bind(_Plain(bx.Graph('other').child('b')))


def _step(cls):
  graph, rng, params = _net()
  cls(graph.child('cell'), hidden_size=4, rng=rng)(params, jnp.ones((2, 3)), None)


def _scan(inputs, fn=bx.static_scan):
  step = lambda params, x, state, reset, is_training: ((x, state), params)  # noqa: E731
  fn(step, bx.Params(), inputs, None, None, True)


def _lstm_apply(x):
  graph, rng, params = _net()
  bx.LSTM(graph.child('cell'), hidden_size=4, rng=rng).apply(params, x)


def _get(name, **kw):
  m = _Plain(bx.Graph('net').child('m'))
  return m.get_param(bx.Params(**kw), name, *((), jax.nn.initializers.zeros) if kw else ())


def _set(value=None, missing=False):
  m = _Plain(bx.Graph('net').child('m'))
  _, params = m.get_param(bx.Params(), 'w', (2,), jax.nn.initializers.zeros)
  m.set_param(params, 'v' if missing else 'w', value)


def _dropout(rate=0.5):
  graph, rng, params = _net()
  return bx.Dropout(graph.child('d'), rate, rng), params


def _conv(cls, x, **kw):
  graph, rng, params = _net()
  cls(graph.child('c'), output_channels=4, kernel_size=(3, 3), rng=rng, **kw)(params, x)


# (what raises, jax-blox's exception type, jax-blox's sentence, what blox adds after it)
ERRORS = {
    'graph_name': (lambda: bx.Graph(''), ValueError, 'Graph node must have a name.', "Got ''"),
    'duplicate_child': (lambda: [g := bx.Graph('net'), g.child('a'), g.child('a')], ValueError,
                        "Graph node '('net',)' already has a child named 'a'.", 'a_1'),
    'bound_twice': (_bind_twice, ValueError, "Graph node '('net', 'a')' already bound to _Plain(). Cannot bind _Plain().",
                    'graph.child'),
    'bind_root': (lambda: _Plain(bx.Graph('net')), ValueError,
                  "Cannot bind '_Plain' to root graph node 'net'. Use graph.child('name') to create a child node.",
                  'root binds no module'),
    'no_super': (lambda: _NoSuper(bx.Graph('net').child('m')), RuntimeError,
                 "Module '_NoSuper' failed to initialize. Did you forget to call super().__init__(graph)?", 'first thing'),
    'param_not_found': (lambda: _get('w'), KeyError,
                        "Parameter '('net', 'm', 'w')' not found. To create a new parameter, provide shape and init.",
                        'net/m/w does not exist.*shape=None'),
    'param_locked': (lambda: _get('w', _locked=True), KeyError, "Parameter '('net', 'm', 'w')' missing (params locked).",
                     r'params.unlocked\(\)'),
    'set_missing': (lambda: _set(jnp.ones(2), missing=True), KeyError, "Path '('net', 'm', 'v')' not found.",
                    'no param at net/m/v'),
    'set_nothing': (_set, ValueError, 'At least one of value, trainable, or metadata must be provided.',
                    r'set_param\(net/m/w\)'),
    'set_not_array': (lambda: _set([1.0, 2.0]), TypeError, 'value must be a jax.Array, got list.', 'jnp.asarray'),
    'rng_unseeded': (lambda: bx.Rng(bx.Graph('net').child('rng'))(bx.Params()), KeyError,
                     "Rng '('net', 'rng')' not initialized. Use rng.seed(params, seed=...) first.",
                     'no net/rng/seed in params'),
    'rng_seed_required': (lambda: bx.Rng(bx.Graph('net').child('rng')).seed(bx.Params()), ValueError,
                          "Rng '('net', 'rng')' not initialized. Seed is required.", 'pass seed='),
    'rng_nothing': (lambda: (lambda g, rng, params: rng.seed(params))(*_net()), ValueError,
                    'At least one of seed or counter must be provided.', r'net/rng\.seed'),
    'scan_empty': (lambda: _scan({}), ValueError, 'The input Pytree cannot be empty.', 'static_scan'),
    'scan_rank': (lambda: _scan(jnp.ones(3), bx.dynamic_scan), ValueError,
                  'Input leaves must have rank >= 2, got 1.', r'dynamic_scan.*shape \(3,\)'),
    'scan_time': (lambda: _scan([jnp.ones((2, 3)), jnp.ones((2, 4))]), AssertionError,
                  "[Chex] Assertion assert_axis_dimension failed: Expected tensor to have dimension equal to '3' on "
                  "axis '1' but got '4' instead.", r'\[3, 4\]'),
    'apply_rank': (lambda: _lstm_apply(jnp.ones(3)), ValueError, 'Input leaves must have rank >= 2.',
                   r'LSTM net/cell\.apply'),
    'linear_scalar': (lambda: bx.Linear(bx.Graph('net').child('l'), 2, None)(bx.Params(), jnp.ones(())), ValueError,
                      'Input must not be scalar.', 'Linear net/l'),
    'lstm_prev_state': (lambda: _step(bx.LSTM), ValueError, 'The LSTM __call__ method requires a valid prev_state.',
                        'lstm.initial_state'),
    'gru_prev_state': (lambda: _step(bx.GRU), ValueError, 'The GRU __call__ method requires a valid prev_state.',
                       'gru.initial_state'),
    'dropout_rate': (lambda: _dropout(1.0), ValueError,
                     'Dropout rate must be in [0.0, 1.0), got 1.0.', 'Dropout net/d'),
    'conv_rank': (lambda: _conv(bx.Conv, jnp.ones((4, 3))), ValueError,
                  'Expected input rank >= 3 for 2D conv (at least 2 spatial dims + 1 channel dim), got 2.',
                  r'Conv net/c.*shape \(4, 3\)'),
    'conv_transpose_rank': (lambda: _conv(bx.ConvTranspose, jnp.ones((4, 3))), ValueError,
                            'Expected input rank >= 3 for 2D conv_transpose (at least 2 spatial dims + 1 channel dim), '
                            'got 2.', 'ConvTranspose net/c'),
    'conv_groups': (lambda: _conv(bx.Conv, jnp.ones((5, 5, 3)), feature_group_count=2), ValueError,
                    'input_channels (3) must be divisible by feature_group_count (2).', 'Conv net/c'),
    'traced_flag': (lambda: jax.jit(lambda t: (lambda d, p: d(p, jnp.ones(3), is_training=t))(*_dropout()))(True),
                    jax.errors.TracerBoolConversionError,
                    'Attempted boolean conversion of traced array with shape bool[].',
                    r"Dropout net/d: is_training.*static_argnames='is_training'"),
    'param_trainable': (lambda: bx.Param(jnp.ones(2), trainable=1), TypeError, 'trainable must be a bool, got int.',
                        'True or False'),
    'param_metadata': (lambda: bx.Param(jnp.ones(2), metadata=[('sharding', ())]), TypeError,
                       'metadata must be a dict or None, got list.', 'sharding'),
    'merge_locked': (lambda: bx.Params().locked().merge(bx.Params()), ValueError, 'Locked mismatch: True vs False.',
                     r'\.unlocked\(\)'),
    'path_not_found': (lambda: _net()[2][('net', 'rng', 'sed')], KeyError, "Path '('net', 'rng', 'sed')' not found.",
                       'Did you mean net/rng/seed'),
    'set_locked': (lambda: bx.Params().locked().__setitem__(('a',), bx.Param(jnp.ones(2))), RuntimeError,
                   'Cannot set params after locking. Use unlocked() first.', r'Cannot set a: params are locked'),
    'set_not_param': (lambda: bx.Params().__setitem__(('a',), jnp.ones(2)), TypeError, 'Expected Param, got ArrayImpl',
                      r'bx\.Param\(value\)'),
    'pool_rank': (lambda: bx.max_pool(jnp.ones(4), 2), ValueError,
                  'Expected input rank >= 2 for 1D pooling (at least 1 spatial dims + 1 channel dim), got 1.',
                  r'max_pool.*shape \(4,\)'),
}


@pytest.mark.parametrize('case', sorted(ERRORS))
def test_error_starts_with_the_jaxblox_sentence(case):
  fn, exc_type, sentence, detail = ERRORS[case]
  with pytest.raises(exc_type, match='^' + re.escape(sentence)) as info:
    fn()
  assert re.search(detail, str(info.value)[len(sentence):]), str(info.value)  # blox's detail follows


# -- '/' inside a graph name is one path element ------------------------------------------------


class _TwoLinears(bx.Module):
  """Two Linears whose paths are equal once '/'-joined: `ff/in` (one name) and `ff` / `in`."""

  def __init__(self, graph, rng):
    super().__init__(graph)
    self.one = bx.Linear(graph.child('ff/in'), 4, rng)
    self.nested = bx.Linear(graph / 'ff' / 'in', 4, rng)

  def __call__(self, params, x):
    y, params = self.one(params, x)
    z, params = self.nested(params, y)
    return z, params


def _slash_model():
  graph = bx.Graph('model/v1')
  rng = bx.Rng(graph.child('rng'))
  block = _TwoLinears(graph.child('encoder/decoder'), rng)
  params = rng.seed(bx.Params(), seed=0)
  _, params = block(params, jnp.ones((2, 4)))
  return graph, block, params.locked()


def test_slash_in_a_graph_name_is_one_path_element():
  graph = bx.Graph('model/v1')
  child = graph.child('encoder/decoder')
  assert child.path == ('model/v1', 'encoder/decoder') and child.name == 'encoder/decoder'
  assert (graph / 'a' / 'b').path == ('model/v1', 'a', 'b')  # '/' the operator still nests
  _, _, params = _slash_model()
  assert ('model/v1', 'encoder/decoder', 'ff/in', 'kernel') in params
  assert ('model/v1', 'encoder/decoder', 'ff', 'in', 'kernel') in params


def test_slash_names_round_trip_through_summary():
  graph, _, params = _slash_model()
  text = bx.summary(graph, params)
  names = [line.split()[0] for line in text.splitlines() if line.startswith('model')]
  assert sorted(bx.str_to_path(n) for n in names) == sorted(params.keys())
  assert 'model%2Fv1/encoder%2Fdecoder/ff%2Fin/kernel' in names
  assert 'model%2Fv1/encoder%2Fdecoder/ff/in/kernel' in names


def _key_free(params):  # typed keys compare through their data
  return {path: np.asarray(jax.random.key_data(p.value) if jax.dtypes.issubdtype(p.value.dtype, jax.dtypes.prng_key)
                           else p.value) for path, p in params.items()}


def test_slash_names_round_trip_through_checkpoint_save_and_restore(tmp_path):
  from blox_scale.training.checkpoint import Checkpointer
  from blox_scale.training.config import CheckpointConfig
  _, _, params = _slash_model()
  state = {'params': params, 'step': jnp.asarray(1, jnp.int32)}
  ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
  ckpt.save(1, state)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored, _ = ckpt.restore(1, abstract)
  ckpt.close()
  assert sorted(restored['params'].keys()) == sorted(params.keys())
  tree_allclose(_key_free(restored['params']), _key_free(params), rtol=0, atol=0)


def test_slash_names_round_trip_through_unstack_and_restack():
  import blox_scale as bs
  graph = bx.Graph('model/v1')
  rng = bx.Rng(graph.child('rng'))
  stack = bs.Stack(graph.child('layers/main'), lambda g: _TwoLinears(g, rng), 3, rng=rng)
  params = rng.seed(bx.Params(), seed=0)
  _, params = stack(params, jnp.ones((2, 4)))
  per_layer = bs.unstack(params, stack)
  kernel = params[stack.block.graph.path + ('ff/in', 'kernel')].value
  for i in range(3):
    np.testing.assert_array_equal(per_layer[('model/v1', 'layers/main', f'layer_{i}', 'ff/in', 'kernel')].value, kernel[i])
    assert ('model/v1', 'layers/main', f'layer_{i}', 'ff', 'in', 'kernel') in per_layer
  back = bs.restack(per_layer, stack)
  assert list(back.keys()) == list(params.keys())
  assert [p.metadata for p in back.values()] == [p.metadata for p in params.values()]
  tree_allclose(_key_free(back), _key_free(params), rtol=0, atol=0)


def test_sharding_errors_name_slash_paths_unambiguously():
  from blox_scale.parallel import sharding
  from blox_scale.training.config import MeshConfig
  params = bx.Params({('model/v1', 'w'): bx.Param(jax.ShapeDtypeStruct((6, 4), jnp.float32),
                                                  metadata={'sharding': ('mlp',)})})
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
  with pytest.raises(ValueError, match=r"Param model%2Fv1/w: dimension 0 \('mlp', size 6\) is not divisible"):
    sharding.param_shardings(params, mesh, sharding.rules_from_config(MeshConfig()))


def test_lora_path_patterns_read_slash_names_like_path_to_str():
  from blox_scale.finetune.wrap import path_matches
  path = ('lm', 'encoder/decoder', 'q', 'kernel')
  assert path_matches(path, 'encoder%2Fdecoder/q') and path_matches(path, bx.path_to_str(path[1:3]))
  assert not path_matches(path, 'encoder/decoder/q')  # three names, not the two of this path
