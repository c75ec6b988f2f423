"""Equinox: modules are pytrees of arrays; `filter_vmap` builds the stacked blocks, `lax.scan`
runs them (partition/combine), `filter_checkpoint` is the remat, `filter_jit` the step.

Equinox layers work on one example: the model maps `int32[T]` to `f32[T, V]` and the
loss `jax.vmap`s it over the batch, as Equinox's own examples do.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from benchmarks.peers import common

normal = lambda key, shape: 0.02 * jax.random.normal(key, shape)


class Attention(eqx.Module):
  q: jax.Array
  k: jax.Array
  v: jax.Array
  o: jax.Array
  q_bias: jax.Array
  k_bias: jax.Array
  v_bias: jax.Array
  o_bias: jax.Array

  def __init__(self, s: common.Shape, key: jax.Array) -> None:
    D, H, Dh = s.d_model, s.num_heads, s.head_dim
    kq, kk, kv, ko = jax.random.split(key, 4)
    self.q, self.k, self.v = normal(kq, (D, H, Dh)), normal(kk, (D, H, Dh)), normal(kv, (D, H, Dh))
    self.o = normal(ko, (H, Dh, D))
    self.q_bias = self.k_bias = self.v_bias = jnp.zeros((H, Dh))
    self.o_bias = jnp.zeros((D,))

  def __call__(self, x: jax.Array) -> jax.Array:                        # x: [T, D]
    q = jnp.einsum('td,dnh->tnh', x, self.q) + self.q_bias               # [T, H, Dh]
    k = jnp.einsum('td,dnh->tnh', x, self.k) + self.k_bias
    v = jnp.einsum('td,dnh->tnh', x, self.v) + self.v_bias
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return jnp.einsum('tnh,nhd->td', a, self.o) + self.o_bias


class Block(eqx.Module):
  ln1: eqx.nn.LayerNorm
  attn: Attention
  ln2: eqx.nn.LayerNorm
  wi: eqx.nn.Linear
  wo: eqx.nn.Linear

  def __init__(self, s: common.Shape, key: jax.Array) -> None:
    ka, ki, ko = jax.random.split(key, 3)
    self.ln1 = eqx.nn.LayerNorm(s.d_model, eps=1e-5)
    self.attn = Attention(s, ka)
    self.ln2 = eqx.nn.LayerNorm(s.d_model, eps=1e-5)
    self.wi = eqx.nn.Linear(s.d_model, s.mlp_dim, key=ki)
    self.wo = eqx.nn.Linear(s.mlp_dim, s.d_model, key=ko)

  def __call__(self, x: jax.Array) -> jax.Array:                        # x: [T, D]
    x = x + self.attn(jax.vmap(self.ln1)(x))
    h = jax.nn.gelu(jax.vmap(self.wi)(jax.vmap(self.ln2)(x)), approximate=True)
    return x + jax.vmap(self.wo)(h)


class GPT(eqx.Module):
  embed: eqx.nn.Embedding
  pos: eqx.nn.Embedding
  blocks: Block            # every array with a leading [num_layers] axis
  final_norm: eqx.nn.LayerNorm
  remat: str = eqx.field(static=True)

  def __init__(self, s: common.Shape, remat: str, key: jax.Array) -> None:
    ke, kp, kb = jax.random.split(key, 3)
    self.embed = eqx.nn.Embedding(s.vocab, s.d_model, key=ke)
    self.pos = eqx.nn.Embedding(s.seq_len, s.d_model, key=kp)
    self.blocks = eqx.filter_vmap(lambda k: Block(s, k))(jax.random.split(kb, s.num_layers))
    self.final_norm = eqx.nn.LayerNorm(s.d_model, eps=1e-5)
    self.remat = remat

  def __call__(self, tokens: jax.Array) -> jax.Array:                    # int32[T] -> f32[T, V]
    x = self.embed.weight[tokens] + self.pos.weight[: tokens.shape[0]]
    dynamic, static = eqx.partition(self.blocks, eqx.is_array)

    def layer(x, block_arrays):
      return eqx.combine(block_arrays, static)(x), None

    if self.remat != 'none':
      layer = eqx.filter_checkpoint(layer, policy=common.POLICY[self.remat], prevent_cse=False)
    x, _ = jax.lax.scan(layer, x, dynamic)
    return jax.vmap(self.final_norm)(x) @ self.embed.weight.T


# canonical name -> (getter, how the canonical array maps to the eqx array)
_T = lambda a: jnp.swapaxes(a, -1, -2)   # eqx.nn.Linear stores weight [out, in]
PATHS = {
    'embed': (lambda m: m.embed.weight, None), 'pos': (lambda m: m.pos.weight, None),
    'final_scale': (lambda m: m.final_norm.weight, None), 'final_bias': (lambda m: m.final_norm.bias, None),
    'block/ln1_scale': (lambda m: m.blocks.ln1.weight, None), 'block/ln1_bias': (lambda m: m.blocks.ln1.bias, None),
    'block/ln2_scale': (lambda m: m.blocks.ln2.weight, None), 'block/ln2_bias': (lambda m: m.blocks.ln2.bias, None),
    **{f'block/{n}': ((lambda n: lambda m: getattr(m.blocks.attn, n))(n), None)
       for n in ('q', 'k', 'v', 'o', 'q_bias', 'k_bias', 'v_bias', 'o_bias')},
    'block/wi': (lambda m: m.blocks.wi.weight, _T), 'block/wi_bias': (lambda m: m.blocks.wi.bias, None),
    'block/wo': (lambda m: m.blocks.wo.weight, _T), 'block/wo_bias': (lambda m: m.blocks.wo.bias, None),
}


def loss_fn(model: GPT, batch: dict) -> jax.Array:
  logits = jax.vmap(model)(batch['inputs'])
  return common.cross_entropy(logits, batch['targets'])


def build(shape: common.Shape, numbers: dict, remat: str):
  model = GPT(shape, remat, jax.random.key(0))
  getters = [get for get, _ in PATHS.values()]
  values = []
  for name, (get, transform) in PATHS.items():
    value = jnp.asarray(numbers[name])
    value = transform(value) if transform else value
    if get(model).shape != value.shape:
      raise ValueError(f'equinox {name}: shape {get(model).shape} != canonical {value.shape}')
    values.append(value)
  model = eqx.tree_at(lambda m: [get(m) for get in getters], model, values)
  tx = common.optimizer()
  opt_state = tx.init(eqx.filter(model, eqx.is_array))

  # The batch goes first so that 'all-except-first' donates exactly the model and optimizer state.
  @eqx.filter_jit(donate='all-except-first')
  def train_step(batch, model, opt_state):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, batch)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss

  def step(state, batch):
    model, opt_state, loss = train_step(batch, *state)
    return (model, opt_state), loss

  def grads(batch):
    loss, g = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn))(model, batch)
    out = {}
    for name, (get, transform) in PATHS.items():
      out[name] = transform(get(g)) if transform else get(g)
    return loss, out

  return dict(state=(model, opt_state), step=step, grads=grads,
              lower=lambda state, batch: train_step.lower(batch, *state).lowered)
