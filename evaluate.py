"""
Generation and evaluation: captions for batches of images, the val loss, and the evaluation
report (what `sample.py --eval` writes and train.py writes at the end of a run).

Read top to bottom:
1) generation: prompts for 1-2 images or a user prompt, batched captioning,
2) losses: caption loss on the val split, also with the images shuffled and with no image
   at all (the connector provably uses the image when the first is far below the others),
3) caption rows for val / golden samples and the QA set (an unreadable image skips its row
   and is counted, never the end of an evaluation),
4) evaluate(): everything scored with metrics.py, written as report/{report.md,
   generations.jsonl, metrics.json, loss.png, thumbs/},
5) the report writer (markdown tables, a loss-curve picture drawn with PIL, a gallery).
"""
import contextlib
import html
import io
import json
import math
import os
import time

import numpy as np
import torch

import data
import metrics
import model as M
from common import UserError, atomic_write_text, autocast as autocast_for
from images import load_image

# -----------------------------------------------------------------------------
# Generation


def prompt_ids(vlm, tok, n_images, prompt=None):
    """The training template for 1 or 2 images, or a user prompt (images prepended when it
    has no '<image>' marker)."""
    if prompt is None:
        prompt = data.TEMPLATE_A if n_images == 1 else data.TEMPLATE_B
    prompt = prompt.replace('\\n', '\n')
    if '<image>' not in prompt:
        prompt = '<image>\n' * n_images + prompt
    if prompt.count('<image>') != n_images:
        raise UserError(f"the prompt has {prompt.count('<image>')} <image> markers for {n_images} images")
    if not prompt.endswith('\n'):
        prompt += '\n'  # the caption follows a newline in training
    return data.encode_prompt(tok, prompt, vlm.connector_args['n_latents'], vlm.slot_id, vlm.brackets, vlm.bos_id)


def caption_batch(vlm, tok, image_groups, prompt=None, temperature=0.0, top_p=0.9, max_new_tokens=64,
                  generator=None, batch_size=32):
    """image_groups: one list of uint8 [3, H, W] arrays per prompt. Returns decoded captions.
    Prompts run batch_size at a time, so a thousand captions are a few dozen forward passes."""
    device = vlm.pix_mean.device
    out = []
    for s in range(0, len(image_groups), batch_size):
        groups = image_groups[s:s + batch_size]
        prompts = [prompt_ids(vlm, tok, len(g), prompt) for g in groups]
        imgs = torch.from_numpy(np.stack([im for g in groups for im in g])).to(device)
        new = vlm.generate(imgs, prompts, max_new_tokens, temperature, top_p, generator)
        out += [' '.join(tok.decode(t, skip_special_tokens=True).split()) for t in new]  # one line each
    return out


def backbone_autocast(vlm):
    """The autocast training used for these backbones (bf16 backbones: bf16 autocast)."""
    return autocast_for(vlm.pix_mean.device, next(vlm.llm.parameters()).dtype)

# -----------------------------------------------------------------------------
# Losses


@torch.no_grad()
def caption_loss_sums(vlm, batches, autocast=contextlib.nullcontext()):
    """(summed caption-token loss, caption tokens, skipped samples) over collated batches;
    the caller divides (and, under DDP, all-reduces first)."""
    sums, bad = control_loss_sums(vlm, batches, autocast, controls=False)
    return sums[0][0], int(sums[0][1]), bad


# The val loss alone cannot tell a connector that sees from one that has learnt a soft prompt
# (a fixed prefix that fits the captions on average): both lower it. The same captions with
# the batch's images shuffled, and with no image at all, can: a connector that uses the image
# has the right-image loss far below both, a soft prompt has it equal to the shuffled one.
CONTROLS = ('right', 'shuffled', 'no_image')


