"""
Image files: how a vision tower wants its pixels, decoding any image to those pixels, reading
image bytes from wherever a prepared dataset keeps them, and the checks and packing that
prepare_llava.py runs over them.

1) the preprocessing rule of a tower (size, resize rule, resample filter, mean/std), read from
   its preprocessor_config.json so that pixels match the tower's own image processor,
2) decoding: EXIF orientation, any PIL mode to RGB, the resize the processor does, uint8 out
   (normalisation happens on the device, in model.VLM.encode_images),
3) ImageReader: bytes by image id from a folder, images.zip (read in place), the packed file,
   or WebDataset tar shards (read in place),
4) prepare-time work: which images exist, which decode, packing them into one file.
"""
import io
import json
import os
import struct
import time
import warnings
import zipfile
import zlib

import numpy as np
from PIL import Image, ImageFile, ImageOps

from common import Progress, UserError, hub_reachable, parse_backbone

MIN_SIDE = 8  # images smaller than this on a side carry no usable signal for a 384 px tower

# -----------------------------------------------------------------------------
# The tower's preprocessing rule

# The default tower's preprocessor_config.json, so 'random:google/siglip-so400m-patch14-384'
# needs no download: straight to 384x384, bicubic, mean/std 0.5
KNOWN_PROCESSORS = {
    'google/siglip-so400m-patch14-384': dict(size=dict(height=384, width=384), resample=3, do_normalize=True,
                                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
}
# How each tower family preprocesses when its directory has no preprocessor_config.json
# (SigLIP: straight to size x size; CLIP: shortest side to size, then a centre crop)
FAMILY_SPECS = {
    'siglip': dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample=3, crop=False),
    'clip': dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                 resample=3, crop=True),
}


def _processor_config(name):
    """The tower's preprocessor_config.json as a dict (local dir, hub cache, then hub), or None
    when it has none. Read as JSON rather than through AutoImageProcessor, whose classes and
    backends (PIL / torchvision) change between transformers releases."""
    path = None
    if os.path.isdir(name):
        path = os.path.join(name, 'preprocessor_config.json')
    else:
        from huggingface_hub import hf_hub_download
        for local in (True, False):
            if not local and not hub_reachable():
                break
            try:
                path = hf_hub_download(name, 'preprocessor_config.json', local_files_only=local)
                break
            except Exception:  # not cached / not on the hub: try the next place, else no file
                continue
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f'{path} is not valid JSON ({e}); fix or remove it') from None


def _spec_from_processor(p, name):
    size, crop = p.get('size'), p.get('crop_size')
    size = {'shortest_edge': size} if isinstance(size, int) else (size or {})
    crop = {'height': crop, 'width': crop} if isinstance(crop, int) else (crop or {})
    if p.get('do_center_crop') and crop:
        out, shortest = crop, size.get('shortest_edge') or crop.get('height')
    elif 'height' in size:
        out, shortest = size, None
    else:
        raise UserError(f"vision tower '{name}': preprocessor size {p.get('size')} is not a fixed square; only "
                        f"fixed-resolution towers (SigLIP, CLIP) are supported")
    if out.get('height') != out.get('width'):
        raise UserError(f"vision tower '{name}': non-square input {out} is not supported")
    norm = p.get('do_normalize', True)
    return dict(size=int(out['height']), shortest_edge=int(shortest) if shortest else None,
                mean=tuple(p.get('image_mean', (0.5,) * 3)) if norm else (0.0,) * 3,
                std=tuple(p.get('image_std', (0.5,) * 3)) if norm else (1.0,) * 3,
                resample=int(p.get('resample', 3)))


