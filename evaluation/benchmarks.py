"""
The captioning benchmarks papers report, read from their files as distributed, captioned by a
connector and scored as the COCO caption toolkit scores them (coco_caption.py).

$ python sample.py --ckpt out/ckpt.pt --bench coco --ann dataset_coco.json --images coco/        # Karpathy test
$ python sample.py --ckpt out/ckpt.pt --bench coco --ann captions_val2014.json --images val2014/
$ python sample.py --ckpt out/ckpt.pt --bench nocaps --ann nocaps_val_4500_captions.json --images nocaps/
$ python sample.py --ckpt out/ckpt.pt --bench flickr30k --ann dataset_flickr30k.json --images flickr30k-images/

Read top to bottom:
1) readers: Karpathy split files (COCO, Flickr30k) and COCO-style caption files (COCO
   captions, NoCaps with its per-image domain); a bad record or a missing image is counted
   and skipped, a file that is not one of them is one error line,
2) object hallucination on COCO as published: CHAIR with COCO's 80 classes, the image's
   segmented objects (instances_val2014.json) and its captions' objects as ground truth,
3) captioning the images (batched greedy decoding, the training template),
4) scoring (overall, NoCaps also per domain) and evaluate_bench(), what train.py calls at
   each eval (the captioning spread over the ranks),
5) run_bench(): the official results file, metrics.json and the report,
6) write_synthetic(): the synthetic val split in these layouts, five references per image
   (the CPU demo's stand-in for COCO, and the tests').
"""
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

from configurator import Progress, UserError, atomic_write_text
from evaluation import coco_caption, evaluate, metrics, report

BENCHMARKS = ('coco', 'nocaps', 'flickr30k')
KARPATHY_SPLITS = ('train', 'restval', 'val', 'test')
DOMAINS = ('in-domain', 'near-domain', 'out-domain')  # NoCaps, named as its evaluation names them
NAMES = {'coco': 'COCO captions', 'nocaps': 'NoCaps', 'flickr30k': 'Flickr30k'}

# -----------------------------------------------------------------------------
# Readers


def _load_json(path, what):
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} not found')
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f'{what} {path} is not valid JSON ({str(e)[:120]})') from None


def read_benchmark(bench, ann, images, split=None, num=0):
    """
    The images of a benchmark file: dict(bench, layout, split, items, skipped, scanned) where
    items are dict(image_id, image (path), references, domain) in file order (the first `num`
    usable ones; 0: all) and skipped counts what was left out and why. Layouts:
      karpathy  dataset_coco.json / dataset_flickr30k.json: images[] {filepath?, filename,
                cocoid (COCO), imgid, split, sentences[] {raw}}; split 'test' by default
      coco      captions_val2014.json / nocaps_val_4500_captions.json: images[] {id,
                file_name, domain (NoCaps)}, annotations[] {image_id, caption}
    Image paths resolve under `images` as the layout names them (filepath/filename, or
    file_name), or straight under it; an absolute path or one that leaves `images` is skipped.
    """
    if bench not in BENCHMARKS:
        raise UserError(f"unknown benchmark '{bench}' (choose from {', '.join(BENCHMARKS)})")
    if not os.path.isdir(images):
        raise UserError(f'image folder {images} not found')
    d = _load_json(ann, 'annotation file')
    if not isinstance(d, dict) or not isinstance(d.get('images'), list):
        raise UserError(f'{ann} is neither a Karpathy split file (images[] with sentences) nor a COCO-style caption '
                        f'file (images[] and annotations[])')
    layout = 'coco' if 'annotations' in d else 'karpathy'
    if bench == 'nocaps' and layout != 'coco':
        raise UserError(f'{ann} is a Karpathy split file; NoCaps is read from its COCO-style file '
                        f'(nocaps_val_4500_captions.json, with a domain per image)')
    if layout == 'karpathy':
        split = split or 'test'
        if split not in KARPATHY_SPLITS:
            raise UserError(f"unknown split '{split}' (a Karpathy split file has {', '.join(KARPATHY_SPLITS)})")
        records = _karpathy(d, bench, split)
    else:
        if split:
            raise UserError(f'--split is for Karpathy split files; {ann} is a COCO-style file (all its images count)')
        if not isinstance(d['annotations'], list):
            raise UserError(f'{ann}: annotations is not a list')
        records = _coco_style(d, bench)
    skipped, items, seen, scanned = Counter(), [], set(), 0
    for rec in records:
        if num and len(items) >= num:
            break  # the rest is never looked at: a 500-image subset of a 40K-image file stays fast
        scanned += 1
        if isinstance(rec, str):
            skipped[rec] += 1
            continue
        paths = rec.pop('paths')
        if any(os.path.isabs(p) or os.path.normpath(p).startswith('..') for p in paths):
            skipped['unsafe_path'] += 1  # a file that names /etc/passwd or ../.. is never opened
            continue
        path = next((p for p in paths if os.path.isfile(os.path.join(images, p))), None)
        if rec['image_id'] in seen:
            skipped['duplicate_image'] += 1
        elif not rec['references']:
            skipped['no_references'] += 1
        elif path is None:
            skipped['missing_image'] += 1
        else:
            seen.add(rec['image_id'])
            items.append(dict(rec, image=os.path.join(images, path)))
    if not items:
        why = ', '.join(f'{v} {k}' for k, v in skipped.items()) or 'it has none'
        raise UserError(f'no usable image in {ann}' + (f" (split '{split}')" if split else '') +
                        f' under {images}: {why}')
    return dict(bench=bench, layout=layout, split=split or 'all', items=items, skipped=dict(skipped), scanned=scanned,
                ann=ann)


