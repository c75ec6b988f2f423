"""Multi-head attention: MHA, grouped-query (GQA) and multi-query (MQA).

One module covers the three: `num_kv_heads == num_heads` is MHA,
`num_kv_heads == 1` is MQA (Shazeer 2019), anything dividing `num_heads` is
GQA (Ainslie et al. 2023). Keys and values keep their `num_kv_heads` heads all
the way into `jax.nn.dot_product_attention`, which groups the query heads
itself (no `jnp.repeat` of K/V), and which GPUs can route to the cuDNN fused
kernel.

Params (logical axes in `metadata['sharding']`):
  q:  [embed, heads, head_dim]      ('embed', 'heads', 'head_dim')
  k:  [embed, kv_heads, head_dim]   ('embed', 'kv_heads', 'head_dim')
  v:  [embed, kv_heads, head_dim]   ('embed', 'kv_heads', 'head_dim')
  o:  [heads, head_dim, embed]      ('heads', 'head_dim', 'embed')
  with `use_bias`: q_bias [heads, head_dim], k_bias/v_bias [kv_heads, head_dim],
  o_bias [embed]; with `qk_norm`: q_norm/scale, k_norm/scale [head_dim] ('norm',).

Kernels are 3-d (heads kept as their own axis) so that tensor parallelism can
shard 'heads' without a reshape that would hide the head boundary. Each is a
`Projection` child module (`self.q`, `self.k`, `self.v`, `self.o`) whose
params keep the names above (`attn/q`, not `attn/q/kernel`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import blox as bx
from blox.layers import DType, cast
from blox_scale.nn.config import AttentionConfig
from blox_scale.nn.projection import Projection
from blox_scale.nn.rope import apply_rope

Cache = dict[str, jax.Array]


def _normal(std: float) -> Any:
  return jax.nn.initializers.normal(stddev=std)


def attention_mask(query_slots: jax.Array, key_valid: jax.Array, sliding_window: int = 0) -> jax.Array:
  """Boolean mask `[batch, 1, T, S]` for attention over a KV cache.

  Args:
    query_slots: `int[T]`, the cache slot each query token is written to.
    key_valid: `bool[batch, S]`, which cache slots hold a real token of that
      row (False for left padding).
    sliding_window: if > 0, a query sees only the last `sliding_window` slots
      (itself included).
  True means "attend". Slots and positions differ by a per-row constant
  (the left pad), so causality and windows are checked on slots.
  """
  slots = jnp.arange(key_valid.shape[1], dtype=jnp.int32)
  q = query_slots.astype(jnp.int32)[:, None]                  # [T, 1]
  allowed = slots[None, :] <= q                               # [T, S] causal
  if sliding_window > 0:
    allowed = allowed & (slots[None, :] > q - sliding_window)
  return allowed[None, None, :, :] & key_valid[:, None, None, :]


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """Boolean mask `[batch, 1, T, T]` from `segment_ids: int[batch, T]`: a query sees only keys of its own segment.

  With the attention's own causal mask this is the block-causal mask of packed
  documents (`jax.nn.dot_product_attention` in jax 0.10 has no segment-id
  argument, so the mask is explicit).
  """
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, :, :]


class Attention(bx.Module):
  """Causal self-attention with RoPE, optional QK-norm and sliding window.

  Call forms:
    `y, params = attn(params, x, positions)`: training / full sequence,
      causal (and windowed) by construction; an optional `mask=`
      (`bool[batch, 1, T, T]`, e.g. `segment_mask`) further restricts it.
    `(y, new_kv), params = attn(params, x, positions, cache, mask=m, cache_index=i)`:
      decoding. `cache = {'k', 'v'}: [batch, S, kv_heads, head_dim]` holds the
      earlier tokens' keys/values; the T new ones are written at slots
      `[i, i + T)` for this call, `mask: bool[batch, 1, T, S]` (see
      `attention_mask`) says what each query may see, and only the new entries
      `new_kv = {'k', 'v'}: [batch, T, kv_heads, head_dim]` are returned: the
      caller writes them into its (layer-stacked) cache once, so a scan over
      layers never copies the whole cache into its outputs.
  `x: [batch, T, embed]`, `positions: int[batch, T]`; `y` has x's shape and
  the compute dtype.
  """

  def __init__(self, graph: bx.Graph, config: AttentionConfig, rng: bx.Rng | None = None) -> None:
    super().__init__(graph)
    c = config
    num_kv_heads = c.num_kv_heads or c.num_heads
    where = bx.path_to_str(graph.path)
    if c.num_heads < 1 or num_kv_heads < 1 or c.num_heads % num_kv_heads:
      raise ValueError(
          f'Attention {where}: num_heads={c.num_heads} must be a positive multiple of '
          f'num_kv_heads={num_kv_heads} (1 = multi-query, num_heads = multi-head).')
    if c.sliding_window < 0:
      raise ValueError(f'Attention {where}: sliding_window={c.sliding_window} must be >= 0 (0 = full causal).')
    # `jax.nn.dot_product_attention(implementation=...)` for the full-sequence
    # path: None is XLA's fused-by-compiler version (any platform); 'cudnn'
    # is the cuDNN flash-attention kernel on NVIDIA GPUs (bf16/fp16 only). The
    # cached decode path always uses XLA (its explicit mask is arbitrary).
    if c.implementation not in (None, 'xla', 'cudnn'):
      raise ValueError(f"Attention {where}: implementation={c.implementation!r} is not one of None, 'xla', 'cudnn'.")
    self.config = c
    self.num_heads = c.num_heads
    self.num_kv_heads = num_kv_heads
    self.rng = rng
    self.out_init_std = c.init_std if c.out_init_std is None else c.out_init_std

    def projection(name: str, in_ndim: int, axes: tuple[str, ...], std: float) -> Projection:
      return Projection(graph.child(name), rng, in_ndim=in_ndim, kernel_axes=axes, kernel_init=_normal(std),
                        use_bias=c.use_bias, param_dtype=c.param_dtype, dtype=c.dtype)

    self.q = projection('q', 1, ('embed', 'heads', 'head_dim'), c.init_std)
    self.k = projection('k', 1, ('embed', 'kv_heads', 'head_dim'), c.init_std)
    self.v = projection('v', 1, ('embed', 'kv_heads', 'head_dim'), c.init_std)
    self.o = projection('o', 2, ('heads', 'head_dim', 'embed'), self.out_init_std)
    self.q_norm = self.k_norm = None
    if c.qk_norm:
      # Per-head RMSNorm of q and k (Gemma 3, OLMo 2, Qwen 3): bounds the
      # attention logits, which otherwise grow with training and blow up bf16.
      norm = lambda name: bx.RMSNorm(graph.child(name), epsilon=c.norm_eps, param_dtype=c.param_dtype, dtype=c.dtype)
      self.q_norm, self.k_norm = norm('q_norm'), norm('k_norm')

  def __call__(
      self,
      params: bx.Params,
      x: jax.Array,
      positions: jax.Array,
      cache: Cache | None = None,
      *,
      mask: jax.Array | None = None,
      cache_index: jax.Array | int = 0,
  ) -> tuple[Any, bx.Params]:
    d_model = x.shape[-1]
    head_dim = self.config.head_dim or d_model // self.num_heads
    q, params = self.q(params, x, (self.num_heads, head_dim))     # [B, T, N, H]
    k, params = self.k(params, x, (self.num_kv_heads, head_dim))  # [B, T, K, H]
    v, params = self.v(params, x, (self.num_kv_heads, head_dim))  # [B, T, K, H]
    dtype = q.dtype  # the compute dtype: `dtype`, or the promotion of x and the kernels
    if self.q_norm is not None:
      q, params = self.q_norm(params, q)
      k, params = self.k_norm(params, k)
      q, k = cast(q, dtype), cast(k, dtype)
    if self.config.use_rope:
      q = apply_rope(q, positions, self.config.rope_theta)
      k = apply_rope(k, positions, self.config.rope_theta)
    q = checkpoint_name(q, 'qkv')
    k = checkpoint_name(k, 'qkv')
    v = checkpoint_name(v, 'qkv')

    if cache is None:
      window = (self.config.sliding_window - 1, 0) if self.config.sliding_window > 0 else None
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=window,
                                         implementation=self.config.implementation)
      new_kv = None
    else:
      if mask is None:
        raise ValueError(
            f"Attention {bx.path_to_str(self.graph.path)}: decoding with a cache needs mask= "
            '(bool[batch, 1, T, S], see blox_scale.nn.attention_mask).')
      # Write the new keys/values into this layer's copy of the cache and attend
      # over all S slots; the mask hides empty, padded and future slots.
      start = (0, cache_index, 0, 0)
      keys = jax.lax.dynamic_update_slice(cache['k'], cast(k, cache['k'].dtype), start)
      values = jax.lax.dynamic_update_slice(cache['v'], cast(v, cache['v'].dtype), start)
      out = jax.nn.dot_product_attention(q, cast(keys, dtype), cast(values, dtype), mask=mask)
      new_kv = {'k': cast(k, cache['k'].dtype), 'v': cast(v, cache['v'].dtype)}

    y, params = self.o(params, cast(out, dtype), (d_model,))      # [B, T, D]
    y = checkpoint_name(y, 'attn_out')
    if cache is None:
      return y, params
    return (y, new_kv), params