def image_spec(name, vision_cfg):
    """How the tower's own processor turns an image into pixels: `size` (square side fed to
    the tower), `shortest_edge` (None: resize straight to size x size, as SigLIP; else resize
    the shortest side to it, then centre-crop, as CLIP), `resample`, `mean`/`std`. A tower
    without a preprocessor file gets its family's rule; an unknown family is an error rather
    than a silent guess. name: a backbone name ('tiny', 'random:X', X; common.parse_backbone)."""
    kind, base = parse_backbone(name)
    p = None
    if kind != 'tiny':
        p = KNOWN_PROCESSORS.get(base) or _processor_config(base)
    if p is not None:
        return _spec_from_processor(p, base)
    family = next((f for f in FAMILY_SPECS if vision_cfg.model_type.startswith(f)), None)
    if family is None:
        raise UserError(f"vision tower '{base}' has no preprocessor_config.json and its family "
                        f"'{vision_cfg.model_type}' has no known default; put the preprocessor_config.json of "
                        f"the checkpoint it came from in its directory")
    spec = dict(FAMILY_SPECS[family], size=int(vision_cfg.image_size))
    spec['shortest_edge'] = spec['size'] if spec.pop('crop') else None
    return spec


def pack_spec(size):
    """The spec --pack_size uses: straight to size x size, bicubic."""
    return dict(size=size, shortest_edge=None, resample=3, mean=(0.5,) * 3, std=(0.5,) * 3)

# -----------------------------------------------------------------------------
# Decoding


