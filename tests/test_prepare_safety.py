"""
Tests of prepare_llava.py against hostile or broken input: image paths that leave the data
directory are dropped, counted and never read (folder, zip, caption JSONL), and one bad
record (a lone surrogate, a line nested 200,000 deep) never aborts a run, while a caption
file that is broken as a whole is one UserError line.

$ python -m pytest -q tests/test_prepare_safety.py
"""
import builtins
import io
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

import prepare_llava as P
from configurator import UserError
from conftest import load_prepared

GOOD = {'g0.jpg': 'a red circle at the top left.', 'g1.jpg': 'a blue square at the bottom right.',
        'sub/g2.jpg': 'two green triangles and one red star.'}
# each leaves the image root (data/images/ or data/images.zip) or names an absolute path
UNSAFE = ['/etc/passwd', '../x.jpg', 'a/../../x.jpg', 'sub/../../x.jpg', '../../outside.jpg']
UNSAFE_CAPTIONS = ['a yellow star at the top.', 'a white cross in the center.', 'a pink diamond on the left.',
                   'an orange circle on the right.', 'a purple square at the bottom.']


def jpeg(seed, size=20):
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=95)
    return buf.getvalue()


def llava_record(image, caption):
    return dict(id=image, image=image, conversations=[{'from': 'human', 'value': '<image>\nDescribe it.'},
                                                      {'from': 'gpt', 'value': caption}])


@pytest.fixture
def layout(tmp_path):
    """tmp/outside.jpg, tmp/data/{x.jpg, images/, images.zip, blip...json}: every unsafe path
    points at a real, decodable image (or /etc/passwd), so only the path rule can drop it.
    Also tmp/data/abs.json, whose one unsafe record is the absolute path of a good image."""
    data = tmp_path / 'data'
    (data / 'images' / 'sub').mkdir(parents=True)
    (tmp_path / 'outside.jpg').write_bytes(jpeg(100))
    (data / 'x.jpg').write_bytes(jpeg(101))
    with zipfile.ZipFile(data / 'images.zip', 'w') as zf:
        for k, name in enumerate(GOOD):
            (data / 'images' / name).write_bytes(jpeg(k))
            zf.writestr(name, jpeg(k))
    records = [llava_record(n, c) for n, c in GOOD.items()] + \
        [llava_record(n, c) for n, c in zip(UNSAFE, UNSAFE_CAPTIONS)]
    (data / P.LLAVA_JSON).write_text(json.dumps(records))
    inside_abs = str(data / 'images' / 'g0.jpg')
    (data / 'abs.json').write_text(json.dumps(records[:3] + [llava_record(inside_abs, UNSAFE_CAPTIONS[0])]))
    return tmp_path


@pytest.fixture
def accesses(monkeypatch):
    """Every path opened (builtins.open) or listed (os.listdir) in this process, resolved."""
    seen = {'open': set(), 'listdir': set()}
    real_open, real_listdir = builtins.open, os.listdir

    def spy_open(file, *a, **kw):
        if isinstance(file, (str, bytes, os.PathLike)):
            seen['open'].add(os.path.realpath(file))
        return real_open(file, *a, **kw)

    def spy_listdir(path='.'):
        if isinstance(path, (str, bytes, os.PathLike)):
            seen['listdir'].add(os.path.realpath(path))
        return real_listdir(path)
    monkeypatch.setattr(builtins, 'open', spy_open)
    monkeypatch.setattr(os, 'listdir', spy_listdir)
    return seen


def assert_never_read(seen, tmp):
    forbidden = {'/etc/passwd', str(tmp / 'outside.jpg'), str(tmp / 'data' / 'x.jpg')}
    assert not seen['open'] & forbidden, seen['open'] & forbidden
    listed = {'/etc', str(tmp), str(tmp / 'data')}
    assert not seen['listdir'] & listed, seen['listdir'] & listed


def prepare(*argv):
    return P.main([str(a) for a in argv])


def assert_only_good_kept(out, n_unsafe=len(UNSAFE)):
    meta, arrays = load_prepared(out)
    assert meta['filters']['unsafe_path'] == n_unsafe, meta['filters']
    assert sum(meta['filters'].values()) == n_unsafe  # nothing else: the images are fine
    assert meta['counts']['kept'] == len(GOOD)
    assert sorted(p.decode() for p in arrays['image_paths.npy']) == sorted(GOOD)

