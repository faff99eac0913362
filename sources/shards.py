"""
WebDataset tar shards (as img2dataset writes them) as an image-caption source, read in place.

  expand_shards(spec)                -> (paths, n_missing): a folder, a glob, a brace range, a .tar
  scan_shard(path)                   -> (samples, problems): one shard's index, from its headers only
  (read at train time by sources/images.py: read_member, ShardFiles)
  write_shards(out_dir, samples, ..) tars the way img2dataset writes them (tests and benchmarks)

The layout (webdataset convention, which img2dataset follows): members come grouped by key;
the key is the member name up to the first '.' of its basename ('dir/000123.jpg' -> key
'dir/000123', ext 'jpg'). Per key: the image in any of images.IMAGE_EXTS (any case), the
caption in .txt, or in .json's "caption" when there is no .txt. Other members are ignored.

Headers are parsed by hand (ustar, GNU longname 'L', pax 'x'), not with tarfile: tarfile
builds a TarInfo per member and keeps them all, ~3x slower on 3M members, and it raises on a
damaged shard where we want the samples before the damage. Offsets agree with tarfile's
TarInfo.offset_data on everything tarfile writes (the tests check this).
"""
import glob
import io
import json
import math
import os
import re
import tarfile
import time

import numpy as np

from configurator import Progress, UserError
from sources.images import IMAGE_EXTS  # samples['exts'] holds an index into it

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
_IMAGE_EXT = {e: i for i, e in enumerate(IMAGE_EXTS)}
MAX_CAPTION_BYTES = 1 << 20  # a larger .txt is not a caption
MAX_JSON_BYTES = 16 << 20    # img2dataset's .json may carry EXIF, so allow more than a caption
MAX_META_BYTES = 1 << 20     # a pax / GNU longname header larger than this is damage, not a name
REGULAR_TYPES = (b'0', b'\0', b'7')
NO_DATA_TYPES = (b'1', b'2', b'3', b'4', b'5', b'6')  # links, devices, dirs, fifos: tarfile skips no data
TRAILER_SLACK = 64 << 10  # bytes allowed after the end-of-archive marker (record padding)
POSIX_MAGIC = b'ustar\x00'  # ustar's prefix field holds the name's leading part; GNU's does not

# -----------------------------------------------------------------------------
# Which files


def expand_shards(spec):
    """Shard paths (absolute, in order) for a folder (its *.tar, sorted, not recursive), a glob
    (matches sorted), a brace pattern ('cc3m/{00000..00331}.tar', zero-padding kept; several
    braces and comma lists '{a,b}' allowed; each expansion may itself be a glob) or a single
    file. Returns (paths, n_missing): n_missing counts brace-expanded files that do not exist
    (an img2dataset run leaves holes where a shard failed); they are left out, not fatal.
    No path at all is a ValueError with one line saying what was looked for."""
    spec = os.path.expanduser(str(spec))
    if os.path.isdir(spec):
        paths = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                       if f.endswith('.tar') and os.path.isfile(os.path.join(spec, f)))
        if not paths:
            raise ValueError(f"no *.tar files in folder '{spec}'")
        return [os.path.abspath(p) for p in paths], 0
    paths, n_missing = [], 0
    for p in expand_braces(spec):
        if glob.has_magic(p):
            paths += sorted(m for m in glob.glob(p) if os.path.isfile(m))
        elif os.path.isfile(p):
            paths.append(p)
        else:
            n_missing += 1
    paths = list(dict.fromkeys(os.path.abspath(p) for p in paths))  # overlapping patterns: once each
    if not paths:
        what = 'brace pattern' if '{' in spec else 'glob' if glob.has_magic(spec) else 'file or folder'
        n = f' ({n_missing} paths, none exists)' if n_missing > 1 else ''
        raise ValueError(f"no shards found: {what} '{spec}' matches no file{n}")
    return paths, n_missing


_RANGE = re.compile(r'^(-?\d+)\.\.(-?\d+)$')


