"""Model FLOPs per token, device peaks and MFU.

Conventions (Kaplan et al. 2020, PaLM appendix B, as MaxText and nanoGPT):
  * Training costs 6 FLOPs per matmul parameter per token (2 forward, 4
    backward). N counts the params of every matmul: attention q/k/v/o, the
    MLP, and the output head (even when tied: the head matmul is computed
    whether or not its weights are shared). Embedding lookups, norms and
    biases are not matmuls and are left out.
  * Attention scores and the weighted sum of values add 2 matmuls of
    `T x T x (heads * head_dim)` per layer and sequence: 4·T·d_attn FLOPs
    forward per token per layer, x3 for training = 12·L·T·d_attn. A causal
    mask halves the useful work (only keys up to the query count), so causal
    attention is 6·L·T·d_attn. With a sliding window w the average number of
    keys per query is `w - w**2 / (2T)` instead of `T / 2`.
  * Remat recomputation is NOT counted: MFU measures useful model FLOPs, so a
    policy that recomputes more shows a lower MFU, as it should.
MFU = tokens/s x FLOPs/token / (devices x peak FLOP/s of one device).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from blox_scale.models.config import ModelConfig

# Dense bf16 peak FLOP/s of one JAX device (no 2:4 sparsity), from the
# vendors' data sheets, keyed by a lower-case substring of `device.device_kind`.
# Longest key wins ('tpu v5 lite' before 'tpu v5'). TPU v2/v3 expose each
# TensorCore as a device, hence half the chip figure; v4 and later chips
# (megacore) are one device.
PEAK_FLOPS: dict[str, float] = {
    # NVIDIA
    'b200': 2.25e15,
    'h200': 989e12,
    'h100 pcie': 756e12,
    'h100': 989e12,        # SXM
    'h800': 989e12,
    'gh200': 989e12,
    'a100': 312e12,
    'a800': 312e12,
    'l40s': 362e12,
    'l4': 121e12,
    'a10g': 70e12,
    'a10': 125e12,
    'v100': 125e12,        # fp16 tensor cores (no bf16)
    'rtx 4090': 165e12,
    'rtx 3090': 71e12,
    # Google TPU
    'tpu v2': 22.5e12,     # per TensorCore
    'tpu v3': 61.5e12,     # per TensorCore
    'tpu v4 lite': 137.5e12,
    'tpu v4': 275e12,
    'tpu v5 lite': 197e12,  # v5e
    'tpu v5e': 197e12,
    'tpu v5p': 459e12,
    'tpu v5': 459e12,       # v5p reports 'TPU v5'
    'tpu v6 lite': 918e12,  # v6e (Trillium)
    'tpu v6e': 918e12,
    'tpu7x': 2.307e15,      # Ironwood
}


def matmul_params(config: ModelConfig) -> int:
  """N: parameters that take part in a matmul per token (see module doc).

  Mixture of experts (`model.moe.num_experts > 0`): an MoE layer counts the
  params a token is actually multiplied with, its router and `top_k` of the
  experts (active params), not all `num_experts`.
  """
  c = config
  heads, kv_heads = c.num_heads, c.num_kv_heads or c.num_heads
  head_dim = c.head_dim or c.d_model // c.num_heads
  attn = c.d_model * head_dim * (2 * heads + 2 * kv_heads)        # q, o and k, v
  per_hidden = (3 if c.mlp_activation == 'swiglu' else 2) * c.d_model
  mlp = per_hidden * c.mlp_dim
  total = c.num_layers * (attn + mlp) + c.d_model * c.vocab_size  # + output head
  m = c.moe
  if m.num_experts > 0:  # every every_n_layers-th layer: router + top_k experts instead of the dense MLP
    moe_layers = c.num_layers // m.every_n_layers
    active = c.d_model * m.num_experts + m.top_k * per_hidden * (m.mlp_dim or c.mlp_dim)
    total += moe_layers * (active - mlp)
  return total


def total_params(config: ModelConfig) -> int:
  """Matmul params held (every expert counted), against `matmul_params`' active ones."""
  c, m = config, config.moe
  if m.num_experts == 0:
    return matmul_params(c)
  per_expert = (3 if c.mlp_activation == 'swiglu' else 2) * c.d_model * (m.mlp_dim or c.mlp_dim)
  return matmul_params(c) + (c.num_layers // m.every_n_layers) * (m.num_experts - m.top_k) * per_expert


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token of the score and value matmuls (causal, windowed)."""
  c = config
  d_attn = c.num_heads * (c.head_dim or c.d_model // c.num_heads)
  w = c.sliding_window
  keys = seq_len / 2 if w <= 0 or w >= seq_len else w - w * w / (2 * seq_len)   # mean keys per query
  # forward 2 matmuls x 2 FLOPs x keys x d_attn, training = 3 x forward
  return 12.0 * c.num_layers * keys * d_attn


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6N plus attention (causal halved)."""
  if seq_len < 1:
    raise ValueError(f'flops_per_token: seq_len must be >= 1, got {seq_len} (data.seq_len).')
  return 6.0 * matmul_params(config) + attention_flops_per_token(config, seq_len)


def peak_from_table(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s for a `device_kind` string, or None when unknown."""
  kind = device_kind.lower()
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):
    if key in kind:
      return PEAK_FLOPS[key]
  return None


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(platform: str = 'cpu', size: int = 512, repeats: int = 5) -> float:
  """FLOP/s of a jitted float32 `size x size` matmul on the default device (best of `repeats`).

  Used where no data-sheet peak exists (CPUs): measured once per process,
  then cached. On a CPU shared with other work this is what the machine
  offers right now, so MFU stays meaningful relative to it.
  """
  del platform  # part of the cache key only
  a = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda a: (a @ a) @ a)   # two matmuls per call: less dispatch overhead per FLOP
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * 2.0 * size ** 3 / best


def device_peak_flops(device: Any | None = None) -> float:
  """Peak FLOP/s of one device: the table for GPUs/TPUs, a measured matmul peak otherwise."""
  device = jax.devices()[0] if device is None else device
  peak = peak_from_table(getattr(device, 'device_kind', ''))
  if peak is not None:
    return peak
  measured = measured_matmul_peak(device.platform)
  if device.platform == 'cpu':
    # Fake CPU devices (--xla_force_host_platform_device_count) share the same
    # cores, and one matmul already uses all of them: split the machine's peak.
    return measured / max(1, len(jax.local_devices(backend='cpu')))
  return measured


def achieved_flops(tokens_per_sec: float, flops_per_token: float) -> float:
  """Model FLOP/s actually delivered."""
  return tokens_per_sec * flops_per_token


def mfu(tokens_per_sec: float, flops_per_token: float, n_devices: int, peak: float | None = None) -> float:
  """Model FLOPs utilisation in [0, 1]: achieved FLOP/s / (n_devices x peak of one device)."""
  if n_devices < 1:
    raise ValueError(f'mfu: n_devices must be >= 1, got {n_devices}.')
  peak = device_peak_flops() if peak is None else peak
  return achieved_flops(tokens_per_sec, flops_per_token) / (n_devices * peak)