def _karpathy(d, bench, split):
    """Records of a Karpathy split file (a string: why one was skipped). The image id is
    COCO's cocoid, or for Flickr30k the Flickr photo id its file name holds."""
    for r in d['images']:
        try:
            name, s, sents = r['filename'], r['split'], r['sentences']
            if not isinstance(name, str) or not isinstance(sents, list):
                raise TypeError
            if 'cocoid' in r:
                image_id = r['cocoid']
            else:
                stem = os.path.splitext(name)[0]
                image_id = int(stem) if stem.isdigit() else r['imgid']
            if not isinstance(image_id, (int, str)):
                raise TypeError
            refs = [x['raw'].strip() for x in sents if isinstance(x, dict) and isinstance(x.get('raw'), str) and
                    x['raw'].strip()]
            folder = r.get('filepath') or ''
        except (KeyError, TypeError, AttributeError):
            yield 'malformed_image'
            continue
        if s not in KARPATHY_SPLITS:
            yield 'unknown_split'
        elif s == split:
            yield dict(image_id=image_id, references=refs, domain=None,
                       paths=[os.path.join(folder, name), name] if folder else [name])


def _coco_style(d, bench):
    """Records of a COCO-style file: images[] + annotations[] (captions grouped by image)."""
    refs, bad = {}, Counter()
    for a in d['annotations']:
        if isinstance(a, dict) and isinstance(a.get('caption'), str) and a['caption'].strip() and \
                isinstance(a.get('image_id'), (int, str)):
            refs.setdefault(a['image_id'], []).append(a['caption'].strip())
        else:
            bad['malformed_caption'] += 1
    for why, n in bad.items():
        yield from [why] * n
    for r in d['images']:
        if not isinstance(r, dict) or not isinstance(r.get('file_name'), str) or \
                not isinstance(r.get('id'), (int, str)):
            yield 'malformed_image'
            continue
        domain = None
        if bench == 'nocaps':
            domain = r.get('domain')
            domain = {'in': 'in-domain', 'near': 'near-domain', 'out': 'out-domain'}.get(domain, domain)
            if domain not in DOMAINS:
                yield 'unknown_domain'
                continue
        name, paths = r['file_name'], [r['file_name']]
        if name.startswith('COCO_') and name.count('_') >= 2:
            paths.append(os.path.join(name.split('_')[1], name))  # COCO_val2014_...jpg also under val2014/
        yield dict(image_id=r['id'], references=refs.get(r['id'], []), domain=domain, paths=paths)


@lru_cache(maxsize=4)
def _cached(bench, ann, images, split, num):
    return read_benchmark(bench, ann, images, split, num)

# -----------------------------------------------------------------------------
# CHAIR on COCO as published: COCO's 80 classes and their synonyms; ground truth = the
# image's segmented objects (instances_val2014.json) and the objects its captions name


# the project's object words (metrics.OBJECT_WORDS) that belong to a COCO class, under COCO's
# category names; plus what COCO has and that table leaves out
_COCO_NAME = {'ball': 'sports ball', 'plant': 'potted plant', 'table': 'dining table', 'phone': 'cell phone'}
COCO_CLASSES = tuple((
    'person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire hydrant, stop sign, '
    'parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe, backpack, umbrella, '
    'handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite, baseball bat, baseball glove, skateboard, '
    'surfboard, tennis racket, bottle, wine glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange, '
    'broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, potted plant, bed, dining table, toilet, tv, laptop, '
    'mouse, remote, keyboard, cell phone, microwave, oven, toaster, sink, refrigerator, book, clock, vase, scissors, '
    'teddy bear, hair drier, toothbrush').split(', '))
