"""
Training-time data: the prepared dataset's reader, the template (image slots, labels),
multi-image mixing, length-grouped batching or packing, mixtures of several prepared
datasets, the resumable batch order, and the DataLoader. prepare_llava.py writes the prepared
format (docs/data.md); images are decoded and read by sources/images.py.
"""
import atexit
import functools
import json
import os
import shutil
import signal

import numpy as np
import torch

from configurator import UserError, first_line
from sources.images import ImageReader, check_image_files, load_array, load_image, resolve_root

TEMPLATE_A = '<image>\nDescribe the image in one sentence.\n'
TEMPLATE_B = '<image>\n<image>\nDescribe each image in order, one sentence per image.\n'
MULTI_PREFIXES = ('Image 1: ', ' Image 2: ')  # Template B's target: "Image 1: ... Image 2: ..."
META_VERSION = 2

# -----------------------------------------------------------------------------
# The prepared dataset


def _load_meta(prepared_dir):
    meta_path = os.path.join(prepared_dir, 'meta.json')
    if not os.path.exists(meta_path):
        raise UserError(f"no prepared dataset at '{prepared_dir}' (meta.json missing): run `python prepare_llava.py` "
                        f"(LLaVA-Pretrain in data/llava_pretrain/) or `python prepare_llava.py --synthetic=2000` "
                        f"first, or set data_dir")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        missing = [k for k in ('tokenizer', 'eos_id', 'slot_id', 'image_kind', 'image_root', 'n_images', 'splits')
                   if k not in meta]
    except (ValueError, TypeError, OSError) as e:
        missing, meta = [first_line(e, 80)], None
    if missing:
        raise UserError(f'{meta_path} is corrupt or from another tool ({", ".join(missing)} missing); run '
                        f'prepare_llava.py again for this dataset')
    if meta.get('version', 1) > META_VERSION:
        raise UserError(f'{prepared_dir} was written by a newer prepare_llava.py (format {meta["version"]}); '
                        f'update this repository or prepare the data again')
    return meta


def open_prepared(prepared_dir, image_root=''):
    """dict(meta, dir, root, train=(tokens, index), val=(tokens, index), image_paths).
    O(1) memory, and O(1) checks that every file has the size the index and meta.json say,
    so a truncated copy is one clear line here, not empty captions mid-run."""
    meta = _load_meta(prepared_dir)
    d = dict(meta=meta, dir=prepared_dir)
    for split in ('train', 'val'):
        index = load_array(prepared_dir, f'{split}_index.npy')
        n = meta['splits'].get(split, -1)
        if index.ndim != 2 or index.shape[1] != 4 or len(index) != n:
            raise UserError(f'{prepared_dir}/{split}_index.npy holds {index.shape} but meta.json says {n} samples: '
                            f'the dataset is damaged; run prepare_llava.py again')
        path = os.path.join(prepared_dir, f'{split}_tokens.bin')
        want = 4 * int(index[-1, 0] + index[-1, 1]) if len(index) else 0  # splits are written in index order
        size = os.path.getsize(path) if os.path.exists(path) else -1
        if size != want:
            raise UserError(f'{path} has {size} bytes but its index needs {want}: the dataset is truncated or '
                            f'damaged; run prepare_llava.py again (or copy it again)')
        tokens = np.memmap(path, dtype=np.uint32, mode='r') if want else np.zeros(0, np.uint32)
        d[split] = (tokens, index)
    d['image_paths'] = load_array(prepared_dir, 'image_paths.npy')
    if len(d['image_paths']) != meta['n_images']:
        raise UserError(f'{prepared_dir}/image_paths.npy lists {len(d["image_paths"])} images but meta.json says '
                        f'{meta["n_images"]}; run prepare_llava.py again')
    check_image_files(prepared_dir, meta)
    d['root'] = resolve_root(prepared_dir, meta, image_root)
    return d


# -----------------------------------------------------------------------------
# Several prepared datasets: data_dir='dirA:1.0,dirB:0.5'


