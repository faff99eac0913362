"""
Tests of `prepare_llava.py --shards` (WebDataset tar shards as img2dataset writes them,
indexed in place): the same pairs as shards or as a LLaVA json + images folder prepare to
the same arrays, whatever way the shards are named; training reads the same pixels from the
tars as from the folder; damaged shards keep their complete samples; verification and
packing work on shards; records without a caption or an image are counted.

$ python -m pytest -q tests/test_prepare_shards.py
"""
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
from sources import images
import prepare_llava as P
from sources import shards
from sources import backbones as B
from conftest import load_prepared, tiny_builder

COLOURS = ['red', 'green', 'blue', 'yellow', 'purple', 'orange', 'white', 'pink']
PLACES = ['at the top left', 'in the center', 'at the bottom right']
CAPTIONS = [f'a {c} circle {p}.' for p in PLACES for c in COLOURS][:22]
# messy records the filters must treat alike in both layouts
MESSY = [CAPTIONS[3], 'a RED circle, at the top left!', 'a stock photo of a red star.', 'a star', None]
ARRAYS = ('train_tokens.bin', 'val_tokens.bin', 'train_index.npy', 'val_index.npy')


def jpeg(seed, size=24):
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size + seed % 5, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def llava(folder, pairs, name=P.LLAVA_JSON):
    """pairs written as a LLaVA json + images/ folder under `folder`."""
    (folder / 'images').mkdir(parents=True, exist_ok=True)
    records = []
    for k, (raw, cap) in enumerate(pairs):
        (folder / 'images' / f'{k:03d}.jpg').write_bytes(raw)
        records.append(dict(id=str(k), image=f'{k:03d}.jpg', conversations=[
            {'from': 'human', 'value': '<image>\nDescribe it.'}, {'from': 'gpt', 'value': cap}]))
    (folder / name).write_text(json.dumps(records))
    return folder / name


@pytest.fixture(scope='module')
def both(tmp_path_factory):
    """27 pairs (22 clean, 5 messy) as 3 shards of 10 and as a LLaVA json: (root, pairs)."""
    d = tmp_path_factory.mktemp('both')
    pairs = [(jpeg(k), c) for k, c in enumerate(CAPTIONS + MESSY)]
    shards.write_shards(str(d / 'tars'), pairs, per_shard=10)
    llava(d / 'llava', pairs)
    return d, pairs


def prepare(*argv):
    return P.main(['--tokenizer=tiny', '--val_ratio=0.2', '--workers=1', *map(str, argv)])


def assert_same_dataset(a, b, ignore=()):
    """Two prepared folders hold the same samples: tokens, index, splits, golden, filters."""
    ma, arr_a = load_prepared(a)
    mb, arr_b = load_prepared(b)
    for name in ARRAYS:
        assert arr_a[name].dtype == arr_b[name].dtype and np.array_equal(arr_a[name], arr_b[name]), name
    for key in ('splits', 'golden', 'n_images', 'counts', 'filters', 'tokenizer', 'eos_id', 'slot_id'):
        if key not in ignore:
            assert ma[key] == mb[key], key

# -----------------------------------------------------------------------------
# same arrays as the LLaVA layout


@pytest.mark.parametrize('spec', ['folder', 'glob', 'brace'])
def test_shards_prepare_like_the_llava_layout(both, tmp_path, spec):
    d, _ = both
    given = {'folder': d / 'tars', 'glob': d / 'tars' / '*.tar', 'brace': d / 'tars' / '{00000..00002}.tar'}[spec]
    ref = tmp_path / 'ref'
    prepare('--data_dir', d / 'llava', '--out_dir', ref)
    meta = prepare('--shards', given, '--out_dir', tmp_path / 'sh')
    assert_same_dataset(ref, tmp_path / 'sh')
    assert meta['filters']['duplicate'] == 2 and meta['filters']['empty_caption'] == 1  # the messy ones
    assert meta['image_kind'] == 'shards' and meta['shards'] == ['00000.tar', '00001.tar', '00002.tar']
    locs = np.load(tmp_path / 'sh' / 'image_locs.npy')
    assert locs.shape == (meta['n_images'], 3) and locs.dtype == np.int64


def test_shards_default_out_dir_is_beside_them(both):
    d, _ = both
    meta = prepare('--shards', d / 'tars')
    assert meta['image_kind'] == 'shards' and (d / 'tars' / 'prepared' / 'meta.json').exists()
    shutil.rmtree(d / 'tars' / 'prepared')


