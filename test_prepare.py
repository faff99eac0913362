"""
Tests of prepare_llava.py (CPU, offline, ~10 s): python -m pytest -q test_prepare.py

Most runs use the tiny tokenizer; the Qwen3 test uses ../shared/assets when it exists.
"""
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import prepare_llava as P
from model import TINY_WORDS, tiny_tokenizer

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parent / 'shared' / 'assets'
META_KEYS = {'version', 'source', 'tokenizer', 'vocab_size', 'eos_id', 'slot_id', 'image_root', 'image_kind',
             'packed_size', 'n_images', 'splits', 'golden', 'filters', 'counts', 'min_tokens', 'max_tokens',
             'max_dups', 'seed', 'val_ratio', 'qa_file'}

# -----------------------------------------------------------------------------
# A messy LLaVA-format dataset


def noise(w, h, seed=0):
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


def make_images():
    """{relative path: bytes} of every image of the messy set."""
    gray16 = (np.arange(30 * 30).reshape(30, 30) * 60).astype(np.uint16)  # up to ~54000: 16-bit range
    bomb = io.BytesIO()
    Image.new('1', (10000, 9000)).save(bomb, format='PNG')  # 90M px > PIL's 89.5M limit; ~11 KB on disk
    return {
        'a/rgb.jpg': jpeg_bytes(noise(40, 30)),
        'a/gray.png': png_bytes(noise(30, 30, 1).convert('L')),
        'a/rgba.png': png_bytes(noise(30, 30, 2).convert('RGBA')),
        'b/cmyk.jpg': jpeg_bytes(Image.new('CMYK', (30, 30), (0, 200, 200, 0))),
        'b/i16.png': png_bytes(Image.fromarray(gray16)),
        'b/pal.png': png_bytes(noise(30, 30, 3).convert('P')),
        'b/exif.jpg': exif_rotated(),
        'c/g0.jpg': jpeg_bytes(noise(30, 30, 4)),
        'c/g1.jpg': jpeg_bytes(noise(30, 30, 5)),
        'c/g2.jpg': jpeg_bytes(noise(30, 30, 6)),
        'c/g3.jpg': jpeg_bytes(noise(30, 30, 7)),
        'bad/corrupt.jpg': np.random.default_rng(8).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        'bad/zero.jpg': b'',
        'bad/trunc.jpg': jpeg_bytes(noise(64, 64, 9))[:4000],
        'bad/tiny.png': png_bytes(noise(4, 4)),
        'bad/bomb.png': bomb.getvalue(),
    }


def rec(image, caption, human='Describe the image concisely.\n<image>', gpt='gpt', hum='human'):
    return dict(id=image, image=image, conversations=[{'from': hum, 'value': human}, {'from': gpt, 'value': caption}])