@torch.no_grad()
def control_loss_sums(vlm, batches, autocast=contextlib.nullcontext(), controls=True):
    """[[loss sum, caption tokens]] for the right images, and with controls also for the
    images shuffled within each batch and with no image (CONTROLS order), plus the skipped
    samples. The shuffled pass costs one more forward pass per batch, the no-image pass a
    shorter one (no slots)."""
    device = vlm.pix_mean.device
    sums, bad = [[0.0, 0] for _ in (CONTROLS if controls else CONTROLS[:1])], 0
    drop = [vlm.slot_id, *(vlm.brackets or ())]
    for b in batches:
        bad += b['n_bad']
        if not b['n_targets']:
            continue
        variants = [b, _shuffled(b), without_images(b, drop, vlm.eos_id)] if controls else [b]
        for k, v in enumerate(variants):
            if not v['n_targets']:
                continue
            images, input_ids, target_pos, target_ids, position_ids = data.to_device(v, device)
            with autocast:
                loss = vlm(images, input_ids, target_pos, target_ids, position_ids=position_ids, reduction='sum')
            sums[k][0] += loss.item()
            sums[k][1] += v['n_targets']
    return sums, bad


def _shuffled(batch):
    """The same captions with the batch's images moved along by one (each caption gets the
    previous row's image), so the loss says what the captions cost with the wrong image. A
    batch of one has no other image: left out."""
    batch = dict(batch, images=batch['images'].roll(1, 0))
    return batch if len(batch['sample_lens']) > 1 else dict(batch, n_targets=0)


def without_images(batch, drop_ids, pad_id):
    """A collated batch (padded or packed) with every image slot and bracket removed: the
    captions from text alone. Each row's kept tokens move left in order (a stable sort, no
    loop over tokens); packed samples keep positions that restart at each sample."""
    ids, labels = batch['input_ids'], batch['labels']
    drop = torch.isin(ids, torch.tensor(drop_ids, dtype=ids.dtype))
    order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)
    n_kept = (~drop).sum(1, keepdim=True)
    T = int(n_kept.max()) if len(ids) else 0
    col = torch.arange(T)[None]
    real = col < n_kept
    new_ids = torch.where(real, ids.gather(1, order)[:, :T], pad_id)
    new_labels = torch.where(real, labels.gather(1, order)[:, :T], -100)
    pos = batch['position_ids']
    if pos is not None:
        # drops before a token within its own sample: the running drop count minus its value
        # where the sample started (position 0)
        cum = drop.long().cumsum(1)
        base = torch.where(pos == 0, cum - drop.long(), 0).cummax(1).values
        kept_pos = (pos - (cum - base)).gather(1, order)[:, :T]
        last = kept_pos.gather(1, (n_kept - 1).clamp(min=0))
        pos = torch.where(real, kept_pos, last + col - n_kept + 1)  # pads continue the last sample
    nxt = torch.zeros_like(new_labels, dtype=torch.bool)
    nxt[:, :-1] = new_labels[:, 1:] != -100
    return dict(batch, images=batch['images'][:0], input_ids=new_ids, labels=new_labels, position_ids=pos,
                target_pos=torch.nonzero(nxt.flatten()).flatten(), target_ids=new_labels[:, 1:][nxt[:, :-1]],
                n_tokens=batch['n_tokens'] - int(drop.sum()))


def val_losses(vlm, ds, n, batch_size):
    """Caption loss of the first n val samples with the right images, with shuffled images,
    and with no image; the first is the val loss. None where nothing was measured."""
    samples = [ds[i] for i in range(n)]
    batches = [data.collate(samples[s:s + batch_size], pad_id=vlm.eos_id) for s in range(0, n, batch_size)]
    sums, bad = control_loss_sums(vlm, batches, backbone_autocast(vlm))
    right, shuffled, none = (s / c if c else None for s, c in sums)
    return dict(loss=right, caption_ppl=math.exp(min(right, 50)) if right is not None else None,
                loss_shuffled_images=shuffled, loss_no_image=none, skipped_samples=bad)

# -----------------------------------------------------------------------------
# Caption rows


def references_by_image(prepared, tok):
    """{image id: every caption of that image in the dataset}: CHAIR and the caption metrics
    use all references of a sample, not just the caption it was drawn with."""
    refs = {}
    for split in ('train', 'val'):
        tokens, index = prepared[split]
        for off, n, i0, i1 in np.asarray(index):
            if i1 < 0:
                refs.setdefault(int(i0), []).append((int(off), int(n), split))
    return lambda i0: [tok.decode(prepared[split][0][off:off + n].tolist(), skip_special_tokens=True).strip()
                       for off, n, split in refs.get(i0, [])]


