"""Flax NNX: `nnx.Module`s, blocks created with `nnx.vmap` and run with `nnx.scan` + `nnx.remat`.

Two ways to jit the same model, both from Flax's documentation:
  'lifted':     `nnx.jit` + `nnx.value_and_grad` + `nnx.Optimizer.update` on the objects;
  'functional': `nnx.split` once, then a plain `jax.jit` step that `nnx.merge`s the
                state, runs the same code and returns `nnx.state(...)` (the pattern
                Flax recommends when dispatch overhead matters).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.peers import common

init = nnx.initializers.normal(0.02)


class Attention(nnx.Module):
  def __init__(self, s: common.Shape, *, rngs: nnx.Rngs) -> None:
    D, H, Dh = s.d_model, s.num_heads, s.head_dim
    for name in ('q', 'k', 'v'):
      setattr(self, name, nnx.Param(init(rngs.params(), (D, H, Dh))))
      setattr(self, f'{name}_bias', nnx.Param(jnp.zeros((H, Dh))))
    self.o = nnx.Param(init(rngs.params(), (H, Dh, D)))
    self.o_bias = nnx.Param(jnp.zeros((D,)))

  def __call__(self, x: jax.Array) -> jax.Array:                        # x: [B, T, D]
    q = jnp.einsum('btd,dnh->btnh', x, self.q[...]) + self.q_bias[...]   # [B, T, H, Dh]
    k = jnp.einsum('btd,dnh->btnh', x, self.k[...]) + self.k_bias[...]
    v = jnp.einsum('btd,dnh->btnh', x, self.v[...]) + self.v_bias[...]
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return jnp.einsum('btnh,nhd->btd', a, self.o[...]) + self.o_bias[...]


class Block(nnx.Module):
  def __init__(self, s: common.Shape, *, rngs: nnx.Rngs) -> None:
    self.ln1 = nnx.LayerNorm(s.d_model, epsilon=1e-5, rngs=rngs)
    self.attn = Attention(s, rngs=rngs)
    self.ln2 = nnx.LayerNorm(s.d_model, epsilon=1e-5, rngs=rngs)
    self.wi = nnx.Linear(s.d_model, s.mlp_dim, kernel_init=init, rngs=rngs)
    self.wo = nnx.Linear(s.mlp_dim, s.d_model, kernel_init=init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.wo(nnx.gelu(self.wi(self.ln2(x)), approximate=True))


class GPT(nnx.Module):
  def __init__(self, s: common.Shape, remat: str, *, rngs: nnx.Rngs) -> None:
    self.remat = remat
    self.embed = nnx.Embed(s.vocab, s.d_model, embedding_init=init, rngs=rngs)
    self.pos = nnx.Embed(s.seq_len, s.d_model, embedding_init=init, rngs=rngs)

    @nnx.split_rngs(splits=s.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_block(rngs: nnx.Rngs) -> Block:
      return Block(s, rngs=rngs)

    self.blocks = create_block(rngs)
    self.final_norm = nnx.LayerNorm(s.d_model, epsilon=1e-5, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:                    # int32[B, T] -> f32[B, T, V]
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))

    def layer(x, block):
      return block(x)

    if self.remat != 'none':
      layer = nnx.remat(layer, policy=common.POLICY[self.remat], prevent_cse=False)
    x = nnx.scan(layer, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)
    return self.embed.attend(self.final_norm(x))


# canonical name -> attribute path in GPT
PATHS = {
    'embed': ('embed', 'embedding'), 'pos': ('pos', 'embedding'),
    'final_scale': ('final_norm', 'scale'), 'final_bias': ('final_norm', 'bias'),
    'block/ln1_scale': ('blocks', 'ln1', 'scale'), 'block/ln1_bias': ('blocks', 'ln1', 'bias'),
    'block/ln2_scale': ('blocks', 'ln2', 'scale'), 'block/ln2_bias': ('blocks', 'ln2', 'bias'),
    **{f'block/{n}': ('blocks', 'attn', n) for n in ('q', 'k', 'v', 'o', 'q_bias', 'k_bias', 'v_bias', 'o_bias')},
    'block/wi': ('blocks', 'wi', 'kernel'), 'block/wi_bias': ('blocks', 'wi', 'bias'),
    'block/wo': ('blocks', 'wo', 'kernel'), 'block/wo_bias': ('blocks', 'wo', 'bias'),
}


def _get(tree, path):
  for name in path:
    tree = tree[name] if isinstance(tree, dict) else getattr(tree, name)
  return tree


def loss_fn(model: GPT, batch: dict) -> jax.Array:
  return common.cross_entropy(model(batch['inputs']), batch['targets'])


def _model(shape: common.Shape, numbers: dict, remat: str) -> GPT:
  model = GPT(shape, remat, rngs=nnx.Rngs(0))
  for name, path in PATHS.items():
    var = _get(model, path)
    if var.shape != numbers[name].shape:
      raise ValueError(f'nnx {name}: shape {var.shape} != canonical {numbers[name].shape}')
    var[...] = jnp.asarray(numbers[name])
  return model


def _grads(model: GPT):
  def grads(batch):
    loss, g = nnx.jit(nnx.value_and_grad(loss_fn))(model, batch)
    g = nnx.to_pure_dict(g)
    return loss, {name: _get(g, path) for name, path in PATHS.items()}
  return grads


def build_lifted(shape: common.Shape, numbers: dict, remat: str):
  model = _model(shape, numbers, remat)
  optimizer = nnx.Optimizer(model, common.optimizer(), wrt=nnx.Param)

  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss

  def step(state, batch):
    return state, train_step(*state, batch)

  return dict(state=(model, optimizer), step=step, grads=_grads(model), lower=None)


def build_functional(shape: common.Shape, numbers: dict, remat: str):
  model = _model(shape, numbers, remat)
  optimizer = nnx.Optimizer(model, common.optimizer(), wrt=nnx.Param)
  grads = _grads(model)
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return dict(state=state, step=step, grads=grads, lower=step.lower)
