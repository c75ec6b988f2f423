"""jax-blox 0.1.6's `blox.visualize` module path: `display`, re-exported.

The object is the same as `blox.display`, defined in `blox.display` (which
also holds blox's plain-text `summary`).
"""

from blox.display import display

__all__ = ['display']
