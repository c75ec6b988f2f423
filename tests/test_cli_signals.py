"""SIGTERM/SIGINT from the first line of a command: one line and the documented exit status, no traceback."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blox_scale import _startup

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('orig_argv, argv0, want', [
    (['python', '-m', 'blox_scale.cli.train', 'train.steps=1'], '-m', 'blox-train'),
    (['python', '-X', 'importtime', '-mblox_scale.cli.plan'], '-m', 'blox-plan'),
    (['python', '/venv/bin/blox-sample', '--prompt', 'x'], '/venv/bin/blox-sample', 'blox-sample'),
    (['python', '-m', 'pytest', '-q'], '-m', None),  # a library user (here pytest): nothing installed
    (['python', '-m', 'blox_scale.cli.common'], '-m', None),
    (['python', '-c', 'import blox_scale'], '-c', None),
    (['python', 'my_script.py'], 'my_script.py', None),
])
def test_only_the_commands_install_start_up_handlers(orig_argv, argv0, want):
  assert _startup.command_name(orig_argv, argv0) == want


def test_importing_blox_scale_in_a_program_changes_no_handler():
  assert not _startup.installed()  # this pytest process imported blox_scale


def _caught(pid: int, signum: int) -> bool:
  """True once the process has a handler for `signum` (/proc/<pid>/status SigCgt, a hex bitmask)."""
  try:
    status = Path(f'/proc/{pid}/status').read_text()
  except OSError:
    return False
  mask = next(int(l.split()[1], 16) for l in status.splitlines() if l.startswith('SigCgt:'))
  return bool(mask & (1 << (signum - 1)))


@pytest.mark.slow
@pytest.mark.skipif(not Path('/proc/self/status').exists(), reason='reads /proc/<pid>/status (Linux)')
@pytest.mark.parametrize('tool, signum, status', [
    ('train', signal.SIGTERM, 0), ('train', signal.SIGINT, 0), ('sample', signal.SIGTERM, 143),
    ('plan', signal.SIGINT, 130)])
def test_a_signal_during_the_imports_is_one_line(tool, signum, status):
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen([sys.executable, '-m', f'blox_scale.cli.{tool}'], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 60
  while not _caught(proc.pid, signal.SIGTERM) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.001)  # the handlers go in at the top of blox_scale/__init__.py, before jax is imported
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == status, err[-2000:]
  assert err.splitlines() == [f'blox-{tool}: {signum.name} while starting: stopped at once; nothing was written']
  assert out == ''


def test_a_signal_while_a_tool_runs_unwinds_to_one_line(capsys):
  from blox_scale.cli.common import run_cli

  def tool(argv):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # interrupted by the handler's exception

  previous = signal.signal(signal.SIGTERM, _startup._stop)  # as in a command, after its imports
  try:
    assert run_cli('blox-thing', tool, []) == 143
    assert signal.getsignal(signal.SIGTERM) is _startup._stop  # run_cli restores what it replaced
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert capsys.readouterr().err == 'blox-thing: stopped by SIGTERM\n'


def test_output_into_a_closed_pipe_ends_quietly():
  # `blox-report runs/x | head`: the reader is gone while the tool writes; like cat, it stops with
  # 128 + SIGPIPE and says nothing (it used to print 'error: [Errno 32] Broken pipe' and Python's
  # 'Exception ignored ... BrokenPipeError' at exit).
  tool = ("import sys; from blox_scale.cli.common import run_cli\n"
          "sys.exit(run_cli('blox-report', lambda argv: print('step 1 loss 5.5\\n' * 20000)))")
  read, write = os.pipe()
  os.close(read)
  try:
    proc = subprocess.run([sys.executable, '-c', tool], cwd=REPO, stdout=write, stderr=subprocess.PIPE, text=True,
                          timeout=120)
  finally:
    os.close(write)
  assert (proc.returncode, proc.stderr) == (128 + signal.SIGPIPE, '')
