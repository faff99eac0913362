"""
Tests for sources/shards.py (and the shard readers of sources/images.py): WebDataset tar shards
as an image-caption source.

$ python -m pytest -q tests/test_shards.py          # a few seconds on 2 CPU cores

Shards come from write_shards (the img2dataset layout: pax headers, sorted suffixes) or are
built member by member with tarfile where a test needs an odd layout. tarfile is the oracle
for offsets: scan_shard's must equal TarInfo.offset_data.
"""
import hashlib
import io
import json
import multiprocessing as mp
import os
import tarfile

import numpy as np
import pytest

from sources import images as I
from sources import shards as S


def fake_images(n, seed=0):
    """Distinct byte strings standing in for JPEGs (the scan never decodes): sizes around and
    on 512-byte boundaries, so padding arithmetic gets exercised."""
    rng = np.random.default_rng(seed)
    sizes = [511, 512, 513, 1, 1024, 3000, 10240, 700]
    return [rng.integers(0, 256, sizes[i % len(sizes)], dtype=np.uint8).tobytes() for i in range(n)]


@pytest.fixture
def written(tmp_path):
    """25 samples in shards of 10 (3 shards), with a sample whose caption is None."""
    imgs = fake_images(25)
    caps = [f'caption {i} é' for i in range(25)]
    caps[7] = None  # img2dataset writes no .txt and "caption": null
    paths = S.write_shards(str(tmp_path / 'cc'), list(zip(imgs, caps)), per_shard=10)
    return tmp_path / 'cc', paths, imgs, caps


def make_tar(path, members, fmt=tarfile.PAX_FORMAT):
    """members: (name, bytes) regular files, or (name, None) for a directory."""
    with tarfile.open(path, 'w', format=fmt) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return str(path)


def reasons(problems):
    return sorted((r, d) for r, _, d in problems)

# -----------------------------------------------------------------------------
# expand_shards


def test_folder_glob_brace_give_the_same_shards(written):
    d, paths, _, _ = written
    by_folder, m0 = S.expand_shards(str(d))
    by_glob, m1 = S.expand_shards(str(d / '*.tar'))
    by_brace, m2 = S.expand_shards(str(d / '{00000..00002}.tar'))
    assert by_folder == by_glob == by_brace == [os.path.abspath(p) for p in paths]
    assert m0 == m1 == m2 == 0
    assert all(p.endswith('.tar') for p in by_folder)  # not the .parquet / _stats.json beside them


