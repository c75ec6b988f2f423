"""Rotary position embeddings (RoPE, Su et al. 2021, arXiv:2104.09864).

Each head vector is split into two halves `(x1, x2)` that form `head_dim / 2`
planes; plane `i` is rotated by the angle `position * theta**(-2i / head_dim)`.
This is the "rotate half" layout of GPT-NeoX and Llama (Hugging Face
checkpoints), not the interleaved pairs of the original paper: both are the
same rotation up to a fixed permutation of the head dims.

Rotating queries and keys by their own positions makes `q . k` depend only on
the position difference, which is what lets a KV cache store rotated keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """`f32[head_dim // 2]`: the angular frequency of each rotation plane."""
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head_dim, got {head_dim}. Use an even model.head_dim.')
  exponents = jnp.arange(0, head_dim // 2, dtype=jnp.float32) * (2.0 / head_dim)
  return 1.0 / (theta ** exponents)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates `x` by its positions.

  Args:
    x: `[batch, seq, heads, head_dim]` queries or keys (any float dtype).
    positions: `int[batch, seq]`, the absolute position of every token (rows
      may differ: left-padded prompts start at position 0 after their pad).
    theta: the base frequency (10_000 in Llama 2, 500_000 in Llama 3).
  Returns:
    `x`'s shape and dtype. Angles and the rotation are computed in float32
    (bf16 angles are off by whole radians at positions in the thousands).
  """
  head_dim = x.shape[-1]
  freqs = rope_frequencies(head_dim, theta)                                   # [H/2]
  angles = positions.astype(jnp.float32)[:, :, None] * freqs[None, None, :]   # [B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]                                        # [B, T, 1, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : head_dim // 2], xf[..., head_dim // 2:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