def expand_braces(s):
    """Bash-style brace expansion: '{00000..00002}' -> 00000 00001 00002 (a bound with a leading
    zero pads every term to the wider bound, as bash and the braceexpand package do), '{a,b}'
    -> a b, nested and several braces as in bash. A brace with neither '..' nor a top-level
    comma is literal."""
    start = s.find('{')
    while start >= 0:
        depth, commas, end = 0, [], -1
        for i in range(start, len(s)):
            c = s[i]
            if c == '{':
                depth += 1
            elif c == '}':
                depth -= 1
                if depth == 0:
                    end = i
                    break
            elif c == ',' and depth == 1:
                commas.append(i)
        if end < 0:
            return [s]  # unbalanced: literal
        body, head, tail = s[start + 1:end], s[:start], s[end + 1:]
        m = _RANGE.match(body)
        if m:
            a, b = m.group(1), m.group(2)
            padded = any(x.lstrip('-').startswith('0') and len(x.lstrip('-')) > 1 for x in (a, b))
            pad = max(len(a), len(b)) if padded else 0
            lo, hi = int(a), int(b)
            step = 1 if hi >= lo else -1
            alts = [f'{k:0{pad}d}' for k in range(lo, hi + step, step)]
        elif commas:
            cuts = [start] + commas + [end]
            alts = [s[cuts[k] + 1:cuts[k + 1]] for k in range(len(cuts) - 1)]
        else:
            start = s.find('{', start + 1)  # literal brace: look further on
            continue
        return [x for alt in alts for x in expand_braces(head + alt + tail)]
    return [s]

# -----------------------------------------------------------------------------
# One shard's index, from its headers


class _Damage(Exception):
    """The shard is unreadable from here on; the message says where and why."""


def _number(field):
    """tarfile's nti: octal digits ended by NUL or space, or GNU base-256 (a first byte with
    the high bit set) for numbers that do not fit 11 octal digits (members of 8 GiB and more)."""
    if field[0] & 0x80:
        n = int.from_bytes(field[1:], 'big')
        return n - (1 << (8 * len(field) - 8)) if field[0] == 0xff else n
    s = field.split(b'\0', 1)[0].strip()
    return int(s, 8) if s else 0  # ValueError on garbage: the caller calls it damage


def _pax(buf):
    """A pax extended header's records ('%d %s=%s\\n') -> {keyword: value}."""
    out, pos = {}, 0
    while pos < len(buf) and buf[pos]:  # tarfile pads the data with NULs
        sp = buf.index(b' ', pos)
        n = int(buf[pos:sp])
        rec = buf[sp + 1:pos + n]
        if n <= sp - pos or not rec.endswith(b'\n') or b'=' not in rec:
            raise ValueError('bad pax record')
        k, v = rec[:-1].split(b'=', 1)
        out[k.decode('utf-8', 'surrogateescape')] = v.decode('utf-8', 'surrogateescape')
        pos += n
    return out


