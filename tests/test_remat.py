"""Remat policies: read what the gradient of the scanned stack saves, per policy.

`jax.ad_checkpoint.print_saved_residuals` lists every residual the VJP of a
function keeps for the backward pass. Over a scan, per-layer residuals are
scan outputs with a leading layer axis. Shapes below are chosen distinct so a
residual's shape says which value it is:

  carry x        [L, B, S, D]   (the layer input)
  scores         [L, B, S, S]   (batched dot: einsum 'bsd,btd->bst')
  mlp pre / h    [L, B, S, H]   (x @ w1, unbatched dot; tanh of it named 'mlp_hidden')
"""

import contextlib
import io

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import checkpoint_name
from helpers import tree_allclose

import blox as bx
import blox_scale as bs
from blox_scale.stacking import remat as remat_lib

L, B, S, D, H = 6, 2, 3, 4, 5
CARRY = f'f32[{L},{B},{S},{D}]'
SCORES = f'f32[{L},{B},{S},{S}]'
HIDDEN = f'f32[{L},{B},{S},{H}]'


class AttnMLP(bx.Module):
  """Tiny attention + MLP block: x: [B, S, D] -> [B, S, D]."""

  def __init__(self, graph, rng):
    super().__init__(graph)
    self.rng = rng

  def __call__(self, params, x):
    init = jax.nn.initializers.normal(0.5)
    wq, params = self.get_param(params, 'wq', (D, D), init, rng=self.rng)
    w1, params = self.get_param(params, 'w1', (D, H), init, rng=self.rng)
    w2, params = self.get_param(params, 'w2', (H, D), init, rng=self.rng)
    q = x @ wq  # [B, S, D]
    scores = jnp.einsum('bsd,btd->bst', q, x)  # [B, S, S]
    x = x + jnp.einsum('bst,btd->bsd', jax.nn.softmax(scores, axis=-1), x)
    h = checkpoint_name(jnp.tanh(x @ w1), 'mlp_hidden')  # [B, S, H]
    return x + h @ w2, params


_INIT = {}


def make(remat, **kw):
  root = bx.Graph('m')
  rng = bx.Rng(root.child('rng'))
  stack = bs.Stack(root.child('stack'), lambda g: AttnMLP(g, rng), L, rng=None, remat=remat, **kw)
  x = jax.random.normal(jax.random.key(1), (B, S, D))
  if 'params' not in _INIT:  # the same params for every policy: initialise once
    _INIT['params'] = stack.init(rng.seed(bx.Params(), seed=0), x)
  params = _INIT['params']
  weights = {p: q.value for p, q in params.items() if p[:3] == ('m', 'stack', 'block')}
  rest = {p: q for p, q in params.items() if p[:3] != ('m', 'stack', 'block')}

  def loss(weights, x):
    data = dict(rest)
    for p, v in weights.items():
      data[p] = params[p].replace(value=v)
    y, _ = stack(bx.Params.from_items(data, locked=True), x)
    return jnp.sum(y)  # linear in y: the loss itself saves no residual

  return loss, weights, x


def residuals(remat, **kw):
  """[(type, description)] of the non-argument residuals the gradient saves."""
  loss, weights, x = make(remat, **kw)
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.ad_checkpoint.print_saved_residuals(loss, weights, x)
  out = []
  for line in buf.getvalue().splitlines():
    kind, _, desc = line.partition(' ')
    # Arguments (the stacked weights) and, for the nested scan, their
    # [groups, k, ...] reshapes are inputs the backward needs anyway, not
    # activations a policy decides about.
    if 'from the argument' not in desc and 'output of reshape' not in desc:
      out.append(kind)
  return sorted(out)


def test_full_saves_only_the_carry_per_layer():
  assert residuals('full') == [CARRY]


def test_callable_policy_is_used_unchanged():
  assert residuals(jax.checkpoint_policies.nothing_saveable) == [CARRY]
  assert residuals(jax.checkpoint_policies.dots_saveable) == residuals('dots')


def test_none_saves_everything_including_elementwise_results():
  saved = residuals('none')
  assert SCORES in saved and HIDDEN in saved and CARRY in saved
  # No checkpoint: softmax and tanh outputs are kept as well, more than 'dots'.
  assert len(saved) > len(residuals('dots'))
  assert saved.count(SCORES) >= 2  # scores and softmax(scores)


def test_dots_saves_matmul_outputs_including_batched_ones():
  saved = residuals('dots')
  assert SCORES in saved  # batched dot (attention scores)
  assert HIDDEN in saved  # x @ w1
  assert saved.count(HIDDEN) == 1  # tanh(x @ w1) is elementwise: recomputed


