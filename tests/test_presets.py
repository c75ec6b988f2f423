"""Every preset in configs/: its parameter count from `jax.eval_shape` (nothing allocated) matches its stated size."""

import math
import re
from pathlib import Path

import jax
import pytest

import blox as bx
from blox_scale.training.config import load_config
from blox_scale.models import DecoderLM

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
PRESETS = sorted(CONFIGS.glob('*.yaml'))
UNITS = {'K': 1e3, 'M': 1e6, 'B': 1e9}


def stated_size(path: Path) -> tuple[float, int | None]:
  """`# params: 124M  (124,439,808 ...)` -> (124e6, 124439808)."""
  match = re.search(r'^# params: ([\d.]+)([KMB])(?:\s+\(([\d,]+))?', path.read_text(), re.M)
  if match is None:
    raise AssertionError(f'{path.name} must state its size in a "# params: <n>[KMB]" comment.')
  exact = int(match.group(3).replace(',', '')) if match.group(3) else None
  return float(match.group(1)) * UNITS[match.group(2)], exact


def count_params(path: Path) -> int:
  model = DecoderLM(bx.Graph('lm'), load_config(path).model)
  abstract = jax.eval_shape(model.init, 0)
  assert all(isinstance(p.value, jax.ShapeDtypeStruct) for p in abstract.values())  # nothing allocated
  return sum(math.prod(p.value.shape) for k, p in abstract.items() if k[1] != 'rng')


def test_all_presets_are_checked():
  names = {p.stem for p in PRESETS}
  assert {'tiny', 'gpt2_124m', 'llama_1b', 'llama_7b', 'llama_70b'} <= names


@pytest.mark.parametrize('path', PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_parameter_count_matches_published_size(path):
  published, exact = stated_size(path)
  n = count_params(path)
  assert abs(n - published) / published < 0.01, f'{path.name}: {n:,} params, states {published:,.0f}'
  if exact is not None:
    assert n == exact, f'{path.name}: {n:,} params, states exactly {exact:,}'
