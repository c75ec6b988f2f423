"""docs/comparison.md: the Equinox, Flax NNX and blox snippets run as written and train.

Equinox and Flax are not test dependencies: their snippets run when the `bench`
extra is installed (`pip install -e '.[bench]'`) and are skipped otherwise.
"""

import pathlib
import re

import numpy as np
import pytest

DOC = pathlib.Path(__file__).parent.parent / 'docs' / 'comparison.md'
PREAMBLE = 'import jax\nimport jax.numpy as jnp\nimport optax\n'


def snippets(framework: str) -> list[str]:
  """The python blocks introduced by a paragraph starting with **framework**, in order."""
  text = DOC.read_text()
  found = re.findall(r'^\*\*(Equinox|Flax NNX|blox)\*\*.*?```python\n(.*?)```', text, flags=re.S | re.M)
  blocks = [code for name, code in found if name == framework]
  assert len(blocks) == 2, f'expected a model and a step snippet for {framework} in {DOC.name}, got {len(blocks)}'
  return blocks


def run(framework: str) -> dict:
  namespace: dict = {}
  exec(PREAMBLE, namespace)
  for code in snippets(framework):
    exec(compile(code, f'docs/comparison.md ({framework})', 'exec'), namespace)
  return namespace


def data():
  r = np.random.default_rng(0)
  x = r.standard_normal((64, 3)).astype(np.float32)
  return x, (x @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)


def train(step_once, steps: int = 60) -> list[float]:
  losses = [float(step_once(i)) for i in range(steps)]
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
  return losses


def test_equinox_snippets_run_and_train():
  pytest.importorskip('equinox', reason="Equinox is in the 'bench' extra only (pip install -e '.[bench]')")
  ns = run('Equinox')
  jax, x, y = ns['jax'], *data()
  state = {'model': ns['model'], 'opt_state': ns['opt_state']}

  def once(i):
    state['model'], state['opt_state'], loss = ns['step'](state['model'], state['opt_state'], x, y, jax.random.key(i))
    return loss

  train(once)


def test_nnx_snippets_run_and_train():
  pytest.importorskip('flax.nnx', reason="Flax is in the 'bench' extra only (pip install -e '.[bench]')")
  ns = run('Flax NNX')
  x, y = data()
  train(lambda i: ns['step'](ns['model'], ns['optimizer'], x, y))


def test_blox_snippets_run_and_train():
  ns = run('blox')
  x, y = data()
  state = {'params': ns['params'], 'opt_state': ns['opt_state']}

  def once(i):
    state['params'], state['opt_state'], loss = ns['step'](state['params'], state['opt_state'], x, y)
    return loss

  train(once)
