"""Stack: per-layer inputs/outputs (KV cache), heterogeneous groups, errors."""

import jax
import jax.numpy as jnp
import pytest
from helpers import tree_allclose

import blox as bx
import blox_scale as bs
from test_stack import B, D, H, RawMLP, _replace, build, x_input


# -- per-layer inputs/outputs (KV-cache style) ----------------------------------------------


class CacheBlock(bx.Module):
  """Writes its input into its own cache slot `pos` and attends (mean) over the cache."""

  def __init__(self, graph, rng):
    super().__init__(graph)
    self.proj = bx.Linear(graph.child('proj'), D, rng=rng)

  def __call__(self, params, x, cache, pos):
    cache = jax.lax.dynamic_update_slice(cache, x[:, None, :], (0, pos, 0))  # [B, T, D]
    h, params = self.proj(params, jnp.mean(cache, axis=1))
    return (x + jnp.tanh(h), cache), params


def _cache_reference(params, x, caches, pos, L):
  root = bx.Graph('m')
  rng = bx.Rng(root.child('rng'))
  node = root.child('stack')
  blocks = [CacheBlock(node.child(f'layer_{i}'), rng) for i in range(L)]
  outs = []
  for i, blk in enumerate(blocks):
    data = {p: q for p, q in params.items() if p[:3] != ('m', 'stack', 'block')}
    for p, q in params.items():
      if p[:3] == ('m', 'stack', 'block'):
        data[('m', 'stack', f'layer_{i}') + p[3:]] = bx.Param(q.value[i])
    (x, c), _ = blk(bx.Params.from_items(data, locked=True), x, caches[i], pos)
    outs.append(c)
  return x, jnp.stack(outs)


@pytest.mark.parametrize('kw', [dict(scan=True), dict(scan=False), dict(nested=2)], ids=['scan', 'loop', 'nested'])
def test_call_per_layer_kv_cache_under_jit(kw):
  L, T = 4, 5
  stack, _, params = build(CacheBlock, L, **kw)
  x = x_input()
  caches = jnp.zeros((L, B, T, D))
  (_, _), params = stack.call_per_layer(params, x, caches, 0)
  params = params.locked()
  step = jax.jit(lambda p, x, c, pos: stack.call_per_layer(p, x, c, pos))
  ref_caches = caches
  for pos in range(3):
    xt = x_input(10 + pos)
    (y, caches), _ = step(params, xt, caches, pos)
    y_ref, ref_caches = _cache_reference(params, xt, ref_caches, pos, L)
    tree_allclose(y, y_ref)
    tree_allclose(caches, ref_caches)
  assert caches.shape == (L, B, T, D)
  assert float(jnp.abs(caches[:, :, 3:]).max()) == 0.0 and float(jnp.abs(caches[:, :, :3]).min()) > 0


# -- heterogeneous groups --------------------------------------------------------------------


class Scale(bx.Module):
  def __init__(self, graph, rng):
    super().__init__(graph)
    self.rng = rng

  def __call__(self, params, x):
    s, params = self.get_param(params, 's', (D,), jax.nn.initializers.normal(1.0), rng=self.rng,
                               metadata={'sharding': ('embed',)})
    return jnp.tanh(x * s[None, :]), params


def test_group_of_different_blocks_scanned_and_remainder_stack():
  root = bx.Graph('m')
  rng = bx.Rng(root.child('rng'))
  pattern = [lambda g: RawMLP(g, rng), lambda g: RawMLP(g, rng), lambda g: Scale(g, rng)]
  main = bs.Stack(root.child('stack'), lambda g: bs.Group(g, pattern), 2, rng=rng)  # layers 0..5
  rest = bs.Stack(root.child('rest'), lambda g: bs.Group(g, pattern[:1]), 1, rng=rng)  # layer 6
  params = rng.seed(bx.Params(), seed=0)
  x = x_input()

  def model(params, x):
    x, params = main(params, x)
    return rest(params, x)

  _, params = model(params, x)
  params = params.locked()
  assert params[('m', 'stack', 'block', 'sub_2', 's')].value.shape == (2, D)
  assert params[('m', 'stack', 'block', 'sub_0', 'w1')].value.shape == (2, D, H)
  y, _ = jax.jit(model)(params, x)
  # Unrolled by hand: the pattern's blocks applied in order, params sliced per repeat.
  ref = x
  for r in range(2):
    for j in range(3):
      v = {k[-1]: q.value[r] for k, q in params.items() if k[:4] == ('m', 'stack', 'block', f'sub_{j}')}
      ref = jnp.tanh(ref * v['s'][None, :]) if j == 2 else ref + jnp.tanh(ref @ v['w1'] + v['b1'][None, :]) @ v['w2']
  v = {k[-1]: q.value[0] for k, q in params.items() if k[:4] == ('m', 'rest', 'block', 'sub_0')}
  ref = ref + jnp.tanh(ref @ v['w1'] + v['b1'][None, :]) @ v['w2']
  tree_allclose(y, ref)


