"""Every layer against a hand-written jax.numpy reference, forward and gradient, f32 and bf16.

Harness: the layer is initialised, its trainable params are differentiated
through `layer(params, x)` with a random cotangent, and outputs and gradients
(params and input) are compared with the reference math written here from
the layer's formula. bf16 runs build the layer with `dtype=bfloat16` over
float32 params: activations must come out bf16, gradients f32, and values
match the reference evaluated on bf16-rounded inputs and params.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blox as bx
from helpers import bf16_close, bf16_tols, tree_allclose

BF16 = jnp.bfloat16
F32_TOLS = dict(rtol=1e-5, atol=1e-5)
DTYPES = [None, BF16]


def _round(tree, dtype):
  """bf16 runs: the reference sees the values rounded as the layer sees them."""
  if dtype is None:
    return tree
  return jax.tree.map(lambda a: a.astype(dtype).astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def check_layer(make, x, ref, *, dtype=None, call=None, diff_x=True, seed=0):
  """Builds `make(graph, rng, dtype)`, runs it on `x`, compares with `ref(w, x)`.

  `w` maps param names below the layer (e.g. 'kernel', 'gates/bias') to values.
  Returns the initialised params.
  """
  call = call or (lambda layer, params, x: layer(params, x))
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  layer = make(g.child('layer'), rng, dtype)
  params = jax.jit(lambda p, x: call(layer, p, x)[1].locked())(rng.seed(bx.Params(), seed=seed), x)
  trainable, rest = params.split()

  def names(tree):
    return {'/'.join(k[2:]): v.value for k, v in tree.items()}

  def forward(t, x):
    y, _ = call(layer, t.merge(rest), x)
    return y

  w = names(trainable)
  round_ref = lambda w, x: ref(_round(w, dtype), _round(x, dtype))  # noqa: E731
  y_shape = jax.eval_shape(forward, trainable, x)
  cot = jax.random.normal(jax.random.key(seed + 1), y_shape.shape, jnp.float32)

  # One jitted program per side: outputs and the VJP of a random cotangent
  # (w.r.t. params, and inputs unless they are integer ids).
  @functools.partial(jax.jit, static_argnums=0)
  def run(fn, p, x):
    if diff_x:
      y, vjp = jax.vjp(fn, p, x)
    else:
      y, vjp = jax.vjp(lambda p: fn(p, x), p)
    return y, vjp(cot.astype(y.dtype))

  y, grads = run(forward, trainable, x)
  y_ref, ref_grads = run(round_ref, w, x)
  if dtype is not None:
    assert y.dtype == dtype, f'activations should be {dtype}, got {y.dtype}'
  else:
    assert y.dtype == y_ref.dtype
  close = tree_allclose if dtype is None else bf16_close
  close(y, y_ref)
  for v in jax.tree.leaves(grads):
    assert v.dtype == jnp.float32, f'gradients must be float32 (f32 params), got {v.dtype}'
  close(names(grads[0]), ref_grads[0])
  if diff_x:
    close(grads[1], ref_grads[1])
  return params


def _x(shape, seed=10):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _bias_nonzero():
  return jax.nn.initializers.normal(0.5)


# -- Linear / Embed ------------------------------------------------------------


@pytest.mark.parametrize('dtype', DTYPES)
def test_linear(dtype):
  make = lambda g, rng, dt: bx.Linear(g, 5, rng, bias_init=_bias_nonzero(), dtype=dt)
  ref = lambda w, x: x @ w['kernel'] + w['bias'][None, None, :]
  params = check_layer(make, _x((2, 3, 4)), ref, dtype=dtype)
  assert params[('net', 'layer', 'kernel')].sharding == ('embed', 'mlp')
  assert params[('net', 'layer', 'bias')].sharding == ('mlp',)


def test_linear_no_bias_and_metadata_override():
  g = bx.Graph('net')
  lin = bx.Linear(g.child('l'), 3, None, use_bias=False, kernel_init=jax.nn.initializers.ones,
                  kernel_metadata={'sharding': (None, 'model'), 'note': 1})
  _, params = lin(bx.Params(), jnp.ones((2, 4)))
  assert set(params) == {('net', 'l', 'kernel')}
  assert params[('net', 'l', 'kernel')].metadata == {'sharding': (None, 'model'), 'note': 1}
  with pytest.raises(ValueError, match='at least one dimension'):
    lin(params, jnp.ones(()))


def test_linear_param_dtype_bf16_storage():
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  lin = bx.Linear(g.child('l'), 3, rng, param_dtype=BF16)
  y, params = lin(rng.seed(bx.Params(), seed=0), jnp.ones((2, 4), BF16))
  assert params[('net', 'l', 'kernel')].value.dtype == BF16 and y.dtype == BF16


@pytest.mark.parametrize('dtype', DTYPES)
def test_embed_lookup(dtype):
  ids = jnp.array([[0, 3, 6], [2, 2, 1]])
  make = lambda g, rng, dt: bx.Embed(g, 7, 4, rng, dtype=dt)
  ref = lambda w, ids: jnp.take(w['embedding'], ids, axis=0)
  params = check_layer(make, ids, ref, dtype=dtype, diff_x=False)
  assert params[('net', 'layer', 'embedding')].sharding == ('vocab', 'embed')


@pytest.mark.parametrize('dtype', DTYPES)
def test_embed_attend(dtype):
  make = lambda g, rng, dt: bx.Embed(g, 7, 4, rng, dtype=dt)
  ref = lambda w, x: jnp.einsum('bd,vd->bv', x, w['embedding'])
  check_layer(make, _x((3, 4)), ref, dtype=dtype, call=lambda layer, p, x: layer.attend(p, x))


def test_embed_rejects_float_indices():
  emb = bx.Embed(bx.Graph('n').child('e'), 5, 2, None, embedding_init=jax.nn.initializers.ones)
  with pytest.raises(TypeError, match='indices must be integers'):
    emb(bx.Params(), jnp.ones((2,)))


# -- norms ---------------------------------------------------------------------


def _ref_layer_norm(w, x, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * w['scale'][None, None, :] + w['bias'][None, None, :]


def _ref_rms_norm(w, x, eps=1e-5):
  return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + eps) * w['scale'][None, None, :]


@pytest.mark.parametrize('dtype', DTYPES)
def test_layer_norm(dtype):
  make = lambda g, rng, dt: bx.LayerNorm(g, scale_init=_bias_nonzero(), bias_init=_bias_nonzero(), rng=rng, dtype=dt)
  params = check_layer(make, _x((2, 3, 6)) * 3 + 1, _ref_layer_norm, dtype=dtype)
  assert params[('net', 'layer', 'scale')].sharding == ('norm',)
  assert params[('net', 'layer', 'bias')].sharding == ('norm',)


@pytest.mark.parametrize('dtype', DTYPES)
def test_rms_norm(dtype):
  make = lambda g, rng, dt: bx.RMSNorm(g, scale_init=_bias_nonzero(), rng=rng, dtype=dt)
  params = check_layer(make, _x((2, 3, 6)) * 3, _ref_rms_norm, dtype=dtype)
  assert params[('net', 'layer', 'scale')].sharding == ('norm',)


def test_norm_statistics_are_float32_for_bf16_inputs():
  """A large common offset: bf16 statistics would lose the signal entirely."""
  g = bx.Graph('net')
  ln = bx.LayerNorm(g.child('ln'), dtype=BF16)
  x = (256.0 + _x((4, 64))).astype(BF16)
  y, _ = ln(bx.Params(), x)
  ref = _ref_layer_norm({'scale': jnp.ones(64), 'bias': jnp.zeros(64)}, x.astype(jnp.float32)[None])[0]
  assert y.dtype == BF16
  tree_allclose(y, ref, **bf16_tols())
  # Every reduction in the jaxpr produces float32.
  sums = [line for line in str(jax.make_jaxpr(lambda x: ln(bx.Params(), x)[0])(x)).splitlines() if 'reduce_sum' in line]
  assert sums and all(':f32[' in line for line in sums), sums


def test_norm_default_dtype_promotes_like_jax_blox():
  """dtype=None: bf16 inputs with f32 params give f32 outputs (jnp promotion)."""
  g = bx.Graph('net')
  y, _ = bx.RMSNorm(g.child('n'))(bx.Params(), jnp.ones((2, 4), BF16))
  assert y.dtype == jnp.float32
  y, _ = bx.RMSNorm(g.child('m'), use_scale=False)(bx.Params(), jnp.ones((2, 4), BF16))
  assert y.dtype == BF16


def _ref_batch_norm(w, x, eps=1e-5):
  mean = x.mean(axis=(0, 1, 2))
  var = ((x - mean[None, None, None, :]) ** 2).mean(axis=(0, 1, 2))
  y = (x - mean[None, None, None, :]) / jnp.sqrt(var + eps)[None, None, None, :]
  return y * w['scale'][None, None, None, :] + w['bias'][None, None, None, :]


@pytest.mark.parametrize('dtype', DTYPES)
def test_batch_norm_training(dtype):
  make = lambda g, rng, dt: bx.BatchNorm(g, scale_init=_bias_nonzero(), bias_init=_bias_nonzero(), rng=rng, dtype=dt)
  check_layer(make, _x((3, 2, 2, 5)) * 2 + 1, _ref_batch_norm, dtype=dtype)


def test_batch_norm_running_stats_and_inference():
  g = bx.Graph('net')
  bn = bx.BatchNorm(g.child('bn'), momentum=0.8)
  x = _x((6, 3)) * 2 + 1
  _, params = bn(bx.Params(), x, is_training=True)
  mean, var = x.mean(0), ((x - x.mean(0)[None, :]) ** 2).mean(0)
  tree_allclose(params[('net', 'bn', 'running_mean')].value, 0.2 * mean, **F32_TOLS)
  tree_allclose(params[('net', 'bn', 'running_var')].value, 0.8 + 0.2 * var, **F32_TOLS)
  assert not params[('net', 'bn', 'running_mean')].trainable
  assert params[('net', 'bn', 'running_var')].sharding == ('norm',)
  # Inference: running statistics, params unchanged.
  y, after = bn(params.locked(), x, is_training=False)
  rm, rv = params[('net', 'bn', 'running_mean')].value, params[('net', 'bn', 'running_var')].value
  tree_allclose(y, (x - rm[None, :]) / jnp.sqrt(rv + 1e-5)[None, :], **F32_TOLS)
  tree_allclose(after.values_dict(), params.values_dict(), rtol=0, atol=0)
  # Running stats carry no gradient.
  trainable, rest = params.split()
  grads = jax.grad(lambda t: bn(t.merge(rest), x)[0].sum() + bn(t.merge(rest), x)[1][('net', 'bn', 'running_mean')].value.sum())(trainable)
  assert set(grads) == {('net', 'bn', 'scale'), ('net', 'bn', 'bias')}


def test_is_training_must_be_static():
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  bn = bx.BatchNorm(g.child('bn'))
  params = rng.seed(bx.Params(), seed=0)
  _, params = bn(params, jnp.ones((2, 3)))
  with pytest.raises(TypeError, match="is_training must be a Python bool.*static_argnames='is_training'"):
    jax.jit(lambda p, t: bn(p, jnp.ones((2, 3)), is_training=t))(params, True)


# -- dropout -------------------------------------------------------------------


@pytest.mark.parametrize('dtype', DTYPES)
def test_dropout_forward_and_gradient(dtype):
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  drop = bx.Dropout(g.child('drop'), rate=0.25, rng=rng, dtype=dtype)
  params = rng.seed(bx.Params(), seed=4, counter=9).locked()
  x = _x((16, 32))
  y, new_params = drop(params, x, is_training=True)
  # Reference: the key is fold_in(seed, counter); keep with probability 0.75.
  keep = jax.random.bernoulli(jax.random.fold_in(jax.random.key(4), 9), 0.75, x.shape)
  ref = jnp.where(keep, _round(x, dtype) / 0.75, 0.0)
  tols = F32_TOLS if dtype is None else bf16_tols()
  assert y.dtype == (jnp.float32 if dtype is None else dtype)
  tree_allclose(y, ref, **tols)
  assert int(rng.get_counter(new_params)) == 10
  assert 0.65 < float(keep.mean()) < 0.85
  gx = jax.grad(lambda x: jnp.sum(drop(params, x)[0].astype(jnp.float32) * x))(x)
  # d/dx sum(drop(x) * x) = (x + round(x)) / 0.75 where kept (round is the identity in f32).
  tree_allclose(gx, jnp.where(keep, (x + _round(x, dtype)) / 0.75, 0.0), **tols)
  # Inference and rate 0 are the identity and draw no key.
  y_eval, p_eval = drop(params, x, is_training=False)
  assert y_eval.dtype == y.dtype
  assert int(rng.get_counter(p_eval)) == 9
  with pytest.raises(ValueError, match=r'drop probability and must be in \[0, 1\), got 1.0'):
    bx.Dropout(g.child('bad'), rate=1.0, rng=rng)


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
  x = _x((2,) + (7, 6)[:n] + (4,))
  tup = lambda v: (v,) * n if isinstance(v, int) else tuple(v)  # noqa: E731
  make = lambda g, rng, dt: bx.Conv(g, output_channels=6, rng=rng, bias_init=_bias_nonzero(), dtype=dt, **kw)

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
  x = _x((2, 3, 5, 5, 1))
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
  x = _x((2, 3, 3, 2))
  make = lambda g, rng, dt: bx.ConvTranspose(g, (3, 2), 3, rng, strides=strides, padding=padding, kernel_dilation=dilation,
                                             bias_init=_bias_nonzero(), dtype=dt)

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
  cot = _x(ys['max'].shape, seed=3)
  loss = lambda fn: lambda x: sum(jnp.sum(y.astype(jnp.float32) * cot) for y in fn(x).values())  # noqa: E731
  xf = x.astype(jnp.float32)
  tree_allclose(jax.jit(jax.grad(loss(f)))(xf), jax.jit(jax.grad(loss(f_ref)))(xf), **F32_TOLS)


def test_pool_1d_and_unbatched():
  x = _x((8, 2))  # [length, channels], no batch dim
  tree_allclose(bx.max_pool(x, 2), jnp.maximum(x[0::2], x[1::2]), **F32_TOLS)
  tree_allclose(bx.avg_pool(x[None], 4)[0], x.reshape(2, 4, 2).mean(1), **F32_TOLS)


# -- Sequential ----------------------------------------------------------------


@pytest.mark.parametrize('dtype', DTYPES)
def test_sequential(dtype):
  def make(g, rng, dt):
    return bx.Sequential(g, [bx.Linear(g.child('l1'), 8, rng, bias_init=_bias_nonzero(), dtype=dt), jax.nn.relu,
                             bx.Linear(g.child('l2'), 3, rng, dtype=dt)])

  def ref(w, x):
    h = jax.nn.relu(x @ w['l1/kernel'] + w['l1/bias'][None, :])
    if dtype is not None:
      h = _round(h, dtype)
    return h @ w['l2/kernel'] + w['l2/bias'][None, :]

  check_layer(make, _x((4, 5)), ref, dtype=dtype)


def test_sequential_accepts_a_mapping():
  g = bx.Graph('net')
  seq = bx.Sequential(g.child('seq'), {'double': lambda x: 2 * x, 'neg': jnp.negative})
  y, _ = seq(bx.Params(), jnp.ones(3))
  tree_allclose(y, -2 * jnp.ones(3))


# -- same seed, same numbers as jax-blox 0.1.6 -----------------------------------


def test_init_numbers_match_jax_blox_for_the_same_seed():
  """Golden values printed by jax-blox 0.1.6 for this exact model and seed 7.

  Equal numbers need the same key-drawing order: one key per param in
  creation order, zeros biases included.
  """
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  lin = bx.Linear(g.child('lin'), 3, rng=rng, bias_init=jax.nn.initializers.normal(1.0))
  emb = bx.Embed(g.child('emb'), 5, 3, rng=rng)
  conv = bx.Conv(g.child('conv'), (2, 2), 2, rng=rng)
  lstm = bx.LSTM(g.child('lstm'), 2, rng=rng)
  p = rng.seed(bx.Params(), seed=7)
  x = jnp.ones((1, 2, 2, 3))
  _, p = lin(p, x[:, 0, 0])
  _, p = emb(p, jnp.array([1]))
  _, p = conv(p, x)
  _, p = lstm.apply(p, jnp.ones((1, 2, 3)))
  golden = {
      ('net', 'rng', 'counter'): [7],
      ('net', 'lin', 'kernel'): [0.682119, 0.088705, -0.325928, -0.270523],
      ('net', 'lin', 'bias'): [0.454134, 0.939163, -0.268943],
      ('net', 'emb', 'embedding'): [-0.47365, -0.374214, -1.038875, 1.176943],
      ('net', 'conv', 'kernel'): [-0.228052, -0.149019, 0.251611, 0.027285],
      ('net', 'conv', 'bias'): [0.0, 0.0],
      ('net', 'lstm', 'gates', 'kernel'): [0.308305, -0.011504, -0.502777, -0.384734],
      ('net', 'lstm', 'gates', 'bias'): [0.0, 0.0, 0.0, 0.0],
  }
  for path, expected in golden.items():
    got = np.asarray(p[path].value, np.float64).ravel()[:len(expected)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6, err_msg='/'.join(path))


# -- statistics across a named axis -------------------------------------------------


def test_cross_lane_statistics_equal_full_data_statistics():
  """vmap lanes hold shards of the data; with axis_name the norms see all of it.

  The per-lane means differ on purpose: averaging per-lane variances (jax-blox)
  would be wrong here.
  """
  x = _x((4, 6, 8)) + jnp.arange(4.0)[:, None, None]  # lane l is offset by l
  full = x.reshape(24, 8)
  g = bx.Graph('net')
  bn = bx.BatchNorm(g.child('bn'), axis_name='lanes')
  ln = bx.LayerNorm(g.child('ln'), axis_name='lanes')
  rms = bx.RMSNorm(g.child('rms'), axis_name='lanes')
  plain_bn = bx.BatchNorm(g.child('plain_bn'))

  y_bn, p_bn = jax.vmap(lambda x: bn(bx.Params(), x), axis_name='lanes', out_axes=(0, None))(x)
  y_ref, p_ref = plain_bn(bx.Params(), full)
  tree_allclose(y_bn.reshape(24, 8), y_ref, **F32_TOLS)
  tree_allclose(p_bn[('net', 'bn', 'running_var')].value, p_ref[('net', 'plain_bn', 'running_var')].value, **F32_TOLS)

  # LayerNorm / RMSNorm over features sharded across lanes: [batch, 8] as 4 lanes of [batch, 2].
  feats = jnp.moveaxis(full.reshape(24, 4, 2), 1, 0)  # [lanes, batch, 2]
  y_ln, _ = jax.vmap(lambda x: ln(bx.Params(), x), axis_name='lanes', out_axes=(0, None))(feats)
  y_rms, _ = jax.vmap(lambda x: rms(bx.Params(), x), axis_name='lanes', out_axes=(0, None))(feats)
  unshard = lambda y: jnp.moveaxis(y, 0, 1).reshape(24, 8)  # noqa: E731
  ones, zeros = jnp.ones(8), jnp.zeros(8)
  tree_allclose(unshard(y_ln), _ref_layer_norm({'scale': ones, 'bias': zeros}, full[None])[0], **F32_TOLS)
  tree_allclose(unshard(y_rms), _ref_rms_norm({'scale': ones}, full[None])[0], **F32_TOLS)