def caption_rows(vlm, tok, ds, indices, decoding, batch_size, prefix='val', refs=None):
    """Rows {id, image, prompt, generation, references} for dataset samples, and how many were
    skipped because an image could not be read."""
    ok = []
    for i in indices:
        try:
            raws = [ds.reader.read(k) for k in ds.image_ids(i)]  # read once: pixels and thumbnails
            ok.append((i, raws, [load_image(r, ds.spec) for r in raws]))
        except Exception:  # counted by the caller as a skipped row
            continue
    caps = caption_batch(vlm, tok, [g for _, _, g in ok], None, batch_size=batch_size, **decoding)
    rows = []
    for (i, raws, _), cap in zip(ok, caps):
        ids = ds.image_ids(i)
        own = tok.decode(ds.caption(i), skip_special_tokens=True).strip()
        others = refs(ids[0]) if refs and len(ids) == 1 else []
        rows.append(dict(id=f'{prefix}/{i}', image=[ds.reader.path(k) for k in ids] if len(ids) > 1 else
                         ds.reader.path(ids[0]), prompt='template B' if len(ids) > 1 else 'template A',
                         generation=cap, references=[own] + [r for r in others if r != own],
                         pil=None if ds.reader.kind == 'folder' else _pil(raws[0])))
    return rows, len(indices) - len(ok)


def _pil(raw):
    from PIL import Image
    return Image.open(io.BytesIO(raw))


def read_qa(path):
    """QA JSONL lines {image, question, answers}; image paths relative to the file's folder."""
    rows, root = [], os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows.append(dict(id=str(r.get('id', n)), image=os.path.join(root, r['image']),
                                 question=r['question'], answers=list(r['answers'])))
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f'{path}:{n} is not a QA line {{"image", "question", "answers"}} ({e})') from None
    return rows


def qa_rows(vlm, tok, path, decoding, batch_size):
    """The QA set answered, batched by question (one prompt per batch call); unreadable
    images skip their rows. Returns (rows, skipped)."""
    rows, images = [], []
    lines = read_qa(path)
    for r in lines:
        try:
            images.append([load_image(r['image'], vlm.image_spec)])
            rows.append(r)
        except Exception:  # counted below as skipped
            continue
    skipped = len(lines) - len(rows)
    by_q = {}
    for k, r in enumerate(rows):
        by_q.setdefault(r['question'], []).append(k)
    for q, ks in by_q.items():
        outs = caption_batch(vlm, tok, [images[k] for k in ks], '<image>\n' + q + '\n', batch_size=batch_size,
                             **decoding)
        for k, o in zip(ks, outs):
            rows[k].update(id='qa/' + rows[k]['id'], prompt=q, generation=o)
    return rows, skipped


@torch.no_grad()
def llm_untouched(vlm, tok, texts):
    """Is the frozen LLM still the one that was loaded? Every weight against the fingerprint
    taken when it was built (model.weights_fingerprint: no second copy of the LLM anywhere),
    and text-only logits through the VLM's path (inputs_embeds, no images) against the LLM's
    own (input_ids). Returns dict(ok, max_abs_logit_diff, changed_weights)."""
    device = vlm.pix_mean.device
    bos = [] if vlm.bos_id is None else [vlm.bos_id]
    ids = [bos + tok(t, add_special_tokens=False)['input_ids'][:32] or [vlm.eos_id] for t in texts]
    diff = 0.0
    for i in ids:
        x = torch.tensor([i], device=device)
        ours = vlm.llm(inputs_embeds=vlm.embed(None, x)).logits.float()
        diff = max(diff, float((ours - vlm.llm(input_ids=x).logits.float()).abs().max()))
    want = getattr(vlm.llm, 'frozen_fingerprint', None)
    now = M.weights_fingerprint(vlm.llm)
    changed = sorted(k for k in now if want is None or want.get(k) != now[k])
    dtype = next(vlm.llm.parameters()).dtype
    ok = diff <= (1e-4 if dtype == torch.float32 else 1e-2) and not changed
    return dict(ok=ok, max_abs_logit_diff=diff, changed_weights=changed[:10], n_changed_weights=len(changed))

# -----------------------------------------------------------------------------
# The evaluation