LONG = ' '.join(['red circle'] * 40)  # 80 tokens
# (record, what should happen to it); captions use the tiny tokenizer's words
RECORDS = [
    (rec('a/rgb.jpg', 'a red circle at the top left.'), 'kept'),
    (rec('a/gray.png', 'a blue square at the bottom right.'), 'kept'),
    (rec('a/rgba.png', '  two green triangles and one red star.\n'), 'kept'),
    (rec('b/cmyk.jpg', 'there are three yellow stars.'), 'kept'),
    (rec('b/i16.png', 'a white cross in the center.', human='<image>\nWhat is this?'), 'kept'),
    (rec('b/pal.png', 'a pink diamond on the left.'), 'kept'),
    (rec('b/exif.jpg', 'a purple circle on the right.'), 'kept'),
    (rec('a/rgb.jpg', 'a big red circle in the upper left corner.'), 'kept'),  # same image, second caption
    (rec('c/g0.jpg', 'a red circle at the top left.'), 'duplicate'),
    (rec('c/g1.jpg', 'A red circle, at the TOP left!'), 'duplicate'),  # near duplicate
    (rec('a/missing.jpg', 'a green star at the bottom.'), 'missing_image'),
    (rec('c/g2.jpg', 'a green star at the bottom.'), 'kept'),  # its first occurrence was unusable
    (rec('c/g3.jpg', ''), 'empty_caption'),
    (rec('c/g3.jpg', '   \n '), 'empty_caption'),
    (rec('c/g3.jpg', None), 'empty_caption'),
    (rec('c/g3.jpg', 'a red circle <|image_pad|> at the top.'), 'special_tokens'),
    (rec('c/g3.jpg', 'a blue square in the center<|endoftext|>'), 'special_tokens'),
    (rec('c/g3.jpg', 'a red circle stock photo at the top.'), 'spam'),
    (rec('c/g3.jpg', 'Watermark: a blue square in the center.'), 'spam'),
    (rec('c/g3.jpg', 'download a green star at the top left'), 'spam'),
    (rec('c/g3.jpg', 'a red circle.'), 'too_short'),
    (rec('c/g3.jpg', 'star'), 'too_short'),
    (rec('c/g3.jpg', LONG), 'too_long'),
    (rec('bad/corrupt.jpg', 'a blue circle at the top.'), 'undecodable_image'),
    (rec('bad/trunc.jpg', 'a yellow diamond at the top.'), 'undecodable_image'),
    (rec('bad/zero.jpg', 'a green square at the top.'), 'zero_byte_image'),
    (rec('bad/tiny.png', 'a white star at the top.'), 'tiny_image'),
    (rec('bad/bomb.png', 'an orange cross at the top.'), 'decompression_bomb'),
    ('oops', 'malformed_keys'),
    ({'id': 'x', 'conversations': rec('c/g3.jpg', 'a red circle at the top.')['conversations']}, 'malformed_keys'),
    ({'image': 'c/g3.jpg', 'conversations': [{'from': 'human', 'value': '<image>'}, {'from': 'gpt'}]}, 'malformed_keys'),
    ({'image': 5, 'conversations': rec('c/g3.jpg', 'a red circle at the top.')['conversations']}, 'malformed_types'),
    ({'image': 'c/g3.jpg', 'conversations': 'hello'}, 'malformed_types'),
    (rec('c/g3.jpg', 7), 'malformed_types'),
    ({'image': 'c/g3.jpg', 'conversations': rec('c/g3.jpg', 'a red star at the top.')['conversations'] * 2},
     'malformed_turns'),
    ({'image': 'c/g3.jpg', 'conversations': rec('c/g3.jpg', 'x')['conversations'][:1]}, 'malformed_turns'),
    (rec('c/g3.jpg', 'a red square at the top.', gpt='human', hum='gpt'), 'malformed_roles'),
    (rec('c/g3.jpg', 'a red square at the top.', human='Describe the image.'), 'malformed_image_tokens'),
    (rec('c/g3.jpg', 'a red square at the top.', human='<image> and <image>'), 'malformed_image_tokens'),
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


@pytest.fixture(scope='module')
def messy(tmp_path_factory):
    """data_dir with the LLaVA json, an images/ folder and an images.zip of the same files."""
    d = tmp_path_factory.mktemp('messy')
    images = make_images()
    with zipfile.ZipFile(d / 'images.zip', 'w') as zf:
        for name, data in images.items():
            zf.writestr(name, data)
            (d / 'images' / name).parent.mkdir(parents=True, exist_ok=True)
            (d / 'images' / name).write_bytes(data)
    (d / P.LLAVA_JSON).write_text(json.dumps([r for r, _ in RECORDS]))
    return d


def run(*argv):
    return P.main([str(a) for a in argv])


def load(out):
    out = Path(out)
    meta = json.loads((out / 'meta.json').read_text())
    arrays = {name: (np.fromfile(out / name, dtype=np.uint32) if name.endswith('.bin') else np.load(out / name))
              for name in ('train_tokens.bin', 'val_tokens.bin', 'train_index.npy', 'val_index.npy',
                           'image_paths.npy')}
    return meta, arrays


def samples(arrays):
    """[(image paths, caption token ids)] of train + val."""
    paths = [p.decode() for p in arrays['image_paths.npy']]
    out = []
    for split in ('train', 'val'):
        tokens, index = arrays[f'{split}_tokens.bin'], arrays[f'{split}_index.npy']
        for off, n, i0, i1 in index:
            out.append((tuple(paths[i] for i in (i0, i1) if i >= 0), tokens[off:off + n].tolist()))
    return out


def expected_samples(records, tok):
    return sorted(((r['image'],), tok(r['conversations'][1]['value'].strip(), add_special_tokens=False)['input_ids'])
                  for r in records)

# -----------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize('verify', [True, False])
def test_messy_llava_every_filter_counted(messy, tmp_path, verify):
    meta = run('--data_dir', messy, '--out_dir', tmp_path / 'out', '--tokenizer=tiny', '--workers=2',
               *(['--verify-images'] if verify else []))
    assert meta['filters'] == expected_filters(verify)
    assert list(meta['filters']) == P.RULES
    kept = kept_records(verify)
    assert meta['counts'] == {'records': len(RECORDS), 'kept': len(kept)}
    meta2, arrays = load(tmp_path / 'out')
    assert meta2 == meta and set(meta) == META_KEYS
    assert meta['image_kind'] == 'folder' and meta['image_root'] == os.path.abspath(messy / 'images')
    assert meta['source'] == 'llava' and meta['tokenizer'] == 'tiny' and meta['max_dups'] == 1
    tok = tiny_tokenizer()
    assert sorted(samples(arrays)) == expected_samples(kept, tok)
    assert meta['n_images'] == len({r['image'] for r in kept}) == len(arrays['image_paths.npy'])
    assert arrays['image_paths.npy'].dtype.kind == 'S'
    assert arrays['train_tokens.bin'].dtype == np.uint32 and arrays['train_index.npy'].dtype == np.int64
    assert arrays['train_index.npy'].shape[1] == 4 and (arrays['train_index.npy'][:, 3] == -1).all()
    assert meta['splits'] == {'train': len(kept) - 1, 'val': 1}  # 1% of 9-14 samples rounds up to 1
    assert not list((tmp_path / 'out').glob('*.tmp'))


def test_folder_and_zip_give_identical_outputs(messy, tmp_path):
    # inline verification from the folder, a 2-process pool with per-worker zip handles from the zip
    m1 = run('--data_dir', messy, '--out_dir', tmp_path / 'f', '--tokenizer=tiny', '--verify_images', '--workers=1')
    m2 = run('--data_dir', messy, '--images', messy / 'images.zip', '--out_dir', tmp_path / 'z', '--tokenizer=tiny',
             '--verify_images', '--workers', '2')
    assert m2['image_kind'] == 'zip' and m2['image_root'] == os.path.abspath(messy / 'images.zip')
    assert m1['filters'] == m2['filters'] == expected_filters(True)
    _, a1 = load(tmp_path / 'f')
    _, a2 = load(tmp_path / 'z')
    for name in a1:
        assert a1[name].dtype == a2[name].dtype and np.array_equal(a1[name], a2[name]), name
    for key in ('splits', 'golden', 'counts', 'n_images'):
        assert m1[key] == m2[key]


def test_zip_with_top_folder(messy, tmp_path):
    """images.zip whose members sit under images/ (as some re-zips do): found, and the
    stored path is the member name."""
    with zipfile.ZipFile(messy / 'images.zip') as src, zipfile.ZipFile(tmp_path / 'images.zip', 'w') as dst:
        for name in src.namelist():
            dst.writestr('images/' + name, src.read(name))
    meta = run('--json', messy / P.LLAVA_JSON, '--images', tmp_path / 'images.zip', '--out_dir', tmp_path / 'o',
               '--tokenizer=tiny')
    assert meta['filters'] == expected_filters(False)
    _, arrays = load(tmp_path / 'o')
    with zipfile.ZipFile(tmp_path / 'images.zip') as zf:
        for p in arrays['image_paths.npy']:
            assert p.decode().startswith('images/') and p.decode() in zf.namelist()


def test_max_dups_and_lengths_are_settings(messy, tmp_path):
    meta = run('--data_dir', messy, '--out_dir', tmp_path / 'o', '--tokenizer=tiny', '--max_dups=2',
               '--min-tokens', '1', '--max_tokens=100')
    f = meta['filters']
    assert f['duplicate'] == 1 and f['too_short'] == 0 and f['too_long'] == 0  # three copies of one caption
    meta = run('--data_dir', messy, '--out_dir', tmp_path / 'o', '--tokenizer=tiny', '--max_dups=0')
    assert meta['filters']['duplicate'] == 0 and meta['max_dups'] == 0


def test_pack_images(messy, tmp_path):
    size = 32
    meta = run('--data_dir', messy, '--out_dir', tmp_path / 'f', '--tokenizer=tiny', '--pack-images',
               f'--pack_size={size}', '--workers=2')
    assert meta['image_kind'] == 'packed' and meta['packed_size'] == size
    assert meta['filters'] == expected_filters(True)  # packing implies verification
    _, arrays = load(tmp_path / 'f')
    blob = (tmp_path / 'f' / 'images_packed.bin').read_bytes()
    offs = np.load(tmp_path / 'f' / 'images_packed_offsets.npy')
    paths = [p.decode() for p in arrays['image_paths.npy']]
    assert offs.dtype == np.int64 and offs.shape == (len(paths) + 1,)
    assert offs[0] == 0 and offs[-1] == len(blob) and (np.diff(offs) > 0).all()
    pixels = {}
    for k, p in enumerate(paths):
        img = Image.open(io.BytesIO(blob[offs[k]:offs[k + 1]]))
        assert img.format == 'JPEG' and img.mode == 'RGB' and img.size == (size, size), p
        pixels[p] = np.asarray(img).astype(int)
    # EXIF orientation applied: red on top, blue below (not red left / blue right)
    ex = pixels['b/exif.jpg']
    assert ex[4, 8, 0] > 200 and ex[4, 24, 0] > 200 and ex[4, 24, 2] < 60
    assert ex[28, 8, 2] > 200 and ex[28, 24, 2] > 200 and ex[28, 8, 0] < 60
    assert pixels['b/i16.png'].mean() < 200  # 16-bit gray rescaled, not clipped to white
    # from the zip (per-worker handles): byte-identical pack
    run('--data_dir', messy, '--images', messy / 'images.zip', '--out_dir', tmp_path / 'z', '--tokenizer=tiny',
        '--pack_images', f'--pack_size={size}', '--workers=2')
    assert (tmp_path / 'z' / 'images_packed.bin').read_bytes() == blob
    # a later run without packing removes the stale pack (its image ids would not match)
    meta = run('--data_dir', messy, '--out_dir', tmp_path / 'f', '--tokenizer=tiny')
    assert meta['image_kind'] == 'folder' and not (tmp_path / 'f' / 'images_packed.bin').exists()


def test_caption_jsonl_with_two_images(tmp_path):
    d = tmp_path / 'caps'
    (d / 'imgs').mkdir(parents=True)
    (tmp_path / 'elsewhere').mkdir()
    (d / 'imgs' / 'x.jpg').write_bytes(jpeg_bytes(noise(20, 20, 1)))
    (d / 'imgs' / 'y.jpg').write_bytes(jpeg_bytes(noise(20, 20, 2)))
    z = tmp_path / 'elsewhere' / 'z.jpg'
    z.write_bytes(jpeg_bytes(noise(20, 20, 3)))
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
    ]
    (d / 'caps.jsonl').write_text('\n'.join(lines) + '\n')
    meta = run('--json', d / 'caps.jsonl', '--tokenizer=tiny', '--verify_images', '--workers=2')
    assert meta['source'] == 'jsonl' and meta['image_kind'] == 'folder' and meta['image_root'] == os.path.abspath(d)
    f = meta['filters']
    assert (f['malformed_json'], f['malformed_n_images'], f['malformed_keys'], f['malformed_types'],
            f['missing_image']) == (1, 2, 1, 1, 1)
    assert meta['counts'] == {'records': 8, 'kept': 2}
    _, arrays = load(d / 'prepared')  # out_dir defaults to the JSONL's folder
    tok = tiny_tokenizer()
    got = {imgs: ids for imgs, ids in samples(arrays)}
    assert got == {('imgs/x.jpg', str(z)): tok('two red circles and one blue square.')['input_ids'],
                   ('imgs/y.jpg',): tok('a green star at the top left.')['input_ids']}
    for p in arrays['image_paths.npy']:
        assert os.path.isfile(os.path.join(meta['image_root'], p.decode()))


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
    g = P.golden(lengths[a])
    assert len(g) == 32 and g == sorted(set(g)) and 0 <= g[0] and g[-1] < len(a)
    assert lengths[a][g].min() == lengths[a].min() and lengths[a][g].max() == lengths[a].max()
    assert P.golden(np.array([3, 1, 2])) == [0, 1, 2]


