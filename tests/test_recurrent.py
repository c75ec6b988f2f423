"""LSTM, GRU, static_scan/dynamic_scan, SequenceBase/RecurrenceBase against hand-written loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blox as bx
from helpers import bf16_close, tree_allclose

BF16 = jnp.bfloat16
B, T, F, H = 2, 5, 3, 4


def _x(shape=(B, T, F), seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def ref_lstm(w, xs, dtype=jnp.float32):
  """Unrolled LSTM in plain jnp; `w` holds gates/kernel [F + H, 4H] and gates/bias."""
  rnd = lambda a: a.astype(dtype).astype(jnp.float32)  # noqa: E731
  k, b = rnd(w['gates/kernel']), rnd(w['gates/bias'])
  h = c = jnp.zeros((xs.shape[0], H), jnp.float32)
  outs = []
  for t in range(xs.shape[1]):
    z = jnp.concatenate([rnd(xs[:, t]), h], axis=-1) @ k + b[None, :]
    i, g, f, o = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    outs.append(h)
  return jnp.stack(outs, axis=1), (h, c)


def ref_gru(w, xs, dtype=jnp.float32):
  rnd = lambda a: a.astype(dtype).astype(jnp.float32)  # noqa: E731
  kg, bg = rnd(w['gates/kernel']), rnd(w['gates/bias'])
  kc, bc = rnd(w['candidate/kernel']), rnd(w['candidate/bias'])
  h = jnp.zeros((xs.shape[0], H), jnp.float32)
  outs = []
  for t in range(xs.shape[1]):
    x = rnd(xs[:, t])
    zr = jax.nn.sigmoid(jnp.concatenate([x, h], axis=-1) @ kg + bg[None, :])
    z, r = zr[:, :H], zr[:, H:]
    n = jnp.tanh(jnp.concatenate([x, r * h], axis=-1) @ kc + bc[None, :])
    h = (1 - z) * h + z * n
    outs.append(h)
  return jnp.stack(outs, axis=1), (h,)


def _build(cls, dtype=None, is_static=False):
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  cell = cls(g.child('cell'), hidden_size=H, rng=rng, is_static=is_static, dtype=dtype)
  return g, rng, cell


@pytest.mark.parametrize('cls, ref', [(bx.LSTM, ref_lstm), (bx.GRU, ref_gru)])
@pytest.mark.parametrize('dtype', [None, BF16])
def test_cell_apply_matches_unrolled_reference(cls, ref, dtype):
  _, rng, cell = _build(cls, dtype)
  xs = _x()
  params = jax.jit(lambda p, x: cell.apply(p, x)[1].locked())(rng.seed(bx.Params(), seed=1), xs)
  trainable, rest = params.split()
  w = {'/'.join(k[2:]): v.value for k, v in trainable.items()}
  cot = _x((B, T, H), seed=5)
  ref_dtype = jnp.float32 if dtype is None else dtype

  @jax.jit
  def run(t, x):
    def f(t, x):
      (ys, state), _ = cell.apply(t.merge(rest), x)
      return ys, state
    (ys, state), vjp = jax.vjp(f, t, x)
    return ys, state, vjp((cot.astype(ys.dtype), jax.tree.map(jnp.zeros_like, state)))

  @jax.jit
  def run_ref(w, x):
    (ys, state), vjp = jax.vjp(lambda w, x: ref(w, x, ref_dtype), w, x)
    return ys, state, vjp((cot, jax.tree.map(jnp.zeros_like, state)))

  ys, state, (g_t, g_x) = run(trainable, xs)
  ys_ref, state_ref, (g_w, g_x_ref) = run_ref(w, xs)
  close = tree_allclose if dtype is None else bf16_close
  assert ys.dtype == (jnp.float32 if dtype is None else dtype)
  close(ys, ys_ref)
  close(tuple(state), state_ref)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(g_t))
  close({'/'.join(k[2:]): v.value for k, v in g_t.items()}, g_w)
  close(g_x, g_x_ref)


@pytest.mark.parametrize('cls', [bx.LSTM, bx.GRU])
def test_static_and_dynamic_agree_and_share_params(cls):
  """The README's point: two models with the same param layout share params."""
  _, rng, dynamic = _build(cls, is_static=False)
  _, _, static = _build(cls, is_static=True)
  xs = _x()
  p0 = rng.seed(bx.Params(), seed=2)
  # Lazy init through the scanned path gives the same params as the Python loop.
  (y_d, s_d), p_d = dynamic.apply(p0, xs)
  (y_s, s_s), p_s = static.apply(p0, xs)
  tree_allclose(p_d.values_dict() | {('net', 'rng', 'seed'): 0}, p_s.values_dict() | {('net', 'rng', 'seed'): 0}, rtol=0, atol=0)
  tree_allclose((y_d, tuple(s_d)), (y_s, tuple(s_s)), rtol=1e-6, atol=1e-6)
  locked = p_d.locked()
  (y_l, _), _ = jax.jit(dynamic.apply)(locked, xs)
  (y_ls, _), _ = jax.jit(static.apply)(locked, xs)
  tree_allclose(y_l, y_ls, rtol=1e-6, atol=1e-6)
  tree_allclose(y_l, y_d, rtol=1e-6, atol=1e-6)


