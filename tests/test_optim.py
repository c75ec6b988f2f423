"""AdamW chain: schedule, weight-decay mask, updates against a hand-written AdamW."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blox as bx
from blox_scale.training.config import ModelConfig, OptimizerConfig
from blox_scale.training.optim import decay_mask, lr_schedule, make_optimizer


def _cfg(**kw):
  return dataclasses.replace(OptimizerConfig(), **kw)


def test_schedules_match_hand_formulas():
  cfg = _cfg(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
  total = 110
  cos = lr_schedule(cfg, total)
  lin = lr_schedule(dataclasses.replace(cfg, schedule='linear'), total)
  const = lr_schedule(dataclasses.replace(cfg, schedule='constant'), total)
  for step in (0, 4, 9):
    assert float(cos(step)) == pytest.approx((step + 1) / 10)
    assert float(lin(step)) == pytest.approx((step + 1) / 10)
  for step in (10, 35, 60, 110, 500):
    t = min(1.0, (step - 10) / 100)
    assert float(cos(step)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)), rel=1e-6)
    assert float(lin(step)) == pytest.approx(1.0 - 0.9 * t, rel=1e-6)
    assert float(const(step)) == pytest.approx(1.0)
  # Under jit with a traced step too.
  assert float(jax.jit(cos)(jnp.int32(60))) == pytest.approx(float(cos(60)))


def _stacked_params():
  def p(shape, axes, trainable=True):
    return bx.Param(jnp.ones(shape), trainable, {'sharding': axes})
  return bx.Params({
      ('lm', 'embed', 'embedding'): p((16, 4), ('vocab', 'embed')),
      ('lm', 'layers', 'block', 'mlp', 'kernel'): p((3, 4, 8), ('layers', 'embed', 'mlp')),
      ('lm', 'layers', 'block', 'mlp', 'bias'): p((3, 8), ('layers', 'mlp')),
      ('lm', 'layers', 'block', 'norm', 'scale'): p((3, 4), ('layers', 'norm')),
      ('lm', 'final_norm', 'scale'): p((4,), ('norm',)),
      ('lm', 'gate'): p((3, 4), ('layers', 'embed')),  # a stacked vector: 1-d per layer
  }, True)


def test_decay_mask_uses_logical_axes_not_rank():
  mask = decay_mask(_stacked_params())
  got = {'/'.join(k[1:]): bool(v.value) for k, v in mask.items()}
  assert got == {
      'embed/embedding': True,
      'layers/block/mlp/kernel': True,
      'layers/block/mlp/bias': False,
      'layers/block/norm/scale': False,   # 2-d only because stacked
      'final_norm/scale': False,
      'gate': False,
  }
  # Plain pytrees fall back to rank.
  assert decay_mask({'w': jnp.ones((2, 2)), 'b': jnp.ones(2)}) == {'w': True, 'b': False}


def test_decay_mask_on_the_decoder_lm():
  from blox_scale.models import DecoderLM
  model = DecoderLM(bx.Graph('lm'), ModelConfig(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, max_seq_len=16))
  trainable, _ = jax.eval_shape(model.init, 0).split()
  mask = decay_mask(trainable)
  for path, m in mask.items():
    name = '/'.join(path)
    assert bool(m.value) == ('norm' not in name), name


def _adamw_reference(params, grads_seq, cfg, total):
  """Hand-written AdamW (numpy, float64): clip, adam, masked decoupled decay, lr schedule."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  decays = {k: k.endswith('kernel') for k in params}
  for t, grads in enumerate(grads_seq):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    norm = math.sqrt(sum((x ** 2).sum() for x in g.values()))
    scale = min(1.0, cfg.grad_clip / norm)
    lr = float(lr_schedule(cfg, total)(t))
    for k in params:
      gk = g[k] * scale
      m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * gk
      v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * gk ** 2
      mhat = m[k] / (1 - cfg.b1 ** (t + 1))
      vhat = v[k] / (1 - cfg.b2 ** (t + 1))
      update = mhat / (np.sqrt(vhat) + cfg.eps) + (cfg.weight_decay * params[k] if decays[k] else 0.0)
      params[k] = params[k] - lr * update
  return params


def test_adamw_chain_matches_hand_written_reference():
  cfg = _cfg(learning_rate=0.1, warmup_steps=2, weight_decay=0.5, grad_clip=0.7)
  total = 6
  rng = np.random.default_rng(0)
  values = {'kernel': rng.normal(size=(3, 4)).astype(np.float32), 'scale': rng.normal(size=(4,)).astype(np.float32)}
  axes = {'kernel': ('embed', 'mlp'), 'scale': ('norm',)}
  params = bx.Params.from_items({(k,): bx.Param(jnp.asarray(v), True, {'sharding': axes[k]}) for k, v in values.items()}, locked=True)
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in values.items()} for _ in range(total)]
  optimizer, _ = make_optimizer(cfg, total)
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  for grads in grads_seq:
    g = bx.Params.from_items({(k,): params[(k,)].replace(value=jnp.asarray(x)) for k, x in grads.items()}, locked=True)
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  want = _adamw_reference(values, grads_seq, cfg, total)
  for k in values:
    np.testing.assert_allclose(np.asarray(params[(k,)].value), want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_invalid_optimizer_settings_name_the_key():
  with pytest.raises(ValueError, match='optimizer.learning_rate'):
    make_optimizer(_cfg(learning_rate=0.0), 10)
  with pytest.raises(ValueError, match='optimizer.b2'):
    make_optimizer(_cfg(b2=1.5), 10)
  with pytest.raises(ValueError, match='optimizer.schedule'):
    lr_schedule(_cfg(schedule='step'), 10)