COCO_WORDS = {w: _COCO_NAME.get(o, o) for w, o in metrics.OBJECT_WORDS.items() if _COCO_NAME.get(o, o) in COCO_CLASSES}
COCO_WORDS.update({'orange': 'orange', 'hair drier': 'hair drier', 'hair dryer': 'hair drier',
                   'blow dryer': 'hair drier', 'hairdryer': 'hair drier', 'bow tie': 'tie'})
# a young or grown animal is the animal, not a person ("baby elephant"); a passenger vehicle is
# the vehicle ("passenger train")
COCO_WORDS.update({f'{a} {b}': b for a in ('baby', 'adult', 'mother') for b in
                   'bird cat dog horse sheep cow elephant bear zebra giraffe'.split()})
COCO_WORDS.update({f'passenger {v}': COCO_WORDS[v] for v in ('train', 'jet', 'plane', 'airplane', 'bus', 'car',
                                                               'boat')})
# "orange" is the fruit unless it colours what follows ("an orange cat", "orange and white")
_COLOURED = set('shirt jacket vest coat dress helmet cone cones wall walls sky roof background color colored coloured '
                'striped juice light lights jersey uniform paint'.split())


def coco_objects(caption):
    """The COCO classes a caption names, one per mention (CHAIR-i counts mentions)."""
    toks = metrics.tokenize_caption(caption)
    for i, t in enumerate(toks):
        if t == 'orange':
            nxt, after = (toks[i + 1:i + 2] or [''])[0], (toks[i + 2:i + 3] or [''])[0]
            if nxt in metrics.COLOURS or nxt in _COLOURED or (nxt in ('and', 'or') and after in metrics.COLOURS) or \
                    (nxt and metrics.objects_in(nxt)):
                toks[i] = 'orangecolour'  # the colour: names no object
    return metrics.objects_in(' '.join(toks), COCO_WORDS)


def read_instances(path):
    """{image id: set of COCO class names segmented in it} from instances_*.json."""
    d = _load_json(path, 'instances file')
    try:
        names = {c['id']: c['name'] for c in d['categories']}
        out = {}
        for a in d['annotations']:
            out.setdefault(a['image_id'], set()).add(names[a['category_id']])
        return out
    except (KeyError, TypeError) as e:
        raise UserError(f'{path} is not a COCO instances file (categories[], annotations[] with image_id and '
                        f'category_id): {type(e).__name__} {e}') from None


_instances = lru_cache(maxsize=2)(read_instances)  # 150 MB of JSON: read once per process


def find_instances(ann):
    """instances_val2014.json beside the annotation file (or in an annotations/ folder there), if any."""
    folder = os.path.dirname(os.path.abspath(ann))
    for p in (os.path.join(folder, 'instances_val2014.json'), os.path.join(folder, 'annotations',
                                                                             'instances_val2014.json')):
        if os.path.isfile(p):
            return p
    return None


def check_instances(path):
    """A UserError now, not after the captioning, for an instances file that is not there."""
    if path is not None and not os.path.isfile(path):
        raise UserError(f'instances file {path} not found (COCO annotations/instances_val2014.json)')


def chair_coco(captions, items, instances=None):
    """CHAIR as published (Rohrbach et al. 2018) with COCO's classes: ground truth is the
    image's segmented objects (when an instances file is given; images it lacks count in
    'images_without_instances') and the classes its reference captions name."""
    objs = _instances(os.path.abspath(instances)) if instances else None
    truths = []
    for it in items:
        truth = {o for r in it['references'] for o in coco_objects(r)}
        truths.append(truth | objs.get(it['image_id'], set()) if objs is not None else truth)
    summary, per = metrics.hallucination_rate(captions, [it['references'] for it in items], COCO_WORDS, truths,
                                              coco_objects)
    out = {'CHAIRi': summary['chair_i'], 'CHAIRs': summary['chair_s'],
           'ground_truth': f'{os.path.basename(instances)} + reference captions' if objs is not None else
           'reference captions only (no instances_val2014.json given or found)'}
    out.update((k, summary[k]) for k in ('objects_mentioned', 'objects_hallucinated', 'captions'))
    if objs is not None:
        out['images_without_instances'] = sum(it['image_id'] not in objs for it in items)
    return out, per

