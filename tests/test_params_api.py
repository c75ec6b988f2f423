"""The public Params API for code that transforms param trees, and the path <-> name helper.

Every operation is checked against the same manipulation on a plain dict.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blox as bx


def _params(locked=False):
  data = {
      ('m', 'a', 'w'): bx.Param(jnp.ones((2, 3)), True, {'sharding': ('embed', 'mlp')}),
      ('m', 'a', 'b'): bx.Param(jnp.zeros((3,)), True),
      ('m', 'bn', 'mean'): bx.Param(jnp.zeros((3,)), False),
      ('m', 'ab', 'w'): bx.Param(jnp.full((2,), 2.0), True),
      ('rng', 'counter'): bx.Param(jnp.uint32(0), False),
  }
  return data, bx.Params.from_items(data, locked=locked)


def _same(params, data, locked):
  assert isinstance(params, bx.Params)
  assert params.is_locked is locked
  assert list(params.keys()) == list(data.keys())
  for path, param in data.items():
    got = params[path]
    assert got.trainable == param.trainable and got.metadata == param.metadata
    np.testing.assert_array_equal(got.value, param.value)


@pytest.mark.parametrize('locked', [False, True])
def test_from_items_round_trips_items(locked):
  data, params = _params(locked)
  _same(params, data, locked)
  _same(bx.Params.from_items(params.items(), locked=locked), data, locked)
  _same(bx.Params.from_items(list(data.items()), locked=locked), data, locked)
  with pytest.raises(TypeError, match='Params entries must be Param'):
    bx.Params.from_items({('w',): jnp.ones(2)})
  with pytest.raises(TypeError, match='tuples of str'):
    bx.Params.from_items({'w': bx.Param(jnp.ones(2))})


@pytest.mark.parametrize('locked', [False, True])
def test_filter_and_partition_match_dict_comprehensions(locked):
  data, params = _params(locked)
  under = lambda p: p[:2] == ('m', 'a')
  frozen = lambda p, q: not q.trainable
  _same(params.filter(prefix=('m', 'a')), {p: q for p, q in data.items() if under(p)}, locked)
  _same(params.filter(frozen), {p: q for p, q in data.items() if not q.trainable}, locked)
  _same(params.filter(frozen, prefix=('m',)), {p: q for p, q in data.items() if p[0] == 'm' and not q.trainable}, locked)
  _same(params.filter(), data, locked)
  match, rest = params.partition(prefix=('m', 'a'))
  _same(match, {p: q for p, q in data.items() if under(p)}, locked)
  _same(rest, {p: q for p, q in data.items() if not under(p)}, locked)
  # split keeps its jax-blox meaning: trainable by default, any predicate.
  train, other = params.split()
  _same(train, {p: q for p, q in data.items() if q.trainable}, locked)
  _same(other, {p: q for p, q in data.items() if not q.trainable}, locked)
  assert train.merge(other).keys() == params.keys()


def test_with_param_with_value_and_replace_values_match_dict_updates():
  data, params = _params()
  path = ('m', 'a', 'b')
  new = bx.Param(jnp.ones((3,)), False, {'tag': 'x'})
  _same(params.with_param(path, new), {**data, path: new}, False)
  added = bx.Param(jnp.ones((4,)))
  _same(params.with_param(('m', 'c', 'w'), added), {**data, ('m', 'c', 'w'): added}, False)
  _same(params.with_value(path, jnp.full((3,), 7.0)), {**data, path: data[path].replace(value=jnp.full((3,), 7.0))}, False)
  values = {('m', 'a', 'w'): jnp.zeros((2, 3)), ('rng', 'counter'): jnp.uint32(5)}
  expected = {p: q.replace(value=values[p]) if p in values else q for p, q in data.items()}
  _same(params.replace_values(values), expected, False)
  _same(params, data, False)  # all of them return copies
  with pytest.raises(bx.ParamNotFoundError, match='No param at m/a/x'):
    params.with_value(('m', 'a', 'x'), jnp.ones(1))
  assert params.get(('m', 'nope')) is None and params.get(path) is data[path]


def test_locked_params_refuse_new_paths_but_take_updates():
  data, locked = _params(locked=True)
  with pytest.raises(bx.ParamsLockedError, match='Cannot add m/new: params are locked'):
    locked.with_param(('m', 'new'), bx.Param(jnp.ones(1)))
  updated = locked.with_param(('m', 'a', 'b'), data[('m', 'a', 'b')].replace(value=jnp.ones(3)))
  assert updated.is_locked
  np.testing.assert_array_equal(updated[('m', 'a', 'b')].value, np.ones(3))


def test_api_works_under_jit():
  _, params = _params()
  out = jax.jit(lambda p: p.filter(prefix=('m', 'a')).with_value(('m', 'a', 'b'), p[('m', 'a', 'b')].value + 1))(params)
  np.testing.assert_array_equal(out[('m', 'a', 'b')].value, np.ones(3))
  assert set(out.keys()) == {('m', 'a', 'w'), ('m', 'a', 'b')}  # jit's unflatten sorts dict keys


class _Counter(bx.Module):
  """Creates a state at 0 and increments it in the same call (as BatchNorm does)."""

  def __call__(self, params, x):
    n, params = self.get_param(params, 'n', (), lambda *_: jnp.float32(0), trainable=False)
    return x, self.set_param(params, 'n', n + 1)


def test_record_created_keeps_the_value_at_creation():
  graph = bx.Graph('net')
  a, b = _Counter(graph.child('a')), _Counter(graph.child('b'))
  _, params = a(bx.Params(), 0.0)  # created before recording starts: not recorded
  with bx.record_created() as created:
    _, params = a(params, 0.0)
    _, params = b(params, 0.0)
    with bx.record_created() as inner:  # nested: the innermost records
      _, params = _Counter(graph.child('c'))(params, 0.0)
  assert list(created) == [('net', 'b', 'n')]
  assert float(created[('net', 'b', 'n')].value) == 0.0 and float(params[('net', 'b', 'n')].value) == 1.0
  assert list(inner) == [('net', 'c', 'n')] and float(inner[('net', 'c', 'n')].value) == 0.0
  _, params = _Counter(graph.child('d'))(params, 0.0)  # after the block: not recorded
  assert ('net', 'd', 'n') not in created


@pytest.mark.parametrize('path', [
    ('lm', 'stack', 'block', 'kernel'),
    ('a/b', 'c'),
    ('100%', 'x%2Fy', '%25', '/', '%'),
    ('', 'x', ''),
    ('only',),
])
def test_path_to_str_round_trips_names_with_slash_and_percent(path):
  name = bx.path_to_str(path)
  assert bx.str_to_path(name) == path
  assert len(name.split('/')) == len(path)  # each name is one '/'-separated part


def test_path_to_str_keeps_plain_names_as_they_were():
  assert bx.path_to_str(('lm', 'stack', 'block', 'mlp', 'kernel')) == 'lm/stack/block/mlp/kernel'
  assert bx.path_to_str(('a/b', 'c%')) == 'a%2Fb/c%25'
  assert bx.path_to_str(()) == '' and bx.str_to_path('') == ()
  assert bx.str_to_path('x%41/y') == ('x%41', 'y')  # only the two escapes are read back


def test_key_path_to_str_names_params_inside_any_pytree():
  _, params = _params()
  state = {'params': params, 'opt': [params.filter(prefix=('rng',))]}
  names = [bx.key_path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert names == ['opt/0/rng/counter'] + sorted('params/' + bx.path_to_str(p) for p in params)
  slashed = bx.Params.from_items({('a/b', 'w'): bx.Param(jnp.ones(1))})
  (key_path, _), = jax.tree_util.tree_flatten_with_path(slashed)[0]
  assert bx.key_path_to_str(key_path) == 'a%2Fb/w'
