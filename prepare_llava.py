"""
Image-caption data -> cleaned, deduplicated, tokenized, memory-mappable arrays for data.py.

$ python prepare_llava.py                          # LLaVA-Pretrain (LCS-558K) in data/llava_pretrain/
$ python prepare_llava.py --json=caps.jsonl        # caption JSONL: {"id", "images": [...], "caption", "source"}
$ python prepare_llava.py --synthetic=2000         # CPU demo data: drawn shapes -> data/synthetic/
$ python prepare_llava.py --bench=558000 --tokenizer=/path/to/Qwen3-8B-Base   # speed check

Inputs: the LLaVA json (a list of {"id", "image", "conversations": [human, gpt]}) with the
images in a folder (images/) or still inside images.zip; or a caption JSONL (1 or 2 images
per record, paths relative to the JSONL's folder or absolute).

Output in out_dir (the contract with data.py):
  {train,val}_tokens.bin     uint32 caption token ids of the split, concatenated (no eos, no prompt)
  {train,val}_index.npy      int64 [n, 4]: token offset, token length, image id 0, image id 1 (-1: none)
  image_paths.npy            'S<n>' utf-8 paths relative to the image root (zip: member names)
  images_packed.bin          with --pack_images: every image resized to pack_size, JPEG q95, concatenated
  images_packed_offsets.npy  int64 [n_images + 1]: byte offsets into images_packed.bin
  meta.json                  tokenizer, eos/slot ids, image root and kind, split sizes, golden
                             val samples, filter counts, settings

Cleaning: every record dropped is counted under the first rule it breaks, in this order:
malformed (by reason), empty caption, special-token text, spam, token length, missing
image, undecodable/tiny/bomb image (--verify_images), duplicate caption. Nothing is fatal.
"""
import argparse
import gc
import io
import itertools
import json
import os
import re
import sys
import time
import warnings
import zipfile

import numpy as np
from PIL import Image, ImageDraw, ImageFile

LLAVA_REPO = 'liuhaotian/LLaVA-Pretrain'
LLAVA_JSON = 'blip_laion_cc_sbu_558k.json'
N_GOLDEN = 32
MIN_SIDE = 8  # images smaller than this on a side carry no usable signal for a 384px tower

