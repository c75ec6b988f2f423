"""Transformer MLPs: GELU (GPT-2) and SwiGLU (Llama, PaLM).

Params (logical axes):
  gelu:   wi [embed, mlp] ('embed', 'mlp'), wo [mlp, embed] ('mlp', 'embed')
  swiglu: wi_gate, wi_up [embed, mlp] ('embed', 'mlp'), wo [mlp, embed]
  with `use_bias`: wi*_bias [mlp] ('mlp',), wo_bias [embed] ('embed',).
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

import blox as bx
from blox_scale.nn.config import MLPConfig

# Hidden activation by name; a name in GATED multiplies it with a second projection (GLU).
ACTIVATIONS = {'gelu': lambda h: jax.nn.gelu(h, approximate=True), 'swiglu': jax.nn.silu}
GATED = frozenset({'swiglu'})


class MLP(bx.Module):
  """`x: [..., embed]` -> `[..., d_model]` (`config.d_model`, usually the input width).

  gelu:   `wo(gelu(wi x))` (tanh approximation, as GPT-2).
  swiglu: `wo(silu(wi_gate x) * wi_up x)` (Shazeer 2020, "GLU Variants").
  The hidden activation is tagged 'mlp_hidden' and the output 'mlp_out' for
  `remat='save_names'`.
  """

  def __init__(self, graph: bx.Graph, config: MLPConfig, rng: bx.Rng | None = None) -> None:
    super().__init__(graph)
    c = config
    if c.activation not in ACTIVATIONS:
      raise ValueError(f"MLP {bx.path_to_str(graph.path)}: activation={c.activation!r} is not one of {sorted(ACTIVATIONS)}.")
    self.config = c
    out_std = c.init_std if c.out_init_std is None else c.out_init_std

    def linear(name: str, size: int, axes: tuple[str, str], std: float) -> bx.Linear:
      return bx.Linear(
          graph.child(name), size, rng, use_bias=c.use_bias,
          kernel_init=jax.nn.initializers.normal(stddev=std),
          kernel_metadata={'sharding': axes}, bias_metadata={'sharding': axes[1:]},
          param_dtype=c.param_dtype, dtype=c.dtype)

    if c.activation in GATED:
      self.wi_gate = linear('wi_gate', c.mlp_dim, ('embed', 'mlp'), c.init_std)
      self.wi_up = linear('wi_up', c.mlp_dim, ('embed', 'mlp'), c.init_std)
    else:
      self.wi = linear('wi', c.mlp_dim, ('embed', 'mlp'), c.init_std)
    self.wo = linear('wo', c.d_model, ('mlp', 'embed'), out_std)

  def __call__(self, params: bx.Params, x: jax.Array) -> tuple[jax.Array, bx.Params]:
    act = ACTIVATIONS[self.config.activation]
    if self.config.activation in GATED:
      gate, params = self.wi_gate(params, x)
      up, params = self.wi_up(params, x)
      h = act(gate) * up
    else:
      h, params = self.wi(params, x)
      h = act(h)
    h = checkpoint_name(h, 'mlp_hidden')
    y, params = self.wo(params, h)
    return checkpoint_name(y, 'mlp_out'), params