def test_synthetic(tmp_path):
    meta = run('--synthetic=300', '--data_dir', tmp_path / 's1', '--val_ratio=0.05')
    assert meta['source'] == 'synthetic' and meta['tokenizer'] == 'tiny' and meta['counts']['kept'] == 300
    assert meta['splits'] == {'train': 285, 'val': 15} and len(meta['golden']) == 15
    assert meta['qa_file'] == os.path.abspath(tmp_path / 's1' / 'qa.jsonl')
    saved, arrays = load(tmp_path / 's1' / 'prepared')
    assert saved == meta
    tok = tiny_tokenizer()
    unk = tok.convert_tokens_to_ids('[UNK]')
    for _, ids in samples(arrays):
        assert len(ids) >= 5 and unk not in ids
    records = json.loads((tmp_path / 's1' / 'synthetic.json').read_text())
    assert records[0]['conversations'][0] == {'from': 'human', 'value': '<image>\nDescribe the image in one sentence.'}
    assert records[123]['image'] == '000/000123.jpg'
    assert Image.open(tmp_path / 's1' / 'images' / '000' / '000123.jpg').size == (64, 64)
    words = set(TINY_WORDS)
    for r in records:
        assert set(r['conversations'][1]['value'].rstrip('.').split()) <= words
    qa = [json.loads(line) for line in (tmp_path / 's1' / 'qa.jsonl').read_text().splitlines()]
    assert 150 <= len(qa) <= 300
    for q in qa:
        assert (tmp_path / 's1' / q['image']).is_file() and q['answers'] and q['question']
        assert unk not in tok(q['question'])['input_ids'] and all(unk not in tok(x)['input_ids'] for x in q['answers'])
    assert any(q['question'] == 'What color is the circle?' for q in qa)
    val_images = {p.decode() for p in arrays['image_paths.npy'][arrays['val_index.npy'][:, 2]]}
    assert {q['image'][len('images/'):] for q in qa} >= val_images  # every val image has questions
    # deterministic from the seed; another seed draws another dataset
    run('--synthetic=300', '--data_dir', tmp_path / 's2', '--val_ratio=0.05')
    _, again = load(tmp_path / 's2' / 'prepared')
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    assert (tmp_path / 's1' / 'qa.jsonl').read_text() == (tmp_path / 's2' / 'qa.jsonl').read_text()
    assert (tmp_path / 's1/images/000/000007.jpg').read_bytes() == (tmp_path / 's2/images/000/000007.jpg').read_bytes()
    run('--synthetic=300', '--data_dir', tmp_path / 's3', '--seed=7')
    assert json.loads((tmp_path / 's3' / 'synthetic.json').read_text()) != records