# The filter rules, in the order they are applied (and printed). A record is counted once,
# under the first rule it breaks.
RULES = [
    'malformed_json',          # JSONL line that does not parse
    'malformed_keys',          # not an object, or missing image(s) / conversations / caption / from / value
    'malformed_types',         # a field of the wrong type
    'malformed_turns',         # LLaVA: number of turns != 2
    'malformed_roles',         # LLaVA: turns not (human, gpt)
    'malformed_image_tokens',  # LLaVA: '<image>' count in the human turn != number of images
    'malformed_n_images',      # JSONL: not 1 or 2 images
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
    p = argparse.ArgumentParser(description='LLaVA-Pretrain / caption JSONL / synthetic shapes -> prepared arrays '
                                            'for train.py (see the top of this file)')

    def opt(name, **kw):  # --some_key, with --some-key as an alias
        names = [f'--{name}'] + ([f'--{name.replace("_", "-")}'] if '_' in name else [])
        p.add_argument(*names, dest=name, **kw)

    opt('data_dir', default=None, help="default data/llava_pretrain, or --json's folder, or data/synthetic "
                                       "with --synthetic")
    opt('json', default=None, help=f'default <data_dir>/{LLAVA_JSON}; a .jsonl file is read as caption JSONL')
    opt('images', default=None, help='image folder or zip; default <data_dir>/images, else <data_dir>/images.zip '
                                     '(caption JSONL: the JSONL\'s folder)')
    opt('out_dir', default=None, help='default <data_dir>/prepared')
    opt('tokenizer', default=None, help="hub id, local dir or 'tiny'; default Qwen/Qwen3-8B-Base "
                                        "('tiny' with --synthetic)")
    opt('min_tokens', type=int, default=5)
    opt('max_tokens', type=int, default=60)
    opt('max_dups', type=int, default=None, help='keep at most k samples per normalised caption; 0: no limit. '
                                                 'Default 1 (0 with --synthetic: its captions repeat by design)')
    opt('val_ratio', type=float, default=0.01)
    opt('seed', type=int, default=1337)
    opt('verify_images', action='store_true', help='decode every image (parallel) and drop bad ones')
    opt('skip_image_check', action='store_true', help='do not check that images exist (captions only)')
    opt('pack_images', action='store_true', help='also write all images resized into one file (implies '
                                                 '--verify_images)')
    opt('pack_size', type=int, default=384)
    opt('workers', type=int, default=os.cpu_count() or 1)
    opt('synthetic', type=int, default=None, metavar='N', help='draw N images of shapes with exact captions '
                                                               'and prepare them')
    opt('bench', type=int, default=None, metavar='N', help='time the preparation of an N-record generated '
                                                           'LLaVA json (no images)')

    def fail(msg):  # argparse would print usage + error on two lines; keep failures to one line
        raise SystemExit(f'error: {msg} (see python prepare_llava.py --help)')
    p.error = fail
    args = p.parse_args(argv)
    if args.min_tokens < 1 or args.max_tokens < args.min_tokens:
        raise SystemExit(f'error: need 1 <= min_tokens <= max_tokens, got {args.min_tokens} and {args.max_tokens}')
    if not 0 <= args.val_ratio < 1:
        raise SystemExit(f'error: val_ratio must be in [0, 1), got {args.val_ratio}')
    if args.pack_size < MIN_SIDE or args.workers < 1:
        raise SystemExit(f'error: need pack_size >= {MIN_SIDE} and workers >= 1')
    if args.synthetic is not None and args.synthetic < 1:
        raise SystemExit('error: --synthetic needs a number of images >= 1, e.g. --synthetic=2000')
    if (args.pack_images or args.verify_images) and args.skip_image_check:
        raise SystemExit('error: --verify_images/--pack_images read every image; they cannot be combined with '
                         '--skip_image_check')
    if args.pack_images:
        args.verify_images = True  # packing must not meet an unreadable image after the sample set is fixed
    return args


def progress(what, done, total, state):
    """A progress line on stderr at most every 1.5 s, so long steps show rate and ETA and
    short steps print nothing."""
    now = time.time()
    state.setdefault('t0', now)
    state.setdefault('last', state['t0'])
    if done < total and now - state['last'] < 1.5:
        return
    if done >= total and not state.get('printed'):
        return
    state['last'], state['printed'] = now, True
    rate = done / max(now - state['t0'], 1e-9)
    eta = (total - done) / rate if rate > 0 else float('inf')
    print(f'{what}: {done:,}/{total:,} ({rate:,.0f}/s, ETA {eta:.0f}s)', file=sys.stderr, flush=True)

# -----------------------------------------------------------------------------
# Reading records. Both readers return (captions, images, n_records): the captions
# (stripped, None if empty) and image-path tuples of the well-formed records, in file order.


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
    (h, g) = conv
    if not isinstance(h['value'], str) or not (g['value'] is None or isinstance(g['value'], str)):
        return 'malformed_types', None, None
    if (h['from'], g['from']) != ('human', 'gpt'):
        return 'malformed_roles', None, None
    if h['value'].count('<image>') != 1:
        return 'malformed_image_tokens', None, None
    return None, g['value'], (image,)


def check_jsonl(r):
    """(rule, caption, images) for one caption-JSONL record."""
    if not isinstance(r, dict) or 'images' not in r or 'caption' not in r:
        return 'malformed_keys', None, None
    images, caption = r['images'], r['caption']
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images) or \
            not (caption is None or isinstance(caption, str)):
        return 'malformed_types', None, None
    if not 1 <= len(images) <= 2:  # the index has room for two images per sample
        return 'malformed_n_images', None, None
    return None, caption, tuple(images)


def read_records(path, filters):
    t0 = time.time()
    captions, images, n = [], [], 0
    try:
        if path.endswith('.jsonl'):
            with open(path, encoding='utf-8') as f:
                lines = [line for line in f if line.strip()]
            records = []
            for line in lines:  # one bad line must not lose the file: parse line by line
                try:
                    records.append(json.loads(line))
                except ValueError:
                    filters['malformed_json'] += 1
            n, check = len(lines), check_jsonl
        else:
            with open(path, 'rb') as f:
                records = json.load(f)
            if not isinstance(records, list):
                raise SystemExit(f'error: {path} holds a JSON {type(records).__name__}, expected the LLaVA list of '
                                 f'records; give a caption file with a .jsonl name for the JSONL format')
            n, check = len(records), check_llava
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f'error: {path} is not valid JSON ({str(e).splitlines()[0][:100]}); re-download it or '
                         f'fix the file') from None
    except OSError as e:
        raise SystemExit(f'error: cannot read {path} ({e.strerror or e})') from None
    for r in records:
        rule, caption, imgs = check(r)
        if rule:
            filters[rule] += 1
            continue
        captions.append(caption.strip() if caption else None)
        images.append(imgs)
    print(f'read {n:,} records from {path} in {time.time() - t0:.1f}s')
    return captions, images, n

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