# -----------------------------------------------------------------------------
# paths outside the data directory


@pytest.mark.parametrize('mode', [[], ['--verify_images'], ['--skip_image_check'], ['--pack_images']])
def test_unsafe_llava_paths_dropped_and_never_read_folder(layout, accesses, mode):
    prepare('--data_dir', layout / 'data', '--tokenizer=tiny', '--workers=1', '--val_ratio=0', *mode)
    assert_never_read(accesses, layout)
    assert_only_good_kept(layout / 'data' / 'prepared')


@pytest.mark.parametrize('mode', [[], ['--verify_images'], ['--pack_images']])
def test_unsafe_llava_paths_with_images_zip_never_touch_the_filesystem(layout, accesses, mode):
    """Zip mode reads members of the zip only: '/etc/passwd' or '../x.jpg' is never looked up
    on disk; the records are dropped and counted like in folder mode."""
    data = layout / 'data'
    prepare('--data_dir', data, '--images', data / 'images.zip', '--tokenizer=tiny', '--workers=1',
            '--val_ratio=0', *mode)
    assert_never_read(accesses, layout)
    assert_only_good_kept(data / 'prepared')


def test_absolute_path_inside_the_root_is_still_unsafe_in_llava_json(layout):
    """An absolute path is refused even when it points inside the image root, and
    --allow_absolute_paths is for caption JSONL only: a LLaVA json never gets it."""
    data = layout / 'data'
    for extra in ([], ['--allow_absolute_paths']):
        meta = prepare('--json', data / 'abs.json', '--images', data / 'images', '--out_dir', data / 'p',
                       '--tokenizer=tiny', '--val_ratio=0', *extra)
        assert meta['filters']['unsafe_path'] == 1 and meta['counts']['kept'] == len(GOOD)


def test_caption_jsonl_outside_paths_need_allow_absolute_paths(layout):
    """Caption JSONL: '../' and absolute paths are dropped unless --allow_absolute_paths; with
    it they are kept and resolve to the files named."""
    data = layout / 'data'
    caps = data / 'images' / 'caps.jsonl'
    rows = [dict(id='g', images=['g0.jpg'], caption=GOOD['g0.jpg']),
            dict(id='up', images=['../x.jpg'], caption=UNSAFE_CAPTIONS[0]),
            dict(id='abs', images=[str(layout / 'outside.jpg')], caption=UNSAFE_CAPTIONS[1])]
    caps.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    meta = prepare('--json', caps, '--tokenizer=tiny', '--val_ratio=0', '--out_dir', data / 'safe')
    assert meta['filters']['unsafe_path'] == 2 and meta['counts']['kept'] == 1
    meta = prepare('--json', caps, '--tokenizer=tiny', '--val_ratio=0', '--out_dir', data / 'open',
                   '--allow_absolute_paths', '--verify_images', '--workers=1')
    assert meta['filters']['unsafe_path'] == 0 and meta['counts']['kept'] == 3
    _, arrays = load_prepared(data / 'open')
    root = os.path.join(data / 'open', meta['image_root'])
    got = {os.path.realpath(os.path.join(root, p.decode())) for p in arrays['image_paths.npy']}
    assert got == {str(data / 'images' / 'g0.jpg'), str(data / 'x.jpg'), str(layout / 'outside.jpg')}

# -----------------------------------------------------------------------------
# one bad record never aborts the run


def good_llava_text():
    """The JSON text of the GOOD records, as the body of a list (no brackets)."""
    return ', '.join(json.dumps(llava_record(n, c)) for n, c in GOOD.items())


def test_lone_surrogate_caption_is_malformed_text(layout):
    data = layout / 'data'
    # written by hand: the escape \ud800 stays literal in the file (valid JSON, invalid unicode)
    bad = ('{"id": "s", "image": "g0.jpg", "conversations": [{"from": "human", "value": "<image>"}, '
           '{"from": "gpt", "value": "a red \\ud800 circle at the top."}]}')
    assert '\\ud800' in bad
    (data / 'sur.json').write_text(f'[{good_llava_text()}, {bad}]')
    meta = prepare('--json', data / 'sur.json', '--images', data / 'images', '--out_dir', data / 'p',
                   '--tokenizer=tiny', '--val_ratio=0')
    assert meta['filters']['malformed_text'] == 1
    assert meta['counts'] == {'records': 4, 'kept': 3}


