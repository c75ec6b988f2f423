"""Fine-tuning: LoRA inside scanned stacks, freezing, int8 base, merge.

References: the base model itself (step 0 and merge), an unscanned run of the
same params, hand-written NumPy quantization bounds, and the jaxpr of the
train step (no weight-gradient matmul for frozen kernels).
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blox as bx
import blox_scale as bs
from blox_scale.training.config import MeshConfig, ModelConfig
from helpers import tree_allclose

ft = bs.finetune
CFG = ModelConfig(d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=16)
TARGETS = ('attn/q', 'attn/v', 'mlp/*')
TOKENS = (jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 7) % 256


def lora_model(cfg=CFG, targets=TARGETS, rank=4, int8=False):
  model = bs.DecoderLM(bx.Graph('lm'), cfg)
  if rank:
    ft.add_lora(model, targets, rank=rank, alpha=8)
  if int8:
    ft.add_int8_base(model)
  return model


def randomize_b(params, seed=3):
  """Nonzero B (a trained adapter) so that the low-rank path matters."""
  keys = iter(jax.random.split(jax.random.key(seed), len(params)))
  return bx.Params({k: (p.replace(value=0.1 * jax.random.normal(next(keys), p.shape)) if k[-1].endswith('lora_b') else p)
                    for k, p in params.items()}, params.is_locked)


@pytest.fixture(scope='module')
def base():
  model = bs.DecoderLM(bx.Graph('lm'), CFG)
  params = model.init(0)
  forward = jax.jit(model.__call__)
  logits, _ = forward(params, TOKENS)
  return model, params, forward, logits


@pytest.fixture(scope='module')
def lora_setup(base):
  model, params, forward, logits = base
  lmodel = lora_model()
  lparams = ft.freeze_base(ft.init_new_params(lmodel, params, seed=1))
  return lmodel, lparams, jax.jit(lmodel.__call__)


def test_adapters_are_stacked_with_layer_axis_and_named(base, lora_setup):
  _, params, _, _ = base
  model, lparams, _ = lora_setup
  new = {'/'.join(k): p for k, p in lparams.items() if k not in params}
  assert set(new) == {f'lm/layers/block/{m}_lora_{x}' for m in ('attn/q', 'attn/v') for x in 'ab'} | {
      f'lm/layers/block/mlp/{m}/lora_{x}' for m in ('wi_gate', 'wi_up', 'wo') for x in 'ab'}
  a, b = new['lm/layers/block/attn/q_lora_a'], new['lm/layers/block/attn/q_lora_b']
  assert a.shape == (2, 32, 4) and a.sharding == ('layers', 'embed', None)
  assert b.shape == (2, 4, 4, 8) and b.sharding == ('layers', None, 'heads', 'head_dim')
  assert new['lm/layers/block/mlp/wo/lora_a'].sharding == ('layers', 'mlp', None)
  assert not np.allclose(a.value[0], a.value[1])      # layers start different (per-layer keys)
  assert np.all(np.asarray(b.value) == 0)              # B = 0
  assert all(p.trainable for p in new.values())
  assert not any(p.trainable for k, p in lparams.items() if k in params)
  # The adapters shard with the mesh like the kernels they sit beside.
  mesh = bs.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
  specs = bs.param_shardings(lparams, mesh, bs.rules_from_config(MeshConfig()))
  assert specs[('lm', 'layers', 'block', 'attn', 'q_lora_a')].value.spec == jax.sharding.PartitionSpec(None, 'fsdp', None)
  assert specs[('lm', 'layers', 'block', 'attn', 'q_lora_b')].value.spec == jax.sharding.PartitionSpec(None, None, 'tensor', None)
  # Trainable: r * (in + out) per adapter per layer, counted by hand.
  per_layer = 2 * 4 * (32 + 32) + 2 * 4 * (32 + 64) + 4 * (64 + 32)   # q, v; wi_gate, wi_up; wo
  assert ft.count(lparams, trainable=True) == 2 * per_layer


def test_step0_equals_base_and_merge_equals_on_the_fly(base, lora_setup):
  bmodel, params, bforward, ref = base
  model, lparams, forward = lora_setup
  out, _ = forward(lparams, TOKENS)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))   # exactly: B = 0
  trained = randomize_b(lparams)
  on_the_fly, _ = forward(trained, TOKENS)
  assert float(jnp.abs(on_the_fly - ref).max()) > 1e-2              # the adapters matter
  merged = ft.merge(model, trained)
  assert {k: (p.shape, p.dtype, p.trainable) for k, p in merged.items()} == {
      k: (p.shape, p.dtype, p.trainable) for k, p in params.items()}  # plain params of the base model
  folded, _ = bforward(merged, TOKENS)
  np.testing.assert_allclose(np.asarray(folded), np.asarray(on_the_fly), rtol=1e-5, atol=1e-5)


def test_scanned_equals_unscanned_forward_and_adapter_grads(lora_setup):
  model, lparams, _ = lora_setup
  loop = lora_model(dataclasses.replace(CFG, scan_layers=False))
  trained = randomize_b(lparams)
  batch = {'inputs': TOKENS, 'targets': jnp.roll(TOKENS, -1, axis=1), 'mask': jnp.ones(TOKENS.shape)}

  def grads(m):
    def loss(t, rest):
      return m.loss(t.merge(rest), batch)[0]
    return jax.jit(jax.value_and_grad(loss))(*trained.split())

  (l1, g1), (l2, g2) = grads(model), grads(loop)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  assert set(g1.keys()) == {k for k in trained.keys() if ft.is_adapter(k)}
  tree_allclose(g1, g2, rtol=1e-4, atol=1e-6)


def _dot_output_shapes(jaxpr):
  """Output shapes of every dot_general in a jaxpr, sub-jaxprs (scan, remat, pjit) included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for value in eqn.params.values():
      for v in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(v, 'jaxpr', v)
        if hasattr(inner, 'eqns'):
          shapes += _dot_output_shapes(inner)
  return shapes


