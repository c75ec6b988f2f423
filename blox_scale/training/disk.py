"""Writes to a run's workdir that fail (disk full, permissions): one line with the path, errno and fix.

Every file the trainer writes (config.yaml, the tokenizer copy, metrics.jsonl,
checkpoints, loss.png, data_hashes/) goes through `writing(path, what)` or raises
`WriteFailed` itself, so a full disk reads the same wherever it is hit first:

    <path>: writing the metrics failed: No space left on device (errno 28, ENOSPC); free space on that
    disk or set train.workdir to a disk with room, then rerun to resume

The checkpoint save (training/checkpoint.py) reports its own failures the same
way and adds which earlier checkpoints are intact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
FIX = 'free space on that disk or set train.workdir to a disk with room, then rerun to resume'
FIX_ACCESS = 'make it writable or set train.workdir to a writable directory, then rerun to resume'


class WriteFailed(RuntimeError):
  """A file of the workdir could not be written; the message names it, the errno and the fix."""


def describe_write_error(exc: BaseException) -> str:
  """`<path>: <strerror> (errno N, ENAME)` from an OSError (or tensorstore's message) in `exc`'s chain.

  Falls back to the first 300 characters of the message.
  """
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno:
      return f'{e.filename or "?"}: {e.strerror} (errno {e.errno}, {errno.errorcode.get(e.errno, "?")})'
  text = ' '.join(str(exc).split())
  code = re.search(r"os_error_code='?(\d+)", text)
  path = re.search(r'Failed writing: "([^"]+)"', text) or re.search(r'local file "([^"]+)"', text)
  if code:
    n = int(code.group(1))
    return f'{path.group(1) if path else "?"}: {os.strerror(n)} (errno {n}, {errno.errorcode.get(n, "?")})'
  return text[:300]


def _chain(exc: BaseException | None) -> list[BaseException]:
  out = []
  while exc is not None and exc not in out:
    out.append(exc)
    exc = exc.__cause__ or exc.__context__
  return out


def fix_for(exc: BaseException | None) -> str:
  """The fix to name for a failed write: room for ENOSPC (and unknown causes), permissions for the rest."""
  numbers = [e.errno for e in _chain(exc) if isinstance(e, OSError) and e.errno]
  code = re.search(r"os_error_code='?(\d+)", str(exc)) if exc is not None else None
  numbers += [int(code.group(1))] if code else []
  return FIX_ACCESS if numbers and numbers[0] not in NO_SPACE else FIX


def write_failed(path: str | Path, what: str, exc: BaseException) -> WriteFailed:
  """The one-line error for a failed write of `what` (e.g. 'the metrics') to `path`."""
  detail = describe_write_error(exc)
  if detail.startswith(('?: ', f'{path}: ')):  # the file named once
    detail = detail.split(': ', 1)[1]
  return WriteFailed(f'{path}: writing {what} failed: {detail}; {fix_for(exc)}')


@contextlib.contextmanager
def writing(path: str | Path, what: str) -> Iterator[None]:
  """Turns an OSError inside the block into `WriteFailed` naming `path` and `what`."""
  try:
    yield
  except OSError as e:
    raise write_failed(path, what, e) from e
