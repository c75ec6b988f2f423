"""What every blox command line shares: one-line errors and exit codes.

    def main(argv=None) -> int:
      return run_cli('blox-thing', _main, argv)

`run_cli` runs `_main(argv)` and turns what it raises into one line on
stderr, `tool: error: <key or path>: <what is wrong>; <the fix>`, and an exit
status: 2 for usage and config errors (`UsageError`, `ConfigError`), 1 for
runtime failures (anything else). The traceback is printed only with
`--debug` on the command line or `BLOX_DEBUG=1` in the environment.
Output into a closed pipe (`tool ... | head`) ends the tool quietly with
status 141 (128 + SIGPIPE), as a shell tool killed by SIGPIPE would.
`ArgumentParser` is argparse's, with its errors raised as `UsageError` so
they take the same path.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

from blox_scale import _startup
from blox_scale.training.config import ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEBUG_ENV = 'BLOX_DEBUG'


class UsageError(ConfigError):
  """A command-line argument is invalid (exit status 2)."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but a bad argument raises `UsageError` (one line, exit 2) instead of printing usage."""

  def error(self, message: str) -> None:  # type: ignore[override]
    raise UsageError(f'{message}; see {self.prog} --help')


def one_line(exc: BaseException, limit: int = 2) -> str:
  """The message of `exc` on at most `limit` lines (long library messages keep their first lines)."""
  text = str(exc).strip() or type(exc).__name__
  if isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None:
    text = f'{exc.filename}: {exc.strerror} (errno {exc.errno})'
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return '\n  '.join(lines[:limit]) + (' ...' if len(lines) > limit else '')


def debug_requested(argv: Sequence[str]) -> bool:
  return '--debug' in argv or os.environ.get(DEBUG_ENV, '') not in ('', '0')


class Terminated(KeyboardInterrupt):
  """SIGTERM, raised like SIGINT's KeyboardInterrupt so that `finally` blocks run and the tool ends in one line."""


def _raise_terminated(signum: int, frame: object) -> None:
  raise Terminated()


def run_cli(tool: str, fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
  """Runs `fn(argv)` (argv without `--debug`); returns its exit status, or 2/1 for what it raised.

  SIGINT/SIGTERM (unless the tool handles them itself, as blox-train does) end
  it with one line, `tool: stopped by SIGTERM`, and status 128 + the signal
  number; during the imports before, blox_scale/_startup.py does the same.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = debug_requested(argv)
  if debug:
    os.environ[DEBUG_ENV] = '1'  # for the tool's own log filters
  argv = [a for a in argv if a != '--debug']
  previous = {}
  if _startup.installed():  # the start-up handlers exit at once: from here on, unwind instead
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
  try:
    code = fn(argv)
    return EXIT_OK if code is None else int(code)
  except SystemExit as e:  # --help, or a tool's own sys.exit
    return e.code if isinstance(e.code, int) else EXIT_OK if e.code is None else EXIT_FAILURE
  except KeyboardInterrupt as e:
    signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
    print(f'{tool}: stopped by {signum.name}', file=sys.stderr, flush=True)
    return 128 + signum
  except BrokenPipeError:  # whoever read the output stopped (`blox-report runs/tiny | head`): stop quietly, as cat does
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's exit flush would fail again)
    return 128 + signal.SIGPIPE
  except Exception as e:  # noqa: BLE001  (every failure becomes one line; --debug shows the rest)
    if debug:
      traceback.print_exc()
    usage = isinstance(e, ConfigError)
    known = usage or isinstance(e, (OSError, RuntimeError))  # messages written for the user
    what = one_line(e) if known else f'{type(e).__name__}: {one_line(e)}'
    shown_whole = len(str(e).strip().splitlines()) <= 2
    hint = '' if debug or (known and shown_whole) else f' (rerun with --debug or {DEBUG_ENV}=1 for the traceback)'
    print(f'{tool}: error: {what}{hint}', file=sys.stderr, flush=True)
    return EXIT_USAGE if usage else EXIT_FAILURE
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