def tokenize(tok, texts, batch=16384):
    """Token ids of `texts` as (flat uint32 array, offsets, lengths). Big batches keep the fast
    tokenizer's threads busy; each batch is flattened at once so no per-caption lists live on."""
    flats, lens, state = [], [], {'t0': time.time()}
    for s in range(0, len(texts), batch):
        ids = tok(texts[s:s + batch], add_special_tokens=False, return_attention_mask=False)['input_ids']
        n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flats.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(n.sum())))
        lens.append(n)
        progress('tokenize', min(s + batch, len(texts)), len(texts), state)
    flat = np.concatenate(flats) if flats else np.zeros(0, np.uint32)
    lens = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    offs = np.zeros(len(lens), np.int64)
    np.cumsum(lens[:-1], out=offs[1:])
    return flat, offs, lens

# -----------------------------------------------------------------------------
# Images: where they are, whether they exist, whether they decode, packing


def image_source(path):
    """('folder' | 'zip', absolute path) of an image root, or a one-line error."""
    if os.path.isdir(path):
        return 'folder', os.path.abspath(path)
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        return 'zip', os.path.abspath(path)
    raise SystemExit(f'error: image root {path} is neither a folder nor a zip file; pass --images=PATH')


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
        if probe is not None and not any(n in members for n in itertools.islice(names, 1000)):
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


# Per-process image source, set by init_source in each pool worker: one zip handle per
# process (a handle shared across forks would interleave seeks).
_SOURCE = {}


def init_source(kind, root, pack_size=None):
    _SOURCE.update(kind=kind, root=root, pack_size=pack_size, zip=zipfile.ZipFile(root) if kind == 'zip' else None)
    # verification must see truncation as an error (data.py, which the packer imports,
    # turns truncated-image loading on for training)
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def read_image_bytes(name):
    if _SOURCE['zip'] is not None:
        return _SOURCE['zip'].read(name)
    with open(os.path.join(_SOURCE['root'], name), 'rb') as f:
        return f.read()


def check_image(name):
    """None if the image is usable, else the rule it breaks."""
    try:
        data = read_image_bytes(name)
    except (OSError, KeyError):
        return 'missing_image'  # vanished since the existence check
    if not data:
        return 'zero_byte_image'
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; a bomb is a bomb either way
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if min(im.size) < MIN_SIDE:
                    return 'tiny_image'
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return 'decompression_bomb'
    except Exception:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
        return 'undecodable_image'
    return None


def pack_image(name):
    """JPEG bytes of the image as data.py would see it at pack_size: its load_image does the
    EXIF transpose, RGB conversion (alpha on white, 16-bit rescaled) and bicubic resize, so
    packed and unpacked training see the same pixels."""
    from data import load_image
    try:
        a = load_image(read_image_bytes(name), _SOURCE['pack_size'])
    except Exception as e:
        return f'{type(e).__name__}: {e}'
    buf = io.BytesIO()
    Image.fromarray(a.transpose(1, 2, 0)).save(buf, format='JPEG', quality=95)
    return buf.getvalue()


def map_images(fn, names, kind, root, workers, what, pack_size=None):
    """fn over image names, in order, over a pool of `workers` processes (inline for 1)."""
    state = {'t0': time.time()}
    if workers <= 1 or len(names) < 2:
        init_source(kind, root, pack_size)
        for i, name in enumerate(names):
            yield fn(name)
            progress(what, i + 1, len(names), state)
        return
    import multiprocessing as mp
    with mp.get_context('fork').Pool(workers, init_source, (kind, root, pack_size)) as pool:
        for i, r in enumerate(pool.imap(fn, names, chunksize=16)):
            yield r
            progress(what, i + 1, len(names), state)

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
# Writing: temp names first, then os.replace, meta.json last