# -----------------------------------------------------------------------------
# Captioning


def caption_items(vlm, tok, items, prompt=None, max_new_tokens=64, batch_size=32, what='captioning'):
    """Greedy captions for benchmark items: ({image id: caption}, [items that could not be
    read]). Images are read by a few threads one batch ahead (PIL decodes without the GIL)
    and never all held at once."""
    from sources.images import load_image

    def read(it):
        try:
            return load_image(it['image'], vlm.image_spec)
        except Exception:  # an unreadable image costs its caption, never the run
            return None

    captions, bad, progress = {}, [], Progress(what, len(items))
    with ThreadPoolExecutor(4) as pool:
        chunks = [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
        nxt = pool.map(read, chunks[0]) if chunks else None
        for k, chunk in enumerate(chunks):
            pixels = list(nxt)
            nxt = pool.map(read, chunks[k + 1]) if k + 1 < len(chunks) else None
            ok = [(it, p) for it, p in zip(chunk, pixels) if p is not None]
            bad += [it for it, p in zip(chunk, pixels) if p is None]
            caps = evaluate.caption_batch(vlm, tok, [[p] for _, p in ok], prompt, temperature=0.0,
                                          max_new_tokens=max_new_tokens, batch_size=batch_size) if ok else []
            captions.update((it['image_id'], c) for (it, _), c in zip(ok, caps))
            progress(min(len(items), (k + 1) * batch_size))
    return captions, bad

# -----------------------------------------------------------------------------
# Scoring


def score_bench(b, captions, instances=None, meteor_spice=True):
    """Scores of captions {image id: caption} on a read benchmark b: (metrics, per-image
    rows). Toolkit metrics at the top level (NoCaps also under each domain, each domain scored
    as its own corpus, as NoCaps' evaluation does), CHAIR, and the length distribution."""
    items = [it for it in b['items'] if it['image_id'] in captions]
    refs = {it['image_id']: it['references'] for it in items}
    subsets = {d: [it['image_id'] for it in items if it['domain'] == d] for d in DOMAINS} \
        if b['bench'] == 'nocaps' else {}
    m, per = coco_caption.score(refs, {i: captions[i] for i in refs}, meteor=meteor_spice, spice=meteor_spice,
                                subsets={d: ids for d, ids in subsets.items() if ids})
    cands = [captions[it['image_id']] for it in items]
    if b['bench'] == 'coco':
        m['CHAIR'], coco_per = chair_coco(cands, items, instances)
    h, h_per = metrics.hallucination_rate(cands, [it['references'] for it in items])
    m['chair_refs'] = {k: h[k] for k in ('chair_i', 'chair_s', 'objects_mentioned', 'objects_hallucinated')}
    m['length'] = metrics.length_stats(cands, [it['references'] for it in items])
    rows = []
    for k, it in enumerate(items):
        i = it['image_id']
        rows.append(dict(id=f"{b['bench']}/{i}", image_id=i, image=it['image'], domain=it['domain'],
                         generation=captions[i], references=it['references'], cider_d=per[i]['CIDEr'],
                         hallucinated=(coco_per if b['bench'] == 'coco' else h_per)[k]))
    return m, rows


def evaluate_bench(vlm, tok, bench, ann, images, num=500, batch_size=32, split=None, prompt=None,
                   max_new_tokens=64, instances=None, meteor_spice=False, rank=0, world_size=1):
    """
    Captions the first `num` images (0: all) of a benchmark file and scores them: the
    metrics dict of score_bench (Bleu_1..4, ROUGE_L, CIDEr, ...; NoCaps per domain; CHAIR)
    plus 'skipped' (counts) and 'seconds'. For train.py's eval: the file is read once per
    process (cached), METEOR and SPICE are off by default (each starts a Java process), and
    the connector's train/eval mode is restored afterwards. Under DDP every rank calls it and
    captions its share (evaluate.on_all_ranks); rank 0 scores and gets the metrics, the others None.
    """
    t0 = time.time()
    check_instances(instances)
    was_training = vlm.training
    vlm.eval()

    def share():  # the file is read on every rank: one that cannot read it says so to all
        items = _cached(bench, os.path.abspath(ann), os.path.abspath(images), split, num)['items']
        return caption_items(vlm, tok, items[rank::world_size], prompt, max_new_tokens, batch_size,
                             f'{bench} captions')
    try:
        parts = evaluate.on_all_ranks(share)
    finally:
        vlm.train(was_training)
    error = evaluate.first_error(parts)
    if error:  # raised on every rank alike: the caller's warning (or error) is the same on all
        raise UserError(f'rank {error[0]}: {error[1]}' if world_size > 1 else error[1])
    if rank != 0:
        return None
    b = _cached(bench, os.path.abspath(ann), os.path.abspath(images), split, num)
    captions, bad = {}, []
    for (caps, unread), _ in parts:
        captions.update(caps)
        bad += unread
    if not captions:
        raise UserError(f"none of the {len(b['items'])} {bench} images could be read (e.g. {b['items'][0]['image']})")
    if instances is None and bench == 'coco':
        instances = find_instances(ann)
    m, _ = score_bench(b, captions, instances, meteor_spice)
    m['skipped'] = dict(b['skipped'], **({'unreadable_image': len(bad)} if bad else {}))
    m['seconds'] = time.time() - t0
    return m

def log_entry(m, bench, iter_num):
    """(log.jsonl record, console line) of evaluate_bench's metrics at a training step."""
    scores = {k: m[k] for k in ('CIDEr', 'Bleu_4', 'ROUGE_L') if isinstance(m.get(k), (int, float))}
    rec = dict(iter=iter_num, bench=bench, **{f'bench_{k}': v for k, v in scores.items()}, bench_images=m['images'],
               bench_s=m['seconds'])
    return rec, (f'  {bench} ({m["images"]} images): ' + ' | '.join(f'{k} {v:.3f}' for k, v in scores.items())
                 + f' | {m["seconds"]:.0f}s')

# -----------------------------------------------------------------------------
# The command: results file, metrics.json, report


TOOLKIT_KEYS = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE')


def run_bench(vlm, tok, b, out_dir, checkpoint='', prompt=None, max_new_tokens=64, batch_size=32, instances=None):
    """Captions and scores a read benchmark b; writes out_dir/results.json (the official
    results file: [{image_id, caption}], for the toolkit or an evaluation server),
    metrics.json, report.md (benchmark table, length distribution, gallery with every
    reference), generations.jsonl and thumbs/. Returns the metrics."""
    t0 = time.time()
    check_instances(instances)  # before the captions: a typo must not cost the whole run
    captions, bad = caption_items(vlm, tok, b['items'], prompt, max_new_tokens, batch_size,
                                  f"captioning {NAMES[b['bench']]}")
    if not captions:
        raise UserError(f"none of the {len(b['items'])} images could be read (e.g. {b['items'][0]['image']})")
    results = [{'image_id': it['image_id'], 'caption': captions[it['image_id']]} for it in b['items']
               if it['image_id'] in captions]
    atomic_write_text(os.path.join(out_dir, 'results.json'), json.dumps(results, ensure_ascii=False))
    if instances is None and b['bench'] == 'coco':
        instances = find_instances(b['ann'])
    m, rows = score_bench(b, captions, instances)
    skipped = dict(b['skipped'], **({'unreadable_image': len(bad)} if bad else {}))
    about = dict(benchmark=f"{NAMES[b['bench']]} ({os.path.basename(b['ann'])}, split {b['split']})",
                 checkpoint=checkpoint, decoding='greedy', prompt=prompt or 'the training template',
                 seconds=time.time() - t0)
    full = dict(about, **m, skipped=skipped)
    atomic_write_text(os.path.join(out_dir, 'metrics.json'), json.dumps(full, indent=2, default=str))
    columns = {'all images': {k: m[k] for k in TOOLKIT_KEYS if k in m}}
    columns.update((d, {k: m[d][k] for k in TOOLKIT_KEYS if k in m[d]}) for d in DOMAINS if d in m)
    shown = {k: v for k, v in full.items() if k not in TOOLKIT_KEYS and k not in DOMAINS}
    report.write_report(out_dir, rows, shown, title=f"{NAMES[b['bench']]} benchmark", notes=_notes(m),
                          columns=columns)
    return full


def _notes(m):
    """What the numbers are, for the report."""
    official = m['tokenizer'] == coco_caption.OFFICIAL_TOKENIZER
    s = ('Scores as the COCO caption evaluation toolkit (pycocoevalcap) computes them, on a 0-1 scale (CIDEr: CIDEr-D, '
         f"0-10): tokenizer {m['tokenizer']}. ")
    s += ('Directly comparable to published numbers on the same split.' if official and 'METEOR' in m else
          'BLEU, ROUGE-L and CIDEr equal the toolkit\'s on the same tokens' +
          ('' if official else '; the pure-Python tokenizer matches the official one on caption text (see the '
           'README), install pycocoevalcap and Java for the official one') + '.')
    if m.get('not_computed'):
        s += ' Not computed: ' + '; '.join(f'{k}: {v}' for k, v in m['not_computed'].items()) + '.'
    if 'CHAIR' in m:
        s += (' CHAIR: CHAIRi = hallucinated object mentions / object mentions, CHAIRs = captions with one or more, '
              'with COCO\'s 80 classes.')
    s += (" chair_refs: CHAIR with this project's object words and the references alone as ground truth (as "
          'sample.py --eval reports it).')
    return s


def summary_line(m):
    """One line of the main numbers: overall, then per domain where there are domains."""
    def part(d):
        return ' | '.join(f'{k} {metrics.fmt(d[k])}' for k in TOOLKIT_KEYS if k in d)
    s = f"{m.get('benchmark', '')}: {m['images']} images | {part(m)}"
    s += ''.join(f' || {dom}: CIDEr {metrics.fmt(m[dom]["CIDEr"])}' for dom in DOMAINS if dom in m)
    if 'CHAIR' in m:
        s += f" || CHAIRi {metrics.fmt(m['CHAIR']['CHAIRi'])} CHAIRs {metrics.fmt(m['CHAIR']['CHAIRs'])}"
    skipped = sum(m.get('skipped', {}).values())
    return s + (f' | {skipped} images skipped (see metrics.json)' if skipped else '')

# -----------------------------------------------------------------------------
# A stand-in for the CPU demo: the synthetic val split in the benchmarks' layouts


def _paraphrases(c):
    """Five references for a synthetic caption: itself and four rewordings."""
    base = c.rstrip('.')
    base = base[len('there are '):] if base.startswith('there are ') else base
    one = base.split()[0] in ('a', 'an', 'one') and ' and ' not in base
    return [c, base.capitalize() + '.', f'The image shows {base}.', f'A picture of {base}.',
            f"There {'is' if one else 'are'} {base} in the image."]


def write_synthetic(data_dir, out_dir):
    """The synthetic dataset's val split (data_dir: a folder prepare_llava.py --synthetic
    wrote) as benchmark files, five references per image: dataset_coco.json (Karpathy layout,
    val images in the test split, the others in train), captions_val.json (COCO style) and
    nocaps_val.json (COCO style with a domain per image, by shape). Returns their paths."""
    import data
    from sources.synthetic import PLURALS
    prepared = data.open_prepared(os.path.join(data_dir, 'prepared'))
    paths = [p.decode() if isinstance(p, bytes) else str(p) for p in prepared['image_paths']]
    val = {paths[int(i)] for i in prepared['val'][1][:, 2]}
    with open(os.path.join(data_dir, 'synthetic.json')) as f:
        records = json.load(f)
    images, anns, kimgs = [], [], []
    # NoCaps-like domains, by the first shape a caption names
    domain = dict(circle='in-domain', square='in-domain', triangle='near-domain', diamond='near-domain',
                  star='out-domain', cross='out-domain')
    domain.update((PLURALS[k], v) for k, v in list(domain.items()))
    for k, r in enumerate(records):
        refs = _paraphrases(r['conversations'][1]['value'])
        folder, name = os.path.split(r['image'])
        kimgs.append(dict(filepath=folder, filename=name, cocoid=k, imgid=k, split='test' if r['image'] in val else
                          'train', sentences=[dict(raw=c, sentid=5 * k + j) for j, c in enumerate(refs)]))
        if r['image'] in val:
            shape = next((w for w in refs[0].rstrip('.').split() if w in domain), 'circle')
            images.append(dict(id=k, file_name=r['image'], domain=domain[shape]))
            anns += [dict(image_id=k, id=5 * k + j, caption=c) for j, c in enumerate(refs)]
    out = dict(karpathy=os.path.join(out_dir, 'dataset_coco.json'), coco=os.path.join(out_dir, 'captions_val.json'),
               nocaps=os.path.join(out_dir, 'nocaps_val.json'))
    atomic_write_text(out['karpathy'], json.dumps(dict(images=kimgs, dataset='synthetic')))
    atomic_write_text(out['coco'], json.dumps(dict(images=[{k: v for k, v in im.items() if k != 'domain'}
                                                           for im in images], annotations=anns)))
    atomic_write_text(out['nocaps'], json.dumps(dict(images=images, annotations=anns)))
    return out
