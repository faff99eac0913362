"""
Tests of sources/images.py: decoding any image mode to the tower's RGB pixels (16-bit and float
images scaled by their bit depth), real photos, reading image bytes back from a folder,
images.zip or the packed file, pixel parity with the towers' own image processors (SigLIP,
CLIP, what VLM.encode_images feeds the tower, family defaults), and packing (lossless by
default, --pack_size within a documented difference).

$ python -m pytest -q tests/test_images.py
"""
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
from sources import images
import model as M
import prepare_llava as P
from configurator import UserError
from sources import backbones as B
from conftest import ASSETS, TINY_ARGS, asset_photos

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
    files, picks = asset_photos()
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


def _read_in_a_forked_child(reader, i, queue):
    data_ = reader.read(i)
    queue.put((data_, reader._file.fileno()))


def test_a_forked_worker_opens_its_own_zip_handle(three_sources):
    """DataLoader workers are forked after the main process has read images (golden samples,
    val): a handle shared across processes shares its file offset, and their seeks interleave.
    Each process must open its own."""
    import multiprocessing
    files, prepared = three_sources
    p = prepared['zip']
    reader = images.ImageReader(p['dir'], p['meta'], p['image_paths'], p['root'])
    assert reader.read(0) == files[reader.name(0)]  # the parent's handle is open
    ctx = multiprocessing.get_context('fork')
    q = ctx.Queue()
    child = ctx.Process(target=_read_in_a_forked_child, args=(reader, 1, q))
    child.start()
    got, child_fd = q.get(timeout=60)
    child.join(60)
    assert got == files[reader.name(1)]
    assert child_fd != reader._file.fileno()  # its own open file, not the inherited one


def test_packed_by_default_keeps_the_original_bytes(three_sources):
    _, prepared = three_sources
    assert prepared['packed']['meta']['packed_size'] == 'original'

# -----------------------------------------------------------------------------
# 16-bit and float images: scaled by their bit depth, not by their own maximum


def test_16bit_images_are_scaled_by_bit_depth(tmp_path):
    spec = images.pack_spec(S)
    rng = np.random.default_rng(0)
    dark = Image.fromarray(rng.integers(0, 600, (40, 40)).astype(np.uint16))  # near black in 16 bits
    assert dark.mode.startswith('I;16')
    a = images.load_image(dark, spec)
    assert a.max() <= 3 and a.mean() < 2  # stays near black (x / 257), not stretched to white
    mid = Image.fromarray(np.full((20, 30), 257 * 128, np.uint16))
    assert (images.load_image(mid, spec) == 128).all()
    Image.fromarray(np.full((20, 30), 65535, np.uint16)).save(tmp_path / 'white16.png')
    assert Image.open(tmp_path / 'white16.png').mode in ('I;16', 'I')
    assert (images.load_image((tmp_path / 'white16.png').read_bytes(), spec) == 255).all()
    grad = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(grad).save(tmp_path / 'grad16.png')
    got = images.load_image(str(tmp_path / 'grad16.png'), images.pack_spec(64))
    assert np.abs(got[0].astype(int) - np.rint(grad / 257)).max() <= 1 and (got[0] == got[2]).all()
    # before any resize: every 16-bit value v becomes round(v / 257) exactly (65535 -> 255)
    every = np.arange(0, 65536, 7, dtype=np.uint16).reshape(-1, 1)
    rgb = np.asarray(images.to_rgb(Image.fromarray(every)))
    assert np.array_equal(rgb[..., 0].astype(int), np.rint(every / 257).astype(int))


def test_mode_i_and_f_images():
    spec = images.pack_spec(S)
    i32 = Image.fromarray(np.full((20, 30), 257 * 64, np.int32), 'I')  # 16-bit data in PIL's 32-bit mode
    a = images.load_image(i32, spec)
    assert a.shape == (3, S, S) and (a == 64).all()
    f01 = Image.fromarray(np.full((20, 30), 0.25, np.float32), 'F')  # float in [0, 1]
    assert (images.load_image(f01, spec) == 64).all()
    f255 = Image.fromarray(np.linspace(0, 255, 600, dtype=np.float32).reshape(20, 30), 'F')  # float in [0, 255]
    b = images.load_image(f255, images.pack_spec(30))
    assert b.shape == (3, 30, 30) and b.min() <= 5 and b.max() >= 250

# -----------------------------------------------------------------------------
# preprocessing parity with the tower's own image processor


def pil_processor(name):
    """transformers' PIL-backend processor class (the one sources/images.py mirrors): `XImageProcessorPil`
    in transformers 5, `XImageProcessor` before."""
    import transformers
    return getattr(transformers, f'{name}Pil', None) or getattr(transformers, name)


