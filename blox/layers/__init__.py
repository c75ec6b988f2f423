"""The layers of blox: each a Module with `outputs, params = layer(params, *inputs)`."""

from blox.layers.dropout import Dropout
from blox.layers.linear import Embed, Linear
from blox.layers.norm import BatchNorm, LayerNorm, RMSNorm

__all__ = ['Linear', 'Embed', 'LayerNorm', 'RMSNorm', 'BatchNorm', 'Dropout']
