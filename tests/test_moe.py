"""bs.nn.MoE against a hand-written per-token loop, its two dispatch paths, its losses,
the MoE stack (scan vs loop, remat policies) and expert parallelism on a (data 2, expert 4) mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blox as bx
import blox_scale as bs
from blox_scale.nn import moe as moe_lib
from helpers import bf16_close, tree_allclose

D, F, E, K = 8, 12, 4, 2
MLP = bs.MLPConfig(d_model=D, mlp_dim=F, init_std=0.3)


def make_moe(dtype=jnp.float32, **moe):
  cfg = bs.nn.MoEConfig(**{'num_experts': E, 'top_k': K, **moe})
  mlp = dataclasses.replace(MLP, dtype=dtype)
  graph = bx.Graph('m')
  rng = bx.Rng(graph / 'rng')
  layer = bs.MoE(graph / 'moe', cfg, mlp, rng)
  x = jax.random.normal(jax.random.key(1), (2, 5, D), jnp.float32)
  params = rng.seed(bx.Params(), seed=0)
  _, params = layer(params, x)
  return layer, params.locked(), x


def reference(params, x, routing, top_k=K, dtype=jnp.float32):
  """One token at a time (vmapped over tokens): route it, run each chosen expert's SwiGLU, add up weighted."""
  p = {k[-1]: v.value for k, v in params.items() if k[-2] == 'moe'}

  def one_token(h):                                                           # h: [D]
    l = h.astype(jnp.float32) @ p['router']                                   # [E]
    if routing == 'topk_softmax':
      idx = jnp.argsort(-l)[:top_k]
      w = jax.nn.softmax(l[idx])
    else:
      probs = jax.nn.softmax(l)
      idx = jnp.argsort(-probs)[:top_k]
      w = probs[idx]
    h = h.astype(dtype)
    y = jnp.zeros(h.shape, jnp.float32)
    for j in range(top_k):
      g = h @ p['wi_gate'][idx[j]].astype(dtype)
      u = h @ p['wi_up'][idx[j]].astype(dtype)
      y = y + w[j] * ((jax.nn.silu(g) * u) @ p['wo'][idx[j]].astype(dtype)).astype(jnp.float32)
    return y.astype(dtype)

  return jax.vmap(one_token)(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def grads(fn, params, x):
  trainable, rest = params.split()
  loss = lambda t, x: jnp.sum(jnp.sin(fn(t.merge(rest), x).astype(jnp.float32)))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, x)


@pytest.mark.parametrize('routing, dispatch', [('topk_softmax', 'dropless'), ('softmax_topk', 'capacity')])
def test_moe_matches_per_token_loop_f32(routing, dispatch):
  # capacity_factor = E / K gives every expert a slot for every token: nothing dropped.
  layer, params, x = make_moe(routing=routing, dispatch=dispatch, capacity_factor=E / K)
  run = lambda p, x: layer(p, x)[0][0]
  tree_allclose(jax.jit(run)(params, x), jax.jit(reference, static_argnums=2)(params, x, routing), rtol=1e-5, atol=1e-5)
  tree_allclose(grads(run, params, x), grads(lambda p, x: reference(p, x, routing), params, x), rtol=1e-4, atol=1e-5)
  (_, stats), _ = layer(params, x)
  assert float(stats['dropped_frac']) == 0.0


def test_moe_bf16_within_tolerance():
  layer, params, x = make_moe(dtype=jnp.bfloat16)
  run = lambda p, x: layer(p, x)[0][0]
  y = jax.jit(run)(params, x)
  assert y.dtype == jnp.bfloat16
  bf16_close(y, jax.jit(lambda p, x: reference(p, x, 'topk_softmax', dtype=jnp.bfloat16))(params, x))
  bf16_close(grads(run, params, x), grads(lambda p, x: reference(p, x, 'topk_softmax', dtype=jnp.bfloat16), params, x))


