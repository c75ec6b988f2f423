"""Strict JAX for every test: 8 fake CPU devices, rank promotion raises.

One persistent compilation cache per test session (JAX's own, through its
environment variables so that the CLI subprocesses the tests start share it):
the many tests that run the same tiny model twice (a run and its resumed
copy, a train and a sample) compile it once. Keyed by the program, the
devices and the compile options, so a hit runs the same executable.
"""

import os
import tempfile

# Must be set before jax initialises its backends.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
from helpers import TEST_XLA_FLAGS  # noqa: E402  (LLVM optimisation level 0: see tests/helpers.py)

if TEST_XLA_FLAGS not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' ' + TEST_XLA_FLAGS
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_SESSION = os.environ.get('PYTEST_XDIST_TESTRUNUID') or str(os.getpid())  # the same for every xdist worker of a run
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), f'blox-tests-jax-cache-{_SESSION}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')
# blox-plan stops at 30 s by default; the doc pages' plans (64 devices) take about that beside
# the other tests on 2 cores. The limit itself is tested in tests/test_plan.py.
os.environ.setdefault('BLOX_PLAN_TIME_LIMIT', '300')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')


@pytest.fixture(autouse=True)
def _strict_jax():
  with jax.numpy_rank_promotion('raise'):
    yield
