"""What every peer variant shares: the model's shape, its init numbers, the batch, the loss.

The model is a GPT-2-style decoder: token + learned position embeddings,
`num_layers` pre-norm blocks (LayerNorm -> multi-head causal attention with
biases -> residual; LayerNorm -> GELU(tanh) MLP with biases -> residual), a
final LayerNorm and logits tied to the token embedding. Every framework
starts from the SAME numbers (`init_numbers`, NumPy, in one canonical
stacked layout), so losses and gradients can be compared leaf by leaf.

Canonical layout (flat `{name: float32 array}`):
  embed [V, D], pos [S, D], final_scale [D], final_bias [D]
  block/ln1_scale, block/ln1_bias, block/ln2_scale, block/ln2_bias  [L, D]
  block/q, block/k, block/v [L, D, H, Dh]; block/q_bias, .../k_bias, .../v_bias [L, H, Dh]
  block/o [L, H, Dh, D]; block/o_bias [L, D]
  block/wi [L, D, M]; block/wi_bias [L, M]; block/wo [L, M, D]; block/wo_bias [L, D]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

REMATS = ('none', 'full', 'dots')
# The JAX policy each remat name means, in every framework (None: no checkpoint).
POLICY = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_saveable,
}


@dataclasses.dataclass(frozen=True)
class Shape:
  num_layers: int
  d_model: int = 256
  num_heads: int = 4
  mlp_dim: int = 1024
  seq_len: int = 128
  batch: int = 8
  vocab: int = 1024

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def tiny(num_layers: int) -> Shape:
  """A model small enough that a train step's time is dispatch, not FLOPs."""
  return Shape(num_layers, d_model=32, num_heads=2, mlp_dim=64, seq_len=8, batch=2, vocab=64)


def init_numbers(s: Shape, seed: int = 0) -> dict[str, np.ndarray]:
  """The one set of initial values every variant copies (float32, canonical layout)."""
  r = np.random.default_rng(seed)
  L, D, H, Dh, M = s.num_layers, s.d_model, s.num_heads, s.head_dim, s.mlp_dim
  normal = lambda *shape, std=0.02: (std * r.standard_normal(shape)).astype(np.float32)
  around = lambda *shape, mean: (mean + 0.1 * r.standard_normal(shape)).astype(np.float32)
  out_std = 0.02 / np.sqrt(2 * L)
  return {
      'embed': normal(s.vocab, D), 'pos': normal(s.seq_len, D),
      'final_scale': around(D, mean=1.0), 'final_bias': around(D, mean=0.0),
      'block/ln1_scale': around(L, D, mean=1.0), 'block/ln1_bias': around(L, D, mean=0.0),
      'block/q': normal(L, D, H, Dh), 'block/k': normal(L, D, H, Dh), 'block/v': normal(L, D, H, Dh),
      'block/q_bias': normal(L, H, Dh), 'block/k_bias': normal(L, H, Dh), 'block/v_bias': normal(L, H, Dh),
      'block/o': normal(L, H, Dh, D, std=out_std), 'block/o_bias': normal(L, D),
      'block/ln2_scale': around(L, D, mean=1.0), 'block/ln2_bias': around(L, D, mean=0.0),
      'block/wi': normal(L, D, M), 'block/wi_bias': normal(L, M),
      'block/wo': normal(L, M, D, std=out_std), 'block/wo_bias': normal(L, D),
  }


def make_batch(s: Shape, seed: int = 1) -> dict[str, jax.Array]:
  """`{'inputs', 'targets'}: int32[batch, seq]`, fixed random tokens."""
  r = np.random.default_rng(seed)
  tokens = r.integers(0, s.vocab, (s.batch, s.seq_len + 1), dtype=np.int32)
  return {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:])}


def optimizer() -> optax.GradientTransformation:
  """AdamW, the same for every framework (weight decay on every param, as optax's default)."""
  return optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy; `logits: f32[..., V]`, `targets: int[...]`."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Two-pass LayerNorm over the last axis (what raw JAX and Equinox variants write)."""
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


# The correctness gate every variant passes before anything is timed.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4  # per leaf, relative to the leaf's largest |gradient| (and 1e-5 of the largest overall)


class Mismatch(AssertionError):
  pass


def check_grads(name: str, ref: tuple, got: tuple, where: str) -> float:
  """Largest gradient difference relative to scale; raises Mismatch beyond tolerance."""
  (ref_loss, ref_g), (loss, g) = ref, got
  if abs(float(loss) - float(ref_loss)) > LOSS_RTOL * abs(float(ref_loss)):
    raise Mismatch(f'{name} {where}: loss {float(loss)!r} != raw JAX {float(ref_loss)!r}')
  overall = max(float(np.max(np.abs(np.asarray(v)))) for v in ref_g.values())
  worst = 0.0
  for key, r in ref_g.items():
    r, x = np.asarray(r), np.asarray(g[key])
    if r.shape != x.shape:
      raise Mismatch(f'{name} {where}: gradient {key} has shape {x.shape}, raw JAX {r.shape}')
    tol = GRAD_RTOL * float(np.max(np.abs(r))) + 1e-5 * overall
    diff = float(np.max(np.abs(r - x)))
    if diff > tol:
      raise Mismatch(f'{name} {where}: gradient {key} differs from raw JAX by {diff:.3g} (tolerance {tol:.3g})')
    worst = max(worst, diff / (tol or 1.0))
  return worst
