"""blox_scale.nn blocks against hand-written jax.numpy references, forward and gradient, f32 and bf16.

The references below are written from the papers' formulas, not from our
code: RoPE as a complex rotation, GQA by repeating K/V heads, masks as
explicit index comparisons, softmax attention by hand. bf16 runs build the
module with `dtype=bfloat16` over float32 params: activations come out bf16,
gradients f32, and match the f32 reference evaluated on bf16-rounded inputs
and params within bf16 tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blox as bx
from blox_scale.nn import (MLP, Attention, AttentionConfig, BlockConfig, MLPConfig, TransformerBlock, apply_rope,
                           attention_mask)
from helpers import tree_allclose
from lm_helpers import fill_params

BF16 = jnp.bfloat16
F32_TOLS = dict(rtol=1e-5, atol=1e-5)
B, T, D = 2, 7, 16


# -----------------------------------------------------------------------------
# References
# -----------------------------------------------------------------------------


def ref_rope(x, theta):
  """x: [B, T, N, H]; positions 0..T-1. Pairs (x_i, x_{i+H/2}) as complex numbers."""
  h = x.shape[-1] // 2
  pos = np.arange(x.shape[1], dtype=np.float32)
  freq = theta ** (-np.arange(h, dtype=np.float32) * 2.0 / x.shape[-1])
  rot = jnp.exp(1j * jnp.asarray(pos[:, None] * freq[None, :]))              # [T, H/2]
  z = (x[..., :h] + 1j * x[..., h:]) * rot[None, :, None, :]
  return jnp.concatenate([z.real, z.imag], axis=-1).astype(jnp.float32)


def bc(v, ndim):
  """A trailing-axis vector/matrix broadcast explicitly (rank promotion raises)."""
  return jnp.reshape(v, (1,) * (ndim - jnp.ndim(v)) + jnp.shape(v))


def ref_rms(x, scale, eps=1e-5):
  return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * bc(scale, x.ndim)


def ref_layernorm(x, scale, bias, eps=1e-5):
  mu = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + eps) * bc(scale, x.ndim) + bc(bias, x.ndim)


def ref_attention(w, x, *, num_heads, num_kv_heads, window=0, qk_norm=False, theta=10000.0, bias=False):
  q = jnp.einsum('btd,dnh->btnh', x, w['q'])
  k = jnp.einsum('btd,dnh->btnh', x, w['k'])
  v = jnp.einsum('btd,dnh->btnh', x, w['v'])
  if bias:
    q, k, v = q + bc(w['q_bias'], 4), k + bc(w['k_bias'], 4), v + bc(w['v_bias'], 4)
  if qk_norm:
    q, k = ref_rms(q, w['q_norm/scale']), ref_rms(k, w['k_norm/scale'])
  q, k = ref_rope(q, theta), ref_rope(k, theta)
  group = num_heads // num_kv_heads
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)        # [B, T, N, H]
  logits = jnp.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  t, s = np.arange(x.shape[1])[:, None], np.arange(x.shape[1])[None, :]
  allowed = s <= t
  if window:
    allowed = allowed & (s > t - window)
  logits = jnp.where(jnp.asarray(allowed)[None, None], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bnts,bsnh->btnh', probs, v)
  y = jnp.einsum('btnh,nhd->btd', out, w['o'])
  return y + bc(w['o_bias'], 3) if bias else y


def ref_mlp(w, x, activation, bias=False):
  b = (lambda name: bc(w[name], x.ndim)) if bias else (lambda name: 0.0)
  if activation == 'swiglu':
    gate = x @ w['wi_gate/kernel'] + b('wi_gate/bias')
    up = x @ w['wi_up/kernel'] + b('wi_up/bias')
    h = gate / (1 + jnp.exp(-gate)) * up
  else:
    a = x @ w['wi/kernel'] + b('wi/bias')
    h = 0.5 * a * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))
  return h @ w['wo/kernel'] + b('wo/bias')


# -----------------------------------------------------------------------------
# Harness
# -----------------------------------------------------------------------------


def _round(tree, dtype):
  if dtype is None:
    return tree
  return jax.tree.map(lambda a: a.astype(dtype).astype(jnp.float32), tree)


def check(make, ref, x, dtype, *, call=None, bf16_atol=2e-2):
  """Module vs reference: outputs and gradients (params and x) with a random cotangent.

  Params come from `fill_params` over the module's abstract params (no
  compiled init); each side runs its forward and backward in ONE jit.
  """
  call = call or (lambda m, p, x: m(p, x))
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  module = make(g.child('m'), rng, dtype)
  seeded = rng.seed(bx.Params(), seed=0)
  params = fill_params(jax.eval_shape(lambda p, x: call(module, p, x)[1], seeded, x).locked())
  trainable, rest = params.split()
  names = lambda tree: {'/'.join(k[2:]): v.value for k, v in tree.items()}
  w = _round(names(trainable), dtype)
  x_in = _round(x, dtype)

  forward = lambda t, x: call(module, t.merge(rest), x)[0]
  y_shape = jax.eval_shape(forward, trainable, x)
  ct = jax.random.normal(jax.random.key(7), y_shape.shape, jnp.float32)

  @jax.jit
  def module_side(t, x):
    y, vjp = jax.vjp(forward, t, x)
    return y, vjp(ct.astype(y.dtype))

  @jax.jit
  def ref_side(w, x):
    y, vjp = jax.vjp(ref, w, x)
    return y, vjp(ct)

  y, (g_params, g_x) = module_side(trainable, x)
  y_ref, (r_params, r_x) = ref_side(w, x_in)
  tols = F32_TOLS if dtype is None else dict(rtol=2e-2, atol=bf16_atol)
  assert y.shape == y_ref.shape
  assert y.dtype == (x.dtype if dtype is None else dtype)
  tree_allclose(y, y_ref, **tols)

  g_params = names(g_params)
  assert all(v.dtype == jnp.float32 for v in g_params.values()), 'param grads must be f32'
  assert sorted(g_params) == sorted(r_params)
  if dtype is None:
    tree_allclose((g_params, g_x), (r_params, r_x), rtol=1e-4, atol=1e-4)
  else:
    # bf16 gradients sum many rounded products: compare each leaf relative to
    # its largest entry (3% of the leaf's scale).
    unit = lambda a, r: a / jnp.maximum(jnp.max(jnp.abs(r)), 1e-6)
    tree_allclose(jax.tree.map(unit, (g_params, g_x), (r_params, r_x)),
                  jax.tree.map(unit, (r_params, r_x), (r_params, r_x)), rtol=0, atol=3e-2)
  return params


def _x(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


def _positions():
  return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))


# -----------------------------------------------------------------------------
# Tests
# -----------------------------------------------------------------------------


def test_rope_matches_complex_rotation_and_keeps_norms():
  x = np.random.default_rng(1).standard_normal((B, T, 3, 8)).astype(np.float32)
  y = jax.jit(apply_rope, static_argnums=2)(x, _positions(), 10000.0)
  tree_allclose(y, ref_rope(x, 10000.0), **F32_TOLS)
  tree_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), **F32_TOLS)
  # q.k depends only on the position difference.
  q, k = x[:1, :1, :1], x[1:, :1, :1]
  dot = jax.jit(lambda i, j: jnp.sum(apply_rope(q, jnp.full((1, 1), i), 1e4) * apply_rope(k, jnp.full((1, 1), j), 1e4)))
  np.testing.assert_allclose(dot(3, 1), dot(10, 8), rtol=1e-4)
  with pytest.raises(ValueError, match='even head_dim'):
    apply_rope(jnp.ones((1, 1, 1, 3)), jnp.zeros((1, 1), jnp.int32), 1e4)


ATTENTION_CASES = [
    # (num_heads, num_kv_heads, window, qk_norm, bias, dtype)
    (4, 4, 0, False, False, None),     # MHA
    (4, 2, 0, False, True, None),      # GQA with biases
    (4, 1, 3, False, False, None),     # MQA, sliding window
    (4, 2, 4, True, False, None),      # GQA, window, QK-norm
    (4, 2, 0, False, False, BF16),
    (4, 1, 3, True, False, BF16),
]


@pytest.mark.parametrize('heads,kv_heads,window,qk_norm,bias,dtype', ATTENTION_CASES)
def test_attention_matches_reference(heads, kv_heads, window, qk_norm, bias, dtype):
  make = lambda g, rng, dt: Attention(g, AttentionConfig(num_heads=heads, num_kv_heads=kv_heads, sliding_window=window,
                                                         qk_norm=qk_norm, use_bias=bias, init_std=0.3, dtype=dt), rng)
  ref = lambda w, x: ref_attention(w, x, num_heads=heads, num_kv_heads=kv_heads, window=window,
                                   qk_norm=qk_norm, bias=bias)
  call = lambda m, p, x: m(p, x, _positions())
  params = check(make, ref, _x(), dtype, call=call)
  axes = {k[-1]: v.sharding for k, v in params.items() if k[1] == 'm'}
  assert axes['q'] == ('embed', 'heads', 'head_dim')
  assert axes['k'] == axes['v'] == ('embed', 'kv_heads', 'head_dim')
  assert axes['o'] == ('heads', 'head_dim', 'embed')
  assert params[('net', 'm', 'k')].shape == (D, kv_heads, D // heads)
  if qk_norm:
    assert axes['scale'] == ('norm',)


def test_attention_cache_path_equals_full_sequence():
  """Prefill 4 tokens then 3 single steps through the cache == one causal pass."""
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  attn = Attention(g.child('m'), AttentionConfig(num_heads=4, num_kv_heads=2, sliding_window=3), rng)
  x = _x()
  seeded = rng.seed(bx.Params(), seed=0)
  params = fill_params(jax.eval_shape(lambda p: attn(p, x, _positions())[1], seeded))

  @jax.jit
  def both(params, x):
    y_full, _ = attn(params, x, _positions())
    cache = {'k': jnp.zeros((B, T, 2, 4)), 'v': jnp.zeros((B, T, 2, 4))}
    valid = jnp.ones((B, T), bool)
    pieces, start = [], 0
    for length in (4, 1, 1, 1):
      slots = start + jnp.arange(length)
      (y, new), _ = attn(params, x[:, start:start + length], _positions()[:, start:start + length], cache,
                         mask=attention_mask(slots, valid, 3), cache_index=start)
      cache = {n: jax.lax.dynamic_update_slice(cache[n], new[n], (0, start, 0, 0)) for n in cache}
      pieces.append(y)
      start += length
    return jnp.concatenate(pieces, axis=1), y_full

  stepped, full = both(params, x)
  tree_allclose(stepped, full, **F32_TOLS)


def test_attention_mask_rules():
  valid = jnp.asarray([[True] * 6, [False, False] + [True] * 4])
  m = np.asarray(attention_mask(jnp.arange(6), valid, sliding_window=2))[:, 0]   # [B, T, S]
  t, s = np.arange(6)[:, None], np.arange(6)[None, :]
  expected = (s <= t) & (s > t - 2)
  np.testing.assert_array_equal(m[0], expected)
  np.testing.assert_array_equal(m[1], expected & (s >= 2))


def test_attention_rejects_bad_head_counts():
  with pytest.raises(ValueError, match='multiple of num_kv_heads=3'):
    Attention(bx.Graph('n').child('a'), AttentionConfig(num_heads=4, num_kv_heads=3))
  with pytest.raises(ValueError, match="implementation='flash' is not one of"):
    Attention(bx.Graph('n').child('a'), AttentionConfig(num_heads=4, implementation='flash'))


@pytest.mark.parametrize('activation,bias,dtype', [
    ('swiglu', False, None), ('gelu', True, None), ('swiglu', False, BF16), ('gelu', True, BF16)])
def test_mlp_matches_reference(activation, bias, dtype):
  make = lambda g, rng, dt: MLP(
      g, MLPConfig(mlp_dim=32, d_model=D, activation=activation, use_bias=bias, init_std=0.3, dtype=dt), rng)
  params = check(make, lambda w, x: ref_mlp(w, x, activation, bias), _x(), dtype)
  axes = {'/'.join(k[2:]): v.sharding for k, v in params.items() if k[1] == 'm'}
  assert axes['wo/kernel'] == ('mlp', 'embed')
  first = 'wi_gate/kernel' if activation == 'swiglu' else 'wi/kernel'
  assert axes[first] == ('embed', 'mlp')


def _ref_block(w, x, norm, heads, kv_heads, window, qk_norm):
  sub = lambda prefix: {k[len(prefix) + 1:]: v for k, v in w.items() if k.startswith(prefix + '/')}
  if norm == 'rmsnorm':
    n1, n2 = ref_rms(x, w['norm_1/scale']), None
  else:
    n1 = ref_layernorm(x, w['norm_1/scale'], w['norm_1/bias'])
  h = x + ref_attention(sub('attn'), n1, num_heads=heads, num_kv_heads=kv_heads, window=window, qk_norm=qk_norm)
  n2 = ref_rms(h, w['norm_2/scale']) if norm == 'rmsnorm' else ref_layernorm(h, w['norm_2/scale'], w['norm_2/bias'])
  return h + ref_mlp(sub('mlp'), n2, 'swiglu' if norm == 'rmsnorm' else 'gelu')


@pytest.mark.parametrize('norm,dtype', [('rmsnorm', None), ('layernorm', None), ('rmsnorm', BF16)])
def test_block_matches_reference(norm, dtype):
  act = 'swiglu' if norm == 'rmsnorm' else 'gelu'
  make = lambda g, rng, dt: TransformerBlock(g, BlockConfig.create(
      d_model=D, num_heads=4, num_kv_heads=2, mlp_dim=32, norm=norm, activation=act,
      sliding_window=4, qk_norm=norm == 'rmsnorm', init_std=0.3, dtype=dt), rng)
  ref = lambda w, x: _ref_block(w, x, norm, 4, 2, 4, norm == 'rmsnorm')
  x = _x()
  if dtype is not None:
    x = x.astype(BF16)  # the residual stream is the compute dtype in mixed precision
  # bf16: the residual stream itself is rounded to bf16 twice per block, and
  # the outputs are O(5), so the absolute tolerance is widened accordingly.
  check(make, ref, x, dtype, bf16_atol=6e-2)


def test_block_tags_checkpoint_names_and_dropout():
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  block = TransformerBlock(g.child('b'), BlockConfig.create(d_model=D, num_heads=4, mlp_dim=32, dropout_rate=0.5), rng)
  params = fill_params(jax.eval_shape(lambda p: block(p, _x())[1], rng.seed(bx.Params(), seed=0)))
  text = str(jax.make_jaxpr(lambda p, x: block(p, x)[0])(params, _x()))
  for name in ('qkv', 'attn_out', 'mlp_hidden', 'mlp_out'):
    assert f'name={name}' in text, name

  @jax.jit
  def runs(params, x):
    y_eval, _ = block(params, x, is_training=False)
    y_a, p_a = block(params, x, is_training=True)
    y_b, _ = block(p_a, x, is_training=True)
    y_again, _ = block(params, x, is_training=True)
    return y_eval, y_a, y_b, y_again

  y_eval, y_a, y_b, y_again = runs(params, _x())
  assert not np.allclose(y_eval, y_a) and not np.allclose(y_a, y_b)  # masks differ per call
  tree_allclose(y_a, y_again, rtol=0, atol=0)                         # same counter -> same mask


def test_block_rejects_wrong_width():
  block = TransformerBlock(bx.Graph('n').child('b'), BlockConfig.create(d_model=D, num_heads=4, mlp_dim=32))
  with pytest.raises(ValueError, match=r'expected x: \[batch, seq, 16\]'):
    block(bx.Params(), jnp.ones((1, 3, 8)))