def normalise(a, spec):
    """uint8 [3, H, W] -> what the processor returns: (x / 255 - mean) / std."""
    m, s = (np.array(spec[k], dtype=np.float64).reshape(3, 1, 1) for k in ('mean', 'std'))
    return (a / 255.0 - m) / s


def assert_within_one_level(ref, got, spec, what):
    """Equal to within one uint8 level: 1/255 before normalisation (2/255 at mean/std 0.5)."""
    assert ref.shape == got.shape, (what, ref.shape, got.shape)
    err = np.abs(ref - got) * np.array(spec['std']).reshape(3, 1, 1) * 255
    assert err.max() <= 1.0 + 1e-4, (what, float(err.max()))


def sample_images():
    """{name: file bytes}: the real photos (when ../shared is there) and a few drawn ones of
    awkward sizes and modes. Bytes, as training reads them: a decoder shortcut (JPEG draft
    mode) only shows on an image that has not been decoded yet."""
    folder = ASSETS / 'images'
    out = {f.name: f.read_bytes() for f in sorted(folder.iterdir())} if folder.is_dir() else {}
    rng = np.random.default_rng(1)
    for name, shape in (('wide.png', (60, 500, 3)), ('tall_rgba.png', (300, 90, 4)), ('small_gray.png', (50, 70))):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format='PNG')
        out[name] = buf.getvalue()
    return out


def processor_pixels(proc, raw):
    return proc(images=Image.open(io.BytesIO(raw)), return_tensors='np')['pixel_values'][0]


def composites_on_white(proc):
    """Whether this transformers version's processor composites transparency on white (as
    images.to_rgb does, and transformers >= 5.18 does) or drops the alpha channel (5.17)."""
    clear = Image.new('RGBA', (8, 8), (0, 0, 0, 0))
    return proc(images=clear, return_tensors='np')['pixel_values'].max() > 0


def comparable(proc, files):
    """The files whose pixels this processor defines as sources/images.py does: transparent ones only
    when it composites on white (a processor that drops alpha shows the hidden colours)."""
    if composites_on_white(proc):
        return files
    return {n: raw for n, raw in files.items() if 'A' not in Image.open(io.BytesIO(raw)).getbands()}


SIGLIP = ASSETS / 'siglip-so400m-patch14-384'


@pytest.mark.skipif(not (SIGLIP / 'preprocessor_config.json').exists(), reason='no ../shared/assets')
def test_siglip_pixels_match_the_processor_on_every_image():
    """hubble_deep_field.jpg is the image a JPEG draft()-mode decoding shortcut gets wrong."""
    from transformers import AutoConfig
    proc = pil_processor('SiglipImageProcessor').from_pretrained(str(SIGLIP))
    cfg = AutoConfig.from_pretrained(str(SIGLIP))
    spec = images.image_spec(str(SIGLIP), getattr(cfg, 'vision_config', cfg))
    files = sample_images()
    assert not (ASSETS / 'images').is_dir() or 'hubble_deep_field.jpg' in files
    for name, raw in comparable(proc, files).items():
        ref = processor_pixels(proc, raw)
        assert_within_one_level(ref, normalise(images.load_image(raw, spec), spec), spec, name)
    assert spec['size'] == 384 and spec['shortest_edge'] is None and spec['mean'] == spec['std'] == (0.5,) * 3
    assert spec == images.image_spec('random:' + str(SIGLIP), cfg)


@pytest.mark.parametrize('shortest_edge', [224, 256, 200])  # 200 < crop: the processor zero-pads
def test_clip_pixels_match_the_processor_on_every_image(tmp_path, shortest_edge):
    from transformers import CLIPVisionConfig
    proc = pil_processor('CLIPImageProcessor')(size={'shortest_edge': shortest_edge}, crop_size=224)
    proc.save_pretrained(str(tmp_path))
    spec = images.image_spec(f'random:{tmp_path}', CLIPVisionConfig(image_size=224))
    for name, raw in comparable(proc, sample_images()).items():
        ref = processor_pixels(proc, raw)
        assert_within_one_level(ref, normalise(images.load_image(raw, spec), spec), spec, name)
    assert spec['size'] == 224 and spec['shortest_edge'] == shortest_edge and spec['mean'][0] != 0.5


