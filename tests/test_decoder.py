"""DecoderLM: scanned == Python loop, the loss against hand math, init without allocation, one trace."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import blox as bx
from blox_scale.training.config import ModelConfig
from blox_scale.models import DecoderLM
from blox_scale.parallel.sharding import logical_to_spec
from helpers import tree_allclose
from lm_helpers import fill_params

TINY = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                   max_seq_len=16, init_std=0.1)
GPT2_LIKE = dataclasses.replace(TINY, position='learned', norm='layernorm', mlp_activation='gelu',
                                use_bias=True, tie_embeddings=False, num_kv_heads=0)


def _batch(seed=0, b=2, t=9, vocab=61):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
      'inputs': jax.random.randint(k1, (b, t), 0, vocab, jnp.int32),
      'targets': jax.random.randint(k2, (b, t), 0, vocab, jnp.int32),
      'mask': (jax.random.uniform(k3, (b, t)) < 0.7).astype(jnp.float32),
  }


@functools.lru_cache(maxsize=None)
def _init(config):
  """Random params of a config's layout, from numpy (a compiled init is slow on CPU;
  the real init is tested in test_init_under_eval_shape_and_sharded_jit)."""
  return fill_params(jax.eval_shape(DecoderLM(bx.Graph('lm'), config).init, 0), std=0.1)


def _arrays(params):
  """Float params by path (the Rng's typed key is not comparable with allclose)."""
  return {k: v.value for k, v in params.items() if k[1] != 'rng'}


def _grad(model, params, batch):
  t, nt = params.split()
  f = lambda t: model.loss(t.merge(nt), batch, is_training=True)
  (loss, (metrics, _)), g = jax.jit(jax.value_and_grad(f, has_aux=True))(t)
  return loss, metrics, g


@functools.lru_cache(maxsize=None)
def _reference_grad(config):
  """Loss, metrics and grads of the scanned f32 model on `_batch()` (shared by several tests)."""
  return _grad(DecoderLM(bx.Graph('lm'), config), _init(config), _batch())


@pytest.mark.parametrize('config', [TINY, GPT2_LIKE], ids=['llama_like', 'gpt2_like'])
def test_scanned_equals_unrolled(config):
  scanned = DecoderLM(bx.Graph('lm'), config)
  unrolled = DecoderLM(bx.Graph('lm'), dataclasses.replace(config, scan_layers=False))
  params = _init(config)
  # Same layout either way (Stack's init does not depend on scan).
  shapes = lambda m: {k: (v.value.shape, v.sharding) for k, v in jax.eval_shape(m.init, 0).items()}
  assert shapes(scanned) == shapes(unrolled)
  if config is TINY:  # forward and gradient
    la, ma, ga = _reference_grad(config)
    lb, mb, gb = _grad(unrolled, params, _batch())
    tree_allclose((la, ma), (lb, mb), rtol=1e-5, atol=1e-5)
    tree_allclose(ga, gb, rtol=1e-5, atol=1e-5)
  else:  # forward only (keeps the file fast; the gradient path is the same Stack code)
    fwd = lambda m: jax.jit(lambda p, x: m(p, x)[0])(params, _batch()['inputs'])
    tree_allclose(fwd(scanned), fwd(unrolled), rtol=1e-5, atol=1e-5)


def test_loss_is_masked_mean_cross_entropy_plus_z_loss():
  model = DecoderLM(bx.Graph('lm'), dataclasses.replace(TINY, z_loss=1e-2))
  params = _init(TINY)
  batch = _batch()
  loss, (metrics, _) = jax.jit(lambda p, b: model.loss(p, b))(params, batch)
  logits, _ = jax.jit(lambda p, x: model(p, x))(params, batch['inputs'])
  logits = np.asarray(logits, np.float64)
  m = np.asarray(batch['mask'], np.float64)
  log_z = np.log(np.sum(np.exp(logits), axis=-1))
  picked = np.take_along_axis(logits, np.asarray(batch['targets'])[..., None], axis=-1)[..., 0]
  ce = np.sum((log_z - picked) * m) / np.sum(m)
  z = 1e-2 * np.sum(log_z ** 2 * m) / np.sum(m)
  np.testing.assert_allclose(metrics['loss'], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics['z_loss'], z, rtol=1e-5)
  np.testing.assert_allclose(loss, ce + z, rtol=1e-5)
  assert metrics['tokens'] == np.sum(m)
  # An all-masked batch is 0, not NaN.
  empty = dict(batch, mask=jnp.zeros_like(batch['mask']))
  assert float(model.loss(params, empty)[0]) == 0.0


def test_logits_shape_dtype_and_causality():
  model = DecoderLM(bx.Graph('lm'), TINY)
  params = _init(TINY)
  fwd = jax.jit(lambda p, x: model(p, x)[0])
  x = _batch()['inputs']
  logits = fwd(params, x)
  assert logits.shape == (2, 9, 61) and logits.dtype == jnp.float32
  changed = fwd(params, x.at[:, 5].set((x[:, 5] + 1) % 61))
  tree_allclose(logits[:, :5], changed[:, :5], rtol=1e-6, atol=1e-6)   # the past ignores the future
  assert not np.allclose(logits[:, 5:], changed[:, 5:])


def test_mixed_precision_bf16_compute_f32_params_and_grads():
  model = DecoderLM(bx.Graph('lm'), dataclasses.replace(TINY, dtype='bfloat16'))
  params = _init(TINY)  # the same f32 params; only the compute dtype differs
  assert all(p.value.dtype == jnp.float32 for k, p in params.items() if k[1] != 'rng')
  loss, metrics, grads = _grad(model, params, _batch())
  assert all(g.value.dtype == jnp.float32 for g in grads.values())
  ref_loss, _, _ = _reference_grad(TINY)
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-2)
  logits = jax.jit(lambda p, x: model(p, x)[0])(params, _batch()['inputs'])
  assert logits.dtype == jnp.float32
  text = str(jax.make_jaxpr(lambda p, x: model(p, x)[0])(params, _batch()['inputs']))
  assert 'bf16' in text