def test_brace_range_missing_lists_and_errors(written, tmp_path):
    d, paths, _, _ = written
    got, missing = S.expand_shards(str(d / '{00000..00005}.tar'))
    assert got == paths and missing == 3
    got, missing = S.expand_shards(str(d / '{00002,00000}.tar'))
    assert got == [paths[2], paths[0]] and missing == 0
    assert S.expand_shards(paths[1]) == ([paths[1]], 0)
    with pytest.raises(ValueError, match='brace pattern'):
        S.expand_shards(str(d / '{00010..00019}.tar'))
    with pytest.raises(ValueError, match='glob'):
        S.expand_shards(str(d / '*.tgz'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match=r'no \*\.tar files in folder'):
        S.expand_shards(str(tmp_path / 'empty'))
    with pytest.raises(ValueError, match='file or folder'):
        S.expand_shards(str(tmp_path / 'nope.tar'))


def test_brace_expansion_rules():
    assert S.expand_braces('{00008..00011}.tar') == ['00008.tar', '00009.tar', '00010.tar', '00011.tar']
    assert S.expand_braces('{8..11}') == ['8', '9', '10', '11']
    assert S.expand_braces('{3..1}') == ['3', '2', '1']
    assert S.expand_braces('{a,b}/{0..1}') == ['a/0', 'a/1', 'b/0', 'b/1']
    assert S.expand_braces('x{a,{1..2}}y') == ['xay', 'x1y', 'x2y']
    assert S.expand_braces('lit{x}{0..1}') == ['lit{x}0', 'lit{x}1']

# -----------------------------------------------------------------------------
# scan_shard


def test_scan_reads_back_the_written_bytes(written):
    _, paths, imgs, caps = written
    k = 0
    for p in paths:
        samples, problems = S.scan_shard(p)
        with tarfile.open(p) as tf:
            oracle = {m.name: (m.offset_data, m.size) for m in tf}
        for key, off, size, ext, cap in zip(samples['keys'], samples['offsets'], samples['sizes'],
                                            samples['exts'], samples['captions']):
            while caps[k] is None:  # reported, below
                k += 1
            assert (int(off), int(size)) == oracle[f'{key}.jpg']
            assert I.read_member(p, off, size) == imgs[k]
            assert cap == caps[k] and S.IMAGE_EXTS[ext] == 'jpg'
            assert key == f'{k // 10:05d}{k % 10}'  # img2dataset's '{shard:05d}{i:0Nd}'
            k += 1
        assert samples['offsets'].dtype == np.int64 and samples['exts'].dtype == np.uint8
        assert problems == ([('no_caption', p, '000007')] if p == paths[0] else [])
    assert k == 25


@pytest.mark.parametrize('fmt', [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_caption_precedence_and_sample_problems(tmp_path, fmt):
    img = b'\xff\xd8' + bytes(600)
    long_dir = 'd' * 60 + '/' + 'e' * 60  # > 100 chars: pax path / GNU longname / ustar prefix
    members = [
        ('a.jpg', img), ('a.json', json.dumps({'caption': 'from json'}).encode()), ('a.txt', b'from txt'),
        ('b.json', json.dumps({'caption': 'json only', 'key': 'b'}).encode()), ('b.png', img),
        ('c.jpg', img), ('c.json', b'{"caption": null}'),
        ('d.txt', b'caption but no image'),
        ('e.JPEG', img), ('e.txt', b'\xff\xfe not utf-8'),
        ('f.webp', img), ('f.json', b'{not json'),
        ('g.jpg', img),
        ('sub/', None), ('sub/dir/h.jpg', img), ('sub/dir/h.txt', 'in a folder ü'.encode()),
        (f'{long_dir}/x.jpg', img), (f'{long_dir}/x.txt', b'long name'),
        ('00000_stats.json', b'{"count": 1}'), ('00000.parquet', b'PAR1'), ('README', b'no dot'),
        ('i.jpg', b''), ('i.txt', b'empty image'),
        ('j.jpg', img), ('j.jpg', img), ('j.txt', b'two images'),
        ('k.json', b'{"caption": 3}'), ('k.jpg', img),
        ('m.jpg', img), ('m.seg.png', img), ('m.txt', b'key up to the first dot'),  # m.seg.png: key m, ext seg.png
        ('a.jpg', img), ('a.txt', b'again'),
    ]
    p = make_tar(tmp_path / 'odd.tar', members, fmt)
    samples, problems = S.scan_shard(p)
    got = dict(zip(samples['keys'], samples['captions']))
    assert got == {'a': 'from txt', 'b': 'json only', 'sub/dir/h': 'in a folder ü', f'{long_dir}/x': 'long name',
                   'j': 'two images', 'm': 'key up to the first dot'}
    assert [S.IMAGE_EXTS[e] for e in samples['exts']] == ['jpg', 'png', 'jpg', 'jpg', 'jpg', 'jpg']
    assert reasons(problems) == [('bad_caption', 'e'), ('bad_caption', 'f'), ('bad_caption', 'k'),
                                 ('duplicate_key', 'a'), ('duplicate_member', 'j'), ('empty_image', 'i'),
                                 ('no_caption', 'c'), ('no_caption', 'g'), ('no_image', 'd')]
    for off, size in zip(samples['offsets'], samples['sizes']):
        assert I.read_member(p, off, size) == img


def damaged(tmp_path, written, cut):
    """A copy of the first shard, cut at byte `cut` (an int) or with bytes overwritten."""
    src = written[1][0]
    data = open(src, 'rb').read()
    dst = tmp_path / 'damaged.tar'
    dst.write_bytes(cut(data) if callable(cut) else data[:cut])
    return str(dst)


def test_damaged_shards_keep_the_samples_before_the_damage(tmp_path, written):
    _, paths, imgs, caps = written
    with tarfile.open(paths[0]) as tf:
        m = {ti.name: ti for ti in tf}
    jpg5, txt4 = m['000005.jpg'], m['000004.txt']
    cases = {  # cut -> number of samples kept
        'mid-image': (jpg5.offset_data + jpg5.size // 2, 5),
        'mid-pax-header': (jpg5.offset + 100, 5),
        'mid-ustar-header': (jpg5.offset_data - 412, 5),
        'between members': (jpg5.offset, 5),
        'mid-caption (falls back to .json)': (txt4.offset_data + 3, 5),
        'last image cut by one byte': (m['000009.jpg'].offset_data + m['000009.jpg'].size - 1, 8),
        'garbage header': (lambda b: b[:jpg5.offset] + os.urandom(512) + b[jpg5.offset + 512:], 5),
        'no end marker': (lambda b: b.rstrip(b'\0'), 9),
        'zeroed tail': (lambda b: b[:jpg5.offset] + bytes(len(b) - jpg5.offset + 100000), 5),
    }
    for what, (cut, n_kept) in cases.items():
        p = damaged(tmp_path, written, cut)
        samples, problems = S.scan_shard(p)
        corrupt = [d for r, _, d in problems if r == 'corrupt_shard']
        assert len(corrupt) == 1, (what, problems)
        assert len(samples['keys']) == n_kept, (what, samples['keys'], problems)
        size = os.path.getsize(p)
        for i, (off, n) in enumerate(zip(samples['offsets'], samples['sizes'])):
            assert off + n <= size
            k = int(samples['keys'][i])
            assert I.read_member(p, off, n) == imgs[k] and samples['captions'][i] == caps[k], what


def test_not_a_tar_never_raises(tmp_path, written):
    d = written[0]
    cases = {'zero-byte': b'', 'garbage': os.urandom(5000), 'short garbage': b'hello',
             'zeros': bytes(2048), 'json named .tar': open(d / '00000_stats.json', 'rb').read()}
    for what, data in cases.items():
        p = tmp_path / f'{what}.tar'
        p.write_bytes(data)
        samples, problems = S.scan_shard(str(p))
        assert len(samples['keys']) == 0 and samples['offsets'].shape == (0,)
        if what == 'zeros':  # an empty archive: two end blocks and nothing else
            assert problems == []
        else:
            assert [r for r, _, _ in problems] == ['corrupt_shard'], what
    samples, problems = S.scan_shard(str(tmp_path / 'missing.tar'))
    assert [r for r, _, _ in problems] == ['corrupt_shard'] and 'FileNotFoundError' in problems[0][2]

# -----------------------------------------------------------------------------
# ShardFiles


def open_tars():
    """How many of this process's file descriptors point at a .tar file."""
    n = 0
    for fd in os.listdir('/proc/self/fd'):
        try:
            n += os.readlink(f'/proc/self/fd/{fd}').endswith('.tar')
        except OSError:  # the listing's own fd, gone by now
            pass
    return n


_FILES = None  # set before the fork: workers inherit it, as DataLoader workers inherit the dataset


def _worker_read(jobs):
    out = [hashlib.sha1(_FILES.read(s, o, n)).hexdigest() for s, o, n in jobs]
    return os.getpid(), out, _FILES.n_open(), open_tars()


def test_shardfiles_reads_through_forked_workers_with_a_handle_cap(written):
    global _FILES
    _, paths, imgs, caps = written
    jobs, want = [], []
    for s, p in enumerate(paths):
        samples, _ = S.scan_shard(p)
        for key, off, size in zip(samples['keys'], samples['offsets'], samples['sizes']):
            jobs.append((s, int(off), int(size)))
            want.append(hashlib.sha1(imgs[int(key)]).hexdigest())
    _FILES = I.ShardFiles(paths, max_open=2)
    assert open_tars() == 0
    assert [hashlib.sha1(_FILES.read(*j)).hexdigest() for j in jobs] == want
    assert _FILES.n_open() == open_tars() == 2
    rng = np.random.default_rng(0)
    order = rng.permutation(len(jobs))  # shards interleaved: the LRU has to evict
    chunks = [[jobs[i] for i in order[k::4]] for k in range(4)]
    with mp.get_context('fork').Pool(2) as pool:
        results = pool.map(_worker_read, chunks, chunksize=1)
    assert len({pid for pid, _, _, _ in results} - {os.getpid()}) >= 1
    for k, (pid, got, n_open, n_fds) in enumerate(results):
        assert got == [want[i] for i in order[k::4]]
        assert n_open <= 2 and n_fds == n_open  # the inherited copies were closed
    # the parent's handles survive the workers closing their inherited copies
    assert _FILES.n_open() == 2 and _FILES.read(*jobs[-1]) == imgs[int(S.scan_shard(paths[-1])[0]['keys'][-1])]
    _FILES.close()
    assert open_tars() == 0


def test_read_member_sources(written):
    _, paths, imgs, _ = written
    samples, _ = S.scan_shard(paths[0])
    off, size = samples['offsets'][2], samples['sizes'][2]
    with open(paths[0], 'rb') as f:
        f.seek(7)
        assert I.read_member(f, off, size) == imgs[2] and f.tell() == 7  # position untouched
        assert I.read_member(f.fileno(), off, size) == imgs[2]
    with pytest.raises(OSError, match='short read'):
        I.read_member(paths[0], os.path.getsize(paths[0]) - 10, 100)


def test_random_cuts_and_flips_never_raise(tmp_path, written):
    """Every cut point keeps exactly the samples whose members all precede it (a cut caption
    falls back to the .json); a flipped byte anywhere never raises nor points outside the file."""
    src = written[1][0]
    data = open(src, 'rb').read()
    with tarfile.open(src) as tf:
        ends = {}  # key -> end of its image's data
        for ti in tf:
            if ti.name.endswith('.jpg'):
                ends[ti.name[:-4]] = ti.offset_data + ti.size
        trailer = ti.offset_data + -(-ti.size // 512) * 512  # where the end-of-archive marker starts
    rng = np.random.default_rng(0)
    p = tmp_path / 'fuzz.tar'
    for cut in rng.integers(0, len(data), 150):
        p.write_bytes(data[:cut])
        samples, problems = S.scan_shard(str(p))
        # a cut after the first zero block leaves a complete archive
        assert [r for r, _, _ in problems].count('corrupt_shard') == (cut < trailer + 512)
        assert all(ends[k] <= cut for k in samples['keys'])
        # all but the sample being cut, and the one without a caption, survive
        assert len(samples['keys']) >= sum(e <= cut for k, e in ends.items() if k != '000007') - 1
    for pos in rng.integers(0, len(data), 150):
        b = bytearray(data)
        b[pos] ^= 1 << int(rng.integers(0, 8))
        p.write_bytes(bytes(b))
        samples, problems = S.scan_shard(str(p))
        assert all(o + n <= len(b) for o, n in zip(samples['offsets'], samples['sizes']))
