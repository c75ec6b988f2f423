"""Conv, ConvTranspose and pools against direct jax.numpy references, forward and gradient, f32 and bf16."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blox as bx
from helpers import bf16_tols, tree_allclose
from layer_check import BF16, F32_TOLS, check_layer, nonzero_init, normal


# -- conv ----------------------------------------------------------------------


def _same_pads(size, k, stride, dil):
  out = -(-size // stride)
  total = max((out - 1) * stride + (k - 1) * dil + 1 - size, 0)
  return (total // 2, total - total // 2)


def ref_conv(x, kernel, strides, padding, dilation, groups, input_dilation=None):
  """Direct convolution: sum over kernel offsets of strided input slices.

  x: [b, *spatial, c_in]; kernel: [*k, c_in // groups, c_out].
  `input_dilation` first spreads the input out with zeros between entries.
  """
  n = kernel.ndim - 2
  ks = kernel.shape[:n]
  if input_dilation is not None:
    spread = [(s - 1) * d + 1 for s, d in zip(x.shape[1:-1], input_dilation)]
    index = (slice(None),) + tuple(slice(None, None, d) for d in input_dilation)
    x = jnp.zeros((x.shape[0], *spread, x.shape[-1]), x.dtype).at[index].set(x)
  if padding == 'SAME':
    padding = [_same_pads(x.shape[1 + d], ks[d], strides[d], dilation[d]) for d in range(n)]
  elif padding == 'VALID':
    padding = [(0, 0)] * n
  xp = jnp.pad(x, [(0, 0)] + list(padding) + [(0, 0)])
  out_sizes = [(xp.shape[1 + d] - dilation[d] * (ks[d] - 1) - 1) // strides[d] + 1 for d in range(n)]
  c_out = kernel.shape[-1]
  b = x.shape[0]
  out = jnp.zeros((b, *out_sizes, c_out), jnp.float32)
  for offset in itertools.product(*[range(k) for k in ks]):
    index = tuple(slice(o * dil, o * dil + (size - 1) * s + 1, s)
                  for o, dil, size, s in zip(offset, dilation, out_sizes, strides))
    patch = xp[(slice(None),) + index]  # [b, *out, c_in]
    patch = patch.reshape(patch.shape[:-1] + (groups, patch.shape[-1] // groups))
    w = kernel[offset].reshape(kernel.shape[-2], groups, c_out // groups)  # [c_in/g, g, o/g]
    out = out + jnp.einsum('...gc,cgo->...go', patch, w).reshape(out.shape)
  return out


CONV_CASES = [
    dict(kernel_size=(3, 3), strides=1, padding='SAME', kernel_dilation=1, feature_group_count=1),
    dict(kernel_size=(3, 2), strides=(2, 1), padding='VALID', kernel_dilation=1, feature_group_count=1),
    dict(kernel_size=(2, 2), strides=1, padding=((1, 0), (2, 1)), kernel_dilation=(2, 1), feature_group_count=2,
         input_dilation=(1, 2)),
    dict(kernel_size=3, strides=2, padding='SAME', kernel_dilation=1, feature_group_count=1),  # 1-d
]


# Every case in f32, two of them in bf16 (kept short: each case compiles four programs).
@pytest.mark.parametrize('case, dtype', [(0, None), (1, None), (2, None), (3, None), (0, BF16), (2, BF16)])
def test_conv(case, dtype):
  kw = CONV_CASES[case]
  n = 1 if isinstance(kw['kernel_size'], int) else len(kw['kernel_size'])
  x = normal((2,) + (7, 6)[:n] + (4,))
  tup = lambda v: (v,) * n if isinstance(v, int) else tuple(v)  # noqa: E731
  make = lambda g, rng, dt: bx.Conv(g, output_channels=6, rng=rng, bias_init=nonzero_init(), dtype=dt, **kw)

  def ref(w, x):
    y = ref_conv(x, w['kernel'], tup(kw['strides']), kw['padding'], tup(kw['kernel_dilation']), kw['feature_group_count'],
                 tup(kw.get('input_dilation', 1)))
    return y + w['bias'].reshape((1,) * (y.ndim - 1) + (-1,))

  params = check_layer(make, x, ref, dtype=dtype)
  kernel = params[('net', 'layer', 'kernel')]
  assert kernel.value.shape == tup(kw['kernel_size']) + (4 // kw['feature_group_count'], 6)
  assert kernel.sharding == ('conv_spatial',) * n + ('conv_in', 'conv_out')
  assert params[('net', 'layer', 'bias')].sharding == ('conv_out',)


def test_conv_any_batch_dims():
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  conv = bx.Conv(g.child('c'), (3, 3), 2, rng)
  x = normal((2, 3, 5, 5, 1))
  y, params = conv(rng.seed(bx.Params(), seed=0), x)
  y_unbatched, _ = conv(params, x[0, 0])
  assert y.shape == (2, 3, 5, 5, 2)
  tree_allclose(y[0, 0], y_unbatched, **F32_TOLS)
  with pytest.raises(ValueError, match='expected input rank >= 3'):
    conv(params, jnp.ones((5, 5)))


def _transpose_pads(size_k, stride, dil, padding):
  k = (size_k - 1) * dil + 1
  if padding == 'VALID':
    total = k + stride - 2 + max(k - stride, 0)
    return k - 1, total - (k - 1)
  total = k + stride - 2  # SAME
  before = k - 1 if stride > k - 1 else -(-total // 2)
  return before, total - before


def ref_conv_transpose_2d(x, kernel, strides, padding, dilation):
  """Scatter form: input pixel (i, j) adds `x[i, j] @ kernel[u, v].T` at
  `(i * s_h + before_h - u * d_h, j * s_w + before_w - v * d_w)`."""
  b, h, w, _ = x.shape
  kh, kw = kernel.shape[:2]
  (bh, ah), (bw, aw) = [_transpose_pads(k, s, d, padding) for k, s, d in zip((kh, kw), strides, dilation)]
  out_h = (h - 1) * strides[0] + 1 + bh + ah - (kh - 1) * dilation[0]
  out_w = (w - 1) * strides[1] + 1 + bw + aw - (kw - 1) * dilation[1]
  out = jnp.zeros((b, out_h, out_w, kernel.shape[2]), jnp.float32)
  for u, v in itertools.product(range(kh), range(kw)):
    oh = np.arange(h) * strides[0] + bh - u * dilation[0]
    ow = np.arange(w) * strides[1] + bw - v * dilation[1]
    # Out-of-range targets are cropped: send them past the end and drop them.
    oh = np.where((oh >= 0) & (oh < out_h), oh, out_h)
    ow = np.where((ow >= 0) & (ow < out_w), ow, out_w)
    contrib = jnp.einsum('bijc,oc->bijo', x, kernel[u, v])
    out = out.at[:, oh[:, None], ow[None, :], :].add(contrib, mode='drop')
  return out


@pytest.mark.parametrize('padding, strides, dilation, dtype', [
    ('VALID', (2, 2), (1, 1), None), ('SAME', (2, 1), (1, 1), None), ('SAME', (1, 1), (2, 1), None),
    ('VALID', (2, 2), (1, 1), BF16)])
def test_conv_transpose(padding, strides, dilation, dtype):
  x = normal((2, 3, 3, 2))
  make = lambda g, rng, dt: bx.ConvTranspose(g, (3, 2), 3, rng, strides=strides, padding=padding, kernel_dilation=dilation,
                                             bias_init=nonzero_init(), dtype=dt)

  def ref(w, x):
    y = ref_conv_transpose_2d(x, w['kernel'], strides, padding, dilation)
    return y + w['bias'][None, None, None, :]

  params = check_layer(make, x, ref, dtype=dtype)
  assert params[('net', 'layer', 'kernel')].sharding == ('conv_spatial', 'conv_spatial', 'conv_out', 'conv_in')


def test_conv_transpose_groups_refused():
  with pytest.raises(ValueError, match='feature_group_count=2 is not supported'):
    bx.ConvTranspose(bx.Graph('n').child('c'), 3, 2, None, feature_group_count=2)


# -- pools ---------------------------------------------------------------------


def ref_pool(x, window, strides, padding, kind):
  """Pool by stacking every window offset's strided slice and reducing."""
  n = len(window)
  if padding == 'SAME':
    padding = [_same_pads(x.shape[1 + d], window[d], strides[d], 1) for d in range(n)]
  elif padding == 'VALID':
    padding = [(0, 0)] * n
  fill = {'max': -jnp.inf, 'min': jnp.inf, 'avg': 0.0}[kind]
  pads = [(0, 0)] + list(padding) + [(0, 0)]
  xp = jnp.pad(x.astype(jnp.float32), pads, constant_values=fill)
  ones = jnp.pad(jnp.ones_like(x, jnp.float32), pads)
  out_sizes = [(xp.shape[1 + d] - window[d]) // strides[d] + 1 for d in range(n)]
  slices, counts = [], []
  for offset in itertools.product(*[range(k) for k in window]):
    index = (slice(None),) + tuple(slice(o, o + (size - 1) * s + 1, s) for o, size, s in zip(offset, out_sizes, strides))
    slices.append(xp[index])
    counts.append(ones[index])
  stacked = jnp.stack(slices)
  if kind == 'max':
    return stacked.max(0)
  if kind == 'min':
    return stacked.min(0)
  return stacked.sum(0) / jnp.stack(counts).sum(0)


@pytest.mark.parametrize('window, strides, padding', [((2, 2), None, 'VALID'), ((3, 2), (1, 2), 'SAME'), ((2, 3), 1, ((1, 0), (0, 2)))])
@pytest.mark.parametrize('in_dtype', [jnp.float32, BF16])
def test_pools(window, strides, padding, in_dtype):
  pools = {'max': bx.max_pool, 'min': bx.min_pool, 'avg': bx.avg_pool}
  # Distinct values, exact in bf16: max/min gradients have no ties to break.
  x = ((jax.random.permutation(jax.random.key(0), 180) - 90) / 16).reshape(2, 5, 6, 3).astype(in_dtype)
  s = window if strides is None else ((strides,) * 2 if isinstance(strides, int) else strides)
  f = lambda x: {k: pool(x, window, strides=strides, padding=padding) for k, pool in pools.items()}  # noqa: E731
  f_ref = lambda x: {k: ref_pool(x, window, s, padding, k) for k in pools}  # noqa: E731
  ys = jax.jit(f)(x)
  assert all(y.dtype == in_dtype for y in ys.values())
  tols = F32_TOLS if in_dtype == jnp.float32 else bf16_tols()
  tree_allclose(ys, jax.jit(f_ref)(x), **tols)
  cot = normal(ys['max'].shape, seed=3)
  loss = lambda fn: lambda x: sum(jnp.sum(y.astype(jnp.float32) * cot) for y in fn(x).values())  # noqa: E731
  xf = x.astype(jnp.float32)
  tree_allclose(jax.jit(jax.grad(loss(f)))(xf), jax.jit(jax.grad(loss(f_ref)))(xf), **F32_TOLS)


def test_pool_1d_and_unbatched():
  x = normal((8, 2))  # [length, channels], no batch dim
  tree_allclose(bx.max_pool(x, 2), jnp.maximum(x[0::2], x[1::2]), **F32_TOLS)
  tree_allclose(bx.avg_pool(x[None], 4)[0], x.reshape(2, 4, 2).mean(1), **F32_TOLS)