def test_shard_pixels_through_loader_workers_equal_the_folder(both, tmp_path):
    d, _ = both
    prepare('--data_dir', d / 'llava', '--out_dir', tmp_path / 'ref')
    prepare('--shards', d / 'tars', '--out_dir', tmp_path / 'sh')
    tok = B.load_tokenizer('tiny')
    spec = images.pack_spec(48)
    got = []
    for out in ('ref', 'sh'):
        ds = data.CaptionDataset(data.open_prepared(str(tmp_path / out)), 'train', tiny_builder(tok), spec)
        batches = [[(i,) for i in range(k, min(k + 4, len(ds)))] for k in range(0, len(ds), 4)]
        got.append([(b['images'], b['input_ids']) for b in data.make_loader(ds, batches, num_workers=2)])
    assert len(got[0]) == len(got[1]) >= 4
    for (ia, ta), (ib, tb) in zip(*got):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)

# -----------------------------------------------------------------------------
# damage, verification, packing, incomplete records


def test_damaged_shards_keep_their_complete_samples(both, tmp_path):
    """A shard cut in the middle of sample 15's image and a garbage .tar: each is one
    'corrupt_shard', and what remains is exactly the pairs before the cut plus the other shards."""
    d, pairs = both
    shutil.copytree(d / 'tars', tmp_path / 'tars')
    with tarfile.open(tmp_path / 'tars' / '00001.tar') as tf:
        m = tf.getmember('000015.jpg')
    raw = (tmp_path / 'tars' / '00001.tar').read_bytes()
    (tmp_path / 'tars' / '00001.tar').write_bytes(raw[:m.offset_data + m.size // 2])
    (tmp_path / 'tars' / '00003.tar').write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    meta = prepare('--shards', tmp_path / 'tars', '--out_dir', tmp_path / 'sh')
    assert meta['filters']['corrupt_shard'] == 2
    llava(tmp_path / 'survivors', pairs[:15] + pairs[20:])
    ref = prepare('--data_dir', tmp_path / 'survivors', '--out_dir', tmp_path / 'ref')
    assert meta['counts']['kept'] == ref['counts']['kept'] == 15 + 2  # the 5 messy ones are after the cut
    assert_same_dataset(tmp_path / 'ref', tmp_path / 'sh', ignore=('filters',))
    assert meta['filters'] == {**ref['filters'], 'corrupt_shard': 2}


def test_verify_and_pack_images_on_shards(tmp_path):
    good = [(jpeg(k), c) for k, c in enumerate(CAPTIONS[:6])]
    bad = [(b'not an image at all' * 20, 'a red star at the top left.'),
           (jpeg(9, size=4), 'a blue star in the center.')]
    shards.write_shards(str(tmp_path / 'tars'), good[:3] + bad + good[3:], per_shard=4)
    meta = P.main(['--shards', str(tmp_path / 'tars'), '--out_dir', str(tmp_path / 'v'), '--tokenizer=tiny',
                   '--verify_images', '--workers=2'])
    assert (meta['filters']['undecodable_image'], meta['filters']['tiny_image']) == (1, 1)
    assert meta['counts']['kept'] == 6 and meta['image_kind'] == 'shards'
    meta = P.main(['--shards', str(tmp_path / 'tars'), '--out_dir', str(tmp_path / 'p'), '--tokenizer=tiny',
                   '--pack_images', '--workers=2'])
    assert meta['image_kind'] == 'packed' and meta['counts']['kept'] == 6  # packing implies verification
    p = data.open_prepared(str(tmp_path / 'p'))
    reader = images.ImageReader(p['dir'], p['meta'], p['image_paths'], p['root'])
    assert sorted(reader.read(i) for i in range(6)) == sorted(raw for raw, _ in good)  # original bytes


def test_records_without_caption_or_image_are_counted(tmp_path):
    members = [('a.jpg', jpeg(1)),  # no caption
               ('b.txt', b'a red circle at the top left.'),  # no image
               ('c.jpg', jpeg(2)), ('c.txt', b'\xff\xfe not utf-8'),  # caption not text
               ('d.jpg', b''), ('d.txt', b'a blue square in the center.'),  # empty image
               ('e.jpg', jpeg(3)), ('e.txt', b'two green stars at the bottom right.')]
    (tmp_path / 'tars').mkdir()
    with tarfile.open(tmp_path / 'tars' / '00000.tar', 'w') as tf:
        for name, raw in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(raw)
            tf.addfile(ti, io.BytesIO(raw))
    meta = P.main(['--shards', str(tmp_path / 'tars'), '--out_dir', str(tmp_path / 'o'), '--tokenizer=tiny'])
    f = meta['filters']
    assert (f['empty_caption'], f['malformed_keys'], f['malformed_text'], f['zero_byte_image']) == (1, 1, 1, 1)
    assert meta['counts'] == {'records': 5, 'kept': 1}
