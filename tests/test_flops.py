"""FLOP accounting against numbers computed by hand."""

import dataclasses

import jax
import pytest

from blox_scale import flops
from blox_scale.training.config import ModelConfig


def test_flops_per_token_gpt2_small_by_hand():
  # GPT-2 124M: L=12, d=768, 12 heads, MLP 3072 (GELU), vocab 50257.
  c = ModelConfig(vocab_size=50257, d_model=768, num_layers=12, num_heads=12, mlp_dim=3072,
                  mlp_activation='gelu')
  per_layer = 4 * 768 * 768 + 2 * 768 * 3072          # q,k,v,o + wi,wo
  n = 12 * per_layer + 768 * 50257                     # + head
  assert flops.matmul_params(c) == n == 84_934_656 + 38_597_376
  # seq 1024, causal: 6 * L * T * d
  attn = 6 * 12 * 1024 * 768
  assert flops.flops_per_token(c, 1024) == pytest.approx(6 * n + attn, rel=1e-12)


def test_gqa_swiglu_and_sliding_window_by_hand():
  c = ModelConfig(vocab_size=1000, d_model=64, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=16,
                  mlp_dim=256, mlp_activation='swiglu')
  attn_params = 64 * 16 * 8 * 2 + 64 * 16 * 2 * 2     # q,o: d x N*H ; k,v: d x K*H
  n = 3 * (attn_params + 3 * 64 * 256) + 64 * 1000
  assert flops.matmul_params(c) == n
  d_attn = 8 * 16
  assert flops.flops_per_token(c, 100) == pytest.approx(6 * n + 12 * 3 * 50 * d_attn)
  windowed = dataclasses.replace(c, sliding_window=20)
  # Keys per query: mean over t of min(t+1, 20) ~ 20 - 20**2 / 200 = 18.
  assert flops.attention_flops_per_token(windowed, 100) == pytest.approx(12 * 3 * 18 * d_attn)
  # A window longer than the sequence is plain causal attention.
  assert flops.attention_flops_per_token(dataclasses.replace(c, sliding_window=500), 100) == \
      flops.attention_flops_per_token(c, 100)
  with pytest.raises(ValueError, match='seq_len'):
    flops.flops_per_token(c, 0)


def test_peak_table_and_mfu():
  assert flops.peak_from_table('NVIDIA H100 80GB HBM3') == 989e12
  assert flops.peak_from_table('NVIDIA H100 PCIe') == 756e12
  assert flops.peak_from_table('NVIDIA A100-SXM4-80GB') == 312e12
  assert flops.peak_from_table('TPU v4') == 275e12
  assert flops.peak_from_table('TPU v5 lite') == 197e12
  assert flops.peak_from_table('TPU v5') == 459e12
  assert flops.peak_from_table('TPU v6 lite') == 918e12
  assert flops.peak_from_table('Some CPU') is None
  # 1000 tok/s x 6e9 FLOP/token on 4 devices of 3e12 -> 0.5
  assert flops.mfu(1000.0, 6e9, 4, peak=3e12) == pytest.approx(0.5)
  assert flops.achieved_flops(1000.0, 6e9) == 6e12


def test_cpu_peak_is_measured_once_and_split_across_fake_devices():
  device = jax.devices('cpu')[0]
  first = flops.device_peak_flops(device)
  assert first > 1e6  # any real CPU does more than a MFLOP/s
  assert flops.device_peak_flops(device) == first  # cached, not re-measured
  assert first == pytest.approx(flops.measured_matmul_peak('cpu') / len(jax.local_devices(backend='cpu')))


def test_moe_counts_active_params_mixtral_8x7b():
  # Mixtral's paper: 46.7B params, 12.9B active per token (both with the input embedding).
  from blox_scale.nn.config import MoEConfig
  c = ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_dim=14336,
                  tie_embeddings=False, moe=MoEConfig(num_experts=8, top_k=2))
  embed = 4096 * 32000
  assert flops.matmul_params(c) + embed == pytest.approx(12.9e9, rel=5e-3)
  assert flops.total_params(c) + embed == pytest.approx(46.7e9, rel=5e-3)
  # Every other layer MoE: half the layers dense, half router + 2 of 8 experts.
  half = dataclasses.replace(c, moe=MoEConfig(num_experts=8, top_k=2, every_n_layers=2))
  dense = dataclasses.replace(c, moe=MoEConfig())
  assert flops.matmul_params(half) - flops.matmul_params(dense) == 16 * (4096 * 8 + 3 * 4096 * 14336)