def write_outputs(out_dir, arrays, meta, packed_tmp=None):
    """arrays: {file name: ndarray} (.bin raw, .npy np.save). An old meta.json is removed
    before any old file is replaced, so an interrupted run leaves either the complete old
    output or no meta.json at all, never a meta next to mismatched arrays."""
    os.makedirs(out_dir, exist_ok=True)
    tmps = {}
    for name, a in arrays.items():
        tmps[name] = os.path.join(out_dir, name + '.tmp')
        with open(tmps[name], 'wb') as f:
            if name.endswith('.npy'):
                np.save(f, a)
            else:
                a.tofile(f)
    if packed_tmp:
        tmps['images_packed.bin'] = packed_tmp
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for name, tmp in tmps.items():
        os.replace(tmp, os.path.join(out_dir, name))
    if not packed_tmp:  # a pack from an earlier run would not match the new image ids
        for stale in ('images_packed.bin', 'images_packed_offsets.npy'):
            if os.path.exists(os.path.join(out_dir, stale)):
                os.remove(os.path.join(out_dir, stale))
    write_meta(out_dir, meta)


def write_meta(out_dir, meta):
    tmp = os.path.join(out_dir, 'meta.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, 'meta.json'))

# -----------------------------------------------------------------------------
# The pipeline


def fetch_llava(data_dir):
    """Download LLaVA-Pretrain's json + images.zip into data_dir; None on success, else why not."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return 'huggingface_hub is not installed'
    from model import hub_reachable
    if not hub_reachable():
        return 'the Hugging Face hub is unreachable'
    print(f'{LLAVA_JSON} not found: downloading {LLAVA_REPO} ({LLAVA_JSON} + images.zip, tens of GB) into {data_dir}')
    try:
        snapshot_download(repo_id=LLAVA_REPO, repo_type='dataset', local_dir=data_dir,
                          allow_patterns=[LLAVA_JSON, 'images.zip'])
    except Exception as e:  # offline, no disk space, interrupted... the caller says what to do
        return f'{type(e).__name__}: {str(e).splitlines()[0][:120]}' if str(e) else type(e).__name__
    return None


def resolve_paths(args):
    """Fill in the path defaults and make sure the captions (and images) are there."""
    default_json = args.json is None
    # a caption file given on its own brings its folder along (images/, prepared/ next to it)
    args.data_dir = args.data_dir or (os.path.dirname(args.json) or '.' if args.json else
                                      os.path.join('data', 'llava_pretrain'))
    args.json = args.json or os.path.join(args.data_dir, LLAVA_JSON)
    if not os.path.isfile(args.json):
        if not default_json:
            raise SystemExit(f'error: no caption file at {args.json}; check --json')
        why = fetch_llava(args.data_dir)
        if why or not os.path.isfile(args.json):
            raise SystemExit(f'error: no LLaVA-Pretrain data in {args.data_dir}/ and the download failed '
                             f'({why or "json missing after download"}); download {LLAVA_JSON} and images.zip from '
                             f'https://huggingface.co/datasets/{LLAVA_REPO} into {args.data_dir}/ (images.zip can '
                             f'stay zipped), or run `python prepare_llava.py --synthetic=2000` for demo data')
    jsonl = args.json.endswith('.jsonl')
    if args.images is None:
        folder = os.path.dirname(os.path.abspath(args.json)) if jsonl else os.path.join(args.data_dir, 'images')
        args.images = folder if os.path.isdir(folder) or jsonl else os.path.join(args.data_dir, 'images.zip')
    if not os.path.exists(args.images):
        if not args.skip_image_check:
            raise SystemExit(f'error: no images at {args.images} (expected an images/ folder or images.zip from '
                             f'{LLAVA_REPO} in {args.data_dir}/); pass --images=PATH, or --skip_image_check to '
                             f'prepare the captions only')
        kind, root = 'folder', os.path.abspath(args.images)
    else:
        kind, root = image_source(args.images)
    args.out_dir = args.out_dir or os.path.join(args.data_dir, 'prepared')
    return kind, root, ('jsonl' if jsonl else 'llava')


def prepare(args, source=None):
    """Run the whole pipeline; returns (meta, val image-path tuples)."""
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


def _prepare(args, source):
    t_start = time.time()
    kind, root, detected = resolve_paths(args)
    source = source or detected
    max_dups = 1 if args.max_dups is None else args.max_dups

    # the tokenizer is loaded only now: model.py pulls in torch/transformers (slow), and a
    # missing-data error above should come fast
    from model import load_tokenizer, special_ids
    tok = load_tokenizer(args.tokenizer)
    ids = special_ids(tok)

    filters = dict.fromkeys(RULES, 0)
    captions, images, n_records = read_records(args.json, filters)
    alive = range(len(captions))

    def keep(rule, ok):  # drop the alive records for which ok(i) is False, counted under rule
        nonlocal alive
        before = len(alive)
        alive = [i for i in alive if ok(i)]
        filters[rule] += before - len(alive)

    special = special_token_re(tok)
    keep('empty_caption', lambda i: bool(captions[i]))
    keep('special_tokens', lambda i: not special.search(captions[i]))
    keep('spam', lambda i: not SPAM_RE.search(captions[i].lower()))

    # tokenise every distinct caption once (web captions repeat a lot)
    t0 = time.time()
    uniq = {}
    uid = np.array([uniq.setdefault(captions[i], len(uniq)) for i in alive], dtype=np.int64)
    flat, offs, lens = tokenize(tok, list(uniq))
    uid_of, n_tok = dict(zip(alive, uid.tolist())), lens.tolist()  # record -> distinct caption -> length
    print(f'tokenized {len(uniq):,} distinct captions ({len(flat):,} tokens) in {time.time() - t0:.1f}s')
    keep('too_short', lambda i: n_tok[uid_of[i]] >= args.min_tokens)
    keep('too_long', lambda i: n_tok[uid_of[i]] <= args.max_tokens)

    stored = {}  # image name as given -> name as stored (zip: member name)
    if not args.skip_image_check:
        t0 = time.time()
        names = list(dict.fromkeys(p for i in alive for p in images[i]))
        stored = existing_images(kind, root, names)
        keep('missing_image', lambda i: all(p in stored for p in images[i]))
        print(f'checked {len(names):,} image paths in {time.time() - t0:.1f}s')
    if args.verify_images:
        t0 = time.time()
        names = list(dict.fromkeys(stored[p] for i in alive for p in images[i]))
        bad = {n: r for n, r in zip(names, map_images(check_image, names, kind, root, args.workers, 'verify images'))
               if r}
        # a record goes under the rule of its first bad image
        why = {i: next(bad[stored[p]] for p in images[i] if stored[p] in bad)
               for i in alive if any(stored[p] in bad for p in images[i])}
        for rule in ('missing_image', 'zero_byte_image', 'undecodable_image', 'tiny_image', 'decompression_bomb'):
            keep(rule, lambda i: why.get(i) != rule)
        print(f'verified {len(names):,} images in {time.time() - t0:.1f}s ({len(bad):,} bad)')

    # duplicates last, so the first *usable* occurrence of a caption is the one kept
    if max_dups > 0:
        seen = {}

        def first_k(i):
            key = normalise(captions[i])
            seen[key] = seen.get(key, 0) + 1
            return seen[key] <= max_dups
        keep('duplicate', first_k)

    kept = np.array(alive, dtype=np.int64)
    if len(kept) == 0:
        print_table(filters, n_records, 0)
        raise SystemExit(f'error: no sample of {args.json} survived the filters (table above); check the images '
                         f'path (--images) and --min_tokens/--max_tokens')

    # image ids in order of first use; the stored paths are relative to the image root
    image_id = {}
    for i in kept:
        for p in images[i]:
            image_id.setdefault(stored.get(p, p), len(image_id))
    paths = np.array([p.encode('utf-8') for p in image_id], dtype=f'S{max(len(p.encode()) for p in image_id)}')
    img_cols = np.full((len(kept), 2), -1, dtype=np.int64)
    for row, i in enumerate(kept):
        for k, p in enumerate(images[i]):
            img_cols[row, k] = image_id[stored.get(p, p)]

    kuid = np.array([uid_of[i] for i in kept], dtype=np.int64)
    klen = lens[kuid]
    val = split_val(klen, args.val_ratio, args.seed)
    is_val = np.zeros(len(kept), bool)
    is_val[val] = True
    arrays = {}
    for split, rows in (('train', np.flatnonzero(~is_val)), ('val', val)):
        # gather each sample's tokens from the distinct-caption array, in split order
        n = lens[kuid[rows]]
        new_offs = np.zeros(len(rows), np.int64)
        np.cumsum(n[:-1], out=new_offs[1:])
        src = np.repeat(offs[kuid[rows]] - new_offs, n) + np.arange(int(n.sum()), dtype=np.int64)
        arrays[f'{split}_tokens.bin'] = flat[src]
        arrays[f'{split}_index.npy'] = np.column_stack([new_offs, n, img_cols[rows]]).astype(np.int64).reshape(-1, 4)
    arrays['image_paths.npy'] = paths

    packed_tmp = None
    if args.pack_images:
        packed_tmp, arrays['images_packed_offsets.npy'] = pack(args, kind, root, list(image_id))

    meta = dict(
        version=1, source=source,
        tokenizer=os.path.abspath(args.tokenizer) if os.path.isdir(args.tokenizer) else args.tokenizer,
        vocab_size=len(tok), eos_id=ids['eos'], slot_id=ids['slot'],
        image_root=root, image_kind='packed' if args.pack_images else kind,
        packed_size=args.pack_size if args.pack_images else None,
        n_images=len(image_id), splits=dict(train=int(len(kept) - len(val)), val=int(len(val))),
        golden=golden(klen[val]), filters=filters, counts=dict(records=n_records, kept=int(len(kept))),
        min_tokens=args.min_tokens, max_tokens=args.max_tokens, max_dups=max_dups, seed=args.seed,
        val_ratio=args.val_ratio, qa_file=None)
    write_outputs(args.out_dir, arrays, meta, packed_tmp)
    print_table(filters, n_records, len(kept))
    print(f"wrote {args.out_dir}: train {meta['splits']['train']:,} / val {meta['splits']['val']:,} samples, "
          f"{meta['n_images']:,} images ({meta['image_kind']}), "
          f"{len(arrays['train_tokens.bin']) + len(arrays['val_tokens.bin']):,} caption tokens, "
          f"in {time.time() - t_start:.1f}s")
    return meta, [images[kept[r]] for r in val]


def pack(args, kind, root, names):
    """All kept images, resized and re-encoded, streamed into one file; (tmp path, offsets)."""
    t0 = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    tmp = os.path.join(args.out_dir, 'images_packed.bin.tmp')
    offsets = np.zeros(len(names) + 1, np.int64)
    with open(tmp, 'wb') as f:
        for k, b in enumerate(map_images(pack_image, names, kind, root, args.workers, 'pack images', args.pack_size)):
            if isinstance(b, str):  # verified moments ago, so the file changed under us
                f.close()
                os.remove(tmp)
                raise SystemExit(f'error: cannot pack image {names[k]} ({b}); re-run prepare_llava.py')
            f.write(b)
            offsets[k + 1] = offsets[k] + len(b)
    print(f'packed {len(names):,} images at {args.pack_size}px ({offsets[-1] / 2**20:,.1f} MiB) '
          f'in {time.time() - t0:.1f}s')
    return tmp, offsets


def print_table(filters, n_records, n_kept):
    print(f"{'rule':<24}{'count':>10}{'% of records':>14}")
    for rule, n in list(filters.items()) + [('kept', n_kept)]:
        print(f'{rule:<24}{n:>10,}{100 * n / max(n_records, 1):>13.2f}%')

# -----------------------------------------------------------------------------
# Synthetic data: coloured shapes with exact captions (the CPU demo's and the tests' data)

SIZE = 64
COLORS = dict(red=(220, 40, 40), green=(40, 175, 60), blue=(50, 90, 235), yellow=(240, 220, 40),
              purple=(145, 60, 200), orange=(250, 140, 25), white=(245, 245, 245), pink=(250, 135, 195))
SHAPES = ['circle', 'square', 'triangle', 'diamond', 'star', 'cross']
PLURALS = dict(circle='circles', square='squares', triangle='triangles', diamond='diamonds', star='stars',
               cross='crosses')
COUNT_WORDS = ['zero', 'one', 'two', 'three']
# a 3x3 grid; cell = row * 3 + col
POSITIONS = ['at the top left', 'at the top', 'at the top right', 'on the left', 'in the center', 'on the right',
             'at the bottom left', 'at the bottom', 'at the bottom right']
BACKGROUNDS = [(12, 12, 12), (55, 55, 60), (20, 28, 60), (45, 30, 25)]  # dark: every shape colour stands out


def draw_shape(d, shape, cx, cy, s, color):
    r = s / 2
    if shape == 'circle':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == 'square':
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == 'triangle':
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)
    elif shape == 'diamond':
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif shape == 'star':
        pts = [(cx + (r if k % 2 == 0 else 0.45 * r) * np.cos(-np.pi / 2 + k * np.pi / 5),
                cy + (r if k % 2 == 0 else 0.45 * r) * np.sin(-np.pi / 2 + k * np.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=color)
    else:  # cross
        w = s / 6
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)


def draw_scene(rng):
    """(image, caption, groups) with groups = [(count, colour, shape)]. Half the scenes are
    one large shape at a named grid position; half are 2-4 smaller shapes in one or two
    (count, colour, shape) groups. Shapes are >= 14 px so they survive a resize to 48 px."""
    img = Image.new('RGB', (SIZE, SIZE), BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    d = ImageDraw.Draw(img)
    cells = rng.permutation(9)
    colours = list(COLORS)

    def put(shape, colour, cell, s):
        row, col = divmod(int(cell), 3)
        cx, cy = ((c + 0.5) * SIZE / 3 + rng.integers(-2, 3) for c in (col, row))
        lo, hi = s / 2 + 1, SIZE - 1 - s / 2  # keep the whole shape inside the image
        draw_shape(d, shape, min(max(cx, lo), hi), min(max(cy, lo), hi), s, COLORS[colour])

    if rng.random() < 0.5:
        colour, shape = colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))]
        put(shape, colour, cells[0], int(rng.integers(18, 25)))
        article = 'an' if colour[0] in 'aeiou' else 'a'
        caption, groups = f'{article} {colour} {shape} {POSITIONS[cells[0]]}.', [(1, colour, shape)]
    else:
        counts = [int(rng.integers(2, 4))] if rng.random() < 0.4 else [int(rng.integers(1, 3)), int(rng.integers(1, 3))]
        groups = []
        while len(groups) < len(counts):
            g = (counts[len(groups)], colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))])
            if all(g[1:] != h[1:] for h in groups):
                groups.append(g)
        k = 0
        for count, colour, shape in groups:
            for _ in range(count):
                put(shape, colour, cells[k], int(rng.integers(14, 19)))
                k += 1
        phrases = [f'{COUNT_WORDS[c]} {col} {PLURALS[s] if c > 1 else s}' for c, col, s in groups]
        caption = f'there are {phrases[0]}.' if len(groups) == 1 else f'{phrases[0]} and {phrases[1]}.'
    if rng.random() < 0.4:  # a noisy background (and shapes): the demo should not be too easy
        a = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(6, 16), (SIZE, SIZE, 3))
        img = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    return img, caption, groups


def qa_lines(image, groups, qid):
    """Short-answer questions about one scene, all in the tiny tokenizer's vocabulary."""
    what = [f'{col} {PLURALS[s] if c > 1 else s}' for c, col, s in groups]
    lines = [dict(id=f'{qid}-what', image=image, question='What is in the image?', answers=what)]
    for c, col, s in groups:
        if sum(g[2] == s for g in groups) > 1:
            continue  # the same shape in two colours: no single right answer
        noun = PLURALS[s] if c > 1 else s
        lines.append(dict(id=f'{qid}-color-{s}', image=image, answers=[col],
                          question=f"What color {'are' if c > 1 else 'is'} the {noun}?"))
        lines.append(dict(id=f'{qid}-count-{s}', image=image, answers=[COUNT_WORDS[c], str(c)],
                          question=f'How many {PLURALS[s]} are there?'))
    return lines


def synthetic(args):
    """Draw args.synthetic scenes in the LLaVA layout under data_dir, prepare them with the
    same pipeline as real data, then write qa.jsonl for the val images plus held-out scenes
    (never in the json) up to ~64 images."""
    t0 = time.time()
    args.data_dir = args.data_dir or os.path.join('data', 'synthetic')
    args.tokenizer = args.tokenizer or 'tiny'
    args.max_dups = 0 if args.max_dups is None else args.max_dups
    img_dir = os.path.join(args.data_dir, 'images')
    rng = np.random.default_rng(args.seed)
    records, scenes, state = [], {}, {'t0': time.time()}
    for k in range(args.synthetic):
        img, caption, groups = draw_scene(rng)
        rel = f'{k // 1000:03d}/{k:06d}.jpg'
        os.makedirs(os.path.join(img_dir, os.path.dirname(rel)), exist_ok=True)
        img.save(os.path.join(img_dir, rel), format='JPEG', quality=95)
        records.append(dict(id=f'{k:06d}', image=rel, conversations=[
            dict(value='<image>\nDescribe the image in one sentence.', **{'from': 'human'}),
            dict(value=caption, **{'from': 'gpt'})]))
        scenes[rel] = groups
        progress('draw', k + 1, args.synthetic, state)
    args.json = os.path.join(args.data_dir, 'synthetic.json')
    with open(args.json + '.tmp', 'w') as f:
        json.dump(records, f)
    os.replace(args.json + '.tmp', args.json)
    args.images = img_dir
    print(f'drew {args.synthetic:,} images into {img_dir} in {time.time() - t0:.1f}s')

    meta, val_images = prepare(args, source='synthetic')

    lines = []
    for (rel,) in val_images[:64]:
        lines += qa_lines(f'images/{rel}', scenes[rel], f'val-{rel[4:10]}')
    held_rng = np.random.default_rng([args.seed, 1])  # its own stream: the dataset does not depend on it
    for k in range(max(0, 64 - min(len(val_images), 64))):
        img, _, groups = draw_scene(held_rng)
        rel = f'qa/{k:06d}.jpg'
        os.makedirs(os.path.join(img_dir, 'qa'), exist_ok=True)
        img.save(os.path.join(img_dir, rel), format='JPEG', quality=95)
        lines += qa_lines(f'images/{rel}', groups, f'heldout-{k:06d}')
    qa_path = os.path.abspath(os.path.join(args.data_dir, 'qa.jsonl'))
    with open(qa_path + '.tmp', 'w') as f:
        f.writelines(json.dumps(x) + '\n' for x in lines)
    os.replace(qa_path + '.tmp', qa_path)
    meta['qa_file'] = qa_path
    write_meta(args.out_dir, meta)
    print(f'wrote {len(lines)} QA lines to {qa_path}; synthetic total {time.time() - t0:.1f}s')
    return meta

# -----------------------------------------------------------------------------
# Benchmark: a generated LCS-558K-sized json (no images), prepared in a child process

BENCH_WORDS = """a an the of with and in on at near by for two three man woman boy girl people person dog cat
bird horse car truck bus bike street road city building house room kitchen table chair bed window door tree
trees flowers grass field beach water sea lake river mountain sky clouds sunset snow red blue green yellow white
black brown orange pink gray wooden old new small large big young little sitting standing walking running holding
wearing looking playing riding eating next front top side background view close up image illustration vector
painting drawing logo icon pattern design shirt dress hat shoes bag phone book cake food plate pizza coffee cup
glass bottle wall floor sign card poster map flag light lamp night day winter summer christmas wedding party
portrait photograph cartoon set collection vintage modern abstract colorful beautiful happy cute""".split()


def bench(args):
    import random
    import resource
    import subprocess
    n = args.bench
    data_dir = args.data_dir or os.path.join('data', 'bench')
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f'bench_{n}.json')
    t0 = time.time()
    rnd = random.Random(args.seed)
    prompts = ['Describe the image briefly.\n<image>', '<image>\nWrite a short caption.',
               'Give a one-line summary of the photo.\n<image>']
    records, caps = [], []
    for k in range(n):
        u = rnd.random()
        if u < 0.04 and caps:  # repeats, as in web alt-text
            cap = rnd.choice(caps[-1000:])
        elif u < 0.05:
            cap = 'stock photo of ' + ' '.join(rnd.choices(BENCH_WORDS, k=6))
        elif u < 0.055:
            cap = ''
        elif u < 0.06:
            cap = ' '.join(rnd.choices(BENCH_WORDS, k=80))
        else:  # most BLIP captions are 5-15 words
            cap = ' '.join(rnd.choices(BENCH_WORDS, k=max(2, int(rnd.lognormvariate(2.3, 0.35)))))
        caps.append(cap)
        records.append(dict(id=f'{k:09d}', image=f'{k // 10000:05d}/{k:09d}.jpg', conversations=[
            dict(value=prompts[k % 3], **{'from': 'human'}), dict(value=cap, **{'from': 'gpt'})]))
    with open(path, 'w') as f:
        json.dump(records, f)
    del records, caps
    print(f'bench: wrote {n:,} records ({os.path.getsize(path) / 2**20:.0f} MiB) to {path} in {time.time() - t0:.1f}s')
    cmd = [sys.executable, os.path.abspath(__file__), f'--json={path}', '--skip_image_check',
           f'--tokenizer={args.tokenizer or "Qwen/Qwen3-8B-Base"}', f'--out_dir={os.path.join(data_dir, "prepared")}',
           f'--workers={args.workers}']
    t0 = time.time()
    rc = subprocess.call(cmd)
    wall = time.time() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB on Linux
    if rc:
        raise SystemExit(f'error: the bench prepare run failed (exit {rc}); see its message above')
    print(f'bench: prepared {n:,} records in {wall:.1f}s wall (incl. python start + imports), '
          f'peak RSS {rss:.2f} GiB, {os.cpu_count()} CPUs')
    return wall, rss


def main(argv=None):
    # our pool workers never tokenise; saying so up front keeps the fast tokenizer's threads
    # on and silences its fork warning
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'true')
    args = parse_args(argv)
    if args.bench:
        return bench(args)
    if args.synthetic:
        return synthetic(args)
    args.tokenizer = args.tokenizer or 'Qwen/Qwen3-8B-Base'
    return prepare(args)[0]


if __name__ == '__main__':
    main()