def test_param_layout_and_logical_axes():
  model = DecoderLM(bx.Graph('lm'), GPT2_LIKE)
  abstract = jax.eval_shape(model.init, 0)
  shapes = {'/'.join(k): (v.value.shape, v.sharding) for k, v in abstract.items()}
  assert shapes['lm/embed/embedding'] == ((61, 32), ('vocab', 'embed'))
  assert shapes['lm/pos_embed/embedding'] == ((16, 32), (None, 'embed'))
  assert shapes['lm/head/kernel'] == ((32, 61), ('embed', 'vocab'))
  assert shapes['lm/layers/block/attn/q'] == ((2, 32, 4, 8), ('layers', 'embed', 'heads', 'head_dim'))
  assert shapes['lm/layers/block/mlp/wo/kernel'] == ((2, 48, 32), ('layers', 'mlp', 'embed'))
  assert shapes['lm/layers/block/norm_1/bias'] == ((2, 32), ('layers', 'norm'))
  assert shapes['lm/final_norm/scale'] == ((32,), ('norm',))
  for k, v in abstract.items():
    assert len(v.sharding) == len(v.value.shape), k


def test_init_under_eval_shape_and_sharded_jit():
  model = DecoderLM(bx.Graph('lm'), TINY)
  abstract = jax.eval_shape(model.init, 0)
  assert all(isinstance(p.value, jax.ShapeDtypeStruct) for p in abstract.values())
  mesh = jax.make_mesh((4, 2), ('fsdp', 'tensor'))
  rules = {'embed': 'fsdp', 'heads': 'tensor', 'kv_heads': 'tensor', 'mlp': 'tensor'}
  shardings = jax.tree.map(lambda p: NamedSharding(mesh, logical_to_spec(p.sharding, rules)), abstract,
                           is_leaf=lambda x: isinstance(x, bx.Param))
  params = jax.jit(model.init, out_shardings=shardings)(0)
  q = params[('lm', 'layers', 'block', 'attn', 'q')].value
  assert q.sharding.spec == logical_to_spec(('layers', 'embed', 'heads', 'head_dim'), rules)
  assert jax.tree.map(lambda p: p.shape, _arrays(params)) == jax.tree.map(lambda p: p.shape, _arrays(abstract))
  # Layers start different (the Stack folds the layer index into the init key) ...
  assert not np.allclose(q[0], q[1])
  # ... with the requested scale.
  np.testing.assert_allclose(np.std(np.asarray(q)), TINY.init_std, rtol=0.1)


def test_jitted_loss_traces_once():
  model = DecoderLM(bx.Graph('lm'), TINY)
  params = _init(TINY)
  traces = []

  @jax.jit
  def step(params, batch):
    traces.append(1)
    return model.loss(params, batch)[0]

  for seed in range(3):
    jax.block_until_ready(step(params, _batch(seed)))
  assert len(traces) == 1


def test_remat_policies_agree():
  base = _reference_grad(TINY)
  cfg = dataclasses.replace(TINY, remat='save_names', remat_names=('attn_out', 'mlp_out'))
  other = _grad(DecoderLM(bx.Graph('lm'), cfg), _init(TINY), _batch())
  tree_allclose(base, other, rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem():
  model = DecoderLM(bx.Graph('lm'), TINY)
  params = jax.eval_shape(model.init, 0)
  with pytest.raises(ValueError, match='exceeds model.max_seq_len=16'):
    jax.eval_shape(lambda p: model(p, jnp.zeros((1, 17), jnp.int32)), params)
  with pytest.raises(ValueError, match='int\\[batch, seq\\]'):
    jax.eval_shape(lambda p: model(p, jnp.zeros((1, 4), jnp.float32)), params)
  with pytest.raises(KeyError, match='mask'):
    model.loss(params, {'inputs': jnp.zeros((1, 4), jnp.int32), 'targets': jnp.zeros((1, 4), jnp.int32)})
  with pytest.raises(TypeError, match='ModelConfig'):
    DecoderLM(bx.Graph('lm'), {'d_model': 4})


def test_dropout_scanned_equals_unrolled_and_differs_by_layer_and_step():
  cfg = dataclasses.replace(TINY, dropout_rate=0.3)
  params = _init(TINY)  # dropout adds no params
  batch = _batch()
  loss = lambda m: jax.jit(lambda p, b: m.loss(p, b, is_training=True))
  scanned = DecoderLM(bx.Graph('lm'), cfg)
  unrolled = DecoderLM(bx.Graph('lm'), dataclasses.replace(cfg, scan_layers=False))
  la, (_, pa) = loss(scanned)(params, batch)
  lb, _ = loss(unrolled)(params, batch)
  np.testing.assert_allclose(la, lb, rtol=1e-5)
  l_next, _ = loss(scanned)(pa, batch)        # the advanced Rng counter draws new masks
  l_eval, _ = jax.jit(lambda p, b: scanned.loss(p, b, is_training=False))(params, batch)
  assert float(la) != float(l_next) and float(la) != float(l_eval)
