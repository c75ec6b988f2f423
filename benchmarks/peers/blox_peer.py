"""blox: the project's `TransformerBlock` in a `bs.Stack`, `bx.Embed`/`bx.LayerNorm` around it, raw `jax.jit`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

import blox as bx
import blox_scale as bs
from benchmarks.peers import common
from blox_scale.nn.config import BlockConfig

# canonical name -> the blox param path under ('net', 'gpt')
_BLOCK = {
    'ln1_scale': ('norm_1', 'scale'), 'ln1_bias': ('norm_1', 'bias'),
    'ln2_scale': ('norm_2', 'scale'), 'ln2_bias': ('norm_2', 'bias'),
    'q': ('attn', 'q'), 'k': ('attn', 'k'), 'v': ('attn', 'v'), 'o': ('attn', 'o'),
    'q_bias': ('attn', 'q_bias'), 'k_bias': ('attn', 'k_bias'), 'v_bias': ('attn', 'v_bias'),
    'o_bias': ('attn', 'o_bias'),
    'wi': ('mlp', 'wi', 'kernel'), 'wi_bias': ('mlp', 'wi', 'bias'),
    'wo': ('mlp', 'wo', 'kernel'), 'wo_bias': ('mlp', 'wo', 'bias'),
}
PATHS = {
    'embed': ('net', 'gpt', 'embed', 'embedding'), 'pos': ('net', 'gpt', 'pos', 'embedding'),
    'final_scale': ('net', 'gpt', 'final_norm', 'scale'), 'final_bias': ('net', 'gpt', 'final_norm', 'bias'),
    **{f'block/{k}': ('net', 'gpt', 'layers', 'block') + v for k, v in _BLOCK.items()},
}


class GPT(bx.Module):
  """`tokens: int32[B, T]` -> `logits: f32[B, T, V]`."""

  def __init__(self, graph: bx.Graph, s: common.Shape, remat: str) -> None:
    super().__init__(graph)
    self.rng = bx.Rng(graph / 'rng')
    self.embed = bx.Embed(graph / 'embed', s.vocab, s.d_model, self.rng)
    self.pos = bx.Embed(graph / 'pos', s.seq_len, s.d_model, self.rng)
    config = BlockConfig.create(d_model=s.d_model, num_heads=s.num_heads, mlp_dim=s.mlp_dim, activation='gelu',
                                norm='layernorm', use_rope=False, use_bias=True)
    block = lambda g: bs.TransformerBlock(g, config, self.rng)
    self.layers = bs.Stack(graph / 'layers', block, s.num_layers, rng=self.rng, remat=remat)
    self.final_norm = bx.LayerNorm(graph / 'final_norm')

  def __call__(self, params: bx.Params, tokens: jax.Array) -> tuple[jax.Array, bx.Params]:
    x, params = self.embed(params, tokens)
    p, params = self.pos(params, jnp.arange(tokens.shape[1]))
    x, params = self.layers(params, x + p)
    x, params = self.final_norm(params, x)
    return self.embed.attend(params, x)


def build(shape: common.Shape, numbers: dict, remat: str):
  model = GPT(bx.Graph('net') / 'gpt', shape, remat)
  params = model.rng.seed(bx.Params(), seed=0)
  params = jax.eval_shape(lambda p: model(p, jnp.zeros((1, shape.seq_len), jnp.int32))[1], params).unlocked()
  params = params.unlocked()
  for name, path in PATHS.items():
    params[path] = params[path].replace(value=jnp.asarray(numbers[name]))
  params[('net', 'gpt', 'rng', 'seed')] = params[('net', 'gpt', 'rng', 'seed')].replace(value=jax.random.key(0))
  params[('net', 'gpt', 'rng', 'counter')] = params[('net', 'gpt', 'rng', 'counter')].replace(value=jnp.zeros((), jnp.uint32))
  params = params.locked()
  tx = common.optimizer()

  def loss_fn(trainable, rest, batch):
    logits, params = model(trainable.merge(rest), batch['inputs'])
    return common.cross_entropy(logits, batch['targets']), params.split()[1]

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, batch):
    params, opt_state = state
    trainable, rest = params.split()
    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, rest, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return (optax.apply_updates(trainable, updates).merge(rest), opt_state), loss

  def grads(batch):
    trainable, rest = params.split()
    (loss, _), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trainable, rest, batch)
    return loss, {name: g[path].value for name, path in PATHS.items()}

  return dict(state=(params, tx.init(params.split()[0])), step=step, grads=grads, lower=step.lower)
