"""Code written against jax-blox 0.1.6 runs unchanged: its module paths, the inputs it accepts,
tensor-parallel layers inside shard_map, and its error wording (blox adds path, values and fix
after jax-blox's sentence)."""

import pytest

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