def test_interrupted_write_leaves_no_stale_meta(messy, tmp_path, monkeypatch):
    out = tmp_path / 'o'
    run('--data_dir', messy, '--out_dir', out, '--tokenizer=tiny')
    assert (out / 'meta.json').exists()
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(a, b)
    monkeypatch.setattr(os, 'replace', flaky)
    with pytest.raises(KeyboardInterrupt):
        run('--data_dir', messy, '--out_dir', out, '--tokenizer=tiny', '--max_dups=0')
    assert not (out / 'meta.json').exists()  # half-replaced arrays must never sit next to a meta
    monkeypatch.setattr(os, 'replace', real)
    meta = run('--data_dir', messy, '--out_dir', out, '--tokenizer=tiny', '--max_dups=0')
    assert json.loads((out / 'meta.json').read_text()) == meta


def test_one_line_errors(tmp_path):
    def error_of(*argv):
        with pytest.raises(SystemExit) as e:
            run(*argv)
        msg = str(e.value.code)
        assert msg.startswith('error: ') and '\n' not in msg, msg
        return msg
    assert 'no caption file' in error_of('--json', tmp_path / 'nope.json')
    (tmp_path / 'bad.json').write_text('[{"id": 1,')
    assert 'not valid JSON' in error_of('--json', tmp_path / 'bad.json', '--skip_image_check', '--tokenizer=tiny')
    (tmp_path / 'ok.json').write_text(json.dumps([rec('x.jpg', 'a red circle at the top left.')]))
    assert '--images' in error_of('--json', tmp_path / 'ok.json', '--tokenizer=tiny')  # no images anywhere
    (tmp_path / 'images').mkdir()
    assert 'survived' in error_of('--json', tmp_path / 'ok.json', '--tokenizer=tiny')  # all images missing
    assert 'unrecognized' in error_of('--nope=1')
    assert 'max_tokens' in error_of('--min_tokens=9', '--max_tokens=3')
    assert error_of('--workers', 'two')


