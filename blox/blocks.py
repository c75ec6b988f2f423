"""jax-blox 0.1.6's `blox.blocks` module path: the layers and pooling functions, re-exported.

The objects are the same as `blox.Linear`, `blox.max_pool`, ..., defined in
`blox.layers`.
"""

from blox.layers import (
    GRU, LSTM, BatchNorm, Conv, ConvTranspose, Dropout, Embed, GRUState, LayerNorm, Linear, LSTMState,
    RMSNorm, Sequential, avg_pool, max_pool, min_pool,
)
from blox.layers.conv import Initializer, PaddingLike

__all__ = [
    'Embed', 'Linear', 'Sequential', 'LSTMState', 'LSTM', 'GRUState', 'GRU', 'Dropout', 'LayerNorm',
    'RMSNorm', 'BatchNorm', 'Conv', 'ConvTranspose', 'max_pool', 'min_pool', 'avg_pool',
    'Initializer', 'PaddingLike',
]
