"""Exceptions raised by blox.

Each subclasses the built-in type jax-blox 0.1.6 raised in the same situation,
so `except KeyError` in existing user code keeps working, while the message
states the rule, the values received and the fix.
"""


class _Message:
  # KeyError's str() wraps its message in quotes; print the message as written.
  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ''


class ParamNotFoundError(_Message, KeyError):
  """A param was read that does not exist and could not be created."""


class ParamsLockedError(_Message, KeyError):
  """A new param was requested from locked Params."""


class ParamMismatchError(ValueError):
  """An existing param was requested with another shape or dtype."""


class RngNotSeededError(_Message, KeyError):
  """An Rng was used before `rng.seed(params, seed=...)`."""


class SequenceLengthError(ValueError, AssertionError):
  """Input leaves of a sequence disagree on the time length (axis 1).

  jax-blox checked this with `chex.assert_axis_dimension` (an AssertionError);
  it is also a ValueError, as every other bad input of blox.
  """