def test_train_step_has_no_grads_or_opt_state_for_frozen_weights(base, lora_setup):
  _, params, _, _ = base
  model, lparams, _ = lora_setup
  mesh = bs.make_mesh(MeshConfig(), jax.devices()[:1])
  rules = bs.rules_from_config(MeshConfig())
  optimizer = optax.adam(1e-3)
  batch = {'inputs': TOKENS, 'targets': jnp.roll(TOKENS, -1, axis=1), 'mask': jnp.ones(TOKENS.shape)}
  # Per-layer shapes of the frozen matrices: a weight gradient would be a dot_general with one of them.
  per_layer = [p.shape[1:] if p.sharding[:1] == ('layers',) else p.shape for p in params.values()]
  kernel_shapes = {s for s in per_layer if len(s) >= 2}
  assert len(kernel_shapes) == 5   # q/k/v, o, wi_gate/wi_up, wo, embedding

  def step_jaxpr(m, ps):
    trainable, _ = ps.split()
    state = bs.TrainState(step=jnp.zeros((), jnp.int32), params=ps, opt_state=optimizer.init(trainable))
    step = bs.make_train_step(m, optimizer, mesh, rules, bs.train_state_shardings(state, mesh, rules),
                              bs.batch_sharding(mesh, rules), donate=False)
    return state, jax.make_jaxpr(step)(state, batch).jaxpr

  state, jaxpr = step_jaxpr(model, lparams)
  opt_paths = {k for leaf in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, bx.Params))
               if isinstance(leaf, bx.Params) for k in leaf.keys()}
  assert opt_paths and all(ft.is_adapter(k) for k in opt_paths)
  assert not kernel_shapes & set(_dot_output_shapes(jaxpr))
  # The same check finds the weight gradients of full fine-tuning (so it can fail).
  _, full_jaxpr = step_jaxpr(bs.DecoderLM(bx.Graph('lm'), CFG), params)
  assert kernel_shapes <= set(_dot_output_shapes(full_jaxpr))


def test_int8_base_error_bounded_and_merge(base):
  bmodel, params, bforward, ref = base
  model = lora_model(targets=('attn/q',), int8=True)
  qparams = ft.quantize(model, ft.freeze_base(ft.init_new_params(model, params, seed=1)))
  for path, module in ft.projections(model):
    k = module.param_path('kernel')
    q, scale, w = qparams[k].value, qparams[module.param_path('kernel_scale')].value, params[k].value
    assert q.dtype == jnp.int8 and qparams[k].sharding == params[k].sharding
    n_in = getattr(module.base, 'in_ndim', 1)
    s = np.asarray(scale).reshape(scale.shape[:1] + (1,) * n_in + scale.shape[1:])
    err = np.abs(np.asarray(w) - np.asarray(q, np.float32) * s)
    assert np.all(err <= s / 2 + 1e-7), '/'.join(path)
  forward = jax.jit(model.__call__)
  out, _ = forward(qparams, TOKENS)
  rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
  assert 0 < rel < 1e-2
  trained = randomize_b(qparams)
  on_the_fly, _ = forward(trained, TOKENS)
  folded, _ = bforward(ft.merge(model, trained), TOKENS)
  np.testing.assert_allclose(np.asarray(folded), np.asarray(on_the_fly), rtol=1e-5, atol=1e-5)


def test_bf16_base_keeps_f32_adapters(base):
  _, params, _, ref = base
  model = lora_model(dataclasses.replace(CFG, param_dtype='bfloat16'))
  cast = bx.Params({k: p.replace(value=p.value.astype(jnp.bfloat16)) if p.dtype == jnp.float32 else p
                    for k, p in params.items()}, params.is_locked)
  lparams = ft.freeze_base(ft.init_new_params(model, cast, seed=1))
  dtypes = {p.dtype for k, p in lparams.items() if ft.is_adapter(k)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert {p.dtype for k, p in lparams.items() if p.trainable is False and 'rng' not in k} == {jnp.dtype(jnp.bfloat16)}
  out, _ = jax.jit(model.__call__)(lparams, TOKENS)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=3e-2)


