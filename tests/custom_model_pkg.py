"""A user's whole model, as a test package (`model.factory`): a masked-LM MLP-mixer encoder.

Not decoder-shaped: every position sees every other (a token-mixing matmul
over the sequence, no causal mask), the loss predicts randomly hidden tokens
from both sides (BERT's objective), drawing its mask from the model's Rng
each step; it has no KV cache, so it trains but cannot generate.
"""

import jax
import jax.numpy as jnp

import blox as bx
import blox_scale as bs

OPTIONS = {'mask_rate': 0.25}


class MixerBlock(bx.Module):
  """x + mix_T(norm(x)) + mlp(norm(x)); `x: [batch, max_seq_len, d_model]`."""

  def __init__(self, graph, config, rng):
    super().__init__(graph)
    c = config.block_config()
    self.norm_1 = bs.nn.make_norm(graph / 'norm_1', c.norm, c.norm_eps, c.param_dtype, c.dtype)
    self.token_mix = bx.Linear(graph / 'token_mix', config.max_seq_len, rng,
                               kernel_metadata={'sharding': (None, None)}, bias_metadata={'sharding': (None,)},
                               param_dtype=c.param_dtype, dtype=c.dtype)
    self.norm_2 = bs.nn.make_norm(graph / 'norm_2', c.norm, c.norm_eps, c.param_dtype, c.dtype)
    self.mlp = bs.nn.MLP(graph / 'mlp', c.mlp, rng)

  def __call__(self, params, x, is_training=False):
    h, params = self.norm_1(params, x)
    t, params = self.token_mix(params, h.swapaxes(1, 2))  # [B, D, T]: mixes positions, both directions
    x = x + t.swapaxes(1, 2)
    h, params = self.norm_2(params, x)
    m, params = self.mlp(params, h)
    return (x + m).astype(x.dtype), params


class MaskedMixerLM:
  """The protocol of blox_scale/models/protocol.py: config, init(seed), loss(params, batch, is_training)."""

  def __init__(self, graph, config, rng, *, mask_rate):
    self.graph, self.config, self.rng, self.mask_rate = graph, config, rng, mask_rate  # graph: for LoRA
    self.mask_id = config.vocab_size - 1  # byte 0xFF: never in UTF-8 text
    self.embed = bx.Embed(graph / 'embed', config.vocab_size, config.d_model, rng)
    self.layers = bs.Stack(graph / 'layers', lambda g: MixerBlock(g, config, rng), config.num_layers, rng=rng,
                           remat=config.remat, scan=config.scan_layers)
    c = config.block_config()
    self.norm = bs.nn.make_norm(graph / 'norm', c.norm, c.norm_eps, c.param_dtype, c.dtype)
    self.head = bx.Linear(graph / 'head', config.vocab_size, rng, kernel_metadata={'sharding': ('embed', 'vocab')},
                          bias_metadata={'sharding': ('vocab',)})

  def logits(self, params, tokens):
    """`tokens: int32[B, max_seq_len]` -> `f32[B, max_seq_len, vocab]`."""
    if tokens.shape[1] != self.config.max_seq_len:
      raise ValueError(f'MaskedMixerLM: sequences of {tokens.shape[1]} tokens; token mixing needs exactly '
                       f'model.max_seq_len={self.config.max_seq_len} (set data.seq_len to it)')
    x, params = self.embed(params, tokens)
    x, params = self.layers(params, x)
    x, params = self.norm(params, x)
    return self.head(params, x)

  def init(self, seed=0):
    params = self.rng.seed(bx.Params(), seed=seed)
    _, params = self.logits(params, jnp.zeros((1, self.config.max_seq_len), jnp.int32))
    return params.locked()

  def loss(self, params, batch, is_training=True):
    tokens, mask = batch['inputs'], batch['mask'].astype(jnp.float32)
    key, params = self.rng(params)  # a new mask every step; the counter is checkpointed with the params
    hidden = jax.random.bernoulli(key, self.mask_rate, tokens.shape)
    logits, params = self.logits(params, jnp.where(hidden, self.mask_id, tokens))
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
    weight = hidden * mask
    count = jnp.sum(weight)
    loss = jnp.sum(nll * weight) / jnp.maximum(count, 1.0)
    return loss, ({'loss': loss, 'tokens': count}, params)


def masked_mixer(graph, config, rng):
  """`model.factory: custom_model_pkg:masked_mixer`; options `model.factory_args.mask_rate`."""
  unknown = sorted(set(config.factory_args) - set(OPTIONS))
  if unknown:
    raise ValueError(f'model.factory_args: unknown option(s) {unknown}; masked_mixer takes {sorted(OPTIONS)}')
  return MaskedMixerLM(graph, config, rng, **{**OPTIONS, **config.factory_args})


def not_a_model(graph, config, rng):
  """Returns a layer, not a model: the one-line type error."""
  return bx.Linear(graph / 'dense', 4, rng)