def test_dots_no_batch_saves_projections_but_not_scores():
  saved = residuals('dots_no_batch')
  assert HIDDEN in saved
  assert SCORES not in saved
  assert saved.count(HIDDEN) == 1


def test_save_names_saves_exactly_the_named_values():
  assert residuals('save_names', remat_names=('mlp_hidden',)) == sorted([CARRY, HIDDEN])


def test_offload_names_puts_named_values_in_host_memory():
  saved = residuals('offload_names', remat_names=('mlp_hidden',))
  assert saved == sorted([CARRY, f'f32<host>[{L},{B},{S},{H}]'])
  # And the gradient compiles and runs on CPU.
  loss, weights, x = make('offload_names', remat_names=('mlp_hidden',))
  ref_loss, _, _ = make('none')
  tree_allclose(jax.jit(jax.grad(loss))(weights, x), jax.jit(jax.grad(ref_loss))(weights, x))


def test_nested_saves_one_carry_per_group():
  # L=6 as 2 groups of 3: the forward keeps 2 carries, not 6.
  assert residuals('full', nested=3) == [f'f32[2,{B},{S},{D}]']
  loss, weights, x = make('full', nested=3)
  flat, _, _ = make('full')
  tree_allclose(jax.grad(loss)(weights, x), jax.grad(flat)(weights, x))


def test_gradients_agree_across_policies():
  ref_loss, weights, x = make('none')
  ref = jax.jit(jax.grad(ref_loss))(weights, x)
  # ('full' is compared with an unrolled reference in test_stack.py.)
  for remat, names in [('dots', ()), ('dots_no_batch', ()), ('save_names', ('mlp_hidden',))]:
    loss, _, _ = make(remat, remat_names=names)
    # The same math, fused and recomputed differently: f32 rounding of gradients up to ~90 in size.
    tree_allclose(jax.jit(jax.grad(loss))(weights, x), ref, rtol=1e-4, atol=1e-4)


def test_registry_errors():
  with pytest.raises(ValueError, match=r"Unknown remat policy 'everything'\. Valid names: dots, dots_no_batch"):
    remat_lib.resolve_policy('everything')
  with pytest.raises(ValueError, match=r"remat='save_names' needs remat_names"):
    remat_lib.resolve_policy('save_names')
  with pytest.raises(ValueError, match=r"remat='offload_names' needs remat_names"):
    bs.Stack(bx.Graph('m').child('s'), lambda g: AttnMLP(g, None), 2, remat='offload_names')
  assert set(remat_lib.POLICIES) == {'none', 'full', 'dots', 'dots_no_batch', 'save_names', 'offload_names'}


@pytest.mark.parametrize('name', sorted(remat_lib.JAX_NAMES))
def test_jax_policy_names_mean_the_jax_policy(name):
  # A JAX name builds exactly jax.checkpoint_policies.<name> (called with the
  # stack's arguments for the factories), never a look-alike.
  names = ('mlp_hidden',)
  use, policy = remat_lib.resolve_policy(name, names)
  assert use
  jax_obj = getattr(jax.checkpoint_policies, name)
  factories = {
      'save_only_these_names': lambda: jax_obj(*names),
      'save_any_names_but_these': lambda: jax_obj(*names),
      'save_anything_except_these_names': None,  # returns a fresh lambda: compared by behaviour below
      'save_and_offload_only_these_names': None,
      'offload_dot_with_no_batch_dims': None,
  }
  if name not in factories:
    assert policy is jax_obj
  elif factories[name] is not None:
    assert policy == factories[name]()


def test_jax_names_save_what_their_short_twins_save():
  assert residuals('nothing_saveable') == residuals('full')
  assert residuals('dots_with_no_batch_dims_saveable') == residuals('dots_no_batch')
  assert residuals('save_only_these_names', remat_names=('mlp_hidden',)) == sorted([CARRY, HIDDEN])
  # everything_saveable under jax.checkpoint keeps what no checkpoint keeps.
  assert residuals('everything_saveable') == residuals('none')
  # offload_dot_with_no_batch_dims: the projection outputs go to host memory, the scores are recomputed.
  saved = residuals('offload_dot_with_no_batch_dims')
  assert f'f32<host>[{L},{B},{S},{H}]' in saved and SCORES not in saved


def test_auto_is_not_a_stack_policy():
  with pytest.raises(ValueError, match=r"'auto' is chosen by the trainer"):
    remat_lib.resolve_policy('auto')
