"""
Captions from a trained connector.

$ python sample.py --ckpt out/ckpt.pt --image x.jpg                       # greedy caption
$ python sample.py --ckpt out/ckpt.pt --image a.jpg --image b.jpg         # Template B: k-th <image> = k-th file
$ python sample.py --ckpt out/ckpt.pt --image photos/ --temperature 0.5 --num_samples 3
$ python sample.py --ckpt out/ckpt.pt --image x.jpg --prompt "<image>\nWhat is in the image?\n"
"""
import argparse
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch

import data
import evaluate as SE
import model as M

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')


def parse_args(argv):
    p = argparse.ArgumentParser(description='captions for images from a Stage-1 connector checkpoint')
    p.add_argument('--ckpt', default='out/ckpt.pt', help='ckpt.pt, or an exported connector directory')
    p.add_argument('--image', action='append', default=[], help='image file or directory (repeatable)')
    p.add_argument('--prompt', default=None, help="prompt text; '<image>' marks where each image goes "
                                                   '(default: the training template)')
    p.add_argument('--temperature', type=float, default=0.0, help='0 = greedy; 0.2-0.7 for sampling')
    p.add_argument('--top_p', type=float, default=0.9)
    p.add_argument('--max_new_tokens', type=int, default=64)
    p.add_argument('--num_samples', type=int, default=1)
    p.add_argument('--greedy', action='store_true', help='same as --temperature 0')
    p.add_argument('--seed', type=int, default=1337)
    p.add_argument('--batch_size', type=int, default=32, help='prompts per forward pass')
    p.add_argument('--device', default='auto')
    p.add_argument('--dtype', default='auto')
    p.add_argument('--export', default=None, help='write the connector as safetensors + JSON to this dir, then exit')
    # evaluation mode
    p.add_argument('--eval', action='store_true', help='write an evaluation report (val split + golden set + QA)')
    p.add_argument('--data_dir', default=None, help='prepared dataset (default: the one the checkpoint trained on)')
    p.add_argument('--num', type=int, default=500, help='val samples to caption (0: all)')
    p.add_argument('--qa', default=None, help='QA sanity JSONL {image, question, answers} (default: the dataset\'s)')
    p.add_argument('--out', default=None, help='report folder (default: <ckpt dir>/report)')
    p.add_argument('--untrained', action='store_true', help='evaluate a freshly initialised connector (baseline)')
    p.add_argument('--no_llm_check', action='store_true', help='skip the frozen-LLM check (it loads a second LLM copy)')
    return p.parse_args(argv)


def setup(ckpt_path, device='auto', dtype='auto'):
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device)
    if dtype == 'auto':
        dtype = 'bfloat16' if device.type == 'cuda' else 'float32'
    vlm, tok, ckpt = M.from_checkpoint(ckpt_path, device, {'bfloat16': torch.bfloat16, 'float32': torch.float32}[dtype])
    return vlm, tok, ckpt, device