class MyBlock(bx.Module):
  """A user's own block: two bx.Linear, nothing LoRA-aware."""

  def __init__(self, graph, rng):
    super().__init__(graph)
    self.up = bx.Linear(graph.child('up'), 16, rng)
    self.down = bx.Linear(graph.child('down'), 8, rng)

  def __call__(self, params, x):
    h, params = self.up(params, x)
    y, params = self.down(params, jax.nn.gelu(h))
    return x + y, params


def user_model(dropout=0.0):
  graph = bx.Graph('net')
  rng = bx.Rng(graph.child('rng'))
  stack = bs.Stack(graph.child('stack'), lambda g: MyBlock(g, rng), 3, rng=rng)
  x = jnp.linspace(-1, 1, 16).reshape(2, 8)
  init = lambda seed: stack(rng.seed(bx.Params(), seed=seed), x)[1].locked()
  return types.SimpleNamespace(graph=graph, init=init, stack=stack), x


def test_user_block_in_a_stack_and_dropout():
  model, x = user_model()
  params = model.init(0)
  ref, _ = model.stack(params, x)
  assert ft.add_lora(model, ['up'], rank=2, alpha=2, dropout=0.5) == [('net', 'stack', 'block', 'up')]
  lparams = ft.freeze_base(ft.init_new_params(model, params, seed=1))
  assert lparams[('net', 'stack', 'block', 'up', 'lora_a')].shape == (3, 8, 2)
  out, _ = model.stack(lparams, x)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  trained = randomize_b(lparams)
  eval_out, _ = model.stack(trained, x)
  with ft.lora_dropout(True):
    train_out, _ = model.stack(trained, x)
  assert not np.allclose(np.asarray(train_out), np.asarray(eval_out))
  plain, _ = user_model()
  folded, _ = plain.stack(ft.merge(model, trained), x)
  np.testing.assert_allclose(np.asarray(folded), np.asarray(eval_out), rtol=1e-5, atol=1e-6)


def test_patterns_and_errors(base):
  _, params, _, _ = base
  frozen = ft.freeze(params, ['embed', 'layers/block/attn/*'])
  trainable = {'/'.join(k) for k, p in frozen.items() if p.trainable}
  assert 'lm/embed/embedding' not in trainable and 'lm/layers/block/attn/q' not in trainable
  assert 'lm/layers/block/mlp/wo/kernel' in trainable and 'lm/final_norm/scale' in trainable
  assert ft.unfreeze(frozen).keys() == params.keys() and all(
      a.trainable == b.trainable for a, b in zip(ft.unfreeze(frozen).values(), params.values()))
  with pytest.raises(ValueError, match='attn/qq.*match no param'):
    ft.freeze(params, ['attn/qq'])
  with pytest.raises(ValueError, match=r"\['atn/q'\] match no projection.*attn/q"):
    ft.add_lora(bs.DecoderLM(bx.Graph('lm'), CFG), ['atn/q'], rank=2, alpha=2)
  with pytest.raises(ValueError, match='rank=0'):
    ft.add_lora(bs.DecoderLM(bx.Graph('lm'), CFG), ['attn/q'], rank=0, alpha=2)


def test_lora_step_on_an_fsdp_mesh_donates_and_keeps_the_base(lora_setup):
  model, lparams, _ = lora_setup
  mesh = bs.make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
  rules = bs.rules_from_config(MeshConfig())
  optimizer = optax.adam(1e-2)
  trainable, _ = lparams.split()
  state = bs.TrainState(step=jnp.zeros((), jnp.int32), params=lparams, opt_state=optimizer.init(trainable))
  shardings = bs.train_state_shardings(state, mesh, rules)
  state = jax.device_put(state, shardings)
  step = bs.make_train_step(ft.WithLoRADropout(model), optimizer, mesh, rules, shardings, bs.batch_sharding(mesh, rules))
  batch = {'inputs': TOKENS, 'targets': jnp.roll(TOKENS, -1, axis=1), 'mask': jnp.ones(TOKENS.shape)}
  kernel = ('lm', 'layers', 'block', 'attn', 'q')
  before = np.asarray(state.params[kernel].value)
  first = state.params[kernel].value
  for _ in range(2):
    state, metrics = step(state, batch)
  assert first.is_deleted()                                     # donated, frozen weights included
  assert state.params[kernel].value.sharding == shardings.params[kernel].value
  np.testing.assert_array_equal(np.asarray(state.params[kernel].value), before)
  assert int(state.step) == 2 and bool(metrics['finite'])
  assert float(jnp.abs(state.params[kernel[:-1] + ('q_lora_b',)].value).max()) > 0
