"""The layer-test harness shared by test_layers.py and test_conv.py.

`check_layer` initialises a layer, differentiates its trainable params (and
inputs) through `layer(params, x)` with a random cotangent, and compares
outputs and gradients with a hand-written reference. bf16 runs build the
layer with `dtype=bfloat16` over float32 params: activations must come out
bf16, gradients f32, and values match the reference evaluated on
bf16-rounded inputs and params.
"""

import functools

import jax
import jax.numpy as jnp

import blox as bx
from helpers import bf16_close, tree_allclose

BF16 = jnp.bfloat16
F32_TOLS = dict(rtol=1e-5, atol=1e-5)
DTYPES = [None, BF16]


def round_to(tree, dtype):
  """bf16 runs: the reference sees the values rounded as the layer sees them."""
  if dtype is None:
    return tree
  return jax.tree.map(lambda a: a.astype(dtype).astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def check_layer(make, x, ref, *, dtype=None, call=None, diff_x=True, seed=0):
  """Builds `make(graph, rng, dtype)`, runs it on `x`, compares with `ref(w, x)`.

  `w` maps param names below the layer (e.g. 'kernel', 'gates/bias') to values.
  Returns the initialised params.
  """
  call = call or (lambda layer, params, x: layer(params, x))
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  layer = make(g.child('layer'), rng, dtype)
  params = jax.jit(lambda p, x: call(layer, p, x)[1].locked())(rng.seed(bx.Params(), seed=seed), x)
  trainable, rest = params.split()

  def names(tree):
    return {'/'.join(k[2:]): v.value for k, v in tree.items()}

  def forward(t, x):
    y, _ = call(layer, t.merge(rest), x)
    return y

  w = names(trainable)
  round_ref = lambda w, x: ref(round_to(w, dtype), round_to(x, dtype))  # noqa: E731
  y_shape = jax.eval_shape(forward, trainable, x)
  cot = jax.random.normal(jax.random.key(seed + 1), y_shape.shape, jnp.float32)

  # One jitted program per side: outputs and the VJP of a random cotangent
  # (w.r.t. params, and inputs unless they are integer ids).
  @functools.partial(jax.jit, static_argnums=0)
  def run(fn, p, x):
    if diff_x:
      y, vjp = jax.vjp(fn, p, x)
    else:
      y, vjp = jax.vjp(lambda p: fn(p, x), p)
    return y, vjp(cot.astype(y.dtype))

  y, grads = run(forward, trainable, x)
  y_ref, ref_grads = run(round_ref, w, x)
  if dtype is not None:
    assert y.dtype == dtype, f'activations should be {dtype}, got {y.dtype}'
  else:
    assert y.dtype == y_ref.dtype
  close = tree_allclose if dtype is None else bf16_close
  close(y, y_ref)
  for v in jax.tree.leaves(grads):
    assert v.dtype == jnp.float32, f'gradients must be float32 (f32 params), got {v.dtype}'
  close(names(grads[0]), ref_grads[0])
  if diff_x:
    close(grads[1], ref_grads[1])
  return params


def normal(shape, seed=10):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def nonzero_init():
  return jax.nn.initializers.normal(0.5)