def expand_images(paths):
    """Files stay as given; a directory becomes its image files, sorted."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS))
        elif os.path.exists(p):
            out.append(p)
        else:
            raise SystemExit(f'error: image {p} not found')
    return out


def read_image(path, vlm):
    try:
        return data.load_image(path, vlm.image_spec['size'], vlm.image_spec['resample'])
    except Exception as e:
        raise SystemExit(f'error: cannot read image {path} ({type(e).__name__}: {e})') from None


def prompt_ids(vlm, tok, n_images, prompt=None):
    """The training template for 1 or 2 images, or a user prompt (images prepended when it
    has no '<image>' marker)."""
    if prompt is None:
        prompt = data.TEMPLATE_A if n_images == 1 else data.TEMPLATE_B
    prompt = prompt.replace('\\n', '\n')
    if '<image>' not in prompt:
        prompt = '<image>\n' * n_images + prompt
    if prompt.count('<image>') != n_images:
        raise SystemExit(f"error: the prompt has {prompt.count('<image>')} <image> markers for {n_images} images")
    if not prompt.endswith('\n'):
        prompt += '\n'  # the caption follows a newline in training
    return data.encode_prompt(tok, prompt, vlm.connector.args['n_latents'], vlm.slot_id)


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


# -----------------------------------------------------------------------------
# Evaluation: one report folder with every generation and a markdown summary


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
                raise SystemExit(f'error: {path}:{n} is not a QA line {{"image", "question", "answers"}} ({e})')
    return rows


@torch.no_grad()
def val_loss(vlm, ds, n, batch_size=32):
    """Token-weighted caption loss over the first n val samples, and its perplexity."""
    tot = cnt = 0
    device = vlm.pix_mean.device
    for items in data.eval_batches(n, batch_size):
        b = data.collate([ds[i] for i in items], pad_id=vlm.eos_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda'):
            loss = vlm(b['images'].to(device), b['input_ids'].to(device), b['target_pos'].to(device),
                       b['target_ids'].to(device))
        tot, cnt = tot + loss.item() * b['n_targets'], cnt + b['n_targets']
    return tot / max(cnt, 1)


def caption_split(vlm, tok, ds, indices, reader, temperature, top_p, max_new_tokens, gen, batch_size):
    """Rows {id, image, prompt, generation, references} for dataset samples."""
    groups = [[data.load_image(reader.read(k), ds.size, ds.resample) for k in ds.image_ids(i)] for i in indices]
    caps = caption_batch(vlm, tok, groups, None, temperature, top_p, max_new_tokens, gen, batch_size)
    rows = []
    for i, g in zip(indices, caps):
        ids = ds.image_ids(i)
        rows.append(dict(id=f'val/{i}', image=[reader.path(k) for k in ids] if len(ids) > 1 else reader.path(ids[0]),
                         prompt='template B' if len(ids) > 1 else 'template A', generation=g,
                         references=[tok.decode(ds.caption(i), skip_special_tokens=True).strip()],
                         pil=None if reader.kind == 'folder' else _pil(reader.read(ids[0]))))
    return rows


def _pil(raw):
    from PIL import Image
    return Image.open(io.BytesIO(raw))


@torch.no_grad()
def llm_untouched(vlm, tok, model_args, texts):
    """Text-only logits through the VLM (inputs_embeds path, no images) must equal a freshly
    loaded copy of the base LLM's. Fails if anything modified the frozen LLM."""
    device = vlm.pix_mean.device
    ids = [tok(t, add_special_tokens=False)['input_ids'][:32] or [vlm.eos_id] for t in texts]
    ours = [vlm.llm(inputs_embeds=vlm.embed(None, torch.tensor([i], device=device))).logits.float().cpu() for i in ids]
    dtype = next(vlm.llm.parameters()).dtype
    base = M.build_llm(model_args['llm'], dtype, device, vocab_size=len(tok))
    theirs = [base(input_ids=torch.tensor([i], device=device)).logits.float().cpu() for i in ids]
    del base
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    return diff, diff <= (1e-4 if dtype == torch.float32 else 1e-2)


def evaluate(vlm, tok, model_args, prepared, out_dir, num=500, qa_path=None, temperature=0.0, top_p=0.9,
             max_new_tokens=64, seed=1337, batch_size=32, llm_check=True):
    """Captions the val split (first `num`) and the golden set, runs the QA set, scores
    everything and writes out_dir/{generations.jsonl, report.md, thumbs/}. Returns metrics."""
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)  # reproducible reports when sampling
    n_lat = model_args['n_latents']
    builder = data.SampleBuilder(tok, n_lat, vlm.slot_id, vlm.eos_id)
    ds = data.CaptionDataset(prepared, 'val', builder, vlm.image_spec['size'], vlm.image_spec['resample'])
    reader = ds.reader
    n = len(ds) if num <= 0 else min(num, len(ds))
    metrics = dict(checkpoint=model_args.get('checkpoint', ''), decoding='greedy' if temperature <= 0 else
                   f'temperature {temperature}, top_p {top_p}', seed=seed)
    loss = val_loss(vlm, ds, n, batch_size)
    metrics['val'] = dict(loss=loss, caption_ppl=math.exp(min(loss, 50)))
    val_rows = caption_split(vlm, tok, ds, range(n), reader, temperature, top_p, max_new_tokens, gen, batch_size)
    metrics['val'].update(SE.score_rows(val_rows))
    golden = [i for i in prepared['meta'].get('golden', []) if i < len(ds)]
    gold_rows = caption_split(vlm, tok, ds, golden, reader, temperature, top_p, max_new_tokens, gen, batch_size)
    for r in gold_rows:
        r['id'] = 'golden/' + r['id'].split('/')[1]
    if gold_rows:
        metrics['golden'] = SE.score_rows(gold_rows)
    qa_rows = []
    qa_path = qa_path or prepared['meta'].get('qa_file')
    if qa_path and os.path.exists(qa_path):
        qa_rows = read_qa(qa_path)
        groups = [[read_image(r['image'], vlm)] for r in qa_rows]
        by_q = {}
        for k, r in enumerate(qa_rows):  # batch by question: one prompt per batch call
            by_q.setdefault(r['question'], []).append(k)
        for q, ks in by_q.items():
            outs = caption_batch(vlm, tok, [groups[k] for k in ks], '<image>\n' + q + '\n', temperature, top_p,
                                 max_new_tokens, gen, batch_size)
            for k, o in zip(ks, outs):
                qa_rows[k].update(id='qa/' + qa_rows[k]['id'], prompt=q, generation=o)
        metrics['qa'] = SE.score_rows(qa_rows)
    if llm_check:
        texts = [r['references'][0] for r in val_rows[:4]] or ['a photo of a cat.']
        diff, ok = llm_untouched(vlm, tok, model_args, texts)
        metrics['llm_untouched'] = dict(ok=ok, max_abs_logit_diff=diff)
    metrics['seconds'] = time.time() - t0
    SE.write_report(out_dir, gold_rows + val_rows + qa_rows, metrics)
    with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
        json.dump(metrics, f, indent=2, default=float)
    return metrics


