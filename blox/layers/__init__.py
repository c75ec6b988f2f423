"""The layers of blox: each a Module with `outputs, params = layer(params, *inputs)`.

Also the mixed-precision helpers layers built elsewhere (blox_scale's) share:
`DType`, `compute_dtype(dtype, *arrays)` and `cast(x, dtype)`.
"""

from blox.layers._common import DType, cast, compute_dtype
from blox.layers.conv import Conv, ConvTranspose
from blox.layers.dropout import Dropout
from blox.layers.linear import Embed, Linear
from blox.layers.norm import BatchNorm, LayerNorm, RMSNorm
from blox.layers.pool import avg_pool, max_pool, min_pool
from blox.layers.recurrent import GRU, LSTM, GRUState, LSTMState
from blox.layers.sequential import Sequential

__all__ = [
    'Linear', 'Embed', 'LayerNorm', 'RMSNorm', 'BatchNorm', 'Dropout', 'Conv', 'ConvTranspose',
    'max_pool', 'min_pool', 'avg_pool', 'Sequential', 'LSTM', 'LSTMState', 'GRU', 'GRUState',
    'DType', 'cast', 'compute_dtype',
]