def parse_data_dir(spec):
    """'dir' or 'dirA:1.0,dirB:0.5' -> [(dir, weight)]. A bare dir weighs 1."""
    sources = []
    for part in (p.strip() for p in spec.split(',')):
        if not part:
            continue
        path, weight = part, 1.0
        head, sep, tail = part.rpartition(':')
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:  # a ':' that belongs to the path
                pass
        if not 0 < weight < float('inf'):
            raise UserError(f"data_dir: the weight of '{path}' must be a positive number, got {tail!r}")
        sources.append((path, weight))
    if not sources:
        raise UserError("data_dir is empty: give a prepared dataset, or several as 'dirA:1.0,dirB:0.5'")
    if len({p for p, _ in sources}) != len(sources):
        raise UserError(f"data_dir lists a dataset twice: '{spec}'")
    return sources


def open_sources(spec, image_root=''):
    """[(name, prepared, weight)] for a data_dir spec; every source must share the tokenizer."""
    sources = parse_data_dir(spec)
    if image_root and len(sources) > 1:
        raise UserError('image_root overrides the image folder of one dataset; with several datasets in data_dir, '
                        'fix each one where it lives')
    out = []
    for path, weight in sources:
        prepared = open_prepared(path, image_root)
        out.append((source_name(path), prepared, weight))
    first = out[0][1]['meta']
    for name, p, _ in out[1:]:
        m = p['meta']
        key = lambda m: (m['tokenizer'], m['eos_id'], m['slot_id'], m.get('bos_id'))  # noqa: E731
        if key(m) != key(first):
            raise UserError(f"dataset '{name}' was tokenised with '{m['tokenizer']}' (slot {m['slot_id']}) but "
                            f"'{out[0][0]}' with '{first['tokenizer']}' (slot {first['slot_id']}): prepare every "
                            f"dataset of a mixture with the same tokenizer and slot_token")
    return out


def source_name(path):
    """A short name for a dataset in logs: data/cc3m/prepared -> cc3m."""
    parts = [p for p in os.path.normpath(path).split(os.sep) if p not in ('', '.', 'prepared')]
    return parts[-1] if parts else path

# -----------------------------------------------------------------------------
# Sample building


def encode_prompt(tok, text, n_latents, slot_id, brackets=None, bos_id=None):
    """Prompt text with '<image>' markers -> token ids, each marker becoming n_latents slot
    ids (optionally bracketed by (start_id, end_id)), after the bos of families that have one
    (sources/tokens.py). The text pieces are tokenised on their own, identically at train and
    sample time."""
    ids = [] if bos_id is None else [bos_id]
    for k, piece in enumerate(text.split('<image>')):
        if k > 0:
            ids += ([brackets[0]] if brackets else []) + [slot_id] * n_latents + ([brackets[1]] if brackets else [])
        if piece:
            text_ids = tok(piece, add_special_tokens=False)['input_ids']
            if slot_id in text_ids:
                raise UserError(f'the prompt text {piece!r} contains the image-slot token (id {slot_id}): choose '
                                f'another slot_token when preparing the data, or another prompt')
            ids += text_ids
    return ids


