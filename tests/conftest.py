"""Strict JAX for every test: 8 fake CPU devices, rank promotion raises."""

import os

# Must be set before jax initialises its backends.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')


@pytest.fixture(autouse=True)
def _strict_jax():
  with jax.numpy_rank_promotion('raise'):
    yield