def _members(fd, file_size):
    """(name, data offset, size) of each regular member whose data lies fully inside the file,
    in archive order; raises _Damage where the archive stops making sense. One pread per
    header (plus one for a pax / longname header's data): image bytes are never read."""
    pos, long_name, pax = 0, None, None
    while True:
        hdr = os.pread(fd, BLOCK, pos)
        if len(hdr) < BLOCK:
            if pos == 0:
                raise _Damage('empty file' if not hdr else f'not a tar file ({len(hdr)} bytes)')
            # a tar cut exactly between members reads as complete up to here; say so
            raise _Damage(f'truncated header at byte {pos}' if hdr else
                          f'no end-of-archive marker (ends at byte {pos})')
        if hdr == ZERO_BLOCK:
            # End of archive: tarfile (and so webdataset) stops at the first zero block too. A
            # writer pads the end to its record size (tarfile and GNU tar: 10 KiB); much more
            # after it is a file whose tail was zeroed or overwritten (a crash), not an end.
            if file_size - pos > TRAILER_SLACK:
                raise _Damage(f'end-of-archive marker at byte {pos} but {file_size - pos} bytes follow')
            return
        try:
            chksum = _number(hdr[148:156])
            ok = sum(hdr) - sum(hdr[148:156]) + 256 == chksum
            if not ok:  # some old tars summed signed bytes; tarfile accepts either
                signed = sum(b - 256 if b > 127 else b for b in hdr)
                ok = signed - sum(b - 256 if b > 127 else b for b in hdr[148:156]) + 256 == chksum
            size = _number(hdr[124:136])
            ok = ok and size >= 0
        except ValueError:
            ok = False
        if not ok:
            raise _Damage('not a tar file' if pos == 0 else f'bad header checksum at byte {pos}')
        kind, data = hdr[156:157], pos + BLOCK
        if kind in (b'x', b'g', b'L', b'K'):  # pax (per-member / global), GNU long name / long link
            if size > MAX_META_BYTES or data + size > file_size:
                raise _Damage(f'bad or truncated extended header at byte {pos}')
            buf = os.pread(fd, size, data)
            if kind == b'L':
                long_name = buf.split(b'\0', 1)[0].decode('utf-8', 'surrogateescape')
            elif kind == b'x':
                try:
                    pax = _pax(buf)
                except ValueError:
                    raise _Damage(f'bad pax header at byte {pos}') from None
            pos = data + (size + BLOCK - 1) // BLOCK * BLOCK
            continue
        if pax is not None and 'path' in pax:
            name = pax['path']
        elif long_name is not None:
            name = long_name
        else:
            name = hdr[:100].split(b'\0', 1)[0].decode('utf-8', 'surrogateescape')
            if hdr[257:263] == POSIX_MAGIC and hdr[345]:
                name = hdr[345:500].split(b'\0', 1)[0].decode('utf-8', 'surrogateescape') + '/' + name
        if pax is not None and 'size' in pax:  # tarfile moves sizes of 8 GiB and more here
            try:
                size = int(pax['size'])
                if size < 0:
                    raise ValueError
            except ValueError:
                raise _Damage(f'bad pax size at byte {pos}') from None
        long_name = pax = None
        if kind == b'S':
            raise _Damage(f'GNU sparse member {name} (not supported) at byte {pos}')
        if kind in NO_DATA_TYPES:
            size = 0
        elif kind in REGULAR_TYPES and not name.endswith('/'):
            if data + size > file_size:
                raise _Damage(f'{name} cut off at byte {file_size} (needs {data + size})')
            yield name, data, size
        pos = data + (size + BLOCK - 1) // BLOCK * BLOCK


def _read_caption(fd, off, size, limit):
    if size > limit:
        return None
    return os.pread(fd, size, off).decode('utf-8')  # UnicodeDecodeError: the caller's bad_caption


def _caption(fd, txt, js):
    """(caption, None) of a sample from its .txt (utf-8), else its .json's "caption"; or
    (None, reason) when there is none or it cannot be read."""
    try:
        if txt is not None:
            cap = _read_caption(fd, txt[0], txt[1], MAX_CAPTION_BYTES)
        elif js is None:
            return None, 'no_caption'
        else:
            raw = _read_caption(fd, js[0], js[1], MAX_JSON_BYTES)
            meta = json.loads(raw) if raw is not None else None
            cap = meta.get('caption') if isinstance(meta, dict) else None
            if raw is not None and cap is None:  # "caption": null: img2dataset writes no .txt then
                return None, 'no_caption'
        if not isinstance(cap, str):
            return None, 'bad_caption'
        cap.encode('utf-8')  # a lone surrogate ("\\ud800" in the JSON) would break the tokenizer later
    except ValueError:  # UnicodeError and JSONDecodeError are ValueErrors
        return None, 'bad_caption'
    return cap, None


def _groups(fd, file_size, problems, path):
    """[key, image (off, size, ext) or None, txt (off, size) or None, json (off, size) or None]
    per run of consecutive members with the same key (webdataset's group_by_keys). At damage,
    the group being read is still yielded (its members so far are complete), then _Damage."""
    cur = None
    try:
        for name, off, size in _members(fd, file_size):
            slash = name.rfind('/')
            dot = name.find('.', slash + 1)
            if dot <= slash + 1:
                continue  # no '.' in the basename, or a dotfile: webdataset skips these too
            key, ext = name[:dot], name[dot + 1:].lower()
            if cur is None or key != cur[0]:
                if cur is not None:
                    yield cur
                cur = [key, None, None, None]
            if ext in _IMAGE_EXT:
                slot, val = 1, (off, size, _IMAGE_EXT[ext])
            elif ext == 'txt':
                slot, val = 2, (off, size)
            elif ext == 'json' and not key.endswith('_stats'):
                slot, val = 3, (off, size)
            else:
                continue  # .parquet, _stats.json, a.b.jpg (ext 'b.jpg'), ...: not ours
            if cur[slot] is None:
                cur[slot] = val
            else:
                problems.append(('duplicate_member', path, key))
    except _Damage:
        if cur is not None:
            yield cur
        raise
    if cur is not None:
        yield cur


