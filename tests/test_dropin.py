"""Code written against jax-blox 0.1.6 runs unchanged: its module paths, the inputs it accepts,
tensor-parallel layers inside shard_map, and its error wording (blox adds path, values and fix
after jax-blox's sentence)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import blox as bx

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

  return rng, mlp


def test_column_then_row_parallel_linear_in_shard_map_equals_single_device_mlp():
  rng, mlp = _tp_mlp()
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
  rng, mlp = _tp_mlp()
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