def main(argv):
    args = parse_args(argv)
    if args.export:
        print(f'exported connector to {M.export_connector(args.ckpt, args.export)}')
        return
    if args.eval:
        return main_eval(args)
    files = expand_images(args.image)
    if not files:
        raise SystemExit('error: give at least one --image (a file or a directory)')
    vlm, tok, ckpt, device = setup(args.ckpt, args.device, args.dtype)
    temperature = 0.0 if args.greedy else args.temperature
    gen = torch.Generator(device='cpu').manual_seed(args.seed)
    n_markers = args.prompt.replace('\\n', '\n').count('<image>') if args.prompt else 0
    if len(args.image) > 1 and all(os.path.isfile(f) for f in args.image) or n_markers > 1:
        groups = [[read_image(f, vlm) for f in files]]  # several files: one multi-image prompt
        names = [' + '.join(files)]
    else:
        groups = [[read_image(f, vlm)] for f in files]
        names = files
    for k in range(args.num_samples):
        caps = caption_batch(vlm, tok, groups, args.prompt, temperature, args.top_p, args.max_new_tokens, gen,
                             args.batch_size)
        for name, cap in zip(names, caps):
            print(f'{name}: {cap}' if len(names) > 1 or args.num_samples > 1 else cap)


def main_eval(args):
    vlm, tok, ckpt, device = setup(args.ckpt, args.device, args.dtype)
    model_args = dict(ckpt['model_args'], checkpoint=args.ckpt)
    if args.untrained:  # the baseline: same backbones, connector as initialised (seeded)
        with M.seeded(device, args.seed):
            fresh = M.build_vlm(ckpt['model_args'], tok, device, next(vlm.llm.parameters()).dtype).connector
        vlm.connector.load_state_dict(fresh.state_dict())
        model_args['checkpoint'] += ' (untrained connector)'
    data_dir = args.data_dir or ckpt.get('config', {}).get('data_dir')
    if not data_dir:
        raise SystemExit('error: give --data_dir (the prepared dataset to evaluate on)')
    prepared = data.open_prepared(data_dir)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), 'report')
    m = evaluate(vlm, tok, model_args, prepared, out, args.num, args.qa, 0.0 if args.greedy else args.temperature,
                 args.top_p, args.max_new_tokens, args.seed, args.batch_size, not args.no_llm_check)
    print(summary_line(m))
    print(f'report: {os.path.join(out, "report.md")}')


def summary_line(m):
    parts = [f"val loss {m['val']['loss']:.4f} (ppl {m['val']['caption_ppl']:.2f})"]
    v = m['val']
    if 'cider_d' in v:
        parts.append(f"CIDEr-D {v['cider_d']:.3f} | BLEU-4 {v['bleu4']:.3f} | CHAIR-i {v['chair_i']:.3f}")
    if 'qa' in m:
        parts.append(f"QA exact {m['qa']['qa_exact']:.3f} contains {m['qa']['qa_contains']:.3f}")
    if 'llm_untouched' in m:
        parts.append(f"LLM untouched: {m['llm_untouched']['ok']}")
    return ' | '.join(parts)


if __name__ == '__main__':
    main(sys.argv[1:])