def to_rgb(img):
    """Any PIL mode -> RGB, as the tower's processor does: transparency is composited on white
    (a black silhouette on a transparent background would otherwise vanish into black), and
    16-bit grayscale is scaled by its bit depth (1/257), not by its own maximum, which would
    turn a near-black image white."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith('I') or img.mode == 'F':
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if img.mode == 'F' and a.max() <= 1.0 else (a if img.mode == 'F' else a / 257.0)
        img = Image.fromarray(np.rint(a).clip(0, 255).astype(np.uint8), 'L')
    if img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')
    if 'A' in img.getbands() or img.mode in ('RGBa', 'La'):
        img = img.convert('RGBA')
        bg = Image.new('RGBA', img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert('RGB')


def load_image(src, spec):
    """bytes, a path or a PIL image -> uint8 array [3, size, size], resized exactly as the
    tower's processor resizes (PIL, same filter, same crop), so that training sees the pixels
    the tower was trained on. No JPEG draft-mode shortcut: it changes the pixels of large
    JPEGs."""
    img = src if isinstance(src, Image.Image) else Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
    img = to_rgb(img)
    size, short = spec['size'], spec.get('shortest_edge')
    if short:  # shortest side to `short` (long side truncated, as transformers does), centre crop
        w, h = img.size
        new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        if new != img.size:
            img = img.resize(new, resample=spec['resample'])
        w, h = img.size
        top, left = (h - size) // 2, (w - size) // 2
        if top >= 0 and left >= 0:
            img = img.crop((left, top, left + size, top + size))
        else:  # smaller than the crop: zero-pad around it, as the processor does
            canvas = Image.new('RGB', (max(w, size), max(h, size)))
            canvas.paste(img, (-(-(max(w, size) - w) // 2), -(-(max(h, size) - h) // 2)))
            top, left = (canvas.height - size) // 2, (canvas.width - size) // 2
            img = canvas.crop((left, top, left + size, top + size))
    elif img.size != (size, size):
        img = img.resize((size, size), resample=spec['resample'])
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()

# -----------------------------------------------------------------------------
# Reading image bytes at train time


def resolve_root(prepared_dir, meta, override=''):
    """The image root of a prepared dataset. meta.json stores it relative to the prepared
    folder, so data/ copied or mounted elsewhere still works; the absolute path seen at
    prepare time is the fallback; `override` (train.py's image_root) wins over both."""
    if meta['image_kind'] == 'packed':
        return prepared_dir
    tried = [override] if override else [os.path.normpath(os.path.join(prepared_dir, meta['image_root'])),
                                          meta.get('image_root_abs', '')]
    for root in tried:
        if root and os.path.exists(root):
            return root
    raise UserError(f"the images of {prepared_dir} are not at {' nor '.join(t for t in tried if t)}; set "
                    f"image_root=PATH (the folder, images.zip or shard folder it was prepared from)")


class ImageReader:
    """Raw image bytes by image id. Handles (images.zip, the packed file, tar shards) are
    opened lazily and per process: a handle shared across forked DataLoader workers would
    interleave their seeks."""

    def __init__(self, prepared_dir, meta, image_paths, root):
        self.kind, self.root, self.paths, self.dir = meta['image_kind'], root, image_paths, prepared_dir
        self.shards = meta.get('shards')
        self._pid = None

    def _open(self):
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        locs = os.path.join(self.dir, 'zip_locs.npy')
        if self.kind == 'zip' and os.path.exists(locs):
            # where each member is, found at prepare time: zipfile.ZipFile would parse the whole
            # central directory in every process (558K entries: ~0.3 GB per loader worker)
            self._locs, self._file = np.load(locs, mmap_mode='r'), open(self.root, 'rb')
        elif self.kind == 'zip':  # prepared before zip_locs.npy existed
            self._zip = zipfile.ZipFile(self.root)
        elif self.kind == 'packed':
            self._blob = np.memmap(os.path.join(self.dir, 'images_packed.bin'), dtype=np.uint8, mode='r')
            self._offsets = np.load(os.path.join(self.dir, 'images_packed_offsets.npy'), mmap_mode='r')
        elif self.kind == 'shards':
            from shards import ShardFiles
            self._locs = np.load(os.path.join(self.dir, 'image_locs.npy'), mmap_mode='r')
            self._files = ShardFiles([os.path.join(self.root, s) for s in self.shards])

    def name(self, image_id):
        return self.paths[image_id].decode()

    def path(self, image_id):
        """Where a person finds the image (a file path, or a member inside a zip / shard)."""
        return os.path.join(self.root, self.name(image_id))

    def read(self, image_id):
        self._open()
        if self.kind == 'packed':
            a, b = int(self._offsets[image_id]), int(self._offsets[image_id + 1])
            return self._blob[a:b].tobytes()
        if self.kind == 'shards':
            shard, offset, size = (int(v) for v in self._locs[image_id])
            return self._files.read(shard, offset, size)
        if self.kind == 'zip' and hasattr(self, '_file'):
            return read_zip_member(self._file, *(int(v) for v in self._locs[image_id]))
        if self.kind == 'zip':
            return self._zip.read(self.name(image_id))
        with open(os.path.join(self.root, self.name(image_id)), 'rb') as f:
            return f.read()

    def __getstate__(self):  # workers reopen their own handles
        return {k: v for k, v in self.__dict__.items() if not k.startswith('_')} | {'_pid': None}

def zip_locations(root, names):
    """int64 [n, 3] of zip members (local header offset, compressed size, method), read from
    the central directory once, at prepare time."""
    with zipfile.ZipFile(root) as zf:
        info = {i.filename: i for i in zf.infolist()}
    return np.array([(info[n].header_offset, info[n].compress_size, info[n].compress_type) for n in names],
                    dtype=np.int64).reshape(-1, 3)


def read_zip_member(f, offset, size, method):
    """One member's bytes from an open zip file, by its zip_locations row."""
    f.seek(offset)
    head = f.read(30)
    if head[:4] != b'PK\x03\x04':
        raise ValueError(f'no zip member at byte {offset}: the zip changed since it was prepared')
    name_len, extra_len = struct.unpack('<HH', head[26:30])  # the local header's own lengths
    f.seek(offset + 30 + name_len + extra_len)
    data = f.read(size)
    if method == zipfile.ZIP_STORED:
        return data
    if method == zipfile.ZIP_DEFLATED:
        return zlib.decompress(data, -15)  # raw deflate, as zip stores it
    raise ValueError(f'zip compression method {method} is not supported (stored or deflated only)')

# -----------------------------------------------------------------------------
# Prepare time: existence, verification, packing


def existing_images(kind, root, names):
    """{name: stored name} for the names that exist. A folder is listed once per directory
    (a few hundred listdir calls instead of 558K stats); a zip's names come from its
    central directory. For a zip whose members sit under a top folder (images/00000/x.jpg)
    that prefix is found and kept in the stored name."""
    if kind == 'zip':
        with zipfile.ZipFile(root) as zf:
            members = set(zf.namelist())
        prefix = ''
        probe = next((n for n in names if n not in members), None)
        if probe is not None and not any(n in members for n in names[:1000]):
            hit = next((m for m in members if m.endswith('/' + probe)), None)
            prefix = hit[:-len(probe)] if hit else ''
        return {n: prefix + n for n in names if prefix + n in members}
    split = [n.rpartition('/') for n in names]  # (dir, '/', file); rpartition is 3x faster than os.path
    listing = {}
    for d in {d for d, _, _ in split}:
        try:
            listing[d] = set(os.listdir(os.path.join(root, d)))
        except OSError:
            listing[d] = set()
    return {n: n for n, (d, _, f) in zip(names, split) if f in listing[d]}


# Per-process image source of the prepare pool, set by init_source in each worker: one zip
# handle per process (a handle shared across forks would interleave seeks).
_SOURCE = {}


def init_source(kind, root, pack_size=None, shards=None):
    _SOURCE.update(kind=kind, root=root, pack_size=pack_size, zip=zipfile.ZipFile(root) if kind == 'zip' else None)
    if kind == 'shards':
        from shards import ShardFiles
        _SOURCE['shards'] = ShardFiles([os.path.join(root, s) for s in shards])
    # verification must see a truncated file as an error, whatever a caller set globally
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def read_source(name):
    """Image bytes by stored name: a path under the root, a zip member, or for shards an
    (shard, offset, size) triple."""
    if _SOURCE['kind'] == 'shards':
        return _SOURCE['shards'].read(*name)
    if _SOURCE['zip'] is not None:
        return _SOURCE['zip'].read(name)
    with open(os.path.join(_SOURCE['root'], name), 'rb') as f:
        return f.read()


def check_image(name):
    """None if the image is usable, else the rule it breaks."""
    try:
        raw = read_source(name)
    except (OSError, KeyError):
        return 'missing_image'  # vanished since the existence check
    if not raw:
        return 'zero_byte_image'
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; a bomb is a bomb either way
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                im.load()
                if min(im.size) < MIN_SIDE:
                    return 'tiny_image'
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return 'decompression_bomb'
    except Exception:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
        return 'undecodable_image'
    return None


def pack_image(name):
    """The bytes packed for one image: the original file, untouched (lossless: training sees
    exactly the pixels the folder would give), or with --pack_size a JPEG (q95) resized
    straight to that size, which decodes 2-3x faster but is not pixel-exact (README)."""
    try:
        raw = read_source(name)
        if not _SOURCE['pack_size']:
            return raw
        a = load_image(raw, pack_spec(_SOURCE['pack_size']))
    except Exception as e:
        return f'{type(e).__name__}: {e}'
    buf = io.BytesIO()
    Image.fromarray(a.transpose(1, 2, 0)).save(buf, format='JPEG', quality=95)
    return buf.getvalue()


def map_images(fn, names, kind, root, workers, what, pack_size=None, shards=None):
    """fn over image names, in order, over a pool of `workers` processes (inline for 1)."""
    progress = Progress(what, len(names))
    if workers <= 1 or len(names) < 2:
        init_source(kind, root, pack_size, shards)
        for i, name in enumerate(names):
            yield fn(name)
            progress(i + 1)
        return
    import multiprocessing as mp
    with mp.get_context('fork').Pool(workers, init_source, (kind, root, pack_size, shards)) as pool:
        for i, r in enumerate(pool.imap(fn, names, chunksize=16)):
            yield r
            progress(i + 1)


def pack(out_dir, names, kind, root, workers, pack_size=None, shards=None):
    """All kept images streamed into one file (temp name until the dataset is written);
    returns (temp path, int64 offsets [n + 1])."""
    from common import atomic_write
    t0 = time.time()
    tmp = os.path.join(out_dir, 'images_packed.bin.part')
    offsets = np.zeros(len(names) + 1, np.int64)

    def write(f):
        for k, b in enumerate(map_images(pack_image, names, kind, root, workers, 'pack images', pack_size, shards)):
            if isinstance(b, str):  # verified moments ago, so the file changed under us
                raise UserError(f'cannot pack image {names[k]} ({b}); run prepare_llava.py again')
            f.write(b)
            offsets[k + 1] = offsets[k] + len(b)
    atomic_write(tmp, write)
    print(f"packed {len(names):,} images ({'resized to %d px JPEG' % pack_size if pack_size else 'original bytes'}"
          f", {offsets[-1] / 2**20:,.1f} MiB) in {time.time() - t0:.1f}s")
    return tmp, offsets
