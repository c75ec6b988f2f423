"""jax-blox 0.1.6's `blox.interfaces` module path: the core types, re-exported.

Code written against jax-blox imports from here (`from blox.interfaces import
Graph, Params`); the objects are the same as `blox.Graph`, `blox.Params`, ...,
defined in `blox.graph`, `blox.params`, `blox.module`, `blox.rng` and
`blox.sequence`.
"""

import jax as _jax

from blox.graph import Graph, Path
from blox.module import Module
from blox.params import Param, Params
from blox.rng import Rng
from blox.sequence import (
    InputsT, OutputsT, RecurrenceBase, ResetT, SequenceBase, StateT, StepFn, dynamic_scan, static_scan,
)

Shape = tuple[int, ...]
Initializer = _jax.nn.initializers.Initializer

__all__ = [
    'Graph', 'Param', 'Params', 'Module', 'Rng', 'SequenceBase', 'RecurrenceBase', 'static_scan',
    'dynamic_scan', 'Shape', 'Path', 'Initializer', 'StepFn', 'InputsT', 'StateT', 'OutputsT', 'ResetT',
]