def test_dynamic_apply_uses_one_scan_when_locked():
  _, rng, lstm = _build(bx.LSTM)
  xs = _x()
  _, params = lstm.apply(rng.seed(bx.Params(), seed=0), xs)
  jaxpr = jax.make_jaxpr(lambda p, x: lstm.apply(p, x))(params.locked(), xs)
  assert str(jaxpr).count('scan[') == 1
  _, _, static = _build(bx.LSTM, is_static=True)
  assert 'scan[' not in str(jax.make_jaxpr(lambda p, x: static.apply(p, x))(params.locked(), xs))


def test_step_call_and_initial_state():
  _, rng, lstm = _build(bx.LSTM)
  x = _x((B, F))
  params = rng.seed(bx.Params(), seed=0)
  state, params = lstm.initial_state(params, x)
  assert isinstance(state, bx.LSTMState) and state.hidden.shape == (B, H) and state.cell.shape == (B, H)
  (h, new_state), params = lstm(params, x, state)
  w = {'/'.join(k[2:]): v.value for k, v in params.items() if k[1] == 'cell'}
  ys, (h_ref, c_ref) = ref_lstm(w, x[:, None])
  tree_allclose((h, new_state.cell), (h_ref, c_ref))
  with pytest.raises(ValueError, match='needs prev_state.*initial_state'):
    lstm(params, x, None)


def test_is_reset_restarts_selected_rows():
  _, rng, gru = _build(bx.GRU)
  xs = _x()
  params = rng.seed(bx.Params(), seed=0)
  _, params = gru.apply(params, xs)
  params = params.locked()
  reset = jnp.zeros((B, T), bool).at[1, 3].set(True)  # row 1 restarts at t=3
  (ys, _), _ = gru.apply(params, xs, is_reset=reset)
  (ys_plain, _), _ = gru.apply(params, xs)
  (ys_tail, _), _ = gru.apply(params, xs[:, 3:])
  tree_allclose(ys[0], ys_plain[0], rtol=1e-6, atol=1e-6)
  tree_allclose(ys[1, :3], ys_plain[1, :3], rtol=1e-6, atol=1e-6)
  tree_allclose(ys[1, 3:], ys_tail[1], rtol=1e-6, atol=1e-6)
  # A NumPy mask works too (one step, called directly).
  state, _ = gru.initial_state(params, xs[:, 0])
  (_, stepped), _ = gru(params, xs[:, 0], state._replace(hidden=jnp.ones((B, H))), is_reset=np.array([True, False]))
  (_, fresh), _ = gru(params, xs[:, 0], state)
  tree_allclose(stepped.hidden[0], fresh.hidden[0], rtol=1e-6, atol=1e-6)
  assert not np.allclose(stepped.hidden[1], fresh.hidden[1])


