"""`ModelConfig`: the model's hyperparameters (the `model:` section of a run's config).

Model code reads it; training code re-exports it (`blox_scale.training.config`).
Fields that a block family also has take their default and doc from that
family's config (`inherit`, nn/config.py), and `block_config()` derives the
`BlockConfig` the Stack repeats: defaults live in one place.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from blox_scale.nn.config import AttentionConfig, BlockConfig, MLPConfig, MoEConfig, field, inherit

# The block `model.moe` resolves to when `model.block` is empty (the plug-in path a user's block takes).
MOE_BLOCK = 'blox_scale.nn.moe_block:moe_block'


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model: a decoder-only transformer LM (DecoderLM), or the one model.factory builds."""
  vocab_size: int = field(256, 'Vocabulary size (256 = the byte-level tokenizer).')
  d_model: int = inherit(BlockConfig, 'd_model')
  num_layers: int = field(4, 'Number of transformer blocks (one Stack).')
  num_heads: int = inherit(AttentionConfig, 'num_heads')
  num_kv_heads: int = inherit(AttentionConfig, 'num_kv_heads')
  head_dim: int = inherit(AttentionConfig, 'head_dim')
  mlp_dim: int = inherit(MLPConfig, 'mlp_dim')
  mlp_activation: str = inherit(MLPConfig, 'activation')
  norm: str = inherit(BlockConfig, 'norm')
  norm_eps: float = inherit(BlockConfig, 'norm_eps')
  qk_norm: bool = inherit(AttentionConfig, 'qk_norm')
  position: str = field('rope', "Positions: 'rope' (rotary) or 'learned' (GPT-2 style absolute embeddings).")
  rope_theta: float = inherit(AttentionConfig, 'rope_theta')
  max_seq_len: int = field(256, 'Longest sequence the model (and its KV cache) supports.')
  sliding_window: int = inherit(AttentionConfig, 'sliding_window')
  tie_embeddings: bool = field(True, 'Use the token embedding matrix as the output head.')
  use_bias: bool = inherit(AttentionConfig, 'use_bias')
  dropout_rate: float = inherit(BlockConfig, 'dropout_rate')
  param_dtype: str = field('float32', 'Storage dtype of the params (the master copy).')
  dtype: str = field('float32', "Compute dtype of activations ('bfloat16' for mixed precision).")
  remat: str = field('full', "Per-layer checkpoint policy: none, full, dots, dots_no_batch, save_names, offload_names, JAX's own names (nothing_saveable, dots_with_no_batch_dims_saveable, ...), or auto (the least recomputation whose compiled step fits model.remat_budget_gib).")
  remat_names: tuple[str, ...] = field((), "Activation names for remat='save_names'/'offload_names' (e.g. [attn_out, mlp_out]).")
  remat_nested: bool = field(False, 'Nested sqrt(L) scan: groups of layers, each group under full remat (one saved carry per group).')
  remat_budget_gib: float = field(0.0, "Per-device memory budget of remat=auto in GiB (0 = the device's memory).")
  scan_layers: bool = field(True, 'Run the Stack with lax.scan (False: a Python loop over the same params).')
  z_loss: float = field(0.0, 'Weight of the z-loss (log-softmax normaliser squared); 0 disables.')
  init_std: float = inherit(AttentionConfig, 'init_std')
  block: str = field('', "The layer the Stack repeats: '' (TransformerBlock) or 'pkg.module:factory', a function (graph, model_config, rng) -> Module (docs/custom_blocks.md).")
  # Not hashed: a dict is unhashable, and the block's own options never key a jit cache.
  block_args: dict = dataclasses.field(default_factory=dict, hash=False, metadata={
      'doc': 'Free-form options of a model.block factory, validated by the factory (read as model_config.block_args).'})
  factory: str = field('', "The whole model: '' (DecoderLM, repeating model.block) or 'pkg.module:fn', a function (graph, model_config, rng) -> model with config, init(seed) and loss(params, batch, is_training) (models/protocol.py, docs/custom_blocks.md); excludes model.block.")
  factory_args: dict = dataclasses.field(default_factory=dict, hash=False, metadata={
      'doc': 'Free-form options of a model.factory function, validated by it (read as model_config.factory_args).'})
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig, metadata={
      'doc': f'Mixture of experts (docs/moe.md): num_experts > 0 with model.block empty builds {MOE_BLOCK}.'})

  @property
  def block_factory(self) -> str:
    """The `pkg.module:factory` the Stack repeats: `model.block`, else the MoE block when `model.moe` is on, else '' (TransformerBlock)."""
    if self.block:
      return self.block
    return MOE_BLOCK if self.moe.num_experts > 0 else ''

  def block_config(self, attention_impl: str | None = None) -> BlockConfig:
    """The `BlockConfig` of every layer: same-named fields copied, the rest derived here.

    Residual-branch output projections (attention `o`, MLP `wo`) start with
    std `init_std / sqrt(2 * num_layers)` (GPT-2), so the residual stream's
    variance at init does not grow with depth.
    """
    return BlockConfig.create(
        self, activation=self.mlp_activation, use_rope=self.position == 'rope',
        out_init_std=self.init_std / math.sqrt(2 * self.num_layers), implementation=attention_impl,
        param_dtype=jnp.dtype(self.param_dtype), dtype=jnp.dtype(self.dtype))