def scan_shard(path):
    """One shard's samples from its headers, read in place; never raises on bad data.

    Returns (samples, problems):
      samples   dict of parallel sequences, one entry per usable sample, in archive order:
                  keys      list[str]   webdataset key ('000120034', or 'dir/000123')
                  offsets   int64 [n]   absolute byte offset of the image member's data
                  sizes     int64 [n]   its size in bytes (read it with read_member / ShardFiles)
                  exts      uint8 [n]   index into IMAGE_EXTS (lower-cased)
                  captions  list[str]   the .txt as utf-8, else the .json's "caption" (not stripped)
      problems  list of (reason, path, detail), detail a key or, for 'corrupt_shard', where/why:
                  no_image, no_caption, bad_caption (not utf-8, bad json, not a string, too long),
                  empty_image (0 bytes), duplicate_key (a key met again later in the shard:
                  dropped), duplicate_member (a second image / .txt / .json for a key: the first
                  is kept), corrupt_shard (cannot open, empty, not a tar, truncated, bad header
                  checksum, no end-of-archive marker, over 64 KiB after the marker: the
                  samples before the damage are kept; at most one such entry per shard)

    Grouping is by consecutive key, as webdataset's group_by_keys does."""
    keys, offsets, sizes, exts, captions, problems, seen = [], [], [], bytearray(), [], [], set()
    fd = None

    def add(group):
        key, img, txt, js = group
        if img is None and txt is None and js is None:
            return  # only ignored members (.parquet, ...) under this key: not a sample
        if key in seen:
            return problems.append(('duplicate_key', path, key))
        seen.add(key)
        if img is None:
            return problems.append(('no_image', path, key))
        cap, why = _caption(fd, txt, js)
        if why is None and img[1] == 0:
            why = 'empty_image'
        if why:
            return problems.append((why, path, key))
        keys.append(key)
        offsets.append(img[0])
        sizes.append(img[1])
        exts.append(img[2])
        captions.append(cap)

    try:
        fd = os.open(path, os.O_RDONLY)
        for group in _groups(fd, os.fstat(fd).st_size, problems, path):
            add(group)  # at damage, the group being read too: a caption cut off falls back to .json
    except _Damage as e:
        problems.append(('corrupt_shard', path, str(e)))
    except OSError as e:  # cannot open, or an I/O error mid-way
        problems.append(('corrupt_shard', path, f'{type(e).__name__}: {e.strerror or e}'))
    finally:
        if fd is not None:
            os.close(fd)
    samples = dict(keys=keys, offsets=np.array(offsets, dtype=np.int64), sizes=np.array(sizes, dtype=np.int64),
                   exts=np.frombuffer(bytes(exts), dtype=np.uint8).copy(), captions=captions)
    return samples, problems


def index_shards(spec):
    """Every sample of the shards `spec` names (expand_shards), from their headers: (their
    common folder, shard paths relative to it, [(name 'shard.tar/KEY.jpg', (shard number,
    offset, size), caption)], [problem reason], n_missing shards of a range)."""
    paths, n_missing = expand_shards(spec)
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    rel = [os.path.relpath(p, root) for p in paths]
    samples, problems, progress = [], [], Progress('scan shards', len(paths))
    for k, path in enumerate(paths):
        found, bad = scan_shard(path)
        problems += [reason for reason, _, _ in bad]
        columns = (found['keys'], found['exts'], found['offsets'].tolist(), found['sizes'].tolist(), found['captions'])
        samples += [(f'{rel[k]}/{key}.{IMAGE_EXTS[ext]}', (k, offset, size), caption)
                    for key, ext, offset, size, caption in zip(*columns)]
        progress(k + 1)
    return root, rel, samples, problems, n_missing

