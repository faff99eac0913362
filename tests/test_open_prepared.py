"""
Tests of data.open_prepared on damaged prepared folders: every file cut short, missing or
corrupt is refused when the dataset is opened (O(1) size checks, no scan of the arrays), as
one UserError that names the file and says to run prepare again, never as empty captions or
a crash in the middle of a run.

$ python -m pytest -q tests/test_open_prepared.py
"""
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import data
import prepare_llava as P
from sources import shards
from configurator import UserError
from conftest import assert_one_error_line, run_script, train_args

CAPTIONS = ['a red circle at the top left.', 'a blue square at the bottom right.', 'two green stars in the center.',
            'a yellow triangle on the left.', 'a white cross on the right.', 'an orange diamond at the top.',
            'a pink circle at the bottom.', 'three purple squares on the left.']


def jpeg(seed):
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format='JPEG')
    return buf.getvalue()


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    """The same 8 pairs prepared three ways: {'folder' | 'packed' | 'shards': prepared dir}."""
    d = tmp_path_factory.mktemp('open')
    (d / 'images').mkdir()
    pairs = [(jpeg(k), c) for k, c in enumerate(CAPTIONS)]
    for k, (raw, _) in enumerate(pairs):
        (d / 'images' / f'{k}.jpg').write_bytes(raw)
    records = [dict(id=str(k), image=f'{k}.jpg', conversations=[{'from': 'human', 'value': '<image>'},
                                                                {'from': 'gpt', 'value': c}])
               for k, c in enumerate(CAPTIONS)]
    (d / P.LLAVA_JSON).write_text(json.dumps(records))
    shards.write_shards(str(d / 'shards'), pairs, per_shard=4)
    common = ['--tokenizer=tiny', '--val_ratio=0.3', '--workers=1']
    P.main(['--data_dir', str(d), '--out_dir', str(d / 'folder'), *common])
    P.main(['--data_dir', str(d), '--out_dir', str(d / 'packed'), '--pack_images', *common])
    P.main(['--shards', str(d / 'shards'), '--out_dir', str(d / 'shards_prepared'), *common])
    out = {'folder': d / 'folder', 'packed': d / 'packed', 'shards': d / 'shards_prepared'}
    for p in out.values():
        data.open_prepared(str(p))  # intact: opens
    return out


def cut(n):
    """Damage: drop the last n bytes of the file."""
    def f(path):
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) - n])
    return f


def grow(n):
    """Damage: n bytes too many (a file of another preparation, or two runs written into one)."""
    def f(path):
        path.write_bytes(path.read_bytes() + bytes(n))
    return f


def remove(path):
    path.unlink()


def garbage(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())


def drop_meta_key(key):
    def f(path):
        meta = json.loads(path.read_text())
        del meta[key]
        path.write_text(json.dumps(meta))
    return f


def wrong_shape(path):
    np.save(path, np.load(path)[:, :2])


# (source kind, file, damage)
CASES = {
    'train tokens cut': ('folder', 'train_tokens.bin', cut(4)),
    'val tokens cut': ('folder', 'val_tokens.bin', cut(4)),
    'train tokens too long': ('folder', 'train_tokens.bin', grow(4)),
    'train tokens missing': ('folder', 'train_tokens.bin', remove),
    'image paths missing': ('folder', 'image_paths.npy', remove),
    'train index missing': ('folder', 'train_index.npy', remove),
    'train index corrupt': ('folder', 'train_index.npy', garbage),
    'train index cut': ('folder', 'train_index.npy', cut(16)),
    'val index cut': ('folder', 'val_index.npy', cut(8)),
    'meta truncated': ('folder', 'meta.json', cut(20)),
    'meta without splits': ('folder', 'meta.json', drop_meta_key('splits')),
    'meta without image_kind': ('folder', 'meta.json', drop_meta_key('image_kind')),
    'packed images cut': ('packed', 'images_packed.bin', cut(100)),
    'packed images too long': ('packed', 'images_packed.bin', grow(100)),
    'packed offsets missing': ('packed', 'images_packed_offsets.npy', remove),
    'shard locations wrong shape': ('shards', 'image_locs.npy', wrong_shape),
    'shard locations missing': ('shards', 'image_locs.npy', remove),
}


@pytest.mark.parametrize('case', list(CASES))
def test_damaged_prepared_folder_is_one_user_error_at_open(prepared, tmp_path, case):
    kind, name, damage = CASES[case]
    d = tmp_path / 'prepared'
    shutil.copytree(prepared[kind], d)
    damage(d / name)
    with pytest.raises(UserError) as e:
        data.open_prepared(str(d))
    msg = str(e.value)
    assert name in msg, msg  # names the damaged file
    assert 'prepare_llava.py' in msg and 'again' in msg, msg  # and what to do
    assert '\n' not in msg


def test_tokens_are_memory_mapped_not_read(prepared):
    """Opening costs O(1): token arrays are memmaps, indexes mmapped .npy files."""
    p = data.open_prepared(str(prepared['folder']))
    tokens, index = p['train']
    assert isinstance(tokens, np.memmap) and isinstance(index, np.memmap)
    assert len(index) == p['meta']['splits']['train'] and int(index[:, 1].sum()) == len(tokens)


def test_train_on_cut_tokens_is_one_error_line(synthetic, tmp_path):
    d = tmp_path / 'prepared'
    shutil.copytree(synthetic, d)
    meta = json.loads((d / 'meta.json').read_text())
    meta['image_root'] = str(synthetic.parent / 'images')  # the copy still finds its images
    (d / 'meta.json').write_text(json.dumps(meta))
    cut(4)(d / 'train_tokens.bin')
    p = run_script(train_args(d, tmp_path / 'out', '--max_iters=2'), timeout=120)
    assert_one_error_line(p, 'train_tokens.bin', 'again')
    assert not (tmp_path / 'out' / 'ckpt.pt').exists()
