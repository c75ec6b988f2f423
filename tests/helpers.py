"""Shared test helpers: one tree_allclose for the whole suite; run_tool for the command-line tools."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def tree_allclose(a, b, *, rtol=1e-5, atol=1e-5):
  """Asserts two pytrees have the same structure and allclose leaves."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, f'tree structures differ:\n{ta}\n{tb}'
  for i, (x, y) in enumerate(zip(la, lb)):
    x = np.asarray(jnp.asarray(x, jnp.float32)) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else np.asarray(x)
    y = np.asarray(jnp.asarray(y, jnp.float32)) if jnp.issubdtype(jnp.asarray(y).dtype, jnp.floating) else np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f'leaf {i}')


def bf16_tols():
  return dict(rtol=2e-2, atol=2e-2)


def bf16_close(a, b):
  """bf16 tolerance: elementwise 2e-2, or 3e-2 relative in norm per leaf.

  Gradients of bf16 computations reduce over many elements in bf16 (a bias
  gradient sums the cotangent over every position), so single entries near
  zero can be off by more than an elementwise tolerance while the whole
  gradient is right to bf16 precision.
  """
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    assert x.shape == y.shape
    if np.allclose(x, y, **bf16_tols()):
      continue
    err = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-6)
    assert err < 3e-2, f'relative error {err:.3g} (max abs diff {np.abs(x - y).max():.3g})'


REPO = Path(__file__).resolve().parents[1]

# The suite compiles at LLVM optimisation level 0 (tests/conftest.py sets it for this process; the
# subprocesses the tests start get it through `xla_flags`): the same HLO, XLA passes and buffer
# assignment, with less optimised machine code, for about half the suite's CPU time (its programs
# are tiny: compiling them dominated). Results may differ from level 2 in the last bits, never
# between two runs of the suite's own programs; benchmarks/ keep XLA's defaults.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'


def xla_flags(devices: int | None = None) -> str:
  """`XLA_FLAGS` for a subprocess of the suite: `TEST_XLA_FLAGS`, and `devices` fake CPU devices if given."""
  return TEST_XLA_FLAGS + (f' --xla_force_host_platform_device_count={devices}' if devices else '')


def run_tool(tool, *args, cwd, check=True):
  """`python -m blox_scale.cli.<tool> *args` in `cwd` with this checkout first on PYTHONPATH, one CPU device."""
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'XLA_FLAGS': xla_flags()}
  proc = subprocess.run([sys.executable, '-m', f'blox_scale.cli.{tool}', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode:
    raise AssertionError(f'{tool} {args} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}')
  return proc
