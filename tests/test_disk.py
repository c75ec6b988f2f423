"""Failed writes to a workdir (disk full, permissions): one line naming the file, the errno and the fix."""

import errno
import json
import os

import pytest

from blox_scale.training.disk import WriteFailed, describe_write_error, fix_for, writing
from blox_scale.training.metrics import METRICS_FILE, MetricsWriter, plot_losses

FULL = '/dev/full'  # every write fails with ENOSPC (Linux)

needs_dev_full = pytest.mark.skipif(not os.path.exists(FULL), reason='needs /dev/full (Linux)')


@needs_dev_full
def test_metrics_write_on_a_full_disk_names_the_file_errno_and_fix(tmp_path):
  (tmp_path / METRICS_FILE).symlink_to(FULL)
  writer = MetricsWriter(tmp_path)
  with pytest.raises(WriteFailed) as e:
    writer.write({'kind': 'train', 'step': 1, 'loss': 1.0})
  assert str(e.value) == (f'{tmp_path / METRICS_FILE}: writing the metrics failed: No space left on device '
                          '(errno 28, ENOSPC); free space on that disk or set train.workdir to a disk with room, '
                          'then rerun to resume')
  writer.close()  # the unflushed line fails again: not a second error


@needs_dev_full
def test_loss_plot_on_a_full_disk(tmp_path):
  (tmp_path / METRICS_FILE).write_text(json.dumps({'kind': 'train', 'step': 1, 'loss': 2.0}) + '\n')
  (tmp_path / 'loss.png').symlink_to(FULL)
  with pytest.raises(WriteFailed, match=r'loss\.png: writing the loss plot failed: .*ENOSPC.*free space'):
    plot_losses(tmp_path)


def test_permission_errors_name_the_other_fix(tmp_path):
  with pytest.raises(WriteFailed) as e:
    with writing(tmp_path / 'x', 'the config'):
      raise PermissionError(errno.EACCES, 'Permission denied', str(tmp_path / 'x'))
  assert str(e.value) == (f'{tmp_path / "x"}: writing the config failed: Permission denied (errno 13, EACCES); '
                          'make it writable or set train.workdir to a writable directory, then rerun to resume')


def test_tensorstore_messages_give_path_and_errno():
  # orbax's async writes fail inside tensorstore, whose message carries the path and the OS error code.
  exc = ValueError('INTERNAL: Error writing local file "/w/checkpoints/8.orbax-checkpoint-tmp-1/params/d/x": '
                   "[tensorstore_spec='...'] [os_error_code=28]")
  assert describe_write_error(exc) == ('/w/checkpoints/8.orbax-checkpoint-tmp-1/params/d/x: No space left on device '
                                       '(errno 28, ENOSPC)')
  assert fix_for(exc).startswith('free space')


def test_tensorboard_on_a_full_disk_raises_at_the_next_write(tmp_path):
  import subprocess
  import time
  from blox_scale.training.trackers import TensorBoard

  disk = tmp_path / 'disk'
  disk.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(disk)], capture_output=True).returncode:
    pytest.skip('mounting a tmpfs needs root (CI runs as root)')
  try:
    with pytest.raises(OSError):
      (disk / 'filler').write_bytes(b'x' * 128 * 1024)  # the disk is now full
    tb = TensorBoard(disk)
    with pytest.raises(WriteFailed) as e:  # each write flushes: the first one that reaches the file fails
      for step in range(1, 100):
        tb.write({'kind': 'train', 'step': step, 'loss': 1.0})
        time.sleep(0.01)
    assert str(e.value).startswith(f'{disk}/tensorboard: writing the TensorBoard events failed: ')
    assert 'No space left on device (errno 28, ENOSPC); free space on that disk' in str(e.value)
    (disk / 'filler').unlink()  # room again: closing (and tensorboardX's exit handler) can flush
    try:
      tb.close()
    except WriteFailed:
      pass  # the error its thread kept, if it hit the full disk first
  finally:
    subprocess.run(['umount', '-l', str(disk)], check=False)
