"""Real multi-process runs on this machine: launch/local.sh, jax.distributed, Gloo.

Two processes with 2 fake CPU devices each must train exactly like one
process with 4 devices (same mesh sizes, same global batch), and when one
process dies the survivor must exit with JAX's error well within a minute.
"""

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import multihost_driver  # noqa: E402
from helpers import xla_flags  # noqa: E402

LOCAL = str(ROOT / 'launch' / 'local.sh')
DRIVER = str(ROOT / 'tests' / 'multihost_driver.py')


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith('BLOX_')}
  env['XLA_FLAGS'] = xla_flags()  # local.sh adds the per-process device count
  env.update(extra)
  return env


def _launch(nproc: int, *args: str, timeout: float, **env: str) -> tuple[int, list[tuple[float, str]]]:
  """Runs local.sh; returns its status and (arrival time, line) of every output line."""
  proc = subprocess.Popen([LOCAL, str(nproc), sys.executable, DRIVER, *args], cwd=ROOT, env=_env(**env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
  lines: list[tuple[float, str]] = []

  def read() -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
      lines.append((time.monotonic(), line.rstrip('\n')))

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    rc = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, 9)  # our own session only
    proc.wait()
    raise AssertionError('local.sh did not finish within %ss; last output:\n%s'
                         % (timeout, '\n'.join(l for _, l in lines[-30:])))
  reader.join(timeout=10)
  return rc, lines


def _losses(lines: list[tuple[float, str]]) -> list[float]:
  out = []
  for _, line in lines:
    m = re.match(r'\[p0\] LOSS (\d+) (\S+)$', line)
    if m:
      assert int(m.group(1)) == len(out)
      out.append(float(m.group(2)))
  return out


@pytest.mark.slow
def test_two_processes_match_one_process_then_survive_a_death():
  """One launch (compiles dominate the cost on 2 shared cores), two checks.

  1. Steps 0..2: two processes x 2 devices give the losses of one process x 4.
  2. Process 1 then exits abruptly (after step 3) while process 0 goes on
     stepping; process 0 must exit with status 3 and one line naming JAX's
     reason (stopped heartbeats) within a minute, not abort. The
     launcher's own backstop (BLOX_FAIL_GRACE) is pushed out of the way, so
     only JAX's heartbeat can end process 0.
  """
  mesh = 'data=2,fsdp=2,tensor=1'
  steps = 3
  rc, lines = _launch(2, '--steps', str(steps), '--mesh', mesh, '--die-process', '1', '--die-step', str(steps),
                      '--heartbeat', '10', timeout=300, BLOX_DEVICES_PER_PROCESS='2', BLOX_FAIL_GRACE='600')
  text = '\n'.join(l for _, l in lines)
  # Both processes joined one 4-device run and each fed half of the batch.
  assert '[p0] process 0/2 devices 2/4' in text and '[p1] process 1/2 devices 2/4' in text, text[-3000:]
  assert 'rows 0:4' in text and 'rows 4:8' in text
  multi = _losses(lines)
  assert len(multi) >= steps, text[-3000:]

  # Reference: this (single) process, 4 of its fake devices, the same loop.
  single = multihost_driver.run(multihost_driver.tiny_config(mesh), steps, 8, devices=jax.devices()[:4])
  # Same math, different collective implementations (Gloo across processes vs
  # in-process all-reduce): equal up to f32 summation order.
  np.testing.assert_allclose(multi[:steps], single, rtol=1e-5, atol=1e-6)
  assert single[-1] != single[0]  # the steps did train

  died = [t for t, l in lines if 'dying abruptly' in l]
  assert died, text[-3000:]
  assert rc != 0
  # JAX says why; the survivor then ends with blox's one line and status 3, not an abort (134).
  assert 'stopped sending heartbeats' in text, text[-3000:]
  survivor_exit = [t for t, l in lines if re.search(r'process 0 exited with status 3$', l)]
  assert survivor_exit, text[-3000:]
  stops = [l for _, l in lines if l.startswith('[p0] blox: error: process 0 stops')]
  assert len(stops) == 1 and 'another process of the run died' in stops[0], text[-3000:]
  assert 'status 134' not in text and 'Aborted' not in text
  waited = survivor_exit[0] - died[0]
  print(f'survivor exited {waited:.1f}s after process 1 died (heartbeat 10s)')
  assert waited < 60, f'process 0 took {waited:.0f}s to notice the dead process'


def test_local_sh_reports_the_first_failure_and_prefixes_output():
  # No JAX here: the launcher's own contract, in a second.
  proc = subprocess.run([LOCAL, '3', 'bash', '-c', 'echo "id=$BLOX_PROCESS_ID n=$BLOX_NUM_PROCESSES '
                         '$BLOX_COORDINATOR_ADDRESS $XLA_FLAGS"; exit $((BLOX_PROCESS_ID == 2 ? 5 : 0))'],
                        cwd=ROOT, env=_env(BLOX_DEVICES_PER_PROCESS='3'), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 5, proc.stdout + proc.stderr
  for i in range(3):
    # local.sh keeps the other XLA flags (here the suite's) and sets the device count.
    assert re.search(rf'^\[p{i}\] id={i} n=3 127\.0\.0\.1:\d+ +{re.escape(xla_flags())} --xla_force_host_platform_device_count=3$',
                     proc.stdout, re.M), proc.stdout
  assert 'process 2 exited with status 5' in proc.stderr


def test_initialize_settings_and_cluster_detection(monkeypatch):
  from blox_scale.parallel import distributed
  from blox_scale.training.config import DistributedConfig

  monkeypatch.setattr(distributed, '_initialized', False)
  for name in list(os.environ):
    if name.startswith(('SLURM_', 'OMPI_', 'TPU_', 'BLOX_')):
      monkeypatch.delenv(name)
  assert distributed._cluster_environment() is None
  # An explicit coordinator needs a valid process id and count; the message names the keys.
  bad = DistributedConfig(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=2)
  with pytest.raises(ValueError, match=r'num_processes >= 1 and 0 <= process_id < num_processes.*process_id=2'):
    distributed.initialize(bad)
  monkeypatch.setenv('BLOX_PROCESS_ID', '5')  # the config wins over the environment
  with pytest.raises(ValueError, match='process_id=2'):
    distributed.initialize(bad)
  # Alone, with no cluster around: nothing to join.
  assert distributed.initialize(DistributedConfig()) is False
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert distributed._cluster_environment() == 'slurm'
  monkeypatch.setenv('SLURM_NTASKS', '1')  # a one-task job is a single process
  assert distributed._cluster_environment() is None
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1,w2,w3')
  assert distributed._cluster_environment() == 'tpu'