def _score(vlm, tok, prepared, num, qa_path, decoding, batch_size):
    """Generations and metrics of the current connector: (rows, metrics)."""
    builder = data.SampleBuilder(tok, vlm.connector_args['n_latents'], vlm.slot_id, vlm.eos_id, vlm.brackets,
                                 bos_id=vlm.bos_id)
    ds = data.CaptionDataset(prepared, 'val', builder, vlm.image_spec, replace_bad=False)
    n = len(ds) if num <= 0 else min(num, len(ds))
    m = dict(val=val_losses(vlm, ds, n, batch_size))
    refs = references_by_image(prepared, tok)
    val_rows, skipped = caption_rows(vlm, tok, ds, range(n), decoding, batch_size, refs=refs)
    m['val'].update(metrics.score_rows(val_rows), skipped_rows=skipped)
    # the golden samples already among the val rows are not captioned (or scored) twice
    golden = [i for i in prepared['meta'].get('golden', []) if i < len(ds)]
    extra, skipped = caption_rows(vlm, tok, ds, [i for i in golden if i >= n], decoding, batch_size, 'golden', refs)
    by_id = {r['id']: r for r in val_rows}
    gold_rows = [dict(by_id[f'val/{i}'], id=f'golden/{i}') for i in golden if f'val/{i}' in by_id] + extra
    if extra:
        m['golden'] = dict(metrics.score_rows(gold_rows), skipped_rows=skipped)
    q_rows = []
    if qa_path and os.path.exists(qa_path):
        q_rows, skipped = qa_rows(vlm, tok, qa_path, decoding, batch_size)
        m['qa'] = dict(metrics.score_rows(q_rows), skipped_rows=skipped)
    rest = [r for r in val_rows if r['id'].split('/')[1] not in {str(i) for i in golden}]
    return gold_rows + rest + q_rows, m


def evaluate(vlm, tok, model_args, prepared, out_dir, *, num=500, qa_path=None, temperature=0.0, top_p=0.9,
             max_new_tokens=64, seed=1337, batch_size=32, llm_check=True, baseline=None, log_path=None):
    """Captions the val split (first `num`) and the golden set, runs the QA set, scores
    everything and writes out_dir/{report.md, generations.jsonl, metrics.json, loss.png,
    thumbs/}. baseline: a connector state dict (e.g. the untrained one) evaluated the same way
    and shown side by side. log_path: a training log.jsonl for the loss curve. Returns the
    metrics."""
    t0 = time.time()
    decoding = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    device = vlm.pix_mean.device
    qa_path = qa_path or _meta_path(prepared, 'qa_file')
    base_metrics = None
    if baseline is not None:
        trained = {k: v.clone() for k, v in vlm.connector.state_dict().items()}
        vlm.connector.load_state_dict(baseline)
        _, base_metrics = _score(vlm, tok, prepared, num, qa_path, dict(decoding, generator=_gen(seed, device)),
                                 batch_size)
        vlm.connector.load_state_dict(trained)
    rows, m = _score(vlm, tok, prepared, num, qa_path, dict(decoding, generator=_gen(seed, device)), batch_size)
    m = dict(checkpoint=model_args.get('checkpoint', ''), decoding='greedy' if temperature <= 0 else
             f'temperature {temperature}, top_p {top_p}', seed=seed, **m)
    if llm_check:
        texts = [r['references'][0] for r in rows if r.get('references')][:4] or ['a photo of a cat.']
        m['llm_untouched'] = llm_untouched(vlm, tok, texts)
    m['seconds'] = time.time() - t0
    if base_metrics is not None:
        m['baseline'] = base_metrics
    write_report(out_dir, rows, m, log_path=log_path)
    atomic_write_text(os.path.join(out_dir, 'metrics.json'), json.dumps(m, indent=2, default=float))
    return m


def _gen(seed, device='cpu'):
    """A generator where the logits are: sampling never copies a distribution to the host."""
    return torch.Generator(device=device).manual_seed(seed)  # reproducible reports when sampling


def _meta_path(prepared, key):
    """A path stored in meta.json (relative to the prepared folder), or None."""
    p = prepared['meta'].get(key)
    return os.path.normpath(os.path.join(prepared['dir'], p)) if p else None


