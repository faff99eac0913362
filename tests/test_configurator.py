"""
Tests of configurator.py: config files and --key=value overrides, checked against the
defaults' keys and types, every mistake a one-line UserError; the checks of an output folder;
writes that fail safely.

$ python -m pytest -q tests/test_configurator.py
"""
import errno
import os
import subprocess
import sys

import pytest
import torch

import configurator
from configurator import UserError, atomic_torch_save, atomic_write, atomic_write_bytes, first_line
from conftest import ROOT


def defaults():
    return dict(learning_rate=1e-4, batch_size=16, out_dir='out', vision_ln=True, weight_decay=0.01,
                total_batch_size=512, _private=1)


def test_unknown_key_names_the_closest():
    with pytest.raises(UserError) as e:
        configurator.configure(defaults(), ['--learnig_rate=1e-3'])
    assert 'learnig_rate' in str(e.value) and "'learning_rate'" in str(e.value)


def test_private_names_are_not_keys():
    with pytest.raises(UserError):
        configurator.configure(defaults(), ['--_private=2'])


def test_a_key_needs_a_value():
    with pytest.raises(UserError):
        configurator.configure(defaults(), ['--batch_size'])


@pytest.mark.parametrize('bad', ['--batch_size=1.5', '--batch_size=True', '--vision_ln=1', '--learning_rate=abc',
                                 '--learning_rate=True'])
def test_wrong_types_are_one_line_errors(bad):
    with pytest.raises(UserError) as e:
        configurator.configure(defaults(), [bad])
    key = bad[2:].split('=')[0]
    assert f"'{key}'" in str(e.value) and '\n' not in str(e.value)


def test_values_take_the_defaults_types():
    g = dict(defaults(), sizes=(1, 2))
    configurator.configure(g, ['--sizes=[3, 4]'])
    assert g['sizes'] == (3, 4)  # a list given for a tuple key becomes a tuple
    g = defaults()
    cfg = configurator.configure(g, ['--learning_rate=1', '--out_dir=2024', '--vision_ln=False'])
    assert g['learning_rate'] == 1.0 and type(g['learning_rate']) is float
    assert g['out_dir'] == '2024' and g['vision_ln'] is False
    assert cfg['learning_rate'] == 1.0 and '_private' not in cfg


def test_a_value_may_hold_equals_signs():
    """Only the first '=' separates key and value: a run name like lr=1e-4 stays whole."""
    g = dict(defaults(), wandb_run_name='')
    configurator.configure(g, ['--wandb_run_name=lr=1e-4,bs=16', '--out_dir=runs/a=b'])
    assert g['wandb_run_name'] == 'lr=1e-4,bs=16' and g['out_dir'] == 'runs/a=b'


