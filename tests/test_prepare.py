"""
Tests of prepare_llava.py: a messy LLaVA-format dataset where every filter rule fires once or
more, folder vs images.zip, packing, caption JSONL, the val split, interrupted writes, one-line
errors, the command line, and the real Qwen3 tokenizer. (--synthetic: test_synthetic.py.)

$ python -m pytest -q tests/test_prepare.py
"""
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

import data
import prepare_llava as P
from configurator import UserError
from conftest import ASSETS, ROOT, load_prepared, prepared_samples
from sources.backbones import tiny_tokenizer

META_KEYS = {'version', 'source', 'tokenizer', 'vocab_size', 'eos_id', 'slot_id', 'bos_id', 'slot_token', 'image_root', 'image_root_abs',
             'image_kind', 'shards', 'packed_size', 'n_images', 'splits', 'golden', 'filters', 'counts', 'min_tokens',
             'max_tokens', 'max_dups', 'seed', 'val_ratio', 'qa_file'}


def prepare_main(*argv):
    """prepare_llava.main in this process; returns meta.json's content."""
    return P.main([str(a) for a in argv])

# -----------------------------------------------------------------------------
# a messy LLaVA-format dataset


def noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=95, **kw)
    return buf.getvalue()


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()


def exif_rotated():
    """40x20 stored, left half red / right half blue, EXIF orientation 6 (display rotated
    90 degrees clockwise): shown upright it is 20x40, red on top, blue below."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6
    return jpeg_bytes(img, exif=exif.tobytes())


def messy_images():
    """{relative path: bytes} of every image of the messy set."""
    gray16 = (np.arange(30 * 30).reshape(30, 30) * 60).astype(np.uint16)  # up to ~54000: 16-bit range
    bomb = io.BytesIO()
    Image.new('1', (10000, 9000)).save(bomb, format='PNG')  # 90M px > PIL's 89.5M limit; ~11 KB on disk
    return {
        'a/rgb.jpg': jpeg_bytes(noise_image(40, 30)),
        'a/gray.png': png_bytes(noise_image(30, 30, 1).convert('L')),
        'a/rgba.png': png_bytes(noise_image(30, 30, 2).convert('RGBA')),
        'b/cmyk.jpg': jpeg_bytes(Image.new('CMYK', (30, 30), (0, 200, 200, 0))),
        'b/i16.png': png_bytes(Image.fromarray(gray16)),
        'b/pal.png': png_bytes(noise_image(30, 30, 3).convert('P')),
        'b/exif.jpg': exif_rotated(),
        'c/g0.jpg': jpeg_bytes(noise_image(30, 30, 4)),
        'c/g1.jpg': jpeg_bytes(noise_image(30, 30, 5)),
        'c/g2.jpg': jpeg_bytes(noise_image(30, 30, 6)),
        'c/g3.jpg': jpeg_bytes(noise_image(30, 30, 7)),
        'bad/corrupt.jpg': np.random.default_rng(8).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        'bad/zero.jpg': b'',
        'bad/trunc.jpg': jpeg_bytes(noise_image(64, 64, 9))[:4000],
        'bad/tiny.png': png_bytes(noise_image(4, 4)),
        'bad/thin.png': png_bytes(noise_image(200, 4)),  # one side too small is enough
        'bad/bomb.png': bomb.getvalue(),
    }


def llava_record(image, caption, human='Describe the image concisely.\n<image>', gpt='gpt', hum='human'):
    return dict(id=image, image=image, conversations=[{'from': hum, 'value': human}, {'from': gpt, 'value': caption}])


LONG = ' '.join(['red circle'] * 40)  # 80 tokens
CONV = llava_record('c/g3.jpg', 'a red circle at the top.')['conversations']
# (record, what should happen to it); captions use the tiny tokenizer's words
RECORDS = [
    (llava_record('a/rgb.jpg', 'a red circle at the top left.'), 'kept'),
    (llava_record('a/gray.png', 'a blue square at the bottom right.'), 'kept'),
    (llava_record('a/rgba.png', '  two green triangles and one red star.\n'), 'kept'),
    (llava_record('b/cmyk.jpg', 'there are three yellow stars.'), 'kept'),
    (llava_record('b/i16.png', 'a white cross in the center.', human='<image>\nWhat is this?'), 'kept'),
    (llava_record('b/pal.png', 'a pink diamond on the left.'), 'kept'),
    (llava_record('b/exif.jpg', 'a purple circle on the right.'), 'kept'),
    (llava_record('a/rgb.jpg', 'a big red circle in the upper left corner.'), 'kept'),  # same image, second caption
    (llava_record('c/g0.jpg', 'a red circle at the top left.'), 'duplicate'),
    (llava_record('c/g1.jpg', 'A red circle, at the TOP left!'), 'duplicate'),  # near duplicate
    (llava_record('a/missing.jpg', 'a green star at the bottom.'), 'missing_image'),
    (llava_record('c/g2.jpg', 'a green star at the bottom.'), 'kept'),  # its first occurrence was unusable
    (llava_record('c/g3.jpg', ''), 'empty_caption'),
    (llava_record('c/g3.jpg', '   \n '), 'empty_caption'),
    (llava_record('c/g3.jpg', None), 'empty_caption'),
    (llava_record('c/g3.jpg', 'a red circle <|image_pad|> at the top.'), 'special_tokens'),
    (llava_record('c/g3.jpg', 'a blue square in the center<|endoftext|>'), 'special_tokens'),
    (llava_record('c/g3.jpg', 'a red circle stock photo at the top.'), 'spam'),
    (llava_record('c/g3.jpg', 'Watermark: a blue square in the center.'), 'spam'),
    (llava_record('c/g3.jpg', 'download a green star at the top left'), 'spam'),
    (llava_record('c/g3.jpg', 'a red circle.'), 'too_short'),
    (llava_record('c/g3.jpg', 'star'), 'too_short'),
    (llava_record('c/g3.jpg', LONG), 'too_long'),
    (llava_record('bad/corrupt.jpg', 'a blue circle at the top.'), 'undecodable_image'),
    (llava_record('bad/trunc.jpg', 'a yellow diamond at the top.'), 'undecodable_image'),
    (llava_record('bad/zero.jpg', 'a green square at the top.'), 'zero_byte_image'),
    (llava_record('bad/tiny.png', 'a white star at the top.'), 'tiny_image'),
    (llava_record('bad/thin.png', 'a pink star at the bottom.'), 'tiny_image'),
    (llava_record('bad/bomb.png', 'an orange cross at the top.'), 'decompression_bomb'),
    ('oops', 'malformed_keys'),
    ({'id': 'x', 'conversations': CONV}, 'malformed_keys'),
    ({'image': 'c/g3.jpg', 'conversations': [{'from': 'human', 'value': '<image>'}, {'from': 'gpt'}]},
     'malformed_keys'),
    ({'image': 5, 'conversations': CONV}, 'malformed_types'),
    ({'image': 'c/g3.jpg', 'conversations': 'hello'}, 'malformed_types'),
    (llava_record('c/g3.jpg', 7), 'malformed_types'),
    ({'image': 'c/g3.jpg', 'conversations': llava_record('c/g3.jpg', 'a red star at the top.')['conversations'] * 2},
     'malformed_turns'),
    ({'image': 'c/g3.jpg', 'conversations': llava_record('c/g3.jpg', 'x')['conversations'][:1]}, 'malformed_turns'),
    (llava_record('c/g3.jpg', 'a red square at the top.', gpt='human', hum='gpt'), 'malformed_roles'),
    (llava_record('c/g3.jpg', 'a red square at the top.', human='Describe the image.'), 'malformed_image_tokens'),
    (llava_record('c/g3.jpg', 'a red square at the top.', human='<image> and <image>'), 'malformed_image_tokens'),
]
VERIFY_RULES = ('zero_byte_image', 'undecodable_image', 'tiny_image', 'decompression_bomb')


def expected_filters(verify):
    want = dict.fromkeys(P.RULES, 0)
    for _, what in RECORDS:
        if what != 'kept' and (verify or what not in VERIFY_RULES):
            want[what] += 1
    return want


def kept_records(verify):
    return [r for r, what in RECORDS if what == 'kept' or (not verify and what in VERIFY_RULES)]


def expected_samples(records, tok):
    return sorted(((r['image'],), tok(r['conversations'][1]['value'].strip(), add_special_tokens=False)['input_ids'])
                  for r in records)


@pytest.fixture(scope='module')
def messy(tmp_path_factory):
    """data_dir with the LLaVA json, an images/ folder and an images.zip of the same files."""
    d = tmp_path_factory.mktemp('messy')
    with zipfile.ZipFile(d / 'images.zip', 'w') as zf:
        for name, raw in messy_images().items():
            zf.writestr(name, raw)
            (d / 'images' / name).parent.mkdir(parents=True, exist_ok=True)
            (d / 'images' / name).write_bytes(raw)
    (d / P.LLAVA_JSON).write_text(json.dumps([r for r, _ in RECORDS]))
    return d

# -----------------------------------------------------------------------------
# LLaVA: cleaning, folder and zip


@pytest.mark.parametrize('verify', [True, False])
def test_messy_llava_every_filter_counted(messy, tmp_path, verify):
    out = tmp_path / 'out'
    meta = prepare_main('--data_dir', messy, '--out_dir', out, '--tokenizer=tiny', '--workers=2',
                        *(['--verify-images'] if verify else []))
    assert meta['filters'] == expected_filters(verify)
    assert list(meta['filters']) == P.RULES
    kept = kept_records(verify)
    assert meta['counts'] == {'records': len(RECORDS), 'kept': len(kept)}
    meta2, arrays = load_prepared(out)
    assert meta2 == meta and set(meta) == META_KEYS
    assert meta['image_kind'] == 'folder' and meta['image_root_abs'] == os.path.abspath(messy / 'images')
    assert os.path.normpath(os.path.join(out, meta['image_root'])) == os.path.abspath(messy / 'images')
    assert meta['source'] == 'llava' and meta['tokenizer'] == 'tiny' and meta['max_dups'] == 1
    tok = tiny_tokenizer()
    assert sorted(prepared_samples(arrays)) == expected_samples(kept, tok)
    assert meta['n_images'] == len({r['image'] for r in kept}) == len(arrays['image_paths.npy'])
    assert arrays['image_paths.npy'].dtype.kind == 'S'
    assert arrays['train_tokens.bin'].dtype == np.uint32 and arrays['train_index.npy'].dtype == np.int64
    assert arrays['train_index.npy'].shape[1] == 4 and (arrays['train_index.npy'][:, 3] == -1).all()
    assert meta['splits'] == {'train': len(kept) - 1, 'val': 1}  # 1% of 9-14 samples rounds up to 1
    assert not list(out.glob('*.tmp'))


def test_folder_and_zip_give_identical_outputs(messy, tmp_path):
    # inline verification from the folder, a 2-process pool with per-worker zip handles from the zip
    m1 = prepare_main('--data_dir', messy, '--out_dir', tmp_path / 'f', '--tokenizer=tiny', '--verify_images',
                      '--workers=1')
    m2 = prepare_main('--data_dir', messy, '--images', messy / 'images.zip', '--out_dir', tmp_path / 'z',
                      '--tokenizer=tiny', '--verify_images', '--workers', '2')
    assert m2['image_kind'] == 'zip' and m2['image_root_abs'] == os.path.abspath(messy / 'images.zip')
    assert m1['filters'] == m2['filters'] == expected_filters(True)
    _, a1 = load_prepared(tmp_path / 'f')
    _, a2 = load_prepared(tmp_path / 'z')
    for name in a1:
        assert a1[name].dtype == a2[name].dtype and np.array_equal(a1[name], a2[name]), name
    for key in ('splits', 'golden', 'counts', 'n_images'):
        assert m1[key] == m2[key]


@pytest.mark.parametrize('compression', [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_members_are_read_by_their_prepared_offsets(messy, tmp_path, compression):
    """Training reads zip members by offsets found at prepare time (zip_locs.npy), not by
    parsing the zip's whole central directory in every loader worker: the same bytes as
    zipfile, stored or deflated, with a Zip64-sized comment and extra fields in the way."""
    from sources.images import ImageReader
    z = tmp_path / 'images.zip'
    with zipfile.ZipFile(messy / 'images.zip') as src, zipfile.ZipFile(z, 'w', compression=compression) as dst:
        dst.comment = b'x' * 1000
        for name in src.namelist():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.extra = b'\xfe\xca\x04\x00abcd'  # an extra field of the local header
            info.compress_type = compression
            dst.writestr(info, src.read(name))
    prepare_main('--json', messy / P.LLAVA_JSON, '--images', z, '--out_dir', tmp_path / 'o', '--tokenizer=tiny')
    prepared = data.open_prepared(str(tmp_path / 'o'))
    assert (tmp_path / 'o' / 'zip_locs.npy').exists()
    reader = ImageReader(prepared['dir'], prepared['meta'], prepared['image_paths'], prepared['root'])
    with zipfile.ZipFile(z) as zf:
        for i in range(prepared['meta']['n_images']):
            assert reader.read(i) == zf.read(reader.name(i))
    assert not hasattr(reader, '_zip')  # no ZipFile, no central directory in memory


def test_zip_with_top_folder(messy, tmp_path):
    """images.zip whose members sit under images/ (as some re-zips do): found, and the
    stored path is the member name."""
    with zipfile.ZipFile(messy / 'images.zip') as src, zipfile.ZipFile(tmp_path / 'images.zip', 'w') as dst:
        for name in src.namelist():
            dst.writestr('images/' + name, src.read(name))
    meta = prepare_main('--json', messy / P.LLAVA_JSON, '--images', tmp_path / 'images.zip', '--out_dir',
                        tmp_path / 'o', '--tokenizer=tiny')
    assert meta['filters'] == expected_filters(False)
    _, arrays = load_prepared(tmp_path / 'o')
    with zipfile.ZipFile(tmp_path / 'images.zip') as zf:
        for p in arrays['image_paths.npy']:
            assert p.decode().startswith('images/') and p.decode() in zf.namelist()


def test_max_dups_and_lengths_are_settings(messy, tmp_path):
    meta = prepare_main('--data_dir', messy, '--out_dir', tmp_path / 'o', '--tokenizer=tiny', '--max_dups=2',
                        '--min-tokens', '1', '--max_tokens=100')
    f = meta['filters']
    assert f['duplicate'] == 1 and f['too_short'] == 0 and f['too_long'] == 0  # three copies of one caption
    meta = prepare_main('--data_dir', messy, '--out_dir', tmp_path / 'o', '--tokenizer=tiny', '--max_dups=0')
    assert meta['filters']['duplicate'] == 0 and meta['max_dups'] == 0
    # max_tokens is the longest caption kept, inclusive
    _, arrays = load_prepared(tmp_path / 'o')
    longest = int(max(arrays['train_index.npy'][:, 1].max(), arrays['val_index.npy'][:, 1].max(initial=0)))
    too_long = meta['filters']['too_long']  # the deliberately long captions of the messy set
    for limit, more in ((longest, 0), (longest - 1, 1)):
        meta = prepare_main('--data_dir', messy, '--out_dir', tmp_path / 'o', '--tokenizer=tiny', '--max_dups=0',
                            f'--max_tokens={limit}')
        assert (meta['filters']['too_long'] > too_long) == bool(more), (limit, meta['filters'])


def test_interrupted_write_leaves_no_stale_meta(messy, tmp_path, monkeypatch):
    out = tmp_path / 'o'
    prepare_main('--data_dir', messy, '--out_dir', out, '--tokenizer=tiny')
    assert (out / 'meta.json').exists()
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(a, b)
    monkeypatch.setattr(os, 'replace', flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_main('--data_dir', messy, '--out_dir', out, '--tokenizer=tiny', '--max_dups=0')
    assert not (out / 'meta.json').exists()  # half-replaced arrays must never sit next to a meta
    monkeypatch.setattr(os, 'replace', real)
    meta = prepare_main('--data_dir', messy, '--out_dir', out, '--tokenizer=tiny', '--max_dups=0')
    assert json.loads((out / 'meta.json').read_text()) == meta

# -----------------------------------------------------------------------------
# packing


PACK = 32


@pytest.fixture(scope='module')
def packed(messy, tmp_path_factory):
    """The messy set packed at PACK px from the folder: (out_dir, meta, {image path: pixels})."""
    out = tmp_path_factory.mktemp('packed')
    meta = prepare_main('--data_dir', messy, '--out_dir', out, '--tokenizer=tiny', '--pack-images', '--verify_images',
                        f'--pack_size={PACK}', '--workers=2')
    _, arrays = load_prepared(out)
    blob = (out / 'images_packed.bin').read_bytes()
    offs = np.load(out / 'images_packed_offsets.npy')
    paths = [p.decode() for p in arrays['image_paths.npy']]
    assert offs.dtype == np.int64 and offs.shape == (len(paths) + 1,)
    assert offs[0] == 0 and offs[-1] == len(blob) and (np.diff(offs) > 0).all()
    pixels = {}
    for k, p in enumerate(paths):
        img = Image.open(io.BytesIO(blob[offs[k]:offs[k + 1]]))
        assert img.format == 'JPEG' and img.mode == 'RGB' and img.size == (PACK, PACK), p
        pixels[p] = np.asarray(img).astype(int)
    return out, meta, pixels


def test_pack_size_writes_resized_jpegs(packed):
    _, meta, pixels = packed
    assert meta['image_kind'] == 'packed' and meta['packed_size'] == PACK
    # EXIF orientation applied: red on top, blue below (not red left / blue right)
    ex = pixels['b/exif.jpg']
    assert ex[4, 8, 0] > 200 and ex[4, 24, 0] > 200 and ex[4, 24, 2] < 60
    assert ex[28, 8, 2] > 200 and ex[28, 24, 2] > 200 and ex[28, 8, 0] < 60
    assert pixels['b/i16.png'].mean() < 200  # 16-bit gray rescaled, not clipped to white


def test_pack_images_implies_verification(messy, tmp_path):
    # BUG: prepare_llava.parse_args no longer sets verify_images for --pack_images (the line
    # `args.verify_images = True` was dropped in the restructuring, while the --pack_images
    # help still says "implies --verify_images"): unreadable images are not filtered, and with
    # --pack_size packing them fails with "cannot pack image". Kept failing until fixed.
    meta = prepare_main('--data_dir', messy, '--out_dir', tmp_path / 'f', '--tokenizer=tiny', '--pack-images',
                        f'--pack_size={PACK}', '--workers=2')
    assert meta['filters'] == expected_filters(True)  # packing implies verification


def test_pack_from_zip_is_byte_identical(messy, packed, tmp_path):
    out, _, _ = packed
    # from the zip (per-worker handles): byte-identical pack
    prepare_main('--data_dir', messy, '--images', messy / 'images.zip', '--out_dir', tmp_path / 'z', '--tokenizer=tiny',
                 '--pack_images', '--verify_images', f'--pack_size={PACK}', '--workers=2')
    assert (tmp_path / 'z' / 'images_packed.bin').read_bytes() == (out / 'images_packed.bin').read_bytes()
    # a later run without packing removes the stale pack (its image ids would not match)
    meta = prepare_main('--data_dir', messy, '--out_dir', tmp_path / 'z', '--tokenizer=tiny')
    assert meta['image_kind'] == 'folder' and not (tmp_path / 'z' / 'images_packed.bin').exists()

# -----------------------------------------------------------------------------
# caption JSONL


@pytest.fixture
def caption_jsonl(tmp_path):
    """caps/caps.jsonl: two good records (one with an image outside the folder, by absolute
    path), one bad line of every kind; returns (the file, the outside image)."""
    d = tmp_path / 'caps'
    (d / 'imgs').mkdir(parents=True)
    (tmp_path / 'elsewhere').mkdir()
    (d / 'imgs' / 'x.jpg').write_bytes(jpeg_bytes(noise_image(20, 20, 1)))
    (d / 'imgs' / 'y.jpg').write_bytes(jpeg_bytes(noise_image(20, 20, 2)))
    z = tmp_path / 'elsewhere' / 'z.jpg'
    z.write_bytes(jpeg_bytes(noise_image(20, 20, 3)))
    lines = [
        json.dumps(dict(id='1', images=['imgs/x.jpg', str(z)], caption='two red circles and one blue square.',
                        source='t')),
        json.dumps(dict(id='2', images=['imgs/y.jpg'], caption='a green star at the top left.', source='t')),
        '{not json',
        '',
        json.dumps(dict(id='3', images=[], caption='a red circle at the top left.')),
        json.dumps(dict(id='4', images=['imgs/x.jpg'] * 3, caption='a red circle at the top left.')),
        json.dumps(dict(id='5', caption='a red circle at the top left.')),
        json.dumps(dict(id='6', images='imgs/x.jpg', caption='a red circle at the top left.')),
        json.dumps(dict(id='7', images=['imgs/nope.jpg'], caption='a blue circle at the top left.')),
        json.dumps(dict(id='8', images=['imgs/y.jpg', 'imgs/gone.jpg'], caption='two green stars on the left.')),
    ]
    (d / 'caps.jsonl').write_text('\n'.join(lines) + '\n')
    return d / 'caps.jsonl', z


def test_caption_jsonl_with_two_images(caption_jsonl):
    jsonl, z = caption_jsonl
    d = jsonl.parent
    meta = prepare_main('--json', jsonl, '--tokenizer=tiny', '--verify_images', '--workers=2', '--allow_absolute_paths')
    assert meta['source'] == 'jsonl' and meta['image_kind'] == 'folder' and meta['image_root_abs'] == os.path.abspath(d)
    f = meta['filters']
    assert (f['malformed_json'], f['malformed_n_images'], f['malformed_keys'], f['malformed_types'],
            f['missing_image']) == (1, 2, 1, 1, 2)  # one of two images missing is enough
    assert meta['counts'] == {'records': 9, 'kept': 2}
    _, arrays = load_prepared(d / 'prepared')  # out_dir defaults to the JSONL's folder
    tok = tiny_tokenizer()
    got = {imgs: ids for imgs, ids in prepared_samples(arrays)}
    assert got == {('imgs/x.jpg', str(z)): tok('two red circles and one blue square.')['input_ids'],
                   ('imgs/y.jpg',): tok('a green star at the top left.')['input_ids']}
    root = os.path.join(d / 'prepared', meta['image_root'])
    for p in arrays['image_paths.npy']:
        assert os.path.isfile(os.path.join(root, p.decode()))


def test_caption_jsonl_absolute_paths_are_unsafe_by_default(caption_jsonl):
    jsonl, _ = caption_jsonl
    meta = prepare_main('--json', jsonl, '--tokenizer=tiny', '--workers=1')
    assert meta['filters']['unsafe_path'] == 1 and meta['counts'] == {'records': 9, 'kept': 1}
    assert not P.safe_path('../x.jpg') and not P.safe_path('/etc/passwd') and P.safe_path('a/../x.jpg')

def test_caption_jsonl_with_one_image_as_a_string(tmp_path):
    """{"image": "a.jpg", "caption": ...}, the form many caption sets (and LLaVA's records) use
    for one image, is read like {"images": ["a.jpg"]}; both keys at once, or a list under
    "image", are refused and counted."""
    for name, seed in (('a.jpg', 1), ('b.jpg', 2)):
        (tmp_path / name).write_bytes(jpeg_bytes(noise_image(20, 20, seed)))
    lines = [dict(image='a.jpg', caption='a red circle at the top left.'),
             dict(image='b.jpg', caption='two green stars on the left.', id='x', extra=1),
             dict(image='a.jpg', images=['b.jpg'], caption='a blue square at the top.'),
             dict(image=['a.jpg'], caption='a blue square at the top.')]
    (tmp_path / 'caps.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
    meta = prepare_main('--json', tmp_path / 'caps.jsonl', '--tokenizer=tiny', '--workers=1', '--val_ratio=0')
    assert meta['counts'] == {'records': 4, 'kept': 2}
    assert (meta['filters']['malformed_keys'], meta['filters']['malformed_types']) == (1, 1)
    _, arrays = load_prepared(tmp_path / 'prepared')
    tok = tiny_tokenizer()
    assert dict(prepared_samples(arrays)) == {('a.jpg',): tok('a red circle at the top left.')['input_ids'],
                                              ('b.jpg',): tok('two green stars on the left.')['input_ids']}


def test_when_no_record_survives_the_line_names_the_rule(tmp_path):
    """The closing line names the rule that dropped the most records and what to change: for
    malformed_keys the keys read and those of the first refused record."""
    (tmp_path / 'a.jpg').write_bytes(jpeg_bytes(noise_image(20, 20, 1)))
    (tmp_path / 'keys.jsonl').write_text(''.join(json.dumps(dict(img='a.jpg', text=f'a red circle number {k}.')) + '\n'
                                                 for k in range(3)))
    with pytest.raises(UserError) as e:
        prepare_main('--json', tmp_path / 'keys.jsonl', '--tokenizer=tiny', '--workers=1')
    assert '3 dropped as malformed_keys' in str(e.value) and '"caption"' in str(e.value) and '"image"' in str(e.value)
    assert "the first refused one has ['img', 'text']" in str(e.value), str(e.value)
    (tmp_path / 'long.jsonl').write_text(json.dumps(dict(image='a.jpg', caption='a red circle ' * 30)) + '\n')
    with pytest.raises(UserError, match='1 dropped as too_long; check --max_tokens'):
        prepare_main('--json', tmp_path / 'long.jsonl', '--tokenizer=tiny', '--workers=1')

# -----------------------------------------------------------------------------
# val split and golden set


def test_split_deterministic_and_stratified():
    lengths = np.random.default_rng(0).integers(5, 61, 3000)
    a = P.split_val(lengths, 0.1, seed=1)
    assert np.array_equal(a, P.split_val(lengths, 0.1, seed=1))
    assert not np.array_equal(a, P.split_val(lengths, 0.1, seed=2))
    assert len(a) == 300 and len(np.unique(a)) == 300 and np.all(np.diff(a) > 0)
    edges = np.quantile(lengths, [1 / 3, 2 / 3])
    bucket = np.searchsorted(edges, lengths, side='right')
    for b in range(3):  # each length tertile gives its share of val, to within one sample
        assert abs((bucket[a] == b).sum() - 0.1 * (bucket == b).sum()) <= 1
    assert len(P.split_val([7, 9], 0.01, 0)) == 1 and len(P.split_val([7], 0.5, 0)) == 0
    assert len(P.split_val(lengths, 0.0, 0)) == 0
    for n, ratio in ((30, 0.09), (95, 0.07), (7, 0.5)):  # the nearest count (2.7 -> 3), not one short of it
        assert abs(len(P.split_val(lengths[:n], ratio, 0)) - ratio * n) <= 0.5, (n, ratio)
    g = P.golden(lengths[a])
    assert len(g) == 32 and g == sorted(set(g)) and 0 <= g[0] and g[-1] < len(a)
    assert lengths[a][g].min() == lengths[a].min() and lengths[a][g].max() == lengths[a].max()
    assert P.golden(np.array([3, 1, 2])) == [0, 1, 2]

def test_golden_spans_the_lengths_evenly():
    """The golden set is stratified over caption length: with distinct lengths, it holds the
    shortest and the longest val caption and every (n-1)/31-th one between, by length rank."""
    for n in (33, 64, 200, 1001):
        lengths = np.random.default_rng(n).permutation(n) + 5
        g = P.golden(lengths)
        rank = np.argsort(np.argsort(lengths))  # rank of each sample by length
        assert sorted(rank[g].tolist()) == np.linspace(0, n - 1, 32).round().astype(int).tolist()
        assert int(np.argmin(lengths)) in g and int(np.argmax(lengths)) in g


# -----------------------------------------------------------------------------
# errors and the command line


def test_one_line_errors(tmp_path):
    def error_of(*argv):
        with pytest.raises(UserError) as e:
            prepare_main(*argv)
        msg = str(e.value)
        assert msg and '\n' not in msg, msg
        return msg
    assert 'no caption file' in error_of('--json', tmp_path / 'nope.json')
    (tmp_path / 'bad.json').write_text('[{"id": 1,')
    assert 'not valid JSON' in error_of('--json', tmp_path / 'bad.json', '--skip_image_check', '--tokenizer=tiny')
    (tmp_path / 'ok.json').write_text(json.dumps([llava_record('x.jpg', 'a red circle at the top left.')]))
    assert '--images' in error_of('--json', tmp_path / 'ok.json', '--tokenizer=tiny')  # no images anywhere
    (tmp_path / 'images').mkdir()
    assert 'survived' in error_of('--json', tmp_path / 'ok.json', '--tokenizer=tiny')  # all images missing
    assert 'unrecognized' in error_of('--nope=1')
    assert 'max_tokens' in error_of('--min_tokens=9', '--max_tokens=3')
    assert error_of('--workers', 'two')
    assert 'is a file' in error_of('--json', tmp_path / 'ok.json', '--out_dir', tmp_path / 'ok.json')  # before any work
    assert 'is a file' in error_of('--synthetic=4', '--data_dir', tmp_path / 'ok.json' / 'sub')


def test_cli_spellings():
    a = P.parse_args(['--verify-images', '--max_tokens', '40', '--val-ratio=0.02', '--pack_size=64'])
    assert a.verify_images and a.max_tokens == 40 and a.val_ratio == 0.02 and a.pack_size == 64


def test_cli_pack_images_implies_verify_images():
    # BUG: see test_pack_images_implies_verification: parse_args dropped this rule.
    assert P.parse_args(['--pack-images']).verify_images  # packing implies verification


def test_offline_no_args_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / 'prepare_llava.py')], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith('error:') and 'liuhaotian/LLaVA-Pretrain' in lines[0]
    assert P.LLAVA_JSON in lines[0] and 'images.zip' in lines[0] and 'data/llava_pretrain' in lines[0]
    assert not (tmp_path / 'data' / 'llava_pretrain' / 'prepared').exists()


@pytest.mark.skipif(not (ASSETS / 'Qwen3-8B-Base' / 'tokenizer.json').exists(), reason='no ../shared/assets')
def test_real_qwen3_tokenizer(tmp_path):
    from transformers import AutoTokenizer
    qwen = ASSETS / 'Qwen3-8B-Base'
    caps = ['select luxury furniture 3 - inch gel memory foam mattress topper',
            'a grey watch with an army style strap',
            'Café ☕ latte art in a white cup, seen from above',
            '  the 2019 Tokyo skyline at night, with lights reflecting on the water  ',
            'a small dog sitting on a wooden bench in the park',
            'a man <think> riding a horse on the beach',  # a Qwen3 added token: dropped
            'a cat sleeping on a sofa<|im_end|>']
    (tmp_path / 'images').mkdir()
    for k in range(len(caps)):
        (tmp_path / 'images' / f'{k}.jpg').write_bytes(jpeg_bytes(noise_image(16, 16, k)))
    (tmp_path / P.LLAVA_JSON).write_text(json.dumps([llava_record(f'{k}.jpg', c) for k, c in enumerate(caps)]))
    meta = prepare_main('--data_dir', tmp_path, '--tokenizer', qwen, '--val_ratio=0.3')
    tok = AutoTokenizer.from_pretrained(str(qwen))
    assert meta['tokenizer'] == os.path.abspath(qwen) and meta['vocab_size'] == len(tok)
    assert meta['eos_id'] == 151643 and tok.convert_ids_to_tokens(meta['slot_id']) == '<|image_pad|>'
    assert meta['slot_id'] < len(tok)
    assert meta['filters']['special_tokens'] == 2
    _, arrays = load_prepared(tmp_path / 'prepared')
    got = dict(prepared_samples(arrays))
    assert got == {(f'{k}.jpg',): tok(c.strip(), add_special_tokens=False)['input_ids'] for k, c in enumerate(caps[:5])}
