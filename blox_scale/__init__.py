"""blox_scale: everything about scale on top of blox (import as `bs`).

Folders by concern (docs/architecture.md): `stacking/` (Stack, Group, remat,
layouts), `nn/` and `models/` (blocks, DecoderLM, generation), `parallel/`
(sharding, jax.distributed), `training/` (config, data, optimizer, step,
checkpoints, metrics) and `cli/` (the command-line tools).
"""

from blox_scale import _startup  # noqa: F401  (first: a command handles signals during its imports)
from blox_scale import finetune, flops, nn
from blox_scale.interop import hf
from blox_scale.models import DecoderLM, ModelConfig
from blox_scale.models.generate import generate
from blox_scale.nn import MLP, Attention, AttentionConfig, BlockConfig, MLPConfig, MoE, MoEConfig, TransformerBlock
from blox_scale.parallel import distributed, sharding
from blox_scale.parallel.sharding import (
    batch_sharding, constrain, make_mesh, param_shardings, rules_from_config, use_mesh_rules,
)
from blox_scale.stacking import layout, remat
from blox_scale.stacking.group import Group
from blox_scale.stacking.layout import restack, unstack
from blox_scale.stacking.remat import POLICIES as REMAT_POLICIES
from blox_scale.stacking.stack import Stack
from blox_scale.training.optim import decay_mask, lr_schedule, make_optimizer
from blox_scale.training.step import (
    TrainState, abstract_batch, abstract_train_state, init_train_state, make_eval_step, make_train_step,
    train_state_shardings,
)
from blox_scale.training.tokenizer import ByteTokenizer, get_tokenizer

__all__ = ['Stack', 'Group', 'unstack', 'restack', 'REMAT_POLICIES', 'layout', 'remat',
           'make_optimizer', 'lr_schedule', 'decay_mask', 'ByteTokenizer', 'get_tokenizer',
           'DecoderLM', 'Attention', 'MLP', 'TransformerBlock', 'generate', 'flops', 'nn', 'hf', 'finetune',
           'ModelConfig', 'AttentionConfig', 'MLPConfig', 'BlockConfig', 'MoE', 'MoEConfig']
__all__ += ['distributed', 'sharding', 'make_mesh', 'rules_from_config', 'param_shardings', 'batch_sharding',
            'constrain', 'use_mesh_rules', 'TrainState', 'init_train_state', 'make_train_step', 'make_eval_step',
            'abstract_train_state', 'train_state_shardings', 'abstract_batch']
