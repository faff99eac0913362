"""
Tests of common.py's atomic writes: whatever goes wrong in the middle of writing a file (an
exception in the writer, a failed rename, a full disk), the previous file is left intact and
no temp file stays behind; a full disk is a one-line UserError that names the file.

$ python -m pytest -q tests/test_common.py
"""
import errno
import os

import pytest
import torch

import common
from common import UserError, atomic_torch_save, atomic_write, atomic_write_bytes


@pytest.fixture
def old(tmp_path):
    """A file that a failed write must leave exactly as it was."""
    path = tmp_path / 'ckpt.pt'
    path.write_bytes(b'the previous checkpoint')
    return path


def assert_untouched(path):
    assert path.read_bytes() == b'the previous checkpoint'
    assert sorted(p.name for p in path.parent.iterdir()) == ['ckpt.pt']  # no ckpt.pt.tmp


def half_then(exc):
    """A writer that writes half a file, then fails with exc."""
    def write(f):
        f.write(b'x' * 4096)
        raise exc
    return write


@pytest.mark.parametrize('exc', [RuntimeError('crash in the writer'), KeyboardInterrupt()])
def test_a_crash_mid_write_keeps_the_old_file(old, exc):
    with pytest.raises(type(exc)):
        atomic_write(str(old), half_then(exc))
    assert_untouched(old)


def test_a_failed_rename_keeps_the_old_file(old, monkeypatch):
    def fail(src, dst):
        raise OSError(errno.EIO, 'I/O error')
    monkeypatch.setattr(common.os, 'replace', fail)
    with pytest.raises(OSError):
        atomic_write_bytes(str(old), b'new')
    assert_untouched(old)


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_is_one_line_naming_the_file(old, code):
    with pytest.raises(UserError) as e:
        atomic_write(str(old), half_then(OSError(code, os.strerror(code))))
    msg = str(e.value)
    assert 'disk full' in msg and str(old) in msg and '\n' not in msg, msg
    assert_untouched(old)


def test_torch_save_failures_keep_the_old_checkpoint(old, monkeypatch):
    with pytest.raises(Exception):
        atomic_torch_save({'f': lambda: 0}, str(old))  # cannot be pickled: fails while serialising
    assert_untouched(old)

    def full(fd):  # the disk fills up: on many file systems the error arrives at fsync
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(common.os, 'fsync', full)
    with pytest.raises(UserError, match='disk full'):
        atomic_torch_save({'w': torch.zeros(1000)}, str(old))
    assert_untouched(old)


def test_atomic_torch_save_round_trips(tmp_path):
    path = tmp_path / 'ckpt.pt'
    atomic_torch_save({'w': torch.arange(5)}, str(path))
    atomic_torch_save({'w': torch.arange(6)}, str(path))  # over an existing file
    assert torch.load(path, weights_only=True)['w'].tolist() == list(range(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pt']


def test_autocast_runs_the_connector_matmuls_in_the_backbones_dtype():
    """With bf16 backbones the connector's matmuls run in bf16 (its weights stay fp32); with
    fp32 backbones nothing is cast."""
    a = torch.randn(4, 4)
    with common.autocast(torch.device('cpu'), torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    with common.autocast(torch.device('cpu'), torch.float32):
        assert (a @ a).dtype == torch.float32