def test_scans_thread_rng_state_like_a_loop():
  """A step with dropout: the RNG counter is carried through the scan."""
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  lin = bx.Linear(g.child('lin'), H, rng)
  drop = bx.Dropout(g.child('drop'), 0.5, rng)

  def step(params, x, state, reset, is_training):
    y, params = lin(params, jnp.concatenate([x, state], axis=-1))
    y, params = drop(params, jnp.tanh(y), is_training=is_training)
    return (y, y), params

  xs = _x()
  state = jnp.zeros((B, H))
  params = rng.seed(bx.Params(), seed=0)
  (y_s, s_s), p_s = bx.static_scan(step, params, xs, state, None, True)
  (y_d, s_d), p_d = bx.dynamic_scan(step, params, xs, state, None, True)
  tree_allclose((y_s, s_s), (y_d, s_d), rtol=1e-6, atol=1e-6)
  assert int(rng.get_counter(p_s)) == int(rng.get_counter(p_d)) == 2 + T
  locked = p_s.locked()
  (y_s, _), p_s = bx.static_scan(step, locked, xs, state, None, True)
  (y_d, _), p_d = jax.jit(bx.dynamic_scan, static_argnums=(0, 5))(step, locked, xs, state, None, True)
  tree_allclose(y_s, y_d, rtol=1e-6, atol=1e-6)
  assert int(rng.get_counter(p_d)) == 2 + 2 * T
  # Masks differ between steps (each step draws its own key).
  assert not np.array_equal(np.asarray(y_d[:, 0] == 0), np.asarray(y_d[:, 1] == 0))


def test_scan_input_errors():
  step = lambda p, x, s, r, t: ((x, s), p)  # noqa: E731
  with pytest.raises(ValueError, match='rank >= 2'):
    bx.dynamic_scan(step, bx.Params(), jnp.ones((3,)), None, None, True)
  with pytest.raises(ValueError, match='disagree on the time length.*\\[3, 4\\]'):
    bx.static_scan(step, bx.Params(), (jnp.ones((2, 3)), jnp.ones((2, 4))), None, None, True)


class Chunked(bx.SequenceBase):
  """A SequenceBase processing the whole sequence at once (a causal running mean)."""

  def __init__(self, graph):
    super().__init__(graph)

  def initial_state(self, params, inputs):
    return (jnp.zeros(inputs.shape[:1] + inputs.shape[2:]), jnp.zeros(())), params

  def __call__(self, params, inputs, prev_state, is_reset=None, is_training=True):
    total, count = prev_state
    total = total + inputs
    return (total / (count + 1), (total, count + 1)), params

  def apply(self, params, inputs, prev_state=None, is_reset=None, is_training=True):
    if prev_state is None:
      prev_state, params = self.initial_state(params, inputs)
    total, count = prev_state
    sums = total[:, None] + jnp.cumsum(inputs, axis=1)
    counts = count + jnp.arange(1, inputs.shape[1] + 1, dtype=jnp.float32)
    return (sums / counts[None, :, None], (sums[:, -1], counts[-1])), params


def test_sequence_base_chunk_equals_its_own_steps():
  m = Chunked(bx.Graph('n').child('mean'))
  xs = _x()
  (ys, final), _ = m.apply(bx.Params(), xs)
  state, _ = m.initial_state(bx.Params(), xs)
  (ys_steps, final_steps), _ = bx.static_scan(m, bx.Params(), xs, state, None, True)
  tree_allclose((ys, final), (ys_steps, final_steps), rtol=1e-6, atol=1e-6)
  with pytest.raises(TypeError, match='abstract'):
    bx.RecurrenceBase(bx.Graph('n').child('x'))