class SampleBuilder:
    """Token-level templates, computed once: building a sample is list concatenation."""

    def __init__(self, tok, n_latents, slot_id, eos_id, brackets=None, max_seq_len=1536, bos_id=None):
        self.eos_id, self.max_seq_len = eos_id, max_seq_len
        self.prompt_a = encode_prompt(tok, TEMPLATE_A, n_latents, slot_id, brackets, bos_id)
        self.prompt_b = encode_prompt(tok, TEMPLATE_B, n_latents, slot_id, brackets, bos_id)
        self.prefix_1, self.prefix_2 = (tok(p, add_special_tokens=False)['input_ids'] for p in MULTI_PREFIXES)
        if len(self.prompt_b) + 2 > max_seq_len:
            raise UserError(f'max_seq_len={max_seq_len} cannot hold the prompt ({len(self.prompt_b)} tokens with '
                            f'two images); raise max_seq_len or lower n_latents')

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
    """One split of one prepared dataset. Items are tuples of sample indices: (i,) is one
    image-caption pair; (i, j) mixes two single-image samples into a Template B sample; a
    prepared two-image record is (i,) with two image ids and uses Template B with its own
    caption. replace_bad: an unreadable image is replaced by another sample (training: the
    step keeps its size); otherwise the item comes back as skipped (evaluation). Both are
    counted in n_bad."""

    def __init__(self, prepared, split, builder, spec, replace_bad=True):
        self.tokens, self.index = prepared[split]
        self.builder, self.spec, self.replace_bad = builder, spec, replace_bad
        self.reader = ImageReader(prepared['dir'], prepared['meta'], prepared['image_paths'], prepared['root'])

    def __len__(self):
        return len(self.index)

    def caption(self, i):
        off, n = int(self.index[i, 0]), int(self.index[i, 1])
        return self.tokens[off:off + n].tolist()

    def image_ids(self, i):
        a, b = int(self.index[i, 2]), int(self.index[i, 3])
        return [a] if b < 0 else [a, b]

    def images(self, item):
        """uint8 [3, S, S] arrays of an item's images, in order; raises if one is unreadable."""
        return [load_image(self.reader.read(k), self.spec) for i in item for k in self.image_ids(i)]

    def __getitem__(self, item):
        item = tuple(item) if isinstance(item, (tuple, list)) else (item,)
        n_bad = 0
        for attempt in range(8):
            try:
                imgs = self.images(item)
                break
            except Exception:
                # a corrupt or missing image never crashes a run: take another sample
                # (deterministically, so resume still replays the same data) and count it
                n_bad += 1
                if not self.replace_bad:
                    return dict(skipped=True, n_bad=n_bad)
                item = tuple((i * 7919 + 104729 * (attempt + 1)) % len(self) for i in item)
        else:
            raise UserError(f'8 unreadable images in a row: the image source looks broken ({self.reader.kind} at '
                            f'{self.reader.root}); check it, or prepare the data again with --verify_images')
        ids, labels = self.builder.build([self.caption(i) for i in item], n_images=len(imgs))
        return dict(input_ids=ids, labels=labels, images=imgs, n_bad=n_bad)

    def lengths(self):
        """Sequence length of every sample, vectorised (for length grouping)."""
        n_img = np.where(np.asarray(self.index[:, 3]) < 0, 1, 2)
        cap = np.asarray(self.index[:, 1])
        la, lb = len(self.builder.prompt_a), len(self.builder.prompt_b)
        return np.minimum(np.where(n_img == 1, la, lb) + cap + 1, self.builder.max_seq_len)


class Mixture(torch.utils.data.Dataset):
    """Several CaptionDatasets behind one DataLoader: item (s, *sample indices) is that item
    of dataset s. One dataset is the common case (s is always 0)."""

    def __init__(self, datasets):
        self.datasets = datasets

    def __getitem__(self, item):
        sample = self.datasets[item[0]][tuple(item[1:])]
        sample['source'] = item[0]
        return sample

# -----------------------------------------------------------------------------
# Batching