@pytest.mark.parametrize('resample', [2, 3])  # bilinear, bicubic
def test_the_processor_resample_filter_is_followed(tmp_path, resample):
    from transformers import SiglipVisionConfig
    proc = pil_processor('SiglipImageProcessor')(size={'height': 64, 'width': 64}, resample=resample)
    proc.save_pretrained(str(tmp_path))
    spec = images.image_spec(f'random:{tmp_path}', SiglipVisionConfig(image_size=64))
    assert spec['resample'] == resample
    for name, raw in comparable(proc, sample_images()).items():
        assert_within_one_level(processor_pixels(proc, raw), normalise(images.load_image(raw, spec), spec), spec, name)


def test_processor_file_defaults_follow_transformers(tmp_path):
    """A preprocessor_config.json that leaves out do_normalize normalises (the processors'
    default); do_normalize false means pixels / 255 only."""
    from transformers import SiglipVisionConfig
    cfg = dict(image_processor_type='SiglipImageProcessor', size={'height': 64, 'width': 64},
               image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2])
    for flag, mean, std in ((None, 0.4, 0.2), (True, 0.4, 0.2), (False, 0.0, 1.0)):
        d = tmp_path / str(flag)
        d.mkdir()
        (d / 'preprocessor_config.json').write_text(json.dumps(cfg if flag is None else dict(cfg, do_normalize=flag)))
        spec = images.image_spec(f'random:{d}', SiglipVisionConfig(image_size=64))
        assert spec['mean'] == (mean,) * 3 and spec['std'] == (std,) * 3 and spec['resample'] == 3, (flag, spec)


def tiny_tower(folder, model_type, image_size, processor=None):
    """A directory with a tiny vision tower's config.json (and the processor's
    preprocessor_config.json, if given), for 'random:<dir>'."""
    folder.mkdir()
    cfg = dict(model_type=model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, image_size=image_size, patch_size=16)
    (folder / 'config.json').write_text(json.dumps(cfg))
    if processor is not None:
        processor.save_pretrained(str(folder))
    return f'random:{folder}'


@pytest.mark.parametrize('family', ['siglip', 'clip'])
def test_encode_images_feeds_the_tower_the_processor_pixels(tmp_path, family):
    """What the vision tower receives from VLM.encode_images (uint8 batch normalised on the
    device) equals the processor's pixel_values: a wrong mean/std or a skipped crop shows here."""
    if family == 'siglip':
        proc = pil_processor('SiglipImageProcessor')(size={'height': 64, 'width': 64}, resample=3,
                                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        proc = pil_processor('CLIPImageProcessor')(size={'shortest_edge': 72}, crop_size=64)
    vision = tiny_tower(tmp_path / family, f'{family}_vision_model', 64, proc)
    vlm = M.build_vlm({**TINY_ARGS, 'vision': vision}, B.load_tokenizer('tiny'))
    seen = []
    vlm.vision.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get('pixel_values', a[0] if a else None)),
                                         with_kwargs=True)
    raws = list(comparable(proc, sample_images()).values())[-4:]
    batch = torch.from_numpy(np.stack([images.load_image(r, vlm.image_spec) for r in raws]))
    vlm.encode_images(batch)
    pics = [Image.open(io.BytesIO(r)) for r in raws]
    ref = proc(images=pics, return_tensors='np')['pixel_values']
    got = seen[0].float().numpy()
    for k in range(len(pics)):
        assert_within_one_level(ref[k], got[k], vlm.image_spec, k)


@pytest.mark.parametrize('model_type,mean,crop', [
    ('siglip_vision_model', (0.5, 0.5, 0.5), False),
    ('clip_vision_model', (0.48145466, 0.4578275, 0.40821073), True),
])
def test_tower_without_processor_file_gets_its_family_default(tmp_path, model_type, mean, crop):
    from transformers import AutoConfig
    vision = tiny_tower(tmp_path / 'tower', model_type, 48)
    spec = images.image_spec(vision, AutoConfig.from_pretrained(vision[len('random:'):]))
    assert spec['size'] == 48 and spec['mean'] == mean and spec['resample'] == 3
    assert spec['shortest_edge'] == (48 if crop else None)  # CLIP: shortest side, then a centre crop
    vlm = M.build_vlm({**TINY_ARGS, 'vision': vision}, B.load_tokenizer('tiny'))
    assert vlm.image_spec == spec
    torch.testing.assert_close(vlm.pix_mean.flatten(), torch.tensor(mean) * 255)


@pytest.mark.parametrize('model_type', ['dinov2', 'vit'])
def test_unknown_tower_family_without_processor_file_is_an_error(tmp_path, model_type):
    from transformers import AutoConfig
    vision = tiny_tower(tmp_path / 'tower', model_type, 48)
    with pytest.raises(UserError, match='preprocessor_config.json'):
        images.image_spec(vision, AutoConfig.from_pretrained(vision[len('random:'):]))
    with pytest.raises(UserError, match=model_type):
        M.build_vlm({**TINY_ARGS, 'vision': vision}, B.load_tokenizer('tiny'))