def test_file_then_overrides(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text('batch_size = 8\nlearning_rate = 2e-4\nimport math\n_helper = 3\n')
    g = defaults()
    configurator.configure(g, [str(f), '--batch_size=4', '--lr=1e-3'])
    assert g['batch_size'] == 4 and g['learning_rate'] == 1e-3 and g['weight_decay'] == 0.01
    g = defaults()
    configurator.configure(g, [str(f)])
    assert g['batch_size'] == 8 and g['learning_rate'] == 2e-4
    g = defaults()
    configurator.configure(g, ['--lr=1e-4'])
    assert g['learning_rate'] == 1e-4
    g = defaults()
    configurator.configure(g, ['--batch-size=2', '--weight-decay=0.1'])  # dashes spell the same keys
    assert g['batch_size'] == 2 and g['weight_decay'] == 0.1


def test_bad_config_files(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text('batch_sise = 8\n')
    with pytest.raises(UserError) as e:
        configurator.configure(defaults(), [str(bad)])
    assert "'batch_size'" in str(e.value)
    with pytest.raises(UserError):
        configurator.configure(defaults(), [str(tmp_path / 'missing.py')])


@pytest.mark.parametrize('text, line, what', [
    ('batch_size = 8\n\nlearning_rate = (1e-3\n', 3, 'syntax error'),
    ('batch_size = 8\nimport math\n\nlearning_rate = math.log(-1)\n', 4, 'ValueError'),
    ('def lr():\n    return 1 / 0\n\n\nlearning_rate = lr()\n', 2, 'ZeroDivisionError'),
])
def test_a_broken_config_file_is_one_line_with_file_and_line(tmp_path, text, line, what):
    f = tmp_path / 'broken.py'
    f.write_text(text)
    with pytest.raises(UserError) as e:
        configurator.configure(defaults(), [str(f)])
    msg = str(e.value)
    assert msg.startswith(f'{f}:{line}:') and what in msg and '\n' not in msg, msg


def test_a_config_path_that_is_a_directory_or_missing_is_one_line(tmp_path):
    for path, what in ((tmp_path, 'directory'), (tmp_path / 'missing.py', 'not found')):
        with pytest.raises(UserError) as e:
            configurator.configure(defaults(), [str(path)])
        assert str(path) in str(e.value) and what in str(e.value) and '\n' not in str(e.value), str(e.value)

# -----------------------------------------------------------------------------
# Atomic writes: whatever goes wrong in the middle of writing a file (an exception in the
# writer, a failed rename, a full disk), the previous file is left intact and no temp file
# stays behind; a full disk is a one-line UserError that names the file.


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
    monkeypatch.setattr(configurator.os, 'replace', fail)
    with pytest.raises(UserError, match='input/output error'):
        atomic_write_bytes(str(old), b'new')
    assert_untouched(old)


@pytest.mark.parametrize('code, words', [(errno.ENOSPC, 'disk full'), (errno.EDQUOT, 'disk quota exceeded')])
def test_disk_full_is_one_line_naming_the_file(old, code, words):
    with pytest.raises(UserError) as e:
        atomic_write(str(old), half_then(OSError(code, os.strerror(code))))
    msg = str(e.value)
    assert words in msg and 'GiB free there' in msg and str(old) in msg and '\n' not in msg, msg
    assert_untouched(old)


def test_torch_save_failures_keep_the_old_checkpoint(old, monkeypatch):
    with pytest.raises(Exception):
        atomic_torch_save({'f': lambda: 0}, str(old))  # cannot be pickled: fails while serialising
    assert_untouched(old)

    def full(fd):  # the disk fills up: on many file systems the error arrives at fsync
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(configurator.os, 'fsync', full)
    with pytest.raises(UserError, match='disk full'):
        atomic_torch_save({'w': torch.zeros(1000)}, str(old))
    assert_untouched(old)


def test_atomic_torch_save_round_trips(tmp_path):
    path = tmp_path / 'ckpt.pt'
    atomic_torch_save({'w': torch.arange(5)}, str(path))
    atomic_torch_save({'w': torch.arange(6)}, str(path))  # over an existing file
    assert torch.load(path, weights_only=True)['w'].tolist() == list(range(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pt']


# -----------------------------------------------------------------------------
# One line, whole words


def test_a_long_cause_is_cut_after_its_first_sentence_or_at_a_word():
    """What a failed load says must fit a line without cutting its cause mid-word."""
    accelerate = ('Using a `device_map`, `tp_plan`, `torch.device` context manager or setting '
                  '`torch.set_default_device(device)` requires `accelerate`. You can install it with '
                  '`pip install accelerate` and then restart your session, or the loading goes through host memory.')
    assert first_line(ValueError(accelerate)).endswith('requires `accelerate`.')
    words = ' '.join(['segmentation'] * 40)
    cut = first_line(RuntimeError(words), 100)
    assert len(cut) <= 100 and cut.endswith('...') and set(cut[:-3].split()) == {'segmentation'}
    assert first_line(KeyError()) == 'KeyError' and first_line(OSError('a\nb')) == 'a'


def test_an_out_dir_that_cannot_be_a_folder_is_one_line(tmp_path):
    (tmp_path / 'file').write_text('x')
    for bad in (tmp_path / 'file', tmp_path / 'file' / 'sub' / 'deeper'):
        with pytest.raises(UserError, match="is a file") as e:
            configurator.check_out_dir(str(bad))
        assert '\n' not in str(e.value)
    configurator.check_out_dir(str(tmp_path / 'new' / 'run'))  # to be made: fine
    configurator.check_out_dir(str(tmp_path))


def test_leave_flushes_and_exits_without_the_teardown():
    """A DDP rank ends through leave(): its output so far is out (no newline needed), the exit
    code is the one given, and no exit handler (the teardown that aborts) runs."""
    code = ("import atexit, sys, configurator; atexit.register(print, 'teardown'); print('work', end=''); "
            "print('note', end='', file=sys.stderr); configurator.leave(3)")
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (3, 'work', 'note')
