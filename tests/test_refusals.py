"""
A refusal of the operating system, wherever a user's path is written to, is one line that
names the path, says why in words (disk full, name too long, read-only, quota) and what to do,
before any expensive work: train.py's out_dir, sample.py's --out / --export / --export_hf,
prepare_llava.py's --out_dir (given or its default). The faults are injected into each script
(os.mkdir / os.makedirs, or the first file opened for writing, fail with the errno), and made
real on a tiny file system that is full (a tmpfs in a mount namespace of the test's own;
skipped where the machine does not allow one).

$ python -m pytest -q tests/test_refusals.py
"""
import errno
import json
import shutil
import subprocess
import sys

import pytest

from configurator import OS_REASONS
from conftest import ENV, ROOT, assert_one_error_line, train_args
from test_train import run_forked

# injected into a script's process before it runs: every way it makes a folder (`mkdir`), or
# every file it opens to write (`write`), under `prefix` fails with errno `code`
REFUSE = r'''
import builtins, io, os
prefix, code, where = %r, %d, %r
def refuse(path):
    if not isinstance(path, int) and os.path.abspath(os.fsdecode(path)).startswith(prefix):
        raise OSError(code, os.strerror(code), os.fsdecode(path))
if where == 'mkdir':
    for name in ('mkdir', 'makedirs'):
        def fake(path, *a, _real=getattr(os, name), **k):
            refuse(path)
            return _real(path, *a, **k)
        setattr(os, name, fake)
else:
    real_open, real_os_open = builtins.open, os.open
    def fake_open(file, mode='r', *a, **k):
        if set(str(mode)) & set('wax+'):
            refuse(file)
        return real_open(file, mode, *a, **k)
    def fake_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *a, **k)
    builtins.open = io.open = fake_open
    os.open = fake_os_open
'''
CODES = (errno.ENOSPC, errno.ENAMETOOLONG, errno.EROFS, errno.EDQUOT)


def script_cases(synthetic, demo_run, tmp):
    """{name: (argv, the folder refused, the path the line must name, what must not have
    started)} for each script and way a folder is written to. `mkdir` cases name a folder to be
    made; `write` cases an existing one (caps.jsonl's folder is kept readable)."""
    caps = tmp / 'captions'
    caps.mkdir()
    img = next((synthetic.parent / 'images').rglob('*.jpg'))
    shutil.copy(img, caps / 'a.jpg')
    (caps / 'caps.jsonl').write_text(json.dumps({'image': 'a.jpg', 'caption': 'a red circle at the top.'}) + '\n')
    new, there = tmp / 'new' / 'run', tmp / 'there'
    there.mkdir()
    ckpt = demo_run / 'ckpt.pt'
    out = {}
    for where, folder in (('mkdir', new), ('write', there)):
        out[f'train {where}'] = (train_args(synthetic, folder), folder, 'model:')
        out[f'sample --export_hf {where}'] = (['sample.py', '--ckpt', ckpt, '--export_hf', folder], folder, 'exported')
        out[f'sample --out {where}'] = (['sample.py', '--ckpt', ckpt, '--eval', '--out', folder], folder, 'report')
        out[f'prepare --out_dir {where}'] = (['prepare_llava.py', '--json', caps / 'caps.jsonl', '--out_dir', folder],
                                             folder, 'read 1 records')
    # prepare_llava.py's default out_dir (<the JSONL's folder>/prepared) is checked as well
    out['prepare default out_dir'] = (['prepare_llava.py', '--json', caps / 'caps.jsonl'], caps / 'prepared',
                                      'read 1 records')
    return out


@pytest.fixture(scope='module')
def refused(synthetic, demo_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('refused')
    cases = script_cases(synthetic, demo_run, tmp)
    jobs, pre, want = {}, {}, {}
    for name, (argv, folder, not_started) in cases.items():
        for code in CODES:
            where = 'write' if name.endswith('write') else 'mkdir'
            prefix = folder.parent if where == 'mkdir' else folder  # tmp/new is made, tmp/there is written in
            jobs[f'{name} {errno.errorcode[code]}'] = argv
            pre[f'{name} {errno.errorcode[code]}'] = REFUSE % (str(prefix), code, where)
            want[f'{name} {errno.errorcode[code]}'] = (folder, code, not_started)
    return run_forked(jobs, tmp, alarm=120, pre=pre), want


def test_every_refusal_is_one_line_before_any_work(refused):
    done, want = refused
    assert len(done) == 9 * len(CODES)
    for name, p in done.items():
        folder, code, not_started = want[name]
        line = assert_one_error_line(p, str(folder), OS_REASONS[code], f'errno {code}')
        assert not_started not in p.stdout, (name, p.stdout[-1000:])
        assert 'give another' in line, line


def in_full_tmpfs(mount, args, size='256k'):
    """args run in a mount namespace of their own where the folder `mount` is a tmpfs filled
    to the last byte; skips where the machine does not allow one."""
    if not shutil.which('unshare'):
        pytest.skip('no unshare here')
    mount.mkdir()
    script = ('mount -t tmpfs -o size=%s tmpfs "$0" 2>/dev/null || exit 77; '
              'head -c 100M /dev/zero > "$0/filler" 2>/dev/null; exec "$@"' % size)
    p = subprocess.run(['unshare', '-rm', 'sh', '-c', script, str(mount), sys.executable, *map(str, args)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    if p.returncode == 77 or 'unshare failed' in p.stderr or 'Operation not permitted' in p.stderr:
        pytest.skip(f'no mount namespace here ({p.stderr.strip()[:100]})')
    return p


@pytest.mark.parametrize('script', ['train', 'sample', 'prepare'])
def test_a_real_full_disk_is_one_line(script, synthetic, demo_run, tmp_path):
    """On a file system with no byte left: the out_dir probe (a small file, fsynced) is refused
    with ENOSPC, before the model or the data is touched."""
    (tmp_path / 'caps.jsonl').write_text(json.dumps({'images': ['a.jpg'], 'caption': 'a red circle.'}) + '\n')
    shutil.copy(next((synthetic.parent / 'images').rglob('*.jpg')), tmp_path / 'a.jpg')
    full = tmp_path / 'full'
    args = {'train': train_args(synthetic, full / 'run'),
            'sample': ['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--export_hf', full / 'hf'],
            'prepare': ['prepare_llava.py', '--json', tmp_path / 'caps.jsonl', '--out_dir', full / 'prepared']}
    p = in_full_tmpfs(full, args[script])
    line = assert_one_error_line(p, str(full), 'disk full', '0.00 GiB free there', 'free space there')
    assert 'model:' not in p.stdout and 'read 1 records' not in p.stdout, line
