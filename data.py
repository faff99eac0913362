"""
Training-time data: the prepared-dataset reader, image reading and preprocessing, sample
building (template, image slots, labels), multi-image mixing, length-grouped batching or
packing, and the DataLoader.

The prepared directory (written by prepare_llava.py) holds flat arrays opened with
np.memmap / np.load(mmap_mode='r'), so opening 558K samples costs no per-sample parsing:
  meta.json                      tokenizer, eos/slot ids, image root and kind, counts, golden list
  {train,val}_tokens.bin         uint32 caption tokens of the split, concatenated (no eos)
  {train,val}_index.npy          int64 [n, 4]: token offset, token length, image id 0, image id 1 (-1: none)
  image_paths.npy                fixed-width utf-8 bytes, image path relative to the image root
  images_packed.bin / _offsets   optional: every image as resized JPEG bytes, one file
"""
import functools
import io
import json
import os
import zipfile

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

# A truncated JPEG decodes its readable part instead of raising: the image is still useful.
ImageFile.LOAD_TRUNCATED_IMAGES = True

TEMPLATE_A = '<image>\nDescribe the image in one sentence.\n'
TEMPLATE_B = '<image>\n<image>\nDescribe each image in order, one sentence per image.\n'
MULTI_PREFIXES = ('Image 1: ', ' Image 2: ')  # Template B's target: "Image 1: ... Image 2: ..."

# -----------------------------------------------------------------------------
# The prepared dataset


def open_prepared(prepared_dir):
    """dict(meta, train=(tokens, index), val=(tokens, index), image_paths, dir). O(1) memory."""
    meta_path = os.path.join(prepared_dir, 'meta.json')
    if not os.path.exists(meta_path):
        raise SystemExit(f"error: no prepared dataset at '{prepared_dir}' (meta.json missing): run "
                         f"`python prepare_llava.py` (LLaVA-Pretrain in data/llava_pretrain/) or "
                         f"`python prepare_llava.py --synthetic=2000` first, or set data_dir")
    with open(meta_path) as f:
        meta = json.load(f)
    d = dict(meta=meta, dir=prepared_dir)
    for split in ('train', 'val'):
        tokens = np.memmap(os.path.join(prepared_dir, f'{split}_tokens.bin'), dtype=np.uint32, mode='r') \
            if os.path.getsize(os.path.join(prepared_dir, f'{split}_tokens.bin')) else np.zeros(0, np.uint32)
        d[split] = (tokens, np.load(os.path.join(prepared_dir, f'{split}_index.npy'), mmap_mode='r'))
    d['image_paths'] = np.load(os.path.join(prepared_dir, 'image_paths.npy'), mmap_mode='r')
    return d

# -----------------------------------------------------------------------------
# Images


class ImageReader:
    """Raw image bytes by image id, from a folder, from images.zip read in place, or from
    the packed file. File handles are opened lazily and per process: a zip handle shared
    across forked DataLoader workers would interleave their seeks."""

    def __init__(self, prepared_dir, meta, image_paths):
        self.kind, self.root, self.paths = meta['image_kind'], meta['image_root'], image_paths
        self.dir, self._pid, self._handle, self._offsets = prepared_dir, None, None, None

    def _open(self):
        if self._pid != os.getpid():
            self._pid = os.getpid()
            if self.kind == 'zip':
                self._handle = zipfile.ZipFile(self.root)
            elif self.kind == 'packed':
                self._handle = np.memmap(os.path.join(self.dir, 'images_packed.bin'), dtype=np.uint8, mode='r')
                self._offsets = np.load(os.path.join(self.dir, 'images_packed_offsets.npy'), mmap_mode='r')

    def path(self, image_id):
        return os.path.join(self.root, self.paths[image_id].decode())

    def read(self, image_id):
        self._open()
        if self.kind == 'packed':
            a, b = int(self._offsets[image_id]), int(self._offsets[image_id + 1])
            return self._handle[a:b].tobytes()
        name = self.paths[image_id].decode()
        if self.kind == 'zip':
            return self._handle.read(name)
        with open(os.path.join(self.root, name), 'rb') as f:
            return f.read()

    def __getstate__(self):  # workers reopen their own handles
        return {**self.__dict__, '_pid': None, '_handle': None, '_offsets': None}