def summary_line(m):
    v = m['val']
    if v.get('loss') is None:
        parts = ['val loss not measured (no val samples)']
    else:
        parts = [f"val loss {v['loss']:.4f} (ppl {v['caption_ppl']:.2f}; shuffled images "
                 f"{metrics.fmt(v['loss_shuffled_images'], 3)}, no image {metrics.fmt(v['loss_no_image'], 3)})"]
    if 'cider_d' in v:
        parts.append(f"CIDEr-D {metrics.fmt(v['cider_d'], 3)} | BLEU-4 {metrics.fmt(v['bleu4'], 3)} | "
                     f"CHAIR-i {metrics.fmt(v['chair_i'], 3)}")
    if 'qa' in m:
        parts.append(f"QA accuracy {metrics.fmt(m['qa'].get('qa_accuracy'), 3)}")
    if 'llm_untouched' in m:
        parts.append(f"LLM untouched: {m['llm_untouched']['ok']}")
    skipped = sum(m.get(k, {}).get('skipped_rows', 0) for k in ('val', 'golden', 'qa'))
    if skipped:
        parts.append(f'{skipped} rows skipped (unreadable images)')
    return ' | '.join(parts)

# -----------------------------------------------------------------------------
# The report: report.md (metrics, loss curve, length distributions, gallery), generations.jsonl


def _thumbnail(src, dst, size=128):
    """src: an image path or a PIL image. Returns True if dst was written."""
    from PIL import Image, ImageOps
    try:
        if isinstance(src, Image.Image):
            im = ImageOps.exif_transpose(src)  # a copy: the caller's image is untouched
        else:
            with Image.open(src) as f:
                f.draft('RGB', (2 * size, 2 * size))  # JPEG: decode at a reduced scale, much faster
                im = ImageOps.exif_transpose(f)
        im = im.convert('RGB')
        im.thumbnail((size, size))
        im.save(dst, 'JPEG', quality=85)
        return True
    except Exception:  # an unreadable image costs its thumbnail, never the report
        return False


def read_log(path):
    """Records of a log.jsonl; a torn last line (a run killed mid-write) is left out."""
    out = []
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


# (log key, legend, colour) of each curve plot_losses draws
PLOTTED = [('loss', 'train loss', (31, 119, 180)), ('val_loss', 'val loss', (255, 127, 14)),
           ('val_loss_shuffled', 'val, shuffled images', (214, 39, 40)),
           ('val_loss_no_image', 'val, no image', (127, 127, 127))]


