"""display (treescope) and summary (plain-text table)."""

import jax
import jax.numpy as jnp
import pytest
import treescope

import blox as bx
from blox.display import summary_rows, tree_view


def _model():
  g = bx.Graph('net')
  rng = bx.Rng(g.child('rng'))
  model = bx.Sequential(g.child('mlp'), [
      bx.Linear(g.child('up'), 8, rng), jax.nn.relu,
      bx.Linear(g.child('down'), 4, rng, param_dtype=jnp.bfloat16, kernel_metadata={'sharding': ('mlp', None)}),
      bx.BatchNorm(g.child('bn')),
  ])

  def init(x):
    _, params = model(rng.seed(bx.Params(), seed=0), x)
    return params
  return g, init


def test_summary_table_rows_and_totals():
  g, init = _model()
  params = init(jnp.ones((2, 3)))
  text = bx.summary(g, params)
  lines = text.splitlines()
  assert lines[0].split() == ['path', 'module', 'shape', 'dtype', 'trainable', 'logical', 'axes', 'bytes']
  rows = {r[0]: r for r in summary_rows(g, params)}
  assert rows['net/up/kernel'] == ('net/up/kernel', 'Linear', '(3, 8)', 'float32', 'yes', 'embed, mlp', '96')
  assert rows['net/down/kernel'] == ('net/down/kernel', 'Linear', '(8, 4)', 'bfloat16', 'yes', 'mlp, -', '64')
  assert rows['net/bn/running_mean'][4] == 'no' and rows['net/bn/running_mean'][5] == 'norm'
  assert rows['net/rng/counter'][1:] == ('Rng', '()', 'uint32', 'no', '-', '4')
  # 3*8+8 + 8*4+4 + 4*4 (bn) + 2 (rng) elements; bytes: f32 everywhere but the bf16 down layer.
  n_train, n_non = 24 + 8 + 32 + 4 + 8, 8 + 2
  nbytes = (24 + 8) * 4 + (32 + 4) * 2 + 16 * 4 + 8 + 4
  assert lines[-1] == (f'total: {len(rows)} params, {n_train + n_non:,} elements ({n_train:,} trainable, '
                       f'{n_non:,} non-trainable), {nbytes:,} bytes ({nbytes} B)')


def test_summary_of_abstract_params_allocates_nothing(capsys):
  g, init = _model()
  abstract = jax.eval_shape(init, jnp.ones((2, 3)))
  concrete = init(jnp.ones((2, 3)))
  assert sorted(summary_rows(g, abstract)) == sorted(summary_rows(g, concrete))
  bx.print_summary(g, abstract)
  assert capsys.readouterr().out.strip().endswith('B)')


def test_summary_rejects_bad_arguments():
  g, init = _model()
  with pytest.raises(TypeError, match='expects bx.Params'):
    bx.summary(g, {})
  with pytest.raises(TypeError, match='expect a bx.Graph'):
    bx.summary('net', init(jnp.ones((2, 3))))


def test_display_renders_modules_params_and_references(capsys):
  g, init = _model()
  params = init(jnp.ones((2, 3)))
  bx.display(g, params)
  out = capsys.readouterr().out
  assert out.startswith('net: Graph # Params:')
  assert 'up=Linear # Params: 32' in out
  assert 'rng=<Rng at net/rng>' in out  # a module argument shows as a reference
  assert "Param[N](shape=(), dtype='uint32'" in out and 'Param[T](shape=(8, 4)' in out
  assert "metadata={'sharding': ('mlp', None)}" in out
  # Structure only: constructor arguments, no params.
  bx.display(g)
  out = capsys.readouterr().out
  assert 'Param[' not in out and 'output_size=4' in out


def test_display_several_graphs_and_html():
  g, init = _model()
  other = bx.Graph('head')
  bx.Linear(other.child('proj'), 2, None, kernel_init=jax.nn.initializers.ones)
  view = tree_view((g, other), init(jnp.ones((2, 3))))
  text = treescope.render_to_text(view)
  assert text.startswith('Model(') and 'net=net: Graph' in text and 'head=head: Graph' in text
  assert '<' in treescope.render_to_html(view)
