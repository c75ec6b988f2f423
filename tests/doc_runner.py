"""Runs the code blocks of a Markdown page, in order, as a reader would.

- ```python blocks whose first line is `# file: NAME` are written to NAME;
- other ```python blocks run in one interpreter per run of consecutive
  python blocks (a block sees the names of the python blocks just before it,
  as in a notebook; a shell block in between starts a new interpreter);
- ```bash blocks run with `bash -euo pipefail`;
everything in one fresh directory (with the presets linked at configs/, as in a
checkout's root), with the repository first on PYTHONPATH
(so the page tests this checkout, also through the console scripts).
A block preceded by `<!-- doc-test: skip REASON -->` is not run (e.g. it
needs a cluster) but must still parse; the REASON is mandatory.
A bash block preceded by `<!-- doc-test: shrink KEY=VALUE ... -->` runs with
those config overrides given to every `blox-train` in it (its own
`blox-train`, `python -m blox_scale.cli.train`, `launch/local.sh N ...`
lines): a key the line already sets takes the shrink's value, the others are
appended. That is how commands that train for minutes run in seconds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from helpers import xla_flags

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r'(?:<!--[ \t]*doc-test:[ \t]*(?P<kind>skip|shrink)[ \t]+(?P<reason>[^\n]*?)[ \t]*-->[ \t]*\n)?'
                   r'^```(?P<lang>[a-z]*)[^\n]*\n(?P<body>.*?)^```', re.M | re.S)
TRAIN = re.compile(r'(^|\s)(blox-train|-m blox_scale\.cli\.train)(\s|$)')


@dataclasses.dataclass(frozen=True)
class Block:
  lang: str
  body: str
  line: int
  skip: str | None
  shrink: tuple[str, ...] = ()


def blocks(page: Path) -> list[Block]:
  text = page.read_text()
  out = []
  for m in FENCE.finditer(text):
    line = text.count('\n', 0, m.start('body'))
    if m.group('kind') == 'shrink':
      out.append(Block(m.group('lang'), m.group('body'), line, None, tuple(shlex.split(m.group('reason')))))
    else:
      out.append(Block(m.group('lang'), m.group('body'), line, m.group('reason')))
  return out


class DocBlockError(AssertionError):
  """A block of a page failed; the message names the page, its line and the output."""


def run_page(page: Path, workdir: Path, *, timeout: float = 600) -> list[Block]:
  """Runs every block of `page` in `workdir`; returns the blocks it ran. Raises DocBlockError."""
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep)}
  env['XLA_FLAGS'] = xla_flags()  # as a reader's shell: one CPU device unless the page says otherwise
  for name in ('configs', 'launch', 'docs'):  # pages run from a checkout's root: presets at configs/, ...
    if not (workdir / name).exists():
      (workdir / name).symlink_to(REPO / name)
  ran: list[Block] = []
  python: list[tuple[Block, str]] = []

  def flush() -> None:
    if python:
      _run([sys.executable, '-c', '\n'.join(code for _, code in python)], page, python[-1][0], workdir, env, timeout)
      python.clear()

  for block in blocks(page):
    if block.lang not in ('python', 'bash', 'sh'):
      continue
    if block.skip is not None:  # not run, but it must still parse
      check_syntax(page, block)
      continue
    first = block.body.split('\n', 1)[0]
    if block.lang == 'python' and first.startswith('# file: '):
      (workdir / first[len('# file: '):].strip()).write_text(block.body)
    elif block.lang == 'python':
      python.append((block, f'# {page.name}:{block.line}\n{block.body}'))
    else:
      flush()
      _run(['bash', '-euo', 'pipefail', '-c', shrunk(block.body, block.shrink)], page, block, workdir, env, timeout)
    ran.append(block)
  flush()
  return ran


def shrunk(body: str, overrides: tuple[str, ...]) -> str:
  """`body` with `overrides` (KEY=VALUE) given to every blox-train command line in it."""
  if not overrides:
    return body
  lines = []
  for line in body.split('\n'):
    command, hash_, comment = line.partition(' #')
    if TRAIN.search(command):
      unused = {o.split('=', 1)[0]: o for o in overrides}
      words = [unused.pop(w.split('=', 1)[0], w) if '=' in w else w for w in shlex.split(command)]
      line = shlex.join(words + list(unused.values())) + (hash_ + comment if hash_ else '')
    lines.append(line)
  return '\n'.join(lines)


def check_syntax(page: Path, block: Block) -> None:
  """A block that is not run still has to parse (`bash -n`, `compile`)."""
  if block.lang == 'python':
    try:
      compile(block.body, f'{page.name}:{block.line}', 'exec')
    except SyntaxError as e:
      raise DocBlockError(f'{page}:{block.line}: the skipped python block does not parse: {e}') from e
  else:
    proc = subprocess.run(['bash', '-n', '-c', block.body], capture_output=True, text=True)
    if proc.returncode:
      raise DocBlockError(f'{page}:{block.line}: the skipped bash block does not parse: {proc.stderr.strip()}')


def _run(cmd: list[str], page: Path, block: Block, cwd: Path, env: dict[str, str], timeout: float) -> None:
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    name = page.relative_to(REPO) if page.is_relative_to(REPO) else page
    raise DocBlockError(f'{name}:{block.line}: the {block.lang} block failed (exit {proc.returncode}).\n'
                        f'--- block ---\n{block.body}--- stdout (end) ---\n{proc.stdout[-3000:]}\n'
                        f'--- stderr (end) ---\n{proc.stderr[-3000:]}')