def test_aux_losses_equal_their_formulas_and_capacity_drops():
  layer, params, x = make_moe(dispatch='capacity', capacity_factor=0.5)
  (_, stats), _ = layer(params, x)
  logits = np.asarray(x @ params[('m', 'moe', 'router')].value, np.float64).reshape(-1, E)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  top = np.argsort(-logits, axis=-1)[:, :K]
  f = np.array([(top == e).sum() for e in range(E)]) / top.size
  np.testing.assert_allclose(stats['aux_loss'], E * np.sum(f * probs.mean(0)), rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(stats['z_loss'], np.mean(lse ** 2), rtol=1e-5)
  # capacity ceil(0.5 * 5 * 2 / 4) = 2 slots per expert per sequence: count what overflows by hand.
  slots = moe_lib.capacity(layer.config, 5)
  kept = 0
  for b in range(2):
    used = np.zeros(E, int)
    for j in range(K):          # every first choice before any second choice
      for t in range(5):
        e = top.reshape(2, 5, K)[b, t, j]
        kept += used[e] < slots
        used[e] += 1
  np.testing.assert_allclose(stats['dropped_frac'], 1 - kept / top.size, rtol=1e-6)
  assert float(stats['dropped_frac']) > 0


# -- the MoE model: scanned stack, remat, decoding, plug-in path, expert parallelism ---------

def tiny_model(scan=True, remat='none', layers=4, **moe):
  """4 layers: dense, MoE, dense, MoE (a bs.Group of two, scanned twice), 4 experts, top 2."""
  from blox_scale.models import build_model
  cfg = bs.ModelConfig(vocab_size=32, d_model=16, num_layers=layers, num_heads=2, num_kv_heads=1, mlp_dim=24,
                       max_seq_len=16, scan_layers=scan, remat=remat,
                       moe=bs.nn.MoEConfig(**{'num_experts': 4, 'top_k': 2, 'every_n_layers': 2, **moe}))
  return build_model(cfg)


def tiny_batch(rows=2, seq=8):
  tokens = jax.random.randint(jax.random.key(3), (rows, seq + 1), 0, 32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': jnp.ones((rows, seq), jnp.float32)}


def loss_and_grads(model, params, batch):
  trainable, rest = params.split()
  fn = lambda t: model.loss(t.merge(rest), batch)
  (loss, (metrics, _)), g = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable)
  return metrics, g


@pytest.fixture(scope='module')
def unrolled():
  """The Python-loop stack (scan_layers=False, no remat): the reference of the scanned runs."""
  model = tiny_model(scan=False, layers=2, every_n_layers=1)   # two MoE layers: two scan steps
  params = model.init(0)
  return params, loss_and_grads(model, params, tiny_batch())


@pytest.mark.parametrize('remat', ['none', 'full', 'dots'])
def test_scanned_moe_stack_equals_loop_forward_and_grads(unrolled, remat):
  params, (want_metrics, want_grads) = unrolled
  model = tiny_model(remat=remat, layers=2, every_n_layers=1)
  metrics, grads = loss_and_grads(model, params, tiny_batch())
  tree_allclose(metrics, want_metrics, rtol=1e-5, atol=1e-6)
  tree_allclose(grads, want_grads, rtol=1e-4, atol=1e-6)
  # The aux losses are in the total and are means over the 2 MoE layers.
  m = want_metrics
  assert {'moe_aux_loss', 'moe_z_loss', 'moe_dropped_frac', 'aux_loss'} <= set(m)
  np.testing.assert_allclose(m['total_loss'], m['loss'] + m['aux_loss'], rtol=1e-6)
  np.testing.assert_allclose(m['aux_loss'], 0.01 * m['moe_aux_loss'] + 0.001 * m['moe_z_loss'], rtol=1e-5)
  assert 0.9 < float(m['moe_aux_loss']) < 2.0


def test_plugin_path_equals_sugar_and_kv_cache_decoding():
  from blox_scale.models import build_model
  sugar = tiny_model()
  params = sugar.init(0)
  explicit = build_model(dataclasses.replace(sugar.config, block='blox_scale.nn.moe_block:moe_block'))
  batch = tiny_batch()
  # The same block class, params and shapes (both go through plugin.resolve of the same factory).
  assert type(explicit.layers.block) is type(sugar.layers.block) and explicit.aux_names == sugar.aux_names
  shapes = lambda model: {k: v.value.shape for k, v in jax.eval_shape(model.init, 0).items()}
  assert shapes(explicit) == shapes(sugar)
  # Prefill 7 tokens, then decode the 8th: the logits equal one full forward.
  tokens = batch['inputs']
  full, _ = jax.jit(sugar.__call__)(params, tokens)
  pad = jnp.zeros((2,), jnp.int32)
  decode = jax.jit(lambda p, t, c, i: sugar.decode(p, t, c, cache_index=i, pad=pad)[0])
  pre, cache = decode(params, tokens[:, :7], sugar.init_cache(2, 16), 0)
  last, _ = decode(params, tokens[:, 7:], cache, 7)
  tree_allclose(jnp.concatenate([pre, last], axis=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
def test_data2_expert4_mesh_equals_one_device(dispatch):
  from blox_scale.training.config import MeshConfig
  model = tiny_model(layers=2, dispatch=dispatch, capacity_factor=1.0, remat='full')   # the trainer's default
  params = model.init(0)
  batch = tiny_batch(rows=8)
  want_metrics, want_grads = loss_and_grads(model, params, batch)
  mesh_cfg = MeshConfig(data=2, expert=4)
  mesh, rules = bs.make_mesh(mesh_cfg), bs.rules_from_config(mesh_cfg)
  shardings = bs.param_shardings(params, mesh, rules)
  wi = shardings[('lm', 'layers', 'block', 'moe', 'moe', 'wi_gate')].value
  assert wi.shard_shape((1, 4, 16, 24)) == (1, 1, 16, 24)   # one expert per device of the expert axis
  placed = jax.device_put(params, shardings)
  placed_batch = jax.device_put(batch, bs.batch_sharding(mesh, rules))
  with bs.use_mesh_rules(mesh, rules):
    metrics, grads = loss_and_grads(model, placed, placed_batch)
  tree_allclose(metrics, want_metrics, rtol=1e-5, atol=1e-6)
  tree_allclose(grads, want_grads, rtol=1e-4, atol=1e-6)
  if dispatch == 'capacity':
    assert float(metrics['moe_dropped_frac']) > 0   # capacity_factor 1: some overflow, the same on both


def test_moe_config_errors_name_the_key():
  from blox_scale.training.config import ConfigError, load_config
  base = ['model.num_layers=4', 'model.moe.num_experts=4']
  for override, key in [('model.moe.every_n_layers=3', 'model.moe.every_n_layers=3'),
                        ('model.moe.top_k=5', 'model.moe.top_k=5'),
                        ('model.moe.dispatch=sorted', "model.moe.dispatch='sorted'"),
                        ('model.moe.routing=sinkhorn', "model.moe.routing='sinkhorn'")]:
    with pytest.raises(ConfigError, match=key):
      load_config(None, base + [override], files=False)
  with pytest.raises(ConfigError, match=r'model.block_args'):
    load_config(None, base + ['model.block_args.width=3'], files=False)
