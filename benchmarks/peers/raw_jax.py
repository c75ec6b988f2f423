"""Raw JAX: a dict of arrays, `lax.scan` over the stacked block params, `jax.checkpoint`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from benchmarks.peers import common


def block(p: dict, x: jax.Array) -> jax.Array:
  """One pre-norm block; `x: f32[B, T, D]`, `p` one layer's slice of the stacked params."""
  h = common.layer_norm(x, p['ln1_scale'], p['ln1_bias'])
  q = jnp.einsum('btd,dnh->btnh', h, p['q']) + p['q_bias']                 # [B, T, H, Dh]
  k = jnp.einsum('btd,dnh->btnh', h, p['k']) + p['k_bias']
  v = jnp.einsum('btd,dnh->btnh', h, p['v']) + p['v_bias']
  a = jax.nn.dot_product_attention(q, k, v, is_causal=True)               # [B, T, H, Dh]
  x = x + jnp.einsum('btnh,nhd->btd', a, p['o']) + p['o_bias']
  h = common.layer_norm(x, p['ln2_scale'], p['ln2_bias'])
  h = jax.nn.gelu(h @ p['wi'] + p['wi_bias'], approximate=True)           # [B, T, M]
  return x + h @ p['wo'] + p['wo_bias']


def forward(params: dict, tokens: jax.Array, remat: str) -> jax.Array:
  """`tokens: int32[B, T]` -> `logits: f32[B, T, V]`."""
  x = params['embed'][tokens] + params['pos'][: tokens.shape[1]]

  def body(x, p):
    return block(p, x), None

  if remat != 'none':
    body = jax.checkpoint(body, policy=common.POLICY[remat], prevent_cse=False)
  x, _ = jax.lax.scan(body, x, params['block'])
  x = common.layer_norm(x, params['final_scale'], params['final_bias'])
  return x @ params['embed'].T


def build(shape: common.Shape, numbers: dict, remat: str):
  params = {k: jnp.asarray(v) for k, v in numbers.items() if not k.startswith('block/')}
  params['block'] = {k[len('block/'):]: jnp.asarray(v) for k, v in numbers.items() if k.startswith('block/')}
  tx = common.optimizer()

  def loss_fn(params, batch):
    return common.cross_entropy(forward(params, batch['inputs'], remat), batch['targets'])

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def grads(batch):
    loss, g = jax.jit(jax.value_and_grad(loss_fn))(params, batch)
    flat = {k: v for k, v in g.items() if k != 'block'}
    flat.update({f'block/{k}': v for k, v in g['block'].items()})
    return loss, flat

  return dict(state=(params, tx.init(params)), step=step, grads=grads, lower=step.lower)