def test_pattern_list_is_a_group_and_counts_sub_blocks():
  root = bx.Graph('m')
  rng = bx.Rng(root.child('rng'))
  pattern = [lambda g: RawMLP(g, rng), lambda g: Scale(g, rng)]
  stack = bs.Stack(root.child('stack'), pattern, 6, rng=rng)
  assert isinstance(stack.block, bs.Group) and stack.num_layers == 3
  _, params = stack(rng.seed(bx.Params(), seed=0), x_input())
  assert params[('m', 'stack', 'block', 'sub_1', 's')].value.shape == (3, D)
  with pytest.raises(ValueError, match=r'num_layers=7 is not divisible by the group size 2.*second Stack'):
    bs.Stack(root.child('bad'), pattern, 7, rng=rng)


# -- errors ----------------------------------------------------------------------------------


class Widen(bx.Module):
  def __call__(self, params, x):
    return jnp.concatenate([x, x], axis=-1), params


class ToHalf(bx.Module):
  def __call__(self, params, x):
    return x.astype(jnp.float16), params


def test_error_block_changes_carry_shape_names_both_shapes():
  stack = bs.Stack(bx.Graph('m').child('s'), lambda g: Widen(g), 2)
  with pytest.raises(ValueError, match=r'float32\[3, 4\] and output float32\[3, 8\]'):
    stack(bx.Params(), x_input())


def test_error_block_changes_carry_dtype():
  stack = bs.Stack(bx.Graph('m').child('s'), lambda g: ToHalf(g), 2)
  with pytest.raises(ValueError, match=r'input float32\[3, 4\] and output float16\[3, 4\]'):
    stack(bx.Params(), x_input())


@pytest.mark.parametrize('n', [0, -1, 2.0, True])
def test_error_num_layers(n):
  with pytest.raises(ValueError, match='num_layers must be an int >= 1'):
    bs.Stack(bx.Graph('m').child('s'), lambda g: Widen(g), n)


def test_error_unknown_remat_lists_valid_names():
  with pytest.raises(ValueError, match="Unknown remat policy 'dotz'.*dots, dots_no_batch, full, none, offload_names, save_names"):
    bs.Stack(bx.Graph('m').child('s'), lambda g: Widen(g), 2, remat='dotz')


def test_error_nested_group_size_must_divide():
  with pytest.raises(ValueError, match='num_layers=6 is not divisible by the nested group size nested=4'):
    bs.Stack(bx.Graph('m').child('s'), lambda g: Widen(g), 6, nested=4)
  with pytest.raises(ValueError, match='num_layers=7'):
    bs.Stack(bx.Graph('m').child('s'), lambda g: Widen(g), 7, nested=True)


def test_error_params_differ_between_layers():
  stack, _, params = build(RawMLP, 3)
  params = stack.init(params, x_input())
  bad = _replace(params, ('m', 'stack', 'block', 'w1'), params[('m', 'stack', 'block', 'w1')].value[:2])
  with pytest.raises(ValueError, match=r'm/stack/block/w1 has shape \(2, 4, 6\).*num_layers=3'):
    stack(bad, x_input())


def test_error_block_creates_params_outside_its_path():
  root = bx.Graph('m')
  rng = bx.Rng(root.child('rng'))
  outside = bx.Linear(root.child('outside'), D, rng=rng)

  class Leaky(bx.Module):
    def __call__(self, params, x):
      return outside(params, x)

  stack = bs.Stack(root.child('s'), lambda g: Leaky(g), 2, rng=rng)
  with pytest.raises(ValueError, match=r'outside its own graph path m/s/block.*m/outside/kernel'):
    stack(rng.seed(bx.Params(), seed=0), x_input())


def test_error_block_creates_params_after_init():
  class Late(bx.Module):
    calls = 0

    def __call__(self, params, x):
      Late.calls += 1
      name = 'a' if Late.calls == 1 else 'b'  # a different param on later calls
      w, params = self.get_param(params, name, (D,), jax.nn.initializers.ones)
      return x * w[None, :], params

  stack = bs.Stack(bx.Graph('m').child('s'), lambda g: Late(g), 2)
  with pytest.raises(ValueError, match=r"created params \['m/s/block/b'\] after the stack was initialised"):
    stack(bx.Params(), x_input())


def test_error_locked_without_block_params():
  stack, _, params = build(RawMLP, 2)
  with pytest.raises(bx.ParamsLockedError, match='no block params under m/stack/block'):
    stack(params.locked(), x_input())