def collate(samples, packing=False, max_seq_len=None, pad_id=0):
    """Right-pads (or packs) samples into a batch. Packing fills rows of max_seq_len tokens,
    first fit; with max_seq_len=None every sample goes into one row (flash-attention's layout).
    Returns images uint8 [M, 3, H, W] (row-major: row, then k-th image of the row, which is
    the order the slots are filled in), input_ids / labels [R, T], position_ids (packed only),
    target_pos / target_ids for the caption-only loss, and counts for logging.
    No attention mask: with right padding and causal attention, real tokens never attend to
    the pads after them, and leaving the mask out keeps SDPA on its fused kernels. Packed
    rows instead pass position_ids that restart per sample; transformers then builds a
    block-diagonal causal mask so no sample sees another.
    Samples that came back skipped (unreadable image, evaluation) are left out and counted."""
    n_bad = sum(s.get('n_bad', 0) for s in samples)
    samples = [s for s in samples if not s.get('skipped')]
    if not samples:
        return dict(images=torch.zeros(0, 3, 1, 1, dtype=torch.uint8), input_ids=torch.zeros(0, 0, dtype=torch.long),
                    labels=torch.zeros(0, 0, dtype=torch.long), position_ids=None,
                    target_pos=torch.zeros(0, dtype=torch.long), target_ids=torch.zeros(0, dtype=torch.long),
                    n_samples=0, n_tokens=0, sample_lens=[], n_targets=0, n_bad=n_bad, sources=[])
    if packing and max_seq_len is None:
        # one row for the whole micro-batch: flash-attention (transformers) treats a batch as
        # packed, with attention restarting where position_ids restart, only when it has one
        # row; several packed rows would let each row's samples attend to each other
        rows = [samples]
    elif packing:
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
        n_samples=len(samples), n_tokens=real, sample_lens=[len(s['input_ids']) for s in samples],
        n_targets=len(target_ids), n_bad=n_bad, sources=[s.get('source', 0) for s in samples])


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
        m, g = n_batches * batch_size, group_size * batch_size
        order = np.concatenate([s + np.argsort(item_len[s:min(s + g, m)], kind='stable') for s in range(0, m, g)]
                               or [np.zeros(0, dtype=np.int64)])
        batches = [order[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]
        batches = [batches[b] for b in rng.permutation(n_batches)]
    else:
        batches = [np.arange(b * batch_size, (b + 1) * batch_size) for b in range(n_batches)]
    return [[items[i] for i in b] for b in batches]


class BatchOrder:
    """The infinite micro-batch order of one rank: a pure function of (seed, position), the
    same global order for any number of ranks, so a checkpoint needs only the position to
    resume mid-epoch, on as many GPUs as the run had or on another number.
    Each dataset has its own epochs (epoch_batches). Global micro-batch g comes from dataset
    choice(g), drawn with probability proportional to the weights from a seeded stream, and is
    that dataset's next batch; with one dataset, g is simply its g-th batch. Rank r of W takes
    the global micro-batches g with g % W == r, from global position `start` on."""

    BLOCK = 1 << 16  # choices are drawn in blocks of this many global micro-batches

    def __init__(self, datasets, weights, batch_size, seed, rank=0, world_size=1, start=0, **kw):
        self.lengths = [d.lengths() for d in datasets]
        self.single = [np.asarray(d.index[:, 3]) < 0 for d in datasets]
        self.batch_size, self.seed, self.rank, self.world, self.start, self.kw = \
            batch_size, seed, rank, world_size, start, kw
        # Epochs are not rounded to whole rounds of W: the global order is then the same for any
        # world size, so a run resumed on another number of GPUs continues exactly where it was
        self.n_batches = [len(n) // batch_size for n in self.lengths]
        if min(self.n_batches) < world_size:
            small = min(range(len(datasets)), key=lambda s: len(self.lengths[s]))
            raise UserError(f'{len(self.lengths[small])} training samples is less than one batch per rank '
                            f'({batch_size} x {world_size} ranks): lower batch_size or prepare more data')
        self.p = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.per_epoch = sum(self.n_batches)  # global micro-batches in one "epoch"
        self._epochs = {}

    def _choices(self, block):
        if len(self.p) == 1:
            return np.zeros(self.BLOCK, np.int64)
        return np.random.default_rng([self.seed, 7919, block]).choice(len(self.p), size=self.BLOCK, p=self.p)

    def _batch(self, s, j):
        """The j-th batch of dataset s over its epochs, as (s, *item) tuples."""
        epoch, k = divmod(j, self.n_batches[s])
        if self._epochs.get(s, (None,))[0] != epoch:  # an epoch's order is cached while it is used
            self._epochs[s] = (epoch, epoch_batches(self.lengths[s], self.batch_size, self.seed + s, epoch,
                                                    single=self.single[s], **self.kw))
        return [(s, *item) for item in self._epochs[s][1][k]]

    def counts_before(self, g):
        """How many of the first g global micro-batches came from each dataset."""
        counts = np.zeros(len(self.p), np.int64)
        for block in range(g // self.BLOCK + 1):  # whole blocks, then the start of the last one
            counts += np.bincount(self._choices(block)[:g - block * self.BLOCK], minlength=len(self.p))
        return counts

    def __iter__(self):
        g = self.start
        counts = self.counts_before(g)
        choices, block = None, None
        while True:
            if g // self.BLOCK != block:
                block = g // self.BLOCK
                choices = self._choices(block)
            s = int(choices[g % self.BLOCK])
            if g % self.world == self.rank:
                yield self._batch(s, int(counts[s]))
            counts[s] += 1
            g += 1


_LOADERS = []  # loaders with workers, stopped at exit by stop_workers


@atexit.register
def stop_workers():
    """Stop loader workers before multiprocessing's own exit handler does: it stops them with
    SIGTERM, which they ignore (below), and would then wait for them forever. Registered after
    multiprocessing's handler (torch imports it first), so it runs before it; a DDP rank that
    leaves without exit handlers (configurator.leave) calls it itself."""
    for loader in _LOADERS:
        it = getattr(loader, '_iterator', None)
        if it is not None:
            it._shutdown_workers()


def _quiet_worker(_):
    """Loader workers ignore SIGTERM/SIGINT: a scheduler signals the whole process group, and
    a worker that died first would take the run down before the main process could write its
    checkpoint. The main process stops them when it exits."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def shm_needed(batch_size, image_size, num_workers, local_ranks=1):
    """Bytes of /dev/shm the loader workers of every rank of a node hold at once: each keeps 4
    (prefetch_factor) batches of uint8 images (a few rows have two), with room for half again."""
    return int(1.5 * local_ranks * num_workers * 4 * batch_size * 1.1 * 3 * image_size ** 2)


def check_shm(batch_size, image_size, num_workers, local_ranks=1):
    """One line before any work when they cannot fit: a container's default 64 MB would kill a
    worker with a bus error mid-run."""
    path = '/dev/shm'
    if not num_workers or not os.path.isdir(path):
        return
    need, free = shm_needed(batch_size, image_size, num_workers, local_ranks), shutil.disk_usage(path).free
    if need > free:
        raise UserError(f'{path} has {free / 2**30:.2f} GiB free but {local_ranks} rank(s) x {num_workers} loader '
                        f'workers x 4 prefetched batches of {batch_size} images need ~{need / 2**30:.2f} GiB: lower '
                        f'num_workers (0 decodes in the main process) or give the container more shared memory '
                        f'(docker run --ipc=host, or --shm-size)')


def make_loader(dataset, batch_sampler, packing=False, max_seq_len=None, num_workers=0, pad_id=0,
                pin_memory=False, seed=0, persistent=True):
    collate_fn = functools.partial(collate, packing=packing, max_seq_len=max_seq_len, pad_id=pad_id)
    # its own generator: starting an iterator must not draw from the global RNG (dropout's)
    kw = dict(num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_fn, batch_sampler=batch_sampler,
              generator=torch.Generator().manual_seed(seed))
    if num_workers > 0:
        kw.update(persistent_workers=persistent, prefetch_factor=4, worker_init_fn=_quiet_worker)
    loader = torch.utils.data.DataLoader(dataset, **kw)
    if num_workers > 0 and persistent:
        _LOADERS.append(loader)
    return loader


def eval_batches(n, batch_size, max_batches=None, source=None):
    """Fixed val order: the first samples, in index order (comparable across evals and runs).
    With `source`, items carry the dataset index as for a Mixture."""
    head = () if source is None else (source,)
    batches = [[(*head, i) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
    return batches[:max_batches] if max_batches else batches
