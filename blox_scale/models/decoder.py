"""DecoderLM: a decoder-only transformer language model on one `bs.Stack`.

    tokens -> embed (+ learned positions) -> Stack(TransformerBlock) x L
           -> final norm -> logits (tied embedding or own head), float32

The whole model is configured by `ModelConfig` (blox_scale/models/config.py); the
presets in configs/ give GPT-2 and Llama shapes. Params live under the graph
given to the constructor:

  <root>/rng/{seed,counter}            the model's Rng
  <root>/embed/embedding               [vocab, embed]       ('vocab', 'embed')
  <root>/pos_embed/embedding           [max_seq_len, embed] (None, 'embed')   position='learned'
  <root>/layers/block/...              every block param, [num_layers, ...]   ('layers', ...)
  <root>/final_norm/scale (and bias)   [embed]              ('norm',)
  <root>/head/kernel                   [embed, vocab]       ('embed', 'vocab') tie_embeddings=False
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import blox as bx
from blox.layers import DType, cast
from blox_scale.models import plugin
from blox_scale.models.config import ModelConfig
from blox_scale.nn.attention import Cache, attention_mask, segment_mask
from blox_scale.nn.block import TransformerBlock, make_norm
from blox_scale.parallel.sharding import constrain
from blox_scale.stacking.stack import Stack

Batch = dict[str, jax.Array]

# model.position: rotary (applied inside attention) or GPT-2's learned absolute embeddings.
POSITIONS = ('rope', 'learned')


class LMHead(bx.Module):
  """Untied output projection: `x: [..., embed]` -> float32 logits `[..., vocab]`.

  The matmul runs in the compute dtype and accumulates in float32
  (`preferred_element_type`): logits feed a softmax over a large vocabulary,
  where bf16 rounding of the logits themselves would bias the loss.
  """

  def __init__(self, graph: bx.Graph, vocab_size: int, rng: bx.Rng | None, *, init_std: float = 0.02,
               param_dtype: DType = jnp.float32, dtype: DType | None = None) -> None:
    super().__init__(graph)
    self.vocab_size = vocab_size
    self.rng = rng
    self.init_std = init_std
    self.param_dtype = param_dtype
    self.dtype = dtype

  def __call__(self, params: bx.Params, x: jax.Array) -> tuple[jax.Array, bx.Params]:
    kernel, params = self.get_param(
        params, 'kernel', (x.shape[-1], self.vocab_size), jax.nn.initializers.normal(self.init_std),
        dtype=self.param_dtype, metadata={'sharding': ('embed', 'vocab')}, rng=self.rng)
    return project_logits(x, kernel.T, self.dtype), params


def project_logits(x: jax.Array, table: jax.Array, dtype: DType | None) -> jax.Array:
  """`x: [B, T, D]`, `table: [V, D]` -> `f32[B, T, V]`, accumulated in float32."""
  dt = jnp.result_type(x, table) if dtype is None else jnp.dtype(dtype)
  return jnp.einsum('btd,vd->btv', cast(x, dt), cast(table, dt), preferred_element_type=jnp.float32)


class DecoderLM:
  """The language model of `ModelConfig`.

  ```
  model = DecoderLM(bx.Graph('lm'), cfg.model)
  params = model.init(seed)                                  # locked Params
  logits, params = model(params, tokens, is_training=False)  # int32[B, T] -> f32[B, T, V]
  loss, (metrics, params) = model.loss(params, batch, is_training=True)
  ```
  `DecoderLM` is not itself a `bx.Module` (the root graph binds none); its
  parts are. It implements `models.protocol.Model` and `Decoder`. Every layer is a `TransformerBlock(graph, config.block_config(), rng)`.
  """

  def __init__(self, graph: bx.Graph, config: ModelConfig, *, rng: bx.Rng | None = None,
               attention_impl: str | None = None) -> None:
    """`rng`: the model's `bx.Rng` (default: a new one at `<graph>/rng`).
    `attention_impl`: None (XLA, any platform) or 'cudnn' (NVIDIA flash attention, bf16)."""
    if not isinstance(config, ModelConfig):
      raise TypeError(f'DecoderLM: config must be a ModelConfig (cfg.model), got {type(config).__name__}.')
    c = config
    self.graph = graph
    self.config = c
    self.param_dtype = jnp.dtype(c.param_dtype)
    self.dtype = jnp.dtype(c.dtype)
    self.num_kv_heads = c.num_kv_heads or c.num_heads
    self.head_dim = c.head_dim or c.d_model // c.num_heads
    self.rng = rng if rng is not None else bx.Rng(graph.child('rng'))
    init = jax.nn.initializers.normal(c.init_std)
    self.embed = bx.Embed(graph.child('embed'), c.vocab_size, c.d_model, self.rng, embedding_init=init,
                          param_dtype=self.param_dtype, dtype=self.dtype)
    self.pos_embed = None
    if c.position == 'learned':
      self.pos_embed = bx.Embed(graph.child('pos_embed'), c.max_seq_len, c.d_model, self.rng, embedding_init=init,
                                embedding_metadata={'sharding': (None, 'embed')},
                                param_dtype=self.param_dtype, dtype=self.dtype)
    per_block = 1  # layers one block holds (a repeating pattern, e.g. dense + MoE)
    if c.block_factory:  # the user's layer, or model.moe's (models/plugin.py); the Stack repeats it like any block
      factory = plugin.resolve(c.block_factory, 'model.block' if c.block else 'model.moe')
      per_block = plugin.layers_per_block(factory, c)
      block = lambda g: factory(g, c, self.rng)
    else:
      block_config = c.block_config(attention_impl)
      block = lambda g: TransformerBlock(g, block_config, self.rng)
    if c.remat == 'auto':
      raise ValueError("DecoderLM: model.remat='auto' is resolved by the trainer (blox-train, blox-plan) from the "
                       'compiled step; build the model with the policy it chose '
                       '(blox_scale.training.remat_auto.candidate_config).')
    self.layers = Stack(graph.child('layers'), block, c.num_layers // per_block, rng=self.rng, remat=c.remat,
                        remat_names=c.remat_names, scan=c.scan_layers, nested=c.remat_nested)
    self.layers_per_block = per_block
    # A block with `aux_names` (the MoE block) carries `(x, {name: f32[] running sum})` through the
    # layers; aux['aux_loss'] joins the loss and every entry is a metric (models/plugin.py).
    self.aux_names = tuple(getattr(self.layers.block, 'aux_names', ()))
    self.final_norm = make_norm(graph.child('final_norm'), c.norm, c.norm_eps, self.param_dtype, self.dtype)
    self.head = None
    if not c.tie_embeddings:
      self.head = LMHead(graph.child('head'), c.vocab_size, self.rng, init_std=c.init_std,
                         param_dtype=self.param_dtype, dtype=self.dtype)

  # -- init --------------------------------------------------------------------

  def init(self, seed: Any = 0) -> bx.Params:
    """All params, locked. Pure: works under `jax.eval_shape` and `jax.jit(..., out_shardings=...)`."""
    params = self.rng.seed(bx.Params(), seed=seed)
    _, params = self(params, jnp.zeros((1, 1), jnp.int32))
    return params.locked()

  # -- forward -----------------------------------------------------------------

  def _check_tokens(self, tokens: jax.Array, what: str) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'DecoderLM.{what}: tokens must be int[batch, seq], got {tokens.dtype}{list(tokens.shape)}.')

  def _embed(self, params: bx.Params, tokens: jax.Array, positions: jax.Array) -> tuple[jax.Array, bx.Params]:
    if self.embed.param_path('embedding') in params:
      # FSDP shards the table's embed dim, but the gathered rows must be
      # sharded by batch: gather the table's embed dim first (as FSDP does for
      # every weight) instead of letting XLA replicate the rows after the
      # lookup ("involuntary full rematerialization").
      table, params = self.embed.get_param(params, 'embedding')
      rows = constrain(table, ('vocab', None))[tokens]
      x = rows if self.embed.dtype is None else cast(rows, self.embed.dtype)
    else:
      x, params = self.embed(params, tokens)  # lazy init
    if self.pos_embed is not None:
      p, params = self.pos_embed(params, positions)
      x = x + p
    return constrain(cast(x, self.dtype), ('batch', 'seq', 'embed')), params

  def _logits(self, params: bx.Params, x: jax.Array) -> tuple[jax.Array, bx.Params]:
    x, params = self.final_norm(params, x)
    if self.head is not None:
      logits, params = self.head(params, x)
    else:
      table, params = self.embed.get_param(params, 'embedding')
      logits = project_logits(x, table, self.dtype)
    return constrain(logits, ('batch', 'seq', 'vocab')), params

  def __call__(self, params: bx.Params, tokens: jax.Array, is_training: bool = False, *,
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, bx.Params]:
    """`tokens: int[batch, seq]` -> `logits: f32[batch, seq, vocab]` (causal).

    Packed documents (`data.packing='document'`): `segment_ids: int[batch, seq]`
    (equal ids = one document) restricts attention to the query's own document
    (block-causal), and `positions: int[batch, seq]` (restarting at 0 per
    document) feed RoPE / the learned position table. None: one sequence,
    positions `0..seq-1`.
    """
    logits, _, params = self._forward(params, tokens, is_training, segment_ids, positions)
    return logits, params

  def _forward(self, params: bx.Params, tokens: jax.Array, is_training: bool, segment_ids: jax.Array | None,
               positions: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array], bx.Params]:
    """`__call__` that also returns the blocks' auxiliary sums (`{}` for blocks without `aux_names`)."""
    self._check_tokens(tokens, '__call__')
    batch, seq = tokens.shape
    if seq > self.config.max_seq_len:
      raise ValueError(f'DecoderLM: sequence length {seq} exceeds model.max_seq_len={self.config.max_seq_len}.')
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None, :], (batch, seq))
    mask = None if segment_ids is None else segment_mask(segment_ids)
    x, params = self._embed(params, tokens, positions.astype(jnp.int32))
    # `mask=` only for packed documents: a block without packing support keeps working unpacked.
    extra = {} if mask is None else {'mask': mask}
    x, params = self.layers(params, self._carry(x), positions=positions.astype(jnp.int32), is_training=is_training,
                            **extra)
    x, aux = x if self.aux_names else (x, {})
    logits, params = self._logits(params, x)
    return logits, aux, params

  def _carry(self, x: jax.Array) -> Any:
    """The Stack's carry: `x`, or `(x, zeros of aux_names)` for a block that reports auxiliary values."""
    return (x, {n: jnp.zeros((), jnp.float32) for n in self.aux_names}) if self.aux_names else x

  def loss(self, params: bx.Params, batch: Batch, is_training: bool = True) -> tuple[jax.Array, tuple[dict[str, jax.Array], bx.Params]]:
    """Masked mean next-token cross-entropy (+ z-loss).

    `batch = {'inputs': int32[B, T], 'targets': int32[B, T], 'mask': f32[B, T]}`
    (mask 1 = counted), optionally with `segment_ids`/`positions: int32[B, T]`
    for packed documents (see `__call__`; the data pipeline already zeroes the
    mask of each cross-document target). Returns `(total, (metrics, params))` with metrics
    'loss' (cross-entropy), 'z_loss' (its weighted contribution), 'total_loss'
    and 'tokens' (the mask sum); a block with `aux_names` (MoE) adds its
    sums: 'aux_loss' (its weighted losses, part of the total) and its own
    metrics ('moe_aux_loss', 'moe_z_loss', 'moe_dropped_frac'). z-loss (PaLM) is `z_loss * log(Z)**2`: it
    keeps the softmax normaliser near 1 so bf16 logits do not drift.
    """
    missing = [k for k in ('inputs', 'targets', 'mask') if k not in batch]
    if missing:
      raise KeyError(f'DecoderLM.loss: batch is missing {missing}; it needs inputs, targets and mask.')
    logits, aux, params = self._forward(params, batch['inputs'], is_training, batch.get('segment_ids'),
                                        batch.get('positions'))  # f32[B, T, V]
    targets = batch['targets']
    mask = batch['mask'].astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)                                   # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    tokens = jnp.sum(mask)
    denom = jnp.maximum(tokens, 1.0)  # an all-masked batch gives 0, not NaN
    ce = jnp.sum((log_z - target_logit) * mask) / denom
    z_loss = self.config.z_loss * jnp.sum(jnp.square(log_z) * mask) / denom
    total = ce + z_loss
    metrics = {'loss': ce, 'z_loss': z_loss}
    if aux:  # the blocks' own losses (MoE load balancing, router z-loss), already weighted, and their metrics
      total = total + aux['aux_loss']
      metrics.update(aux)
    metrics.update(total_loss=total, tokens=tokens)
    return total, (metrics, params)

  # -- decoding with a KV cache --------------------------------------------------

  @property
  def can_decode(self) -> bool:
    """Whether the repeated block takes a KV cache (TransformerBlock does; a `model.block` may not)."""
    return plugin.supports_cache(self.layers.block)

  def check_can_decode(self) -> None:
    """Raises `plugin.DecodeNotSupported` (one line) when the block cannot decode with a KV cache."""
    if not self.can_decode:
      raise plugin.DecodeNotSupported(
          f'model.block={self.config.block_factory!r}: its block takes no KV cache, so this model cannot decode '
          '(blox-sample, end-of-training samples); give its __call__ a cache parameter '
          '(the call form is in docs/custom_blocks.md)')

  def init_cache(self, batch: int, length: int, dtype: DType | None = None) -> Cache:
    """Zeros `{'k', 'v'}: [num_layers, batch, length, kv_heads, head_dim]` (compute dtype)."""
    shape = (self.config.num_layers, batch, length, self.num_kv_heads, self.head_dim)
    dtype = self.dtype if dtype is None else dtype
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}

  def decode(self, params: bx.Params, tokens: jax.Array, cache: Cache, *, cache_index: jax.Array | int,
             pad: jax.Array) -> tuple[tuple[jax.Array, Cache], bx.Params]:
    """Runs `tokens` through the model reading and extending the KV cache.

    Args:
      tokens: `int[batch, T]` written at cache slots `[cache_index, cache_index + T)`
        (the whole left-padded prompt at prefill, one token per step after).
      cache: from `init_cache`, `[num_layers, batch, S, kv_heads, head_dim]`.
      cache_index: int scalar, the first slot of these tokens (same for all rows).
      pad: `int[batch]`, how many left-pad slots each row starts with; row b's
        token in slot s has position `s - pad[b]`, and slots `< pad[b]` are
        never attended to.
    Returns:
      `((logits: f32[batch, T, vocab], cache), params)`.
    The stack runs with `call_per_layer`: layer i reads its slice of the
    cache and returns only its T new keys/values, which are written into the
    stacked cache here with one `dynamic_update_slice`, so neither the scan
    nor the Python loop copies the cache into its outputs.
    """
    self._check_tokens(tokens, 'decode')
    self.check_can_decode()
    batch, seq = tokens.shape
    length = cache['k'].shape[2]
    slots = cache_index + jnp.arange(seq, dtype=jnp.int32)                          # [T]
    positions = jnp.maximum(slots[None, :] - pad[:, None].astype(jnp.int32), 0)     # [B, T]
    key_valid = jnp.arange(length, dtype=jnp.int32)[None, :] >= pad[:, None]        # [B, S]
    mask = attention_mask(slots, key_valid, self.config.sliding_window)            # [B, 1, T, S]
    x, params = self._embed(params, tokens, positions)
    g = self.layers_per_block  # a pattern block gets its g layers' cache: [L, ...] -> [L / g, g, ...]
    per_block = cache if g == 1 else jax.tree.map(lambda a: a.reshape((-1, g) + a.shape[1:]), cache)
    (x, new_kv), params = self.layers.call_per_layer(
        params, self._carry(x), per_block, positions=positions, mask=mask, cache_index=cache_index)
    x = x[0] if self.aux_names else x
    if g > 1:
      new_kv = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), new_kv)
    start = (0, 0, cache_index, 0, 0)
    cache = {name: jax.lax.dynamic_update_slice(cache[name], new_kv[name], start) for name in cache}
    logits, params = self._logits(params, x)
    return (logits, cache), params
