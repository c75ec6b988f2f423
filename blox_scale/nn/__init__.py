"""Transformer building blocks: attention, MLPs, mixture-of-experts, RoPE and the pre-norm block."""

from blox_scale.nn.attention import Attention, attention_mask, segment_mask
from blox_scale.nn.block import TransformerBlock, make_norm
from blox_scale.nn.config import AttentionConfig, BlockConfig, MLPConfig, MoEConfig
from blox_scale.nn.mlp import MLP
from blox_scale.nn.moe import MoE
from blox_scale.nn.projection import Projection
from blox_scale.nn.rope import apply_rope, rope_frequencies

__all__ = ['Attention', 'attention_mask', 'segment_mask', 'MLP', 'Projection', 'TransformerBlock', 'make_norm', 'apply_rope',
           'rope_frequencies', 'AttentionConfig', 'MLPConfig', 'BlockConfig', 'MoE', 'MoEConfig']
