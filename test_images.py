"""
Tests of images.py: decoding any image mode to the tower's RGB pixels, real photos, and
reading image bytes back from a folder, images.zip or the packed file.

$ python -m pytest -q test_images.py
"""
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

import data
import images
import prepare_llava as P
from conftest import ASSETS

S = 48  # the tiny tower's input size

# -----------------------------------------------------------------------------
# decoding


def test_load_image_modes(tmp_path):
    spec = images.pack_spec(S)
    transparent = Image.new('RGBA', (20, 10), (0, 0, 0, 0))
    a = images.load_image(transparent, spec)
    assert a.shape == (3, S, S) and a.dtype == np.uint8 and (a == 255).all()  # composited on white
    black = Image.new('RGBA', (20, 10), (0, 0, 0, 255))
    assert (images.load_image(black, spec) == 0).all()
    g16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    a = images.load_image(g16, spec)
    assert a.shape == (3, S, S) and 0 < a.mean() < 255 and a.max() > 200  # rescaled, not clipped
    p = tmp_path / 'x.png'
    Image.new('L', (30, 40), 77).save(p)
    a = images.load_image(str(p), spec)
    assert a.shape == (3, S, S) and (a == 77).all()
    Image.new('P', (30, 40)).save(tmp_path / 'p.gif')
    assert images.load_image((tmp_path / 'p.gif').read_bytes(), spec).shape == (3, S, S)


def test_real_photos_any_mode():
    """Read as the model sees them: RGBA composited on white, grayscale replicated to 3 channels."""
    folder = ASSETS / 'images'
    if not folder.is_dir():
        pytest.skip('../shared/assets/images not present')
    files = {f.name: f for f in folder.iterdir()}
    modes = {n: Image.open(f).mode for n, f in files.items()}
    picks = [next((n for n in sorted(files) if modes[n] == m), None) for m in ('RGBA', 'L')]
    if None in picks:
        pytest.skip(f'no RGBA and grayscale photo in {folder}: {modes}')
    spec = images.pack_spec(S)
    rgba = images.load_image(str(files[picks[0]]), spec)
    gray = images.load_image(str(files[picks[1]]), spec)
    assert rgba.shape == gray.shape == (3, S, S)
    if Image.open(files[picks[0]]).getchannel('A').getpixel((0, 0)) == 0:
        assert (rgba[:, 0, 0] == 255).all()
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()

# -----------------------------------------------------------------------------
# reading image bytes back


def photo_bytes(k, fmt):
    img = Image.fromarray(np.random.default_rng(k).integers(0, 256, (20 + k, 24, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope='module')
def three_sources(tmp_path_factory):
    """The same 4 images prepared from a folder, from images.zip, and packed (original bytes):
    ({stored name: file bytes}, {kind: data.open_prepared(...)})."""
    d = tmp_path_factory.mktemp('readers')
    files = {f'imgs/{k}.{ext}': photo_bytes(k, fmt) for k, (ext, fmt) in
             enumerate([('jpg', 'JPEG'), ('png', 'PNG'), ('jpg', 'JPEG'), ('png', 'PNG')])}
    caps = ['a red circle at the top left.', 'a blue square at the bottom right.',
            'two green triangles and one red star.', 'a white cross in the center.']
    (d / 'imgs').mkdir()
    with zipfile.ZipFile(d / 'images.zip', 'w') as zf:
        for name, raw in files.items():
            (d / name).write_bytes(raw)
            zf.writestr(name, raw)
    (d / 'caps.jsonl').write_text(''.join(json.dumps(dict(id=str(k), images=[n], caption=c)) + '\n'
                                          for k, (n, c) in enumerate(zip(files, caps))))
    common = ['--json', str(d / 'caps.jsonl'), '--tokenizer=tiny', '--val_ratio=0', '--workers=1']
    P.main([*common, '--out_dir', str(d / 'folder')])
    P.main([*common, '--images', str(d / 'images.zip'), '--out_dir', str(d / 'zip')])
    P.main([*common, '--pack_images', '--out_dir', str(d / 'packed')])
    return files, {kind: data.open_prepared(str(d / kind)) for kind in ('folder', 'zip', 'packed')}


@pytest.mark.parametrize('kind', ['folder', 'zip', 'packed'])
def test_image_reader_returns_the_original_bytes(three_sources, kind):
    files, prepared = three_sources
    p = prepared[kind]
    assert p['meta']['image_kind'] == kind
    reader = images.ImageReader(p['dir'], p['meta'], p['image_paths'], p['root'])
    assert [reader.name(i) for i in range(len(files))] == list(files)
    for i, name in enumerate(files):
        assert reader.read(i) == files[name], (kind, name)  # the packed file is lossless by default


def test_packed_by_default_keeps_the_original_bytes(three_sources):
    _, prepared = three_sources
    assert prepared['packed']['meta']['packed_size'] == 'original'