# what a shard problem counts as among prepare_llava.py's RULES (a duplicate member is not a lost record)
SHARD_RULES = dict(corrupt_shard='corrupt_shard', bad_caption='malformed_text', no_caption='empty_caption',
                   empty_image='zero_byte_image', no_image='malformed_keys', duplicate_key='malformed_keys')


def read_shard_records(spec, filters):
    """prepare_llava.py's records of WebDataset tar shards, indexed in place from their
    headers, their problems counted in `filters` (its rules): (captions, images, n_records,
    locations {image name: (shard, offset, size)}, shard paths relative to their common
    folder, that folder)."""
    t0 = time.time()
    try:
        root, rel, samples, problems, n_missing = index_shards(spec)
    except ValueError as e:
        raise UserError(str(e)) from None
    for reason in problems:
        if reason in SHARD_RULES:
            filters[SHARD_RULES[reason]] += 1
    n_records = len(samples) + sum(r in SHARD_RULES and r != 'corrupt_shard' for r in problems)
    print(f'read {n_records:,} records from {len(rel):,} shards in {time.time() - t0:.1f}s'
          + (f' ({n_missing} shards of the range do not exist)' if n_missing else ''))
    return ([c.strip() or None for _, _, c in samples], [(name,) for name, _, _ in samples], n_records,
            {name: loc for name, loc, _ in samples}, rel, root)

# -----------------------------------------------------------------------------
# Writing shards the way img2dataset does (tests and benchmarks)


def write_shards(out_dir, samples, per_shard=10000, parquet=True, start_shard=0):
    """Tars as img2dataset writes them through webdataset's TarWriter: '{shard:05d}.tar' holding,
    per sample, KEY.jpg, KEY.json ({"caption", "key", "status": "success", ...}) and KEY.txt
    (only when the caption is not None), members in sorted-suffix order, tarfile's default
    (pax) format, mode 0o444, owner 'bigdata'; beside each tar '{shard:05d}_stats.json' and,
    with parquet, a '{shard:05d}.parquet' (a dummy with parquet's magic, never read).
    samples: iterable of (image_bytes, caption) or (image_bytes, caption, ext). Keys are
    img2dataset's '{shard:05d}{i:0Nd}', N = digits of per_shard - 1 (per_shard=10000:
    '000120034', 9 digits). Returns the tar paths."""
    os.makedirs(out_dir, exist_ok=True)
    width = max(1, math.ceil(math.log10(per_shard)))
    paths, it = [], iter(samples)
    shard = start_shard
    while True:
        batch = [s for _, s in zip(range(per_shard), it)]
        if not batch:
            return paths
        path = os.path.join(out_dir, f'{shard:05d}.tar')
        t0, now = time.time(), time.time()
        with open(path, 'wb') as f, tarfile.open(fileobj=f, mode='w|') as tf:
            for i, s in enumerate(batch):
                img, cap, ext = (s + ('jpg',))[:3]
                key = f'{shard:05d}{i:0{width}d}'
                meta = dict(url=f'https://example.com/{key}.{ext}', caption=cap, key=key, status='success',
                            error_message=None, width=None, height=None, original_width=None, original_height=None,
                            exif=None, sha256=None)
                members = {ext: img, 'json': json.dumps(meta).encode()}
                if cap is not None:
                    members['txt'] = cap.encode()
                for suffix in sorted(members):  # webdataset's TarWriter writes sorted suffixes
                    ti = tarfile.TarInfo(f'{key}.{suffix}')
                    ti.size, ti.mtime, ti.mode = len(members[suffix]), now, 0o444
                    ti.uname = ti.gname = 'bigdata'
                    tf.addfile(ti, io.BytesIO(members[suffix]))
        with open(os.path.join(out_dir, f'{shard:05d}_stats.json'), 'w') as f:
            json.dump(dict(count=len(batch), successes=len(batch), failed_to_download=0, failed_to_resize=0,
                           duration=time.time() - t0, start_time=t0, end_time=time.time(), status_dict={}), f)
        if parquet:
            with open(os.path.join(out_dir, f'{shard:05d}.parquet'), 'wb') as f:
                f.write(b'PAR1' + bytes(8) + b'PAR1')
        paths.append(path)
        shard += 1
