"""SIGTERM/SIGINT from the first line of a blox command: one line and a clean exit, even during imports.

A command (`blox-train`, `python -m blox_scale.cli.train`, ...) imports jax and
the package for a second or more before its `main()` can install handlers; a
signal then used to end it with status 143 and no message, or a
KeyboardInterrupt traceback. `blox_scale/__init__.py` imports this module
first (it needs only the standard library), and when the process is one of the
commands the handlers below are installed before anything heavy is imported:

    blox-train: SIGTERM while starting: stopped at once; nothing was written

Exit status: 0 for blox-train (its documented status for a stop before the
training loop), 128 + the signal number (143, 130) for the other tools. Plain
`import blox_scale` in a user's program installs nothing. `main()` of each tool
replaces these handlers with its own (cli/common.py, cli/train.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time

STARTED = time.monotonic()  # when this process began importing blox_scale (blox-plan's --time-limit counts from here)

TOOLS = ('train', 'sample', 'plan', 'convert', 'tokenize')
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def command_name(orig_argv: list[str] | None = None, argv0: str | None = None) -> str | None:
  """'blox-<tool>' when this process runs one of the commands, else None."""
  orig_argv = list(getattr(sys, 'orig_argv', []) if orig_argv is None else orig_argv)
  for i, arg in enumerate(orig_argv):
    module = orig_argv[i + 1] if arg == '-m' and i + 1 < len(orig_argv) else arg[2:] if arg.startswith('-m') else None
    if module is not None:
      package, _, tool = module.rpartition('.')
      return f'blox-{tool}' if package == 'blox_scale.cli' and tool in TOOLS else None
  argv0 = (sys.argv[0] if sys.argv else '') if argv0 is None else argv0
  name = os.path.basename(argv0)
  return name if name in {f'blox-{t}' for t in TOOLS} else None


def exit_status(tool: str, signum: int) -> int:
  return 0 if tool == 'blox-train' else 128 + signum


def _stop(signum: int, frame: object) -> None:
  tool = command_name() or 'blox'
  os.write(2, f'{tool}: {signal.Signals(signum).name} while starting: stopped at once; nothing was written\n'.encode())
  os._exit(exit_status(tool, signum))  # nothing to clean up yet: no file is open for writing


def install() -> bool:
  """Installs the start-up handlers if this process is a blox command (main thread only); True if it did."""
  if command_name() is None:
    return False
  try:
    for sig in STOP_SIGNALS:
      signal.signal(sig, _stop)
  except ValueError:  # not the main thread
    return False
  return True


def installed() -> bool:
  """True while the start-up handlers are still the ones in place (no tool has replaced them)."""
  return signal.getsignal(signal.SIGTERM) is _stop


install()
