"""A user's own block, as a test package: the GPT-J parallel block of docs/custom_blocks.md,
and a block without a KV-cache call form (trains, cannot decode)."""

import blox as bx
import blox_scale as bs


class ParallelBlock(bx.Module):
  """y = x + attn(norm(x)) + mlp(norm(x)); decodes through bs.nn.Attention's cache form."""

  def __init__(self, graph, config, rng):
    super().__init__(graph)
    c = config.block_config()
    self.norm = bs.nn.make_norm(graph / 'norm', c.norm, c.norm_eps, c.param_dtype, c.dtype)
    self.attn = bs.nn.Attention(graph / 'attn', c.attention, rng)
    self.mlp = bs.nn.MLP(graph / 'mlp', c.mlp, rng)

  def __call__(self, params, x, cache=None, *, positions=None, mask=None, cache_index=0, is_training=False):
    h, params = self.norm(params, x)
    if cache is None:
      a, params = self.attn(params, h, positions, mask=mask)
    else:
      (a, new_kv), params = self.attn(params, h, positions, cache, mask=mask, cache_index=cache_index)
    m, params = self.mlp(params, h)
    y = (x + a + m).astype(x.dtype)
    return y if cache is None else (y, new_kv), params


class NoCacheBlock(ParallelBlock):
  def __call__(self, params, x, *, positions=None, is_training=False):
    return super().__call__(params, x, positions=positions, is_training=is_training)


def parallel_block(graph, config, rng):
  if config.block_args:
    raise ValueError(f'model.block_args: parallel_block takes no options, got {sorted(config.block_args)}')
  return ParallelBlock(graph, config, rng)


def no_cache_block(graph, config, rng):
  return NoCacheBlock(graph, config, rng)


def two_args(graph, config):
  return ParallelBlock(graph, config, None)


NOT_CALLABLE = 3