def test_cli_spellings():
    a = P.parse_args(['--verify-images', '--max_tokens', '40', '--val-ratio=0.02', '--pack_size=64'])
    assert a.verify_images and a.max_tokens == 40 and a.val_ratio == 0.02 and a.pack_size == 64
    assert P.parse_args(['--pack-images']).verify_images  # packing implies verification


def test_offline_no_args_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), PYTHONPATH=str(HERE))
    r = subprocess.run([sys.executable, str(HERE / 'prepare_llava.py')], cwd=tmp_path, env=env,
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
        (tmp_path / 'images' / f'{k}.jpg').write_bytes(jpeg_bytes(noise(16, 16, k)))
    (tmp_path / P.LLAVA_JSON).write_text(json.dumps([rec(f'{k}.jpg', c) for k, c in enumerate(caps)]))
    meta = run('--data_dir', tmp_path, '--tokenizer', qwen, '--val_ratio=0.3')
    tok = AutoTokenizer.from_pretrained(str(qwen))
    assert meta['tokenizer'] == os.path.abspath(qwen) and meta['vocab_size'] == len(tok)
    assert meta['eos_id'] == 151643 and tok.convert_ids_to_tokens(meta['slot_id']) == '<|image_pad|>'
    assert meta['slot_id'] < len(tok)
    assert meta['filters']['special_tokens'] == 2
    _, arrays = load(tmp_path / 'prepared')
    got = dict(samples(arrays))
    assert got == {(f'{k}.jpg',): tok(c.strip(), add_special_tokens=False)['input_ids'] for k, c in enumerate(caps[:5])}