def plot_losses(records, path, size=(720, 360)):
    """Train and val loss against step, and the val loss with shuffled images and with no
    image where the log has them (the step where the val loss leaves the shuffled one is where
    the connector starts to see), drawn with PIL (no plotting dependency). Returns True if a
    picture was written."""
    from PIL import Image, ImageDraw, ImageFont
    series = [(key, name, color, [(r['iter'], r[key]) for r in records if isinstance(r.get(key), (int, float))
                                  and math.isfinite(r[key])])
              for key, name, color in PLOTTED]
    series = [x for x in series if x[3]]
    pts = [p for *_, xy in series for p in xy]
    if len(pts) < 2:
        return False
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    W, H = size
    left, right, top, bottom = 64, 20, 16, 44
    x1 = max(p[0] for p in pts) or 1
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    y0, y1 = y0 - 0.05 * (y1 - y0 + 1e-9), y1 + 0.05 * (y1 - y0 + 1e-9)
    X = lambda x: left + (W - left - right) * x / x1  # noqa: E731
    Y = lambda y: top + (H - top - bottom) * (y1 - y) / (y1 - y0)  # noqa: E731
    im = Image.new('RGB', size, 'white')
    d = ImageDraw.Draw(im)
    for k in range(6):  # grid and tick labels
        xv, yv = x1 * k / 5, y0 + (y1 - y0) * k / 5
        d.line([(X(xv), top), (X(xv), H - bottom)], fill=(230, 230, 230))
        d.line([(left, Y(yv)), (W - right, Y(yv))], fill=(230, 230, 230))
        d.text((X(xv), H - bottom + 6), f'{xv:.0f}', fill='black', font=font, anchor='ma')
        d.text((left - 6, Y(yv)), f'{yv:.2f}', fill='black', font=font, anchor='rm')
    d.rectangle([left, top, W - right, H - bottom], outline='black')
    d.text(((left + W - right) / 2, H - 16), 'step', fill='black', font=font, anchor='ma')
    for k, (key, name, color, pts) in enumerate(series):
        xy = [(X(x), Y(y)) for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
        for x, y in xy if key != 'loss' else []:  # evals are few: each one a dot
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        d.line([(W - right - 190, top + 14 + 18 * k), (W - right - 165, top + 14 + 18 * k)], fill=color, width=3)
        d.text((W - right - 158, top + 14 + 18 * k), name, fill='black', font=font, anchor='lm')
    im.save(path)
    return True


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return str(x)  # last resort: one odd value must not lose the whole file


def _md(s):
    # one table cell: escape HTML ("<image>" would vanish), pipes, and newlines
    return html.escape(str(s), quote=False).replace('|', '\\|').replace('\n', '<br>')


def _fmt(v):
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return f'{v:.4f}'
    return 'not measured' if v is None else str(v)


def _is_length_stats(v):
    return isinstance(v, dict) and 'bins' in v and 'generated' in v and 'references' in v


def _walk_metrics(d, prefix=''):
    """yields (dotted key, value) for scalars and length-stat tables; lists (per-sample) are skipped"""
    for k, v in d.items():
        key = f'{prefix}{k}'
        if _is_length_stats(v):
            yield key, v
        elif isinstance(v, dict):
            yield from _walk_metrics(v, key + '.')
        elif v is None or isinstance(v, (bool, int, float, str, np.number, np.bool_)):
            yield key, v  # None: a metric of an empty set, shown as 'not measured'


def _row_scores(row):
    parts = []
    if 'bleu4' in row:
        parts.append(f"BLEU-4 {metrics.fmt(row['bleu4'])}")
    if 'cider_d' in row:
        parts.append(f"CIDEr-D {metrics.fmt(row['cider_d'])}")
    if row.get('hallucinated'):
        parts.append('hallucinated: ' + ', '.join(row['hallucinated']))
    for k in ('correct', 'exact', 'contains'):
        if k in row:
            parts.append(f"{k} {'yes' if row[k] else 'no'}")
    return '<br>'.join(_md(p) for p in parts)


def _metrics_table(metrics, notes=None, columns=None):
    """The metrics as one table; with a baseline (metrics['baseline']), side by side. notes:
    the paragraph above the table (default: what the val metrics mean). columns: {title:
    metrics dict} shown first as one table with a column per dict (a benchmark's scores over
    all images and per domain)."""
    header = ('checkpoint', 'decoding', 'seed', 'seconds')
    base = dict(_walk_metrics(metrics.get('baseline', {})))
    found = [(k, v) for k, v in _walk_metrics({k: v for k, v in metrics.items() if k not in ('baseline', *header)})
             if not _is_length_stats(v)]
    if not found and not columns:
        return []
    about = ', '.join(f'{k} {_fmt(metrics[k])}' for k in header if k in metrics)
    about += '; untrained: the connector as initialised, same seed' if base else ''
    lines = ['## Metrics', '', _md(about), '', notes if notes is not None else
             'val.loss: caption-token loss with the right images; loss_shuffled_images: the same captions with '
             "another sample's image; loss_no_image: the caption from text alone (the connector uses the image "
             'when val.loss is far below both). BLEU-4 (corpus) and CIDEr-D as in the COCO caption evaluation; '
             'chair_i: hallucinated object mentions / object mentions, chair_s: captions with one or more '
             '(CHAIR, all references of a sample as ground truth); qa_accuracy: the answer named, not negated, and '
             'no other answer of its kind named; qa_contains_lenient: the answer appears anywhere.', '']
    if columns:
        flat = [dict(_walk_metrics(d)) for d in columns.values()]
        keys = list(dict.fromkeys(k for f in flat for k in f))
        lines += ['| metric | ' + ' | '.join(_md(t) for t in columns) + ' |', '|---' * (len(columns) + 1) + '|']
        lines += ['| ' + ' | '.join([_md(k)] + [_md(_fmt(f.get(k))) for f in flat]) + ' |' for k in keys]
        lines += ['']
    if not found:
        return lines
    if base:
        lines += ['| metric | trained | untrained |', '|---|---|---|']
        lines += [f'| {_md(k)} | {_md(_fmt(v))} | {_md(_fmt(base.get(k)))} |' for k, v in found]
    else:
        lines += ['| metric | value |', '|---|---|']
        lines += [f'| {_md(k)} | {_md(_fmt(v))} |' for k, v in found]
    return lines + ['']


def _length_tables(metrics):
    lines = []
    for key, ls in ((k, v) for k, v in _walk_metrics(metrics) if _is_length_stats(v) and
                    not k.startswith('baseline.')):
        lines += [f'## Caption length in words: {_md(key)}', '',
                  '| | n | mean | median | p10 | p90 |', '|---|---|---|---|---|---|']
        for name in ('generated', 'references'):
            s = ls[name]
            lines.append(f"| {name} | {s['n']} | {s['mean']:.1f} | {s['median']:.1f} | {s['p10']:.1f} | "
                         f"{s['p90']:.1f} |")
        lines += ['', '| words | generated | references |', '|---|---|---|']
        g_n, r_n = max(1, ls['generated']['n']), max(1, ls['references']['n'])
        for b, g, r in zip(ls['bins'], ls['generated']['hist'], ls['references']['hist']):
            lines.append(f'| {b} | {g} ({100 * g / g_n:.0f}%) | {r} ({100 * r / r_n:.0f}%) |')
        lines.append('')
    return lines


def _gallery(out_dir, rows, thumbs, gallery_size):
    shown = rows[:gallery_size]
    if not shown:
        return []
    if thumbs:
        os.makedirs(os.path.join(out_dir, 'thumbs'), exist_ok=True)
    lines = [f'## Gallery (first {len(shown)} of {len(rows)})', '']
    lines += ['| # | image | generation | reference | scores |', '|---|---|---|---|---|'] if thumbs else \
        ['| # | generation | reference | scores |', '|---|---|---|---|']
    for i, row in enumerate(shown):
        refs = row.get('references') or row.get('answers') or []
        refs = [refs] if isinstance(refs, str) else refs
        cells = [_md(row.get('id', i))]
        if thumbs:
            srcs = row['pil'] if row.get('pil') is not None else row.get('image')
            srcs = srcs if isinstance(srcs, (list, tuple)) else ([] if srcs is None else [srcs])
            imgs = []
            for k, src in enumerate(srcs):
                name = f'thumbs/{i:04d}_{k}.jpg'  # by position: ids can hold any character
                if _thumbnail(src, os.path.join(out_dir, name)):
                    imgs.append(f"![{_md(row.get('id', i))}]({name})")
            cells.append(' '.join(imgs))
        cells += [_md(row.get('generation', '')), '<br>'.join(_md(r) for r in refs), _row_scores(row)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines + ['']


def write_report(out_dir, rows, metrics, thumbs=True, title='Evaluation report', gallery_size=32, log_path=None,
                 notes=None, columns=None):
    """
    Writes out_dir/generations.jsonl (every row: id, image, prompt, generation, references,
    then any per-sample scores; a row's PIL image under "pil" is not written) and
    out_dir/report.md: metrics table (trained vs untrained when metrics has a 'baseline'), the
    loss curve of log_path (a training log.jsonl) as loss.png, length distributions, and a
    gallery of the first gallery_size rows with 128 px JPEG thumbnails in out_dir/thumbs/.
    Rows name their image by path under "image" (or a list of paths, multi-image) or carry it
    under "pil". All links are relative to out_dir, so the folder renders wherever it is
    copied. notes and columns: see _metrics_table (a benchmark's report). Returns report.md's
    path.
    """
    os.makedirs(out_dir, exist_ok=True)
    lines_out = []
    for i, row in enumerate(rows):
        out = {'id': row.get('id', i), 'image': row.get('image'), 'prompt': row.get('prompt'),
               'generation': row.get('generation'), 'references': row.get('references')}
        out.update((k, v) for k, v in row.items() if k not in out and k != 'pil')
        lines_out.append(json.dumps(out, ensure_ascii=False, default=_jsonable) + '\n')
    atomic_write_text(os.path.join(out_dir, 'generations.jsonl'), ''.join(lines_out))

    lines = [f'# {title}', '', f'{len(rows)} generations; every one, with its per-sample scores, is in '
             f'[generations.jsonl](generations.jsonl).', '']
    lines += _metrics_table(metrics, notes, columns)
    if log_path and plot_losses(read_log(log_path), os.path.join(out_dir, 'loss.png')):
        lines += ['## Loss curve', '', '![train and val loss against step, val also with shuffled images and with no '
                  'image](loss.png)', '']
    lines += _length_tables(metrics)
    lines += _gallery(out_dir, rows, thumbs, gallery_size)
    path = os.path.join(out_dir, 'report.md')
    atomic_write_text(path, '\n'.join(lines))
    return path