# -----------------------------------------------------------------------------
# packing: lossless by default, --pack_size close


def drawn(mode, k):
    """A smooth drawn picture (gradient + shapes, as photos are smooth at this scale) in `mode`."""
    from PIL import ImageDraw
    y, x = np.mgrid[0:60, 0:80]
    a = np.stack([x * 3, y * 4, (x + y) * 2], -1).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(a)
    d = ImageDraw.Draw(img)
    d.ellipse([10 + k, 10, 40 + k, 40], fill=(230, 30, 30))
    d.rectangle([45, 20, 70, 50], fill=(20, 40, 220))
    if mode == 'I;16':
        return Image.fromarray(np.asarray(img.convert('L')).astype(np.uint16) * 257)
    if mode == 'RGBA':
        img.putalpha(Image.fromarray(((x * 3) % 256).astype(np.uint8)))
        return img
    return img.convert(mode) if mode != 'RGB' else img


def encoded(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope='module')
def packs(tmp_path_factory):
    """Images of many modes prepared from the folder, packed (original bytes) and packed at
    --pack_size S: {kind: data.open_prepared(...)}."""
    d = tmp_path_factory.mktemp('packs')
    exif = drawn('RGB', 0).getexif()
    exif[0x0112] = 6
    files = {'rgb.jpg': encoded(drawn('RGB', 1), 'JPEG', quality=90), 'rgba.png': encoded(drawn('RGBA', 2), 'PNG'),
             'gray.png': encoded(drawn('L', 3), 'PNG'), 'g16.png': encoded(drawn('I;16', 4), 'PNG'),
             'pal.png': encoded(drawn('P', 5), 'PNG'), 'cmyk.jpg': encoded(drawn('CMYK', 6), 'JPEG'),
             'exif.jpg': encoded(drawn('RGB', 7), 'JPEG', exif=exif.tobytes())}
    caps = ['a red circle at the top left.', 'a blue square at the bottom right.', 'two green stars in the center.',
            'a yellow triangle on the left.', 'a white cross on the right.', 'an orange diamond at the top.',
            'a pink circle at the bottom.']
    for name, raw in files.items():
        (d / name).write_bytes(raw)
    (d / 'caps.jsonl').write_text(''.join(json.dumps(dict(id=n, images=[n], caption=c)) + '\n'
                                          for n, c in zip(files, caps)))
    common = ['--json', str(d / 'caps.jsonl'), '--tokenizer=tiny', '--val_ratio=0', '--workers=1']
    P.main([*common, '--out_dir', str(d / 'folder')])
    P.main([*common, '--pack_images', '--out_dir', str(d / 'packed')])
    P.main([*common, '--pack_images', f'--pack_size={S}', '--out_dir', str(d / 'resized')])
    return {kind: data.open_prepared(str(d / kind)) for kind in ('folder', 'packed', 'resized')}


def pixels(p, spec):
    reader = images.ImageReader(p['dir'], p['meta'], p['image_paths'], p['root'])
    return {reader.name(i): images.load_image(reader.read(i), spec) for i in range(len(p['image_paths']))}


def test_packing_is_lossless_by_default(packs):
    """--pack_images without --pack_size: the pixels training sees are exactly the folder's,
    for every mode, at any tower size and crop."""
    assert packs['packed']['meta']['image_kind'] == 'packed'
    for spec in (images.pack_spec(S), dict(images.pack_spec(40), shortest_edge=50)):
        ref, got = pixels(packs['folder'], spec), pixels(packs['packed'], spec)
        assert list(ref) == list(got) and len(ref) == 7
        for name in ref:
            assert np.array_equal(ref[name], got[name]), name


def test_pack_size_is_close_to_the_folder(packs):
    """--pack_size S stores S x S JPEGs (q95, 4:2:0 chroma): at a tower of size S the pixels
    differ from the folder's by JPEG noise only. The documented difference: a mean absolute
    difference under 8 levels per image (0.5-7 on these small drawn images with saturated
    edges; 1-2.5 on real photos at 384 px). A wrong mode conversion, orientation or 16-bit
    scaling would be tens of levels."""
    spec = images.pack_spec(S)
    ref, got = pixels(packs['folder'], spec), pixels(packs['resized'], spec)
    assert packs['resized']['meta']['packed_size'] == S and list(ref) == list(got)
    for name in ref:
        diff = np.abs(ref[name].astype(int) - got[name].astype(int))
        assert diff.mean() < 8, (name, diff.mean())
