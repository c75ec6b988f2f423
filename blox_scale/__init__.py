"""blox_scale: everything about scale on top of blox (import as `bs`)."""

from blox_scale import layout, remat
from blox_scale.group import Group
from blox_scale.layout import restack, unstack
from blox_scale.optim import decay_mask, lr_schedule, make_optimizer
from blox_scale.remat import POLICIES as REMAT_POLICIES
from blox_scale.stack import Stack
from blox_scale.tokenizer import ByteTokenizer
from blox_scale import flops, nn
from blox_scale.models import DecoderLM
from blox_scale.nn import MLP, Attention, TransformerBlock
from blox_scale.sample import generate

__all__ = ['Stack', 'Group', 'unstack', 'restack', 'REMAT_POLICIES', 'layout', 'remat',
           'make_optimizer', 'lr_schedule', 'decay_mask', 'ByteTokenizer',
           'DecoderLM', 'Attention', 'MLP', 'TransformerBlock', 'generate', 'flops', 'nn']
