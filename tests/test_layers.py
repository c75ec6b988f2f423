"""Dense, embedding, norm, dropout and Sequential layers against hand-written jax.numpy references,
forward and gradient, f32 and bf16 (harness: tests/layer_check.py)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blox as bx
from helpers import bf16_tols, tree_allclose
from layer_check import BF16, DTYPES, F32_TOLS, check_layer, nonzero_init, normal, round_to


# -- Linear / Embed ------------------------------------------------------------


@pytest.mark.parametrize('dtype', DTYPES)
def test_linear(dtype):
  make = lambda g, rng, dt: bx.Linear(g, 5, rng, bias_init=nonzero_init(), dtype=dt)
  ref = lambda w, x: x @ w['kernel'] + w['bias'][None, None, :]
  params = check_layer(make, normal((2, 3, 4)), ref, dtype=dtype)
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
  check_layer(make, normal((3, 4)), ref, dtype=dtype, call=lambda layer, p, x: layer.attend(p, x))


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
  make = lambda g, rng, dt: bx.LayerNorm(g, scale_init=nonzero_init(), bias_init=nonzero_init(), rng=rng, dtype=dt)
  params = check_layer(make, normal((2, 3, 6)) * 3 + 1, _ref_layer_norm, dtype=dtype)
  assert params[('net', 'layer', 'scale')].sharding == ('norm',)
  assert params[('net', 'layer', 'bias')].sharding == ('norm',)


@pytest.mark.parametrize('dtype', DTYPES)
def test_rms_norm(dtype):
  make = lambda g, rng, dt: bx.RMSNorm(g, scale_init=nonzero_init(), rng=rng, dtype=dt)
  params = check_layer(make, normal((2, 3, 6)) * 3, _ref_rms_norm, dtype=dtype)
  assert params[('net', 'layer', 'scale')].sharding == ('norm',)


def test_norm_statistics_are_float32_for_bf16_inputs():
  """A large common offset: bf16 statistics would lose the signal entirely."""
  g = bx.Graph('net')
  ln = bx.LayerNorm(g.child('ln'), dtype=BF16)
  x = (256.0 + normal((4, 64))).astype(BF16)
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
  make = lambda g, rng, dt: bx.BatchNorm(g, scale_init=nonzero_init(), bias_init=nonzero_init(), rng=rng, dtype=dt)
  check_layer(make, normal((3, 2, 2, 5)) * 2 + 1, _ref_batch_norm, dtype=dtype)


def test_batch_norm_running_stats_and_inference():
  g = bx.Graph('net')
  bn = bx.BatchNorm(g.child('bn'), momentum=0.8)
  x = normal((6, 3)) * 2 + 1
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
  x = normal((16, 32))
  y, new_params = drop(params, x, is_training=True)
  # Reference: the key is fold_in(seed, counter); keep with probability 0.75.
  keep = jax.random.bernoulli(jax.random.fold_in(jax.random.key(4), 9), 0.75, x.shape)
  ref = jnp.where(keep, round_to(x, dtype) / 0.75, 0.0)
  tols = F32_TOLS if dtype is None else bf16_tols()
  assert y.dtype == (jnp.float32 if dtype is None else dtype)
  tree_allclose(y, ref, **tols)
  assert int(rng.get_counter(new_params)) == 10
  assert 0.65 < float(keep.mean()) < 0.85
  gx = jax.grad(lambda x: jnp.sum(drop(params, x)[0].astype(jnp.float32) * x))(x)
  # d/dx sum(drop(x) * x) = (x + round(x)) / 0.75 where kept (round is the identity in f32).
  tree_allclose(gx, jnp.where(keep, (x + round_to(x, dtype)) / 0.75, 0.0), **tols)
  # Inference and rate 0 are the identity and draw no key.
  y_eval, p_eval = drop(params, x, is_training=False)
  assert y_eval.dtype == y.dtype
  assert int(rng.get_counter(p_eval)) == 9
  with pytest.raises(ValueError, match=r'^Dropout rate must be in \[0\.0, 1\.0\), got 1\.0\. Dropout net/bad: rate is the drop probability and must be in \[0, 1\)'):
    bx.Dropout(g.child('bad'), rate=1.0, rng=rng)


# -- Sequential ----------------------------------------------------------------


@pytest.mark.parametrize('dtype', DTYPES)
def test_sequential(dtype):
  def make(g, rng, dt):
    return bx.Sequential(g, [bx.Linear(g.child('l1'), 8, rng, bias_init=nonzero_init(), dtype=dt), jax.nn.relu,
                             bx.Linear(g.child('l2'), 3, rng, dtype=dt)])

  def ref(w, x):
    h = jax.nn.relu(x @ w['l1/kernel'] + w['l1/bias'][None, :])
    if dtype is not None:
      h = round_to(h, dtype)
    return h @ w['l2/kernel'] + w['l2/bias'][None, :]

  check_layer(make, normal((4, 5)), ref, dtype=dtype)


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

  @jax.jit
  def init(p):
    x = jnp.ones((1, 2, 2, 3))
    _, p = lin(p, x[:, 0, 0])
    _, p = emb(p, jnp.array([1]))
    _, p = conv(p, x)
    _, p = lstm.apply(p, jnp.ones((1, 2, 3)))
    return p

  p = init(rng.seed(bx.Params(), seed=7))
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
  x = normal((4, 6, 8)) + jnp.arange(4.0)[:, None, None]  # lane l is offset by l
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
