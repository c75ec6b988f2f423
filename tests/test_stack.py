"""Stack: scanned == Python loop == an independent unrolled reference, init, RNG, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_allclose

import blox as bx
import blox_scale as bs

B, D, H = 3, 4, 6


# -- blocks ------------------------------------------------------------------------


class RawMLP(bx.Module):
  """A user block written with get_param only: x + w2 tanh(x w1 + b1)."""

  def __init__(self, graph, rng):
    super().__init__(graph)
    self.rng = rng

  def __call__(self, params, x):
    init = jax.nn.initializers.normal(0.5)
    w1, params = self.get_param(params, 'w1', (D, H), init, rng=self.rng, metadata={'sharding': ('embed', 'mlp')})
    b1, params = self.get_param(params, 'b1', (H,), init, rng=self.rng)  # no sharding on purpose
    w2, params = self.get_param(params, 'w2', (H, D), init, rng=self.rng, metadata={'sharding': ('mlp', 'embed')})
    return x + jnp.tanh(x @ w1 + b1[None, :]) @ w2, params


class LayersMLP(bx.Module):
  """Pre-norm residual MLP from our layers."""

  def __init__(self, graph, rng):
    super().__init__(graph)
    self.norm = bx.LayerNorm(graph.child('norm'))
    self.up = bx.Linear(graph.child('up'), H, rng=rng)
    self.down = bx.Linear(graph.child('down'), D, rng=rng)

  def __call__(self, params, x):
    h, params = self.norm(params, x)
    h, params = self.up(params, h)
    h, params = self.down(params, jax.nn.gelu(h))
    return x + h, params


class DropBN(bx.Module):
  """Test-only block with Dropout (shared rng) and BatchNorm (stacked stats)."""

  def __init__(self, graph, rng):
    super().__init__(graph)
    self.up = bx.Linear(graph.child('up'), H, rng=rng)
    self.drop = bx.Dropout(graph.child('drop'), 0.3, rng)
    self.down = bx.Linear(graph.child('down'), D, rng=rng)
    self.bn = bx.BatchNorm(graph.child('bn'), momentum=0.8)

  def __call__(self, params, x, is_training=True):
    h, params = self.up(params, x)
    h, params = self.drop(params, jnp.tanh(h), is_training=is_training)
    h, params = self.down(params, h)
    h, params = self.bn(params, h, is_training=is_training)
    return x + h, params


BLOCKS = {'raw_mlp': RawMLP, 'layers_mlp': LayersMLP, 'dropout_bn': DropBN}


def build(block_cls, num_layers=4, seed=0, **kw):
  root = bx.Graph('m')
  rng = bx.Rng(root.child('rng'))
  stack = bs.Stack(root.child('stack'), lambda g: block_cls(g, rng), num_layers, rng=rng, **kw)
  params = rng.seed(bx.Params(), seed=seed)
  return stack, rng, params


def x_input(seed=1):
  return jax.random.normal(jax.random.key(seed), (B, D))


def reference(block_cls, stacked_params, x, num_layers):
  """L separately built blocks fed hand-sliced params, RNG derived by hand.

  Independent of Stack: per-layer params at m/stack/layer_i/..., the shared
  stream drawn once (fold_in(seed, counter)), layer i reseeded with
  fold_in(key, i), counter 0; afterwards seed unchanged, counter + 1.
  """
  root = bx.Graph('m')
  rng = bx.Rng(root.child('rng'))
  node = root.child('stack')
  blocks = [block_cls(node.child(f'layer_{i}'), rng) for i in range(num_layers)]
  prefix = ('m', 'stack', 'block')
  seed = stacked_params[('m', 'rng', 'seed')].value
  counter = stacked_params[('m', 'rng', 'counter')].value
  key = jax.random.fold_in(seed, counter)
  outer = {p: q for p, q in stacked_params.items() if p[:3] != prefix}
  stacked = {p: q for p, q in stacked_params.items() if p[:3] == prefix}
  new_values = {}
  for i, block in enumerate(blocks):
    data = dict(outer)
    data[('m', 'rng', 'seed')] = bx.Param(jax.random.fold_in(key, i), False, outer[('m', 'rng', 'seed')].metadata)
    data[('m', 'rng', 'counter')] = bx.Param(jnp.uint32(0), False, outer[('m', 'rng', 'counter')].metadata)
    for p, q in stacked.items():
      data[('m', 'stack', f'layer_{i}') + p[3:]] = bx.Param(q.value[i], q.trainable)
    x, out = block(bx.Params.from_items(data, locked=True), x)
    for p in stacked:
      new_values.setdefault(p, []).append(out[('m', 'stack', f'layer_{i}') + p[3:]].value)
  data = dict(stacked_params.items())
  data[('m', 'rng', 'counter')] = data[('m', 'rng', 'counter')].replace(value=counter + jnp.uint32(1))
  for p, vs in new_values.items():
    data[p] = data[p].replace(value=jnp.stack(vs))
  return x, bx.Params.from_items(data, locked=stacked_params.is_locked)


def vals(params):
  """`{path: value}` with typed keys as their raw data (comparable with allclose)."""
  is_key = lambda v: jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
  return {p: jax.random.key_data(v) if is_key(v) else v for p, v in params.values_dict().items()}


def loss_and_state(run, params, x):
  """(loss, (y, new params)) with loss a scalar of y; grads w.r.t. trainables."""
  trainable, rest = params.split()

  def loss(trainable):
    y, new = run(trainable.merge(rest), x)
    return jnp.sum(jnp.sin(y) * y), (y, new)

  return jax.value_and_grad(loss, has_aux=True)(trainable)


# -- equality with the loop and the reference ------------------------------------------


@pytest.mark.parametrize('name', sorted(BLOCKS))
def test_scan_equals_loop_and_unrolled_reference(name):
  cls = BLOCKS[name]
  L = 3
  stack, _, params = build(cls, L)
  x = x_input()
  params = stack.init(params, x)  # the stacked block params (no run)
  params = params.locked()
  loop, _, _ = build(cls, L, scan=False)

  (l_scan, (y_scan, p_scan)), g_scan = jax.jit(lambda p, x: loss_and_state(stack, p, x))(params, x)
  (l_loop, (y_loop, p_loop)), g_loop = jax.jit(lambda p, x: loss_and_state(loop, p, x))(params, x)
  (l_ref, (y_ref, p_ref)), g_ref = jax.jit(lambda p, x: loss_and_state(
      lambda q, x: reference(cls, q, x, L), p, x))(params, x)

  tree_allclose(y_scan, y_ref, rtol=1e-5, atol=1e-5)
  tree_allclose(y_loop, y_ref, rtol=1e-5, atol=1e-5)
  tree_allclose(vals(p_scan), vals(p_ref), rtol=1e-5, atol=1e-5)
  tree_allclose(vals(p_loop), vals(p_ref), rtol=1e-5, atol=1e-5)
  tree_allclose(g_scan.values_dict(), g_ref.values_dict(), rtol=1e-5, atol=1e-5)
  tree_allclose(g_loop.values_dict(), g_ref.values_dict(), rtol=1e-5, atol=1e-5)
  # The outputs are not trivially equal to the input (the test can fail).
  assert float(jnp.max(jnp.abs(y_ref - x))) > 1e-2


def test_batchnorm_stats_are_stacked_and_updated_per_layer():
  stack, _, params = build(DropBN, 3)
  x = x_input()
  _, params = stack(params, x)  # init, then one training run
  mean = ('m', 'stack', 'block', 'bn', 'running_mean')
  assert params[mean].metadata['sharding'] == ('layers', 'norm')
  # Init stored the CREATED statistics (zeros / ones), which the first run then
  # updated once, exactly like an unstacked BatchNorm's first call: the
  # reference, started from those initial values, lands on the same stats.
  _, ref = jax.jit(lambda p, x: reference(DropBN, p, x, 3))(_reset_stats(params), x)
  tree_allclose(params[mean].value, ref[mean].value)
  tree_allclose(params[mean[:-1] + ('running_var',)].value, ref[mean[:-1] + ('running_var',)].value)
  after = np.asarray(params[mean].value)
  assert after.shape == (3, D)
  assert not np.allclose(after[0], after[1])  # each layer keeps its own statistics
  _, params2 = jax.jit(lambda p, x: stack(p, x))(params.locked(), x)
  assert not np.allclose(np.asarray(params2[mean].value), after)  # updated again


def _with_value(params, path, value):
  data = dict(params.items())
  data[path] = data[path].replace(value=value)
  return bx.Params.from_items(data, locked=params.is_locked)


def _reset_stats(params):
  """Params as they were right after init: stats at their initial values, counter rewound."""
  p = _with_value(params, ('m', 'stack', 'block', 'bn', 'running_mean'), jnp.zeros((3, D)))
  p = _with_value(p, ('m', 'stack', 'block', 'bn', 'running_var'), jnp.ones((3, D)))
  return _with_value(p, ('m', 'rng', 'counter'), params[('m', 'rng', 'counter')].value - jnp.uint32(1))


def test_unroll_and_nested_give_the_same_results():
  """Dropout keys and BatchNorm statistics too: layer i is layer i in every schedule."""
  L = 6
  stack, _, params = build(DropBN, L)
  x = x_input()
  params = stack.init(params, x).locked()
  (l0, (y0, p0)), g0 = jax.jit(lambda p, x: loss_and_state(stack, p, x))(params, x)
  for kw in [dict(unroll=2), dict(nested=True), dict(nested=3, unroll=3)]:
    other, _, _ = build(DropBN, L, **kw)
    (l1, (y1, p1)), g1 = jax.jit(lambda p, x: loss_and_state(other, p, x))(params, x)
    tree_allclose(y1, y0)
    tree_allclose(vals(p1), vals(p0))
    tree_allclose(g1.values_dict(), g0.values_dict())


# -- randomness ----------------------------------------------------------------------------


class MaskBlock(bx.Module):
  """Emits its dropout mask as a per-layer output."""

  def __init__(self, graph, rng):
    super().__init__(graph)
    self.drop = bx.Dropout(graph.child('drop'), 0.5, rng)

  def __call__(self, params, x, x_i):
    mask, params = self.drop(params, jnp.ones((16, 16)))
    return (x, mask), params


@pytest.mark.parametrize('scan', [True, False])
def test_dropout_masks_differ_by_layer_and_repeat_for_same_seed_and_counter(scan):
  stack, rng, params = build(MaskBlock, 4, scan=scan)
  x = jnp.zeros((B, D))
  xs = jnp.zeros((4, 1))
  run = jax.jit(lambda p: stack.call_per_layer(p, x, xs))
  (_, masks), params = run(params)
  masks = np.asarray(masks)
  assert masks.shape == (4, 16, 16)
  for i in range(4):
    for j in range(i):
      assert not np.array_equal(masks[i], masks[j]), (i, j)
  # Same seed and counter -> same masks; the stack advanced the counter by exactly one.
  assert int(rng.get_counter(params)) == 1
  (_, again), _ = run(rng.seed(params, counter=0))
  np.testing.assert_array_equal(np.asarray(again), masks)
  (_, next_masks), _ = run(params)
  assert not np.array_equal(np.asarray(next_masks), masks)
  # Layer i's key is fold_in(fold_in(seed, counter), i), its counter starting at 0.
  key = jax.random.fold_in(jax.random.fold_in(rng.get_seed(params), 0), 2)
  expected = jax.random.bernoulli(jax.random.fold_in(key, 0), 0.5, (16, 16)) * 2.0
  np.testing.assert_array_equal(masks[2], np.asarray(expected))


# -- init --------------------------------------------------------------------------------


class CountingBlock(RawMLP):
  init_calls: list = []

  def __call__(self, params, x):
    if self.param_path('w1') not in params:
      CountingBlock.init_calls.append(params[('m', 'rng', 'seed')].value)
    return super().__call__(params, x)


def test_init_is_vmapped_once_and_layers_differ():
  CountingBlock.init_calls = []
  stack, _, params = build(CountingBlock, 5)
  _, params = stack(params, x_input())
  assert len(CountingBlock.init_calls) == 1  # one (vmapped) call, not a loop of 5
  seed_seen = CountingBlock.init_calls[0]
  assert isinstance(seed_seen, jax.core.Tracer) and 'Batch' in type(seed_seen).__name__
  w1 = np.asarray(params[('m', 'stack', 'block', 'w1')].value)
  assert w1.shape == (5, D, H)
  for i in range(1, 5):
    assert not np.allclose(w1[0], w1[i])
  assert params[('m', 'stack', 'block', 'w1')].metadata['sharding'] == ('layers', 'embed', 'mlp')
  assert params[('m', 'stack', 'block', 'b1')].metadata['sharding'] == ('layers', None)
  assert len([p for p in params if p[:3] == ('m', 'stack', 'block')]) == 3


def test_init_does_not_depend_on_modules_created_before_the_stack():
  x = x_input()
  stack, rng, params = build(RawMLP, 3)
  _, p_alone = stack(params, x)

  root = bx.Graph('m')
  rng2 = bx.Rng(root.child('rng'))
  embed = bx.Linear(root.child('embed'), D, rng=rng2)
  stack2 = bs.Stack(root.child('stack'), lambda g: RawMLP(g, rng2), 3, rng=rng2)
  params2 = rng2.seed(bx.Params(), seed=0)
  h, params2 = embed(params2, x)  # draws keys from the shared stream first
  counter_before = int(rng2.get_counter(params2))
  _, params2 = stack2(params2, h)
  block = [p for p in p_alone if p[:3] == ('m', 'stack', 'block')]
  tree_allclose({p: p_alone[p].value for p in block}, {p: params2[p].value for p in block}, rtol=0, atol=0)
  # Init draws do not leak: the stack advanced the shared counter by its one run-time draw.
  assert int(rng2.get_counter(params2)) == counter_before + 1


def test_outer_rng_state_goes_through_the_carry_and_outer_trainables_get_gradients():
  root = bx.Graph('m')
  rng = bx.Rng(root.child('rng'))
  other = bx.Rng(root.child('other'))
  shared = bx.Linear(root.child('shared'), D, rng=rng)

  class UsesOuter(bx.Module):
    def __call__(self, params, x):
      key, params = other(params)  # another stream: its counter is scan carry
      w, _ = shared.get_param(params, 'kernel')  # a shared trainable, closed over
      return x @ w + jax.random.normal(key, x.shape), params

  stack = bs.Stack(root.child('stack'), lambda g: UsesOuter(g), 3)
  params = other.seed(rng.seed(bx.Params(), seed=0), seed=1)
  x = x_input()
  _, params = shared(params, x)
  (y, params_out) = stack(params, x)
  assert int(other.get_counter(params_out)) == 3
  w = params[('m', 'shared', 'kernel')].value
  seed = other.get_seed(params)
  ref = x
  for i in range(3):
    ref = ref @ w + jax.random.normal(jax.random.fold_in(seed, i), x.shape)
  tree_allclose(y, ref)
  grad = jax.grad(lambda w: jnp.sum(stack(_replace(params, ('m', 'shared', 'kernel'), w), x)[0]))(w)
  grad_ref = jax.grad(lambda w: jnp.sum(((x @ w + jax.random.normal(jax.random.fold_in(seed, 0), x.shape)) @ w
                                         + jax.random.normal(jax.random.fold_in(seed, 1), x.shape)) @ w
                                        + jax.random.normal(jax.random.fold_in(seed, 2), x.shape)))(w)
  tree_allclose(grad, grad_ref)


def _replace(params, path, value):
  data = dict(params.items())
  data[path] = data[path].replace(value=value)
  return bx.Params.from_items(data, locked=params.is_locked)


def test_unchanged_params_are_not_emitted_by_the_scan():
  """Only genuinely per-layer outputs leave the scan: no stacked copy of the weights."""
  stack, _, params = build(DropBN, 4)
  x = x_input()
  _, params = stack(params, x)
  jaxpr = jax.make_jaxpr(lambda p, x: stack(p, x))(params.locked(), x)
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
  assert len(scans) == 1
  num_carry = scans[0].params['num_carry']
  stacked_outs = [v.aval.shape for v in scans[0].outvars[num_carry:]]
  # Two per-layer outputs: the BatchNorm running mean and variance, [layers, D] each.
  assert stacked_outs == [(4, D), (4, D)]
  # The returned weights are the very arrays passed in (not copies out of the scan).
  _, out = stack(params.locked(), x)
  assert out[('m', 'stack', 'block', 'up', 'kernel')].value is params[('m', 'stack', 'block', 'up', 'kernel')].value


# -- jit -------------------------------------------------------------------------------


def test_train_step_traces_once_and_leaf_count_is_independent_of_depth():
  leaves = {}
  for L in (2, 8):
    stack, _, params = build(DropBN, L)
    x = x_input()
    params = stack.init(params, x)
    leaves[L] = len(jax.tree.leaves(params.locked()))
    traces = []

    @jax.jit
    def step(params, x):
      traces.append(1)
      (loss, (_, new)), grads = loss_and_state(stack, params, x)
      trainable, _ = new.split()
      updated = jax.tree.map(lambda p, g: p - 0.01 * g, trainable, grads)
      return loss, new.merge(updated)

    params = params.locked()
    losses = []
    for _ in range(3):
      loss, params = step(params, x)
      losses.append(float(loss))
    assert len(traces) == 1
    assert losses[0] != losses[2]
  assert leaves[2] == leaves[8]
