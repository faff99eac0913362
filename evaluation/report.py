"""
The evaluation report: report.md (metrics table, trained and untrained side by side, the loss
curves from log.jsonl drawn with PIL, caption-length distributions, a gallery with
thumbnails) and generations.jsonl; what evaluate.py and benchmarks.py write, and the log
they read.
"""
import html
import json
import math
import os

import numpy as np

from configurator import atomic_write_text
from evaluation import metrics

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


def trim_log(path, upto_iter, upto_eval):
    """On resume: drop the records of the steps about to be redone (evals and benchmark
    records after upto_eval, the rest after upto_iter), so a plotted curve has one point per
    step; a torn last line from a kill goes too."""
    if os.path.exists(path):
        keep = [r for r in read_log(path) if r.get('iter', 0) <= (upto_eval if 'val_loss' in r or 'bench' in r
                                                                    else upto_iter)]
        atomic_write_text(path, ''.join(json.dumps(r) + '\n' for r in keep))


def step_line(r, max_iters):
    """The console line of a training step's log record (train.py)."""
    return (f"iter {r['iter']}/{max_iters} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad {r['grad_norm']:.3f} | "
            f"{r['dt_ms']:.0f} ms | {r['samples_per_s']:.1f} samples/s | {r['tokens_per_s']:.0f} tok/s | "
            + (f"mfu {r['mfu'] * 100:.1f}% | " if r.get('mfu') is not None else '')
            + f"data {r['data_wait'] * 100:.0f}% | epoch {r['epoch']:.2f} (ends in {r['eta_epoch_s'] / 60:.1f} min) | "
            f"eta {r['eta_s'] / 60:.1f} min" + (f" | recompiles {r['recompiles']}" if 'recompiles' in r else '')
            + (f" | bad images {r['bad_images']} ({r['bad_images_total']} in all)" if r['bad_images'] else '')
            + ''.join(f' | {k} {v}' for k, v in r.get('samples_by_source', {}).items()))


def eval_line(r, best=False):
    """The console line of an eval's log record: a connector that sees has the val loss far
    below both controls (shuffled images, no image)."""
    line = f"eval {r['iter']}: val loss {r['val_loss']:.4f} | caption ppl {r['val_ppl']:.2f}"
    if 'val_loss_shuffled' in r:
        line += f" | shuffled images {r['val_loss_shuffled']:.4f} (x{r['val_loss'] / r['val_loss_shuffled']:.2f})"
    line += f" | no image {r['val_loss_no_image']:.4f}" if 'val_loss_no_image' in r else ''
    line += ''.join(f' | {k} {v:.4f}' for k, v in r.get('val_loss_by_source', {}).items())
    return line + f" | {r['eval_s']:.1f}s" + (' (best)' if best else '')


# (log key, legend, colour) of each curve plot_losses draws
PLOTTED = [('loss', 'train loss', (31, 119, 180)), ('val_loss', 'val loss', (255, 127, 14)),
           ('val_loss_shuffled', 'val, shuffled images', (214, 39, 40)),
           ('val_loss_no_image', 'val, no image', (127, 127, 127))]


def plot_losses(records, path, size=(720, 360), plotted=PLOTTED):
    """Train and val loss against step, and the val loss with shuffled images and with no
    image where the log has them (the step where the val loss leaves the shuffled one is where
    the connector starts to see), drawn with PIL (no plotting dependency); `plotted`: other
    (key, legend, colour) curves of the records. Returns True if a picture was written."""
    from PIL import Image, ImageDraw, ImageFont
    series = [(key, name, color, [(r['iter'], r[key]) for r in records if isinstance(r.get(key), (int, float))
                                  and math.isfinite(r[key])])
              for key, name, color in plotted]
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
        for x, y in xy if len(xy) <= 50 else []:  # few points (evals): each one a dot
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
