"""blox: explicit-state neural networks for JAX.

`outputs, params = module(params, *inputs)`: a static `Graph` names things,
a `Params` pytree holds every array (RNG state included), and raw `jax.jit`,
`jax.grad`, `jax.vmap`, `jax.checkpoint` and `jax.lax.scan` apply directly.
A drop-in for the public API of jax-blox 0.1.6.
"""

from blox.errors import ParamMismatchError, ParamNotFoundError, ParamsLockedError, RngNotSeededError
from blox.graph import Graph, Path
from blox.module import Module
from blox.params import Metadata, Param, Params, key_path_to_str, path_to_str, record_created, str_to_path
from blox.rng import Rng
from blox.layers import (
    GRU, LSTM, BatchNorm, Conv, ConvTranspose, Dropout, Embed, GRUState, LayerNorm, Linear, LSTMState,
    RMSNorm, Sequential, avg_pool, max_pool, min_pool,
)
from blox.display import display, print_summary, summary
from blox.sequence import RecurrenceBase, SequenceBase, dynamic_scan, static_scan

__version__ = '0.2.0'

__all__ = [
    'Graph', 'Module', 'Param', 'Params', 'Rng', 'Metadata', 'Path',
    'path_to_str', 'str_to_path', 'key_path_to_str', 'record_created',
    'ParamMismatchError', 'ParamNotFoundError', 'ParamsLockedError', 'RngNotSeededError',
    'Linear', 'Embed', 'LayerNorm', 'RMSNorm', 'BatchNorm', 'Dropout', 'Conv', 'ConvTranspose',
    'max_pool', 'min_pool', 'avg_pool', 'Sequential', 'LSTM', 'LSTMState', 'GRU', 'GRUState',
    'SequenceBase', 'RecurrenceBase', 'static_scan', 'dynamic_scan',
    'display', 'summary', 'print_summary',
]
