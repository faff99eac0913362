"""
Generation and evaluation: captions for batches of images, the val loss with its controls,
the golden-set captions, and the evaluation (what `sample.py --eval` writes and train.py
writes at the end of a run; the files themselves are written by report.py).

Read top to bottom:
1) generation: prompts for 1-2 images or a user prompt, batched captioning,
2) losses: caption loss on the val split, also with the images shuffled and with no image
   at all (the connector provably uses the image when the first is far below the others),
3) caption rows for val / golden samples (spread over the ranks during DDP training) and the
   QA set (an unreadable image skips its row and is counted, never the end of an evaluation),
   and the check that the frozen LLM is untouched,
4) evaluate(): everything scored with metrics.py and written by report.write_report.
"""
import io
import json
import math
import os
import sys
import time
import traceback

import numpy as np
import torch

import data
import model as M
from configurator import UserError, atomic_write_text, error_line, first_line, leave
from evaluation import metrics, report
from sources.images import load_image

class Flag:
    """A stop asked for: train.py sets it from its SIGTERM/SIGINT handler, long work checks it
    between batches and gives up with Stopped, so a preempted run reaches its checkpoint within
    seconds. A plain attribute: threading.Event takes a lock in set(), and a second signal
    arriving inside the first one's set() would wait on that lock forever."""
    value = False

    def set(self):
        self.value = True

    def is_set(self):
        return self.value


stop = Flag()


class Stopped(Exception):
    """Long work gave up because a stop was asked for (evaluate.stop)."""


def check_stop():
    if stop.is_set():
        raise Stopped('stopped by a signal')

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
        check_stop()
        groups = image_groups[s:s + batch_size]
        prompts = [prompt_ids(vlm, tok, len(g), prompt) for g in groups]
        imgs = torch.from_numpy(np.stack([im for g in groups for im in g])).to(device)
        new = vlm.generate(imgs, prompts, max_new_tokens, temperature, top_p, generator)
        out += [' '.join(tok.decode(t, skip_special_tokens=True).split()) for t in new]  # one line each
    return out


# -----------------------------------------------------------------------------
# Losses


# The val loss alone cannot tell a connector that sees from one that has learnt a soft prompt
# (a fixed prefix that fits the captions on average): both lower it. The same captions with
# the batch's images shuffled, and with no image at all, can: a connector that uses the image
# has the right-image loss far below both, a soft prompt has it equal to the shuffled one.
CONTROLS = ('right', 'shuffled', 'no_image')


@torch.no_grad()
def control_loss_sums(vlm, batches, controls=True):
    """[[loss sum, caption tokens]] for the right images, and with controls also for the
    images shuffled within each batch and with no image (CONTROLS order), plus the skipped
    samples. The shuffled pass costs one more forward pass per batch, the no-image pass a
    shorter one (no slots)."""
    device = vlm.pix_mean.device
    sums, bad = [[0.0, 0] for _ in (CONTROLS if controls else CONTROLS[:1])], 0
    drop = [vlm.slot_id, *(vlm.brackets or ())]
    with M.eager():  # no-grad variants (a last batch of one, no images) would recompile the blocks
        for b in batches:
            check_stop()
            bad += b['n_bad']
            if not b['n_targets']:
                continue
            variants = [b, _shuffled(b), without_images(b, drop, vlm.eos_id)] if controls else [b]
            for k, v in enumerate(variants):
                if not v['n_targets']:
                    continue
                images, input_ids, target_pos, target_ids, position_ids = data.to_device(v, device)
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
    sums, bad = control_loss_sums(vlm, batches)
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


def all_gather(obj):
    """Every rank's obj, in rank order, on every rank (a list of one without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def caught(fn):
    """(fn(), None), or (None, its error as one line: Stopped when a stop was asked for). A bug
    (not a UserError) prints its traceback here first."""
    try:
        return fn(), None
    except Stopped:
        return None, Stopped.__name__
    except Exception as e:  # reported by the caller, after the collective that must still happen
        if not isinstance(e, UserError):
            traceback.print_exc()
        return None, error_line(e) if isinstance(e, UserError) else f'{type(e).__name__}: {first_line(e)}'


def on_all_ranks(fn):
    """fn() on this rank, then [(result, error)] of every rank, in rank order (caught): a
    failure on one rank comes back to every rank as its error instead of leaving the others in
    a collective, and a stop asked for on any rank raises Stopped on every rank. Every rank
    must call it."""
    parts = all_gather(caught(fn))
    stopped = next((r for r, (_, e) in enumerate(parts) if e == Stopped.__name__), None)
    if stopped is not None:
        raise Stopped(f'stopped on rank {stopped}')
    return parts


def ranks_ok(error):
    """Collective (DDP): every rank says whether it failed (error: its one line, or None). When
    any did, every rank stops here, together, instead of leaving the others waiting in a
    collective: rank 0 says the failing rank's line, the others stay quiet (their exit code
    says it); every rank exits 1 (leave). Without DDP, an error is raised as it is."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if error:
            raise UserError(error)
        return
    failed = first_error([(None, e) for e in all_gather(error)])
    if failed:
        if dist.get_rank() == 0:
            print(f'error: rank {failed[0]}: {failed[1]}', file=sys.stderr)
        dist.destroy_process_group()
        leave(1)


