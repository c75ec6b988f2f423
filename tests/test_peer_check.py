"""The peer benchmark's correctness gate: blox and raw JAX agree, and a wrong variant stops the run loudly.

Runs without the `bench` extra (only the raw JAX and blox variants are built here).
"""

import pathlib
import sys

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.peers import blox_peer, common, raw_jax  # noqa: E402

sys.path.remove(str(REPO))


@pytest.fixture(scope='module')
def grads():
  shape = common.tiny(2)
  numbers, batch = common.init_numbers(shape), common.make_batch(shape)
  with jax.numpy_rank_promotion('allow'):  # the benchmark's GPT broadcasts positions the usual way
    return raw_jax.build(shape, numbers, 'full')['grads'](batch), blox_peer.build(shape, numbers, 'full')['grads'](batch)


def test_blox_passes_the_gate(grads):
  ref, got = grads
  assert set(got[1]) == set(ref[1])
  assert common.check_grads('blox', ref, got, 'tiny') <= 1.0


def test_a_wrong_gradient_stops_the_run_naming_the_leaf(grads):
  ref, (loss, g) = grads
  key = sorted(g)[0]
  bad = dict(g)
  scale = max(float(np.max(np.abs(np.asarray(v)))) for v in g.values())
  bad[key] = np.asarray(g[key]).copy()
  bad[key].flat[0] += 1e-2 * scale  # one element off by 1% of the largest gradient
  with pytest.raises(common.Mismatch, match=f'blox tiny: gradient {key} differs from raw JAX by'):
    common.check_grads('blox', ref, (loss, bad), 'tiny')


def test_a_wrong_loss_or_shape_stops_the_run(grads):
  ref, (loss, g) = grads
  with pytest.raises(common.Mismatch, match='loss .* != raw JAX'):
    common.check_grads('blox', ref, (float(loss) * 1.001, g), 'tiny')
  key = sorted(g)[-1]
  bad = dict(g)
  bad[key] = np.asarray(g[key])[..., :1]
  with pytest.raises(common.Mismatch, match=f'gradient {key} has shape'):
    common.check_grads('blox', ref, (loss, bad), 'tiny')
