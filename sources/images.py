"""
Image files: how a vision tower wants its pixels, decoding any image to those pixels, reading
image bytes from wherever a prepared dataset keeps them (a folder, or beyond: images.zip, the
packed file, tar shards), and the checks and packing that prepare_llava.py runs over them.

1) the preprocessing rule of a tower (size, resize rule, resample filter, mean/std), read from
   its preprocessor_config.json so that pixels match the tower's own image processor,
2) decoding: EXIF orientation, any PIL mode to RGB, the resize the processor does, uint8 out
   (normalisation happens on the device, in model.VLM.encode_images),
3) ImageReader: bytes by image id from a folder, images.zip (read in place), the packed file,
   or WebDataset tar shards (read in place),
4) prepare-time work: which images exist, which decode, packing them into one file.
"""
import collections
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

from configurator import Progress, UserError, atomic_write, first_line, hub_reachable
from sources.backbones import KNOWN_PROCESSORS, parse_backbone

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')  # image files, by extension
MIN_SIDE = 8  # images smaller than this on a side carry no usable signal for a 384 px tower

# -----------------------------------------------------------------------------
# The tower's preprocessing rule

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


def check_image_files(prepared_dir, meta):
    """O(1) checks that the files of an image source beyond a folder have the sizes the
    dataset says: a truncated copy is one line at start, not unreadable images mid-run."""
    n = meta['n_images']
    if meta['image_kind'] == 'packed':
        offsets = load_array(prepared_dir, 'images_packed_offsets.npy')
        blob = os.path.join(prepared_dir, 'images_packed.bin')
        size = os.path.getsize(blob) if os.path.exists(blob) else -1
        if len(offsets) != n + 1 or size != int(offsets[-1]):
            raise UserError(f'{blob} has {size} bytes for {len(offsets) - 1} offsets ({n} images expected): the '
                            f'packed images are truncated; run prepare_llava.py --pack_images again')
    elif meta['image_kind'] == 'zip' and os.path.exists(os.path.join(prepared_dir, 'zip_locs.npy')):
        locs = load_array(prepared_dir, 'zip_locs.npy')
        if locs.shape != (n, 3):
            raise UserError(f'{prepared_dir}/zip_locs.npy holds {locs.shape}, expected ({n}, 3); run '
                            f'prepare_llava.py again')
    elif meta['image_kind'] == 'shards':
        locs = load_array(prepared_dir, 'image_locs.npy')
        if locs.shape != (n, 3):
            raise UserError(f'{prepared_dir}/image_locs.npy holds {locs.shape}, expected ({n}, 3); run '
                            f'prepare_llava.py again')



def load_array(prepared_dir, name):
    path = os.path.join(prepared_dir, name)
    try:
        return np.load(path, mmap_mode='r')
    except (OSError, ValueError) as e:
        raise UserError(f'{path} is missing or corrupt ({first_line(e, 80)}); run prepare_llava.py again for '
                        f'this dataset') from None


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
# Tar shards, read in place at train time: one member's bytes by its byte offset


def _pread_all(fd, offset, size):
    """pread until size bytes: a regular local file answers in one call, a network or FUSE
    file system may answer in parts. Short at end of file: the shard changed since its scan."""
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    parts, got = [data], len(data)
    while got < size:
        part = os.pread(fd, size - got, offset + got)
        if not part:
            raise OSError(f'short read: {got} of {size} bytes at offset {offset} (shard truncated since it was '
                          f'scanned?)')
        parts.append(part)
        got += len(part)
    return b''.join(parts)


def read_member(src, offset, size):
    """size bytes at offset of a shard: src is a path, an fd, or an open file (its fileno is
    used with pread, so its position is neither used nor moved)."""
    if isinstance(src, int):
        return _pread_all(src, offset, size)
    if hasattr(src, 'fileno'):
        return _pread_all(src.fileno(), offset, size)
    fd = os.open(src, os.O_RDONLY)
    try:
        return _pread_all(fd, offset, size)
    finally:
        os.close(fd)


class ShardFiles:
    """Member bytes by (shard id, offset, size), shard id indexing `paths`. Handles are opened
    lazily and per process: after a fork the inherited ones are closed (the parent's stay
    open) and the worker opens its own. At most max_open are open at once, least recently
    used closed first: thousands of shards times several DataLoader workers would otherwise
    run out of file descriptors (ulimit -n is often 1024). Reads are os.pread, so there is
    no shared file position to race on. One instance per process: not for sharing across
    threads (an eviction could close a handle another thread is reading)."""

    def __init__(self, paths, max_open=64):
        self.paths, self.max_open = list(paths), max(1, int(max_open))
        self._pid, self._fds = None, collections.OrderedDict()

    def _fd(self, shard):
        if self._pid != os.getpid():
            self._close_all()
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        if len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        fd = os.open(self.paths[shard], os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))
        self._fds[shard] = fd
        return fd

    def read(self, shard, offset, size):
        return _pread_all(self._fd(shard), int(offset), int(size))

    def n_open(self):
        return len(self._fds) if self._pid == os.getpid() else 0

    def _close_all(self):
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    close = _close_all

    def __del__(self):
        try:
            self._close_all()
        except Exception:  # at interpreter exit os may already be gone
            pass

    def __getstate__(self):  # a spawned worker opens its own
        return {**self.__dict__, '_pid': None, '_fds': collections.OrderedDict()}

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


def image_ref(where, stored_name):
    """What images.read_source takes: the stored name, or for shards its (shard, offset, size)."""
    return where['locs'][stored_name] if where['kind'] == 'shards' else stored_name


def check_images(f, images, where, verify, workers):
    """prepare_llava.py's image rules over the records f keeps alive (images: their image-name
    tuples; where: the input's kind, root, shard locations): existence, and with `verify`
    decoding, in parallel; f.keep drops and counts the records each rule catches. Returns
    {image name as given: name as stored (zip member name)}."""
    t0 = time.time()
    names = list(dict.fromkeys(p for i in f.alive for p in images[i]))
    stored = {n: n for n in names} if where['kind'] == 'shards' else \
        existing_images(where['kind'], where['root'], names)
    f.keep('missing_image', lambda i: all(p in stored for p in images[i]))
    print(f'checked {len(names):,} image paths in {time.time() - t0:.1f}s')
    if verify:
        t0 = time.time()
        todo = list(dict.fromkeys(stored[p] for i in f.alive for p in images[i]))
        results = map_images(check_image, [image_ref(where, n) for n in todo], where['kind'], where['root'],
                             workers, 'verify images', shards=where['shards'])
        bad = {n: why for n, why in zip(todo, results) if why}
        # a record goes under the rule of its first bad image
        why = {i: next(bad[stored[p]] for p in images[i] if stored[p] in bad)
               for i in f.alive if any(stored[p] in bad for p in images[i])}
        for rule in ('missing_image', 'zero_byte_image', 'undecodable_image', 'tiny_image', 'decompression_bomb'):
            f.keep(rule, lambda i: why.get(i) != rule)
        print(f'verified {len(todo):,} images in {time.time() - t0:.1f}s ({len(bad):,} bad)')
    return stored


def pack(out_dir, names, kind, root, workers, pack_size=None, shards=None):
    """All kept images streamed into one file (temp name until the dataset is written);
    returns (temp path, int64 offsets [n + 1])."""
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