def to_rgb(img):
    """Any PIL mode -> RGB. Transparency is composited on white (a black RGBA silhouette on a
    transparent background would otherwise vanish into black); 16/32-bit grayscale is
    rescaled to 8 bits instead of being clipped to white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
        a = np.asarray(img, dtype=np.float32)
        hi = max(float(a.max()), 1.0)
        img = Image.fromarray((a * (255.0 / hi)).clip(0, 255).astype(np.uint8), 'L')
    if img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        img = img.convert('RGBA')
        bg = Image.new('RGBA', img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert('RGB')


def load_image(src, size, resample=Image.BICUBIC):
    """bytes, a path or a PIL image -> uint8 array [3, size, size] (resized like the tower's
    processor: straight to size x size)."""
    img = src if isinstance(src, Image.Image) else Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
    if img.format == 'JPEG':
        img.draft('RGB', (size, size))  # DCT-domain downscale: decoding a big JPEG gets much cheaper
    img = to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), resample=resample)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()

# -----------------------------------------------------------------------------
# Sample building


def encode_prompt(tok, text, n_latents, slot_id, brackets=None):
    """Prompt text with '<image>' markers -> token ids, each marker becoming n_latents slot
    ids (optionally bracketed by (start_id, end_id)). The text pieces are tokenised on their
    own, identically at train and sample time."""
    ids = []
    for k, piece in enumerate(text.split('<image>')):
        if k > 0:
            ids += ([brackets[0]] if brackets else []) + [slot_id] * n_latents + ([brackets[1]] if brackets else [])
        if piece:
            ids += tok(piece, add_special_tokens=False)['input_ids']
    return ids


class SampleBuilder:
    """Token-level templates, computed once: building a sample is list concatenation."""

    def __init__(self, tok, n_latents, slot_id, eos_id, brackets=None, max_seq_len=1536):
        self.eos_id, self.max_seq_len = eos_id, max_seq_len
        self.prompt_a = encode_prompt(tok, TEMPLATE_A, n_latents, slot_id, brackets)
        self.prompt_b = encode_prompt(tok, TEMPLATE_B, n_latents, slot_id, brackets)
        self.prefix_1, self.prefix_2 = (tok(p, add_special_tokens=False)['input_ids'] for p in MULTI_PREFIXES)
        if len(self.prompt_b) + 2 > max_seq_len:
            raise SystemExit(f'error: max_seq_len={max_seq_len} cannot hold the prompt ({len(self.prompt_b)} '
                             f'tokens with two images); raise max_seq_len or lower n_latents')

    def build(self, captions, n_images=None):
        """captions: token lists. One caption and one image: Template A. Two captions (two
        mixed samples): Template B with "Image 1: ... Image 2: ...". One caption and two
        images (a prepared two-image record): Template B with that caption as the target.
        Returns (input_ids, labels) with labels = -100 except on the target and the eos."""
        n_images = n_images or len(captions)
        if n_images == 1:
            prompt, target = self.prompt_a, list(captions[0])
        elif len(captions) == 1:
            prompt, target = self.prompt_b, list(captions[0])
        else:
            prompt, target = self.prompt_b, self.prefix_1 + list(captions[0]) + self.prefix_2 + list(captions[1])
        ids = prompt + target + [self.eos_id]
        labels = [-100] * len(prompt) + target + [self.eos_id]
        # truncation only ever cuts the target: the prompt (and its image slots) always fits
        return ids[:self.max_seq_len], labels[:self.max_seq_len]


class CaptionDataset(torch.utils.data.Dataset):
    """Items are tuples of sample indices: (i,) is one image-caption pair; (i, j) mixes two
    single-image samples into a Template B sample; a prepared two-image record is (i,)
    with two image ids and uses Template B with its own caption."""

    def __init__(self, prepared, split, builder, image_size, resample=Image.BICUBIC):
        self.tokens, self.index = prepared[split]
        self.builder, self.size, self.resample = builder, image_size, resample
        self.reader = ImageReader(prepared['dir'], prepared['meta'], prepared['image_paths'])

    def __len__(self):
        return len(self.index)

    def caption(self, i):
        off, n = int(self.index[i, 0]), int(self.index[i, 1])
        return self.tokens[off:off + n].tolist()

    def image_ids(self, i):
        a, b = int(self.index[i, 2]), int(self.index[i, 3])
        return [a] if b < 0 else [a, b]

    def __getitem__(self, item):
        item = tuple(item) if isinstance(item, (tuple, list)) else (item,)
        n_bad = 0
        for attempt in range(8):
            try:
                imgs = [load_image(self.reader.read(k), self.size, self.resample)
                        for i in item for k in self.image_ids(i)]
                break
            except Exception:
                # a corrupt or missing image never crashes a run: take another sample
                # (deterministically, so resume still replays the same data) and count it
                n_bad += 1
                item = tuple((i * 7919 + 104729 * (attempt + 1)) % len(self) for i in item)
        else:
            raise RuntimeError('8 unreadable images in a row: the image source looks broken '
                               f'({self.reader.kind} at {self.reader.root})')
        ids, labels = self.builder.build([self.caption(i) for i in item], n_images=len(imgs))
        return dict(input_ids=ids, labels=labels, images=imgs, n_bad=n_bad)

    def lengths(self):
        """Sequence length of every sample, vectorised (for length grouping)."""
        n_img = np.where(np.asarray(self.index[:, 3]) < 0, 1, 2)
        cap = np.asarray(self.index[:, 1])
        la, lb = len(self.builder.prompt_a), len(self.builder.prompt_b)
        return np.minimum(np.where(n_img == 1, la, lb) + cap + 1, self.builder.max_seq_len)

# -----------------------------------------------------------------------------
# Batching


def collate(samples, packing=False, max_seq_len=None, pad_id=0):
    """Right-pads (or packs) samples into a batch.
    Returns images uint8 [M, 3, H, W] (row-major: row, then k-th image of the row, which is
    the order the slots are filled in), input_ids / labels [R, T], position_ids (packed only),
    target_pos / target_ids for the caption-only loss, and counts for logging.
    No attention mask: with right padding and causal attention, real tokens never attend to
    the pads after them, and leaving the mask out keeps SDPA on its fused kernels. Packed
    rows instead pass position_ids that restart per sample; transformers then builds a
    block-diagonal causal mask so no sample sees another."""
    if packing:
        rows, room = [], []
        for s in samples:  # first fit, in order: deterministic
            n = len(s['input_ids'])
            for r in range(len(rows)):
                if room[r] >= n:
                    rows[r].append(s)
                    room[r] -= n
                    break
            else:
                rows.append([s])
                room.append(max_seq_len - n)
    else:
        rows = [[s] for s in samples]
    T = max(sum(len(s['input_ids']) for s in row) for row in rows)
    R = len(rows)
    input_ids = np.full((R, T), pad_id, dtype=np.int64)
    labels = np.full((R, T), -100, dtype=np.int64)
    position_ids = np.zeros((R, T), dtype=np.int64)
    images = []
    for r, row in enumerate(rows):
        t = 0
        for s in row:
            n = len(s['input_ids'])
            input_ids[r, t:t + n] = s['input_ids']
            labels[r, t:t + n] = s['labels']
            position_ids[r, t:t + n] = np.arange(n)
            images += s['images']
            t += n
        # pads continue the last sample's positions, so they never start a new "sample"
        position_ids[r, t:] = np.arange(n, n + T - t)
    # loss positions: t such that labels[t + 1] is a real label, as flat indices into R*T
    nxt = np.zeros_like(labels, dtype=bool)
    nxt[:, :-1] = labels[:, 1:] != -100
    target_pos = np.flatnonzero(nxt)
    target_ids = labels[:, 1:][nxt[:, :-1]]
    real = sum(len(s['input_ids']) for s in samples)
    return dict(
        images=torch.from_numpy(np.stack(images)) if images else torch.zeros(0, 3, 1, 1, dtype=torch.uint8),
        input_ids=torch.from_numpy(input_ids), labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(position_ids) if packing else None,
        target_pos=torch.from_numpy(target_pos), target_ids=torch.from_numpy(target_ids),
        n_samples=len(samples), n_tokens=real, sample_lens=[len(s['input_ids']) for s in samples], n_positions=R * T, n_targets=len(target_ids),
        n_bad=sum(s.get('n_bad', 0) for s in samples))


def to_device(batch, device):
    """(images, input_ids, target_pos, target_ids, position_ids) of a collated batch on the
    device; non_blocking, so pinned batches copy while the GPU works."""
    nb = dict(non_blocking=True)
    pos = batch['position_ids']
    return (batch['images'].to(device, **nb), batch['input_ids'].to(device, **nb), batch['target_pos'].to(device, **nb),
            batch['target_ids'].to(device, **nb), pos.to(device, **nb) if pos is not None else None)


def epoch_batches(lengths, batch_size, seed, epoch, multi_image_frac=0.0, group_by_length=True,
                  group_size=64, single=None):
    """The micro-batches of one epoch, as lists of items, a pure function of its arguments,
    so any position in any epoch can be recomputed on resume.
    group_by_length: shuffle, cut into groups of `group_size` batches, sort each group by
    length and shuffle the resulting batches: nearly all positions are real tokens while
    the order stays random at the scale of an epoch."""
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    perm = rng.permutation(n)
    items = [(int(i),) for i in perm]
    if multi_image_frac > 0:
        # mix only single-image samples, each partner drawn at random
        ok = single if single is not None else np.ones(n, dtype=bool)
        mix = (rng.random(n) < multi_image_frac) & ok[perm]
        partners = rng.integers(0, n, size=n)
        items = [(int(perm[p]), int(partners[p])) if mix[p] and ok[partners[p]] and partners[p] != perm[p]
                 else items[p] for p in range(n)]
    item_len = np.array([sum(lengths[i] for i in it) for it in items])
    n_batches = len(items) // batch_size  # drop the ragged tail: every step has the same size
    if group_by_length:
        order = []
        g = group_size * batch_size
        for s in range(0, n_batches * batch_size, g):
            chunk = np.arange(s, min(s + g, n_batches * batch_size))
            order.append(chunk[np.argsort(item_len[chunk], kind='stable')])
        order = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
        batches = [order[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]
        batches = [batches[b] for b in rng.permutation(n_batches)]
    else:
        batches = [np.arange(b * batch_size, (b + 1) * batch_size) for b in range(n_batches)]
    return [[items[i] for i in b] for b in batches]


class ResumableBatches:
    """Infinite batch sampler over epochs for one rank, starting at a given position.
    Rank r of W takes global batches r, r+W, ...; position = micro-batches this rank has
    consumed, which is all a checkpoint needs to resume mid-epoch."""

    def __init__(self, dataset, batch_size, seed, rank=0, world_size=1, start=0, **kw):
        self.lengths = dataset.lengths()
        self.single = np.asarray(dataset.index[:, 3]) < 0
        self.batch_size, self.seed, self.rank, self.world, self.start, self.kw = \
            batch_size, seed, rank, world_size, start, kw
        self.per_epoch = (len(self.lengths) // batch_size) // world_size
        if self.per_epoch == 0:
            raise SystemExit(f'error: {len(self.lengths)} training samples is less than one batch '
                             f'({batch_size} x {world_size} ranks): lower batch_size or prepare more data')

    def __iter__(self):
        pos = self.start
        while True:
            epoch, k = divmod(pos, self.per_epoch)
            batches = epoch_batches(self.lengths, self.batch_size, self.seed, epoch, single=self.single, **self.kw)
            for b in range(k, self.per_epoch):
                yield batches[b * self.world + self.rank]
            pos = (epoch + 1) * self.per_epoch


def make_loader(dataset, batch_sampler, packing=False, max_seq_len=None, num_workers=0, pad_id=0,
                pin_memory=False):
    collate_fn = functools.partial(collate, packing=packing, max_seq_len=max_seq_len, pad_id=pad_id)
    kw = dict(num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_fn, batch_sampler=batch_sampler)
    if num_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4)
    return torch.utils.data.DataLoader(dataset, **kw)


def eval_batches(n, batch_size, max_batches=None):
    """Fixed val order: the first samples, in index order (comparable across evals and runs)."""
    batches = [[(i,) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
    return batches[:max_batches] if max_batches else batches