def test_lone_surrogate_image_path_with_skip_image_check(layout):
    data = layout / 'data'
    bad = ('{"id": "s", "image": "g\\udc80.jpg", "conversations": [{"from": "human", "value": "<image>"}, '
           '{"from": "gpt", "value": "a yellow star at the top."}]}')
    (data / 'sur.json').write_text(f'[{good_llava_text()}, {bad}]')
    meta = prepare('--json', data / 'sur.json', '--images', data / 'nowhere', '--out_dir', data / 'p',
                   '--tokenizer=tiny', '--val_ratio=0', '--skip_image_check')
    assert meta['filters']['malformed_text'] == 1 and meta['counts'] == {'records': 4, 'kept': 3}
    _, arrays = load_prepared(data / 'p')
    assert sorted(p.decode() for p in arrays['image_paths.npy']) == sorted(GOOD)


def test_deeply_nested_jsonl_line_is_malformed_json(layout):
    data = layout / 'data'
    lines = [json.dumps(dict(id=n, images=[n], caption=c)) for n, c in GOOD.items()]
    lines.insert(1, '[' * 200_000 + ']' * 200_000)
    lines.insert(2, '{"id": "s", "images": ["g0.jpg"], "caption": "a white \\ud800 star at the top."}')
    (data / 'images' / 'caps.jsonl').write_text('\n'.join(lines) + '\n')
    meta = prepare('--json', data / 'images' / 'caps.jsonl', '--tokenizer=tiny', '--val_ratio=0')
    f = meta['filters']
    assert (f['malformed_json'], f['malformed_text']) == (1, 1)
    assert meta['counts'] == {'records': 5, 'kept': 3}


def test_jsonl_line_that_is_not_utf8_is_malformed_json(layout):
    """Bytes that are not UTF-8 in one line make that line bad, not the whole file."""
    data = layout / 'data'
    lines = [json.dumps(dict(id=n, images=[n], caption=c)).encode() for n, c in GOOD.items()]
    lines.insert(1, b'{"id": "x", "images": ["g0.jpg"], "caption": "a blue \xff square at the top."}')
    (data / 'images' / 'caps.jsonl').write_bytes(b'\n'.join(lines) + b'\n')
    meta = prepare('--json', data / 'images' / 'caps.jsonl', '--tokenizer=tiny', '--val_ratio=0')
    assert meta['filters']['malformed_json'] == 1 and meta['counts'] == {'records': 4, 'kept': 3}


@pytest.mark.parametrize('text,why', [
    ('[' * 200_000 + ']' * 200_000, 'nested too deeply'),
    ('[{"id": 1,', 'not valid JSON'),
    ('{"id": "1", "image": "g0.jpg"}', 'holds a JSON dict'),
    (b'\xff\xfe[]', 'not valid JSON'),  # not UTF-8 at all
], ids=['nested', 'cut', 'object', 'not-utf8'])
def test_llava_file_broken_as_a_whole_is_one_user_error(layout, text, why):
    data = layout / 'data'
    p = data / 'broken.json'
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError) as e:
        prepare('--json', p, '--images', data / 'images', '--tokenizer=tiny')
    msg = str(e.value)
    assert why in msg and str(p) in msg and '\n' not in msg, msg
    assert not (data / 'prepared').exists()


def test_byte_order_mark_is_read_fine(layout):
    data = layout / 'data'
    bom = b'\xef\xbb\xbf'
    (data / 'bom.json').write_bytes(bom + f'[{good_llava_text()}]'.encode())
    meta = prepare('--json', data / 'bom.json', '--images', data / 'images', '--out_dir', data / 'a',
                   '--tokenizer=tiny', '--val_ratio=0')
    assert meta['counts'] == {'records': 3, 'kept': 3} and not any(meta['filters'].values())
    lines = [json.dumps(dict(id=n, images=[n], caption=c)) for n, c in GOOD.items()]
    (data / 'images' / 'bom.jsonl').write_bytes(bom + '\n'.join(lines).encode())
    meta = prepare('--json', data / 'images' / 'bom.jsonl', '--out_dir', data / 'b', '--tokenizer=tiny',
                   '--val_ratio=0')
    assert meta['counts'] == {'records': 3, 'kept': 3} and not any(meta['filters'].values())