def agreed(fn):
    """fn() on every rank: its result, or every rank stops with the line of a rank where it
    failed (ranks_ok)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return fn()
    result, error = caught(fn)
    ranks_ok(error)
    return result


def first_error(parts):
    """(rank, message) of the first rank whose part of on_all_ranks failed, or None."""
    return next(((r, e) for r, (_, e) in enumerate(parts) if e), None)


def sample_golden(vlm, tok, ds, golden, path, iter_num, max_new_tokens, batch_size, rank=0, world_size=1):
    """Greedy captions of the golden val samples, each rank captioning golden[rank::world_size],
    appended to `path` (samples.jsonl) by rank 0: {iter, id, generation, reference} in golden
    order. Every rank calls it; returns the lines for rank 0 to print (a failure on any rank is
    a warning line on all, never an exception: sample logs are worth less than the run). A stop
    asked for on any rank raises Stopped on every rank."""
    def caption(share):
        rows, skipped = caption_rows(vlm, tok, ds, share, dict(max_new_tokens=max_new_tokens), batch_size,
                                     prefix='golden')
        return [dict(iter=iter_num, id=r['id'], generation=r['generation'], reference=r['references'][0])
                for r in rows], skipped
    parts = on_all_ranks(lambda: caption([i for i in golden if i < len(ds)][rank::world_size]))
    error = first_error(parts)
    if error:
        where = f' on rank {error[0]}' if world_size > 1 else ''
        return [f'  warning: golden-set sampling failed{where} at iter {iter_num} ({first_line(error[1])}); '
                f'training goes on']
    order = {f'golden/{i}': k for k, i in enumerate(golden)}
    rows = sorted((r for (got, _), _ in parts for r in got), key=lambda r: order[r['id']])
    skipped = sum(n for (_, n), _ in parts)
    try:
        if rank == 0:
            with open(path, 'a') as f:
                f.writelines(json.dumps(r) + '\n' for r in rows)
    except OSError as e:
        return [f'  warning: golden samples not written at iter {iter_num} ({first_line(e)}); training goes on']
    return [f'  sample {r["id"]}: {r["generation"]!r}  (ref: {r["reference"]!r})' for r in rows[:2]] + \
        ([f'  warning: {skipped} golden samples skipped (unreadable images)'] if skipped else [])


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
    """Is the frozen LLM still the one that was loaded? Its logits on the probe tokens taken
    when it was built (model.check_head: no copy of any weight kept), and text-only logits
    through the VLM's path (inputs_embeds, no images) against the LLM's own (input_ids).
    Returns dict(ok, max_abs_logit_diff, probe_logit_diff)."""
    device = vlm.pix_mean.device
    bos = [] if vlm.bos_id is None else [vlm.bos_id]
    ids = [bos + tok(t, add_special_tokens=False)['input_ids'][:32] or [vlm.eos_id] for t in texts]
    diff = 0.0
    with M.eager():
        for i in ids:
            x = torch.tensor([i], device=device)
            ours = vlm.llm(inputs_embeds=vlm.embed(None, x), use_cache=False).logits.float()
            diff = max(diff, float((ours - vlm.llm(input_ids=x, use_cache=False).logits.float()).abs().max()))
        probe_ids, at_build = vlm.llm.probe
        probe = float((M.probe_logits(vlm.llm)[1] - at_build).abs().max())
    tol = 1e-4 if next(vlm.llm.parameters()).dtype == torch.float32 else 1e-2
    return dict(ok=diff <= tol and probe == 0.0, max_abs_logit_diff=diff, probe_logit_diff=probe)

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
    report.write_report(out_dir, rows, m, log_path=log_path)
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

