"""
Benchmarks that print numbers (the README records them with the machine they ran on).

$ python bench.py params                 # full-size model on the meta device: params, FLOPs/sample, H100 estimate
$ python bench.py losshead               # caption-only loss head vs full-vocab logits (CPU: time, peak memory)
$ python bench.py loader                 # image loading from a folder / images.zip / the packed file, by workers
$ python bench.py batching [--data_dir]  # real-token fraction: length grouping vs random batches
$ python bench.py open [--data_dir]      # prepared-dataset open time
GPU throughput and MFU of the full-size model: python train.py config/bench_h100.py
Prepare throughput on 558K records: python prepare_llava.py --bench 558000
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch

import data
import model as M

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'assets')


def model_args(**kw):
    a = dict(vision=M.DEFAULT_VISION, llm=M.DEFAULT_LLM, tokenizer='tiny', vision_feature_layer=-2, n_latents=64,
             resampler_width=1024, resampler_depth=2, resampler_heads=16, resampler_mlp_ratio=4, proj_hidden=4096,
             proj_dropout=0.0, vision_ln=True, match_embed_scale=True, image_brackets=False)
    a.update(kw)
    return a


def bench_params(args):
    """Parameter counts and FLOPs per sample of the full-size model, built on the meta device
    (no memory, no download), and the throughput one H100 would give at 45 % MFU."""
    vision = M.build_vision('random:' + M.DEFAULT_VISION, device='meta')
    n_vision_full = M.count_params(vision)
    llm = M.build_llm('random:' + M.DEFAULT_LLM, device='meta')
    print(f'vision tower  {n_vision_full / 1e9:.3f}B params ({M.DEFAULT_VISION}, all 27 layers + head)')
    print(f'LLM           {M.count_params(llm) / 1e9:.3f}B params ({M.DEFAULT_LLM})')
    tok = M.tiny_tokenizer()
    vlm = M.build_vlm(model_args(vision='random:' + M.DEFAULT_VISION, llm='random:' + M.DEFAULT_LLM,
                                 n_latents=args.n_latents), tok, device='meta')
    print(f'vision used   {M.count_params(vlm.vision) / 1e9:.3f}B params (layers up to the penultimate, no head)')
    print(f'connector     {M.count_params(vlm.connector) / 1e6:.1f}M trainable params (N={args.n_latents})')
    prompt = len(data.encode_prompt(tok, data.TEMPLATE_A, args.n_latents, 1))
    # LCS-558K captions average ~12 words, ~15 Qwen tokens (+ eos)
    seq = prompt + args.caption_tokens + 1  # the Qwen prompt text is ~10 tokens, like the tiny one
    f = M.flops_per_batch(vlm, 1, [seq], args.caption_tokens + 1)
    print(f'sequence      {seq} tokens/sample ({args.n_latents} slots + ~{seq - args.n_latents - args.caption_tokens - 1} '
          f'prompt + {args.caption_tokens} caption + eos)')
    print(f'FLOPs/sample  {f / 1e12:.3f} TFLOP (LLM fwd + input-grad bwd, vision fwd, connector fwd+bwd)')
    for name, peak in (('H100 SXM', 989e12), ('H200', 989e12)):
        rate = 0.45 * peak / f
        print(f'{name} at 45% MFU: {rate:.0f} samples/s -> one 558K epoch in {558128 / rate / 3600:.2f} h on 1 GPU, '
              f'{558128 / rate / 8 / 60:.0f} min on 8')


def _losshead_run(variant, vocab, B, T):
    """One measurement in this process: forward + backward of the loss head."""
    torch.manual_seed(0)
    d = 512
    h = torch.randn(B, T, d, requires_grad=True)
    head = torch.nn.Linear(d, vocab, bias=False).requires_grad_(False)
    labels = torch.full((B, T), -100)
    labels[:, -16:] = torch.randint(0, vocab, (B, 16))  # ~16 caption tokens per sample, the rest prompt
    nxt = labels[:, 1:] != -100
    pos = torch.nonzero(torch.nn.functional.pad(nxt, (0, 1)).flatten()).squeeze(1)
    tgt = labels[:, 1:][nxt]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    for _ in range(3):
        if variant == 'full':  # what a plain `model(labels=...)` does: [B, T, vocab] logits
            logits = head(h).float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
        else:  # model.VLM.forward: lm_head on the caption positions only
            loss = torch.nn.functional.cross_entropy(head(h.reshape(-1, d).index_select(0, pos)).float(), tgt)
        loss.backward()
    dt = (time.time() - t0) / 3
    print(json.dumps(dict(variant=variant, ms=dt * 1000, loss=loss.item(),
                          peak_mib=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)))


def bench_losshead(args):
    print(f'loss head, vocab {args.vocab}, batch {args.B} x {args.T} tokens (~16 caption tokens each), hidden 512, CPU')
    res = {}
    for v in ('caption', 'full'):  # separate processes: clean peak-memory readings
        out = subprocess.run([sys.executable, __file__, 'losshead', '--variant', v, '--vocab', str(args.vocab),
                              '--B', str(args.B), '--T', str(args.T)], capture_output=True, text=True, check=True)
        res[v] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{v:8s} {res[v]['ms']:8.1f} ms/iter  +{res[v]['peak_mib']:7.0f} MiB peak  loss {res[v]['loss']:.4f}")
    print(f"caption-only head: {res['full']['ms'] / res['caption']['ms']:.1f}x faster, "
          f"{res['full']['peak_mib'] / max(res['caption']['peak_mib'], 1):.0f}x less extra memory")


def _photos(n, out_dir, w=500, h=375):
    """n JPEGs of LCS-558K-like size: crops of the sample photos when present, else noise+gradients."""
    from PIL import Image
    rng = np.random.default_rng(0)
    src = []
    if os.path.isdir(os.path.join(ASSETS, 'images')):
        for f in sorted(os.listdir(os.path.join(ASSETS, 'images'))):
            src.append(data.to_rgb(Image.open(os.path.join(ASSETS, 'images', f))))
    paths = []
    for i in range(n):
        if src:
            im = src[i % len(src)]
            x, y = rng.integers(0, max(1, im.width // 4)), rng.integers(0, max(1, im.height // 4))
            im = im.crop((x, y, x + im.width * 3 // 4, y + im.height * 3 // 4)).resize((w, h))
        else:
            a = (np.linspace(0, 255, w)[None, :, None] + rng.normal(0, 40, (h, w, 3))).clip(0, 255)
            im = Image.fromarray(a.astype(np.uint8))
        p = f'{i // 100:03d}/{i:06d}.jpg'
        os.makedirs(os.path.join(out_dir, 'images', os.path.dirname(p)), exist_ok=True)
        im.save(os.path.join(out_dir, 'images', p), quality=90)
        paths.append(p)
    return paths


def bench_loader(args):
    """images/s through CaptionDataset + DataLoader for each image source and worker count."""
    tmp = tempfile.mkdtemp(prefix='loader_bench_')
    try:
        paths = _photos(args.n, tmp)
        recs = [dict(id=str(i), image=p, conversations=[dict(value='<image>\nDescribe.', **{'from': 'human'}),
                dict(value=f'a photo number {i} of a thing on a table', **{'from': 'gpt'})]) for i, p in enumerate(paths)]
        with open(os.path.join(tmp, 'blip_laion_cc_sbu_558k.json'), 'w') as f:
            json.dump(recs, f)
        with zipfile.ZipFile(os.path.join(tmp, 'images.zip'), 'w', zipfile.ZIP_STORED) as z:
            for p in paths:
                z.write(os.path.join(tmp, 'images', p), p)
        py = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prepare_llava.py')]
        common = [f'--data_dir={tmp}', '--tokenizer=tiny', '--min_tokens=1', '--max_dups=0', '--val_ratio=0.01']
        kinds = {'folder': ['--images', os.path.join(tmp, 'images'), f'--out_dir={tmp}/p_folder'],
                 'zip': ['--images', os.path.join(tmp, 'images.zip'), f'--out_dir={tmp}/p_zip'],
                 'packed': ['--images', os.path.join(tmp, 'images'), f'--out_dir={tmp}/p_packed', '--pack_images',
                            f'--pack_size={args.size}']}
        print(f'{args.n} JPEGs 500x375 q90 -> uint8 {args.size}x{args.size}, CPUs: {os.cpu_count()}')
        for kind, extra in kinds.items():
            subprocess.run(py + common + extra, check=True, capture_output=True)
            prepared = data.open_prepared(f'{tmp}/p_{kind}')
            tok = M.tiny_tokenizer()
            b = data.SampleBuilder(tok, 64, 1, 0)
            ds = data.CaptionDataset(prepared, 'train', b, args.size)
            for workers in args.workers:
                sampler = [[(i,) for i in range(s, min(s + 16, len(ds)))] for s in range(0, len(ds), 16)]
                loader = data.make_loader(ds, sampler, num_workers=workers)
                t0, n = time.time(), 0
                for batch in loader:
                    n += batch['images'].shape[0]
                dt = time.time() - t0
                per = n / dt / max(workers, 1)
                print(f'{kind:7s} workers={workers}  {n / dt:7.0f} images/s  ({per:.0f}/s per process)')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_batching(args):
    """Fraction of batch positions that are real tokens, over one epoch's batches."""
    prepared = data.open_prepared(args.data_dir)
    tok = M.load_tokenizer(prepared['meta']['tokenizer'])
    ids = M.special_ids(tok)
    b = data.SampleBuilder(tok, args.n_latents, ids['slot'], ids['eos'])
    ds = data.CaptionDataset(prepared, 'train', b, 384)
    lengths = ds.lengths()
    print(f'{args.data_dir}: {len(lengths):,} samples, sequence length mean {lengths.mean():.1f}, '
          f'min {lengths.min()}, max {lengths.max()} (N={args.n_latents})')
    for grouped in (False, True):
        batches = data.epoch_batches(lengths, args.batch_size, 1337, 0, multi_image_frac=0.0, group_by_length=grouped)
        real = sum(sum(lengths[i] for (i,) in bt) for bt in batches)
        pos = sum(len(bt) * max(lengths[i] for (i,) in bt) for bt in batches)
        print(f'{"length-grouped" if grouped else "random":15s} batch {args.batch_size}: {real / pos * 100:.1f}% '
              f'real tokens')


def bench_open(args):
    t0 = time.time()
    p = data.open_prepared(args.data_dir)
    dt = time.time() - t0
    n = len(p['train'][1]) + len(p['val'][1])
    print(f'opened {args.data_dir}: {n:,} samples in {dt * 1000:.1f} ms')


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('what', choices=['params', 'losshead', 'loader', 'batching', 'open'])
    ap.add_argument('--n_latents', type=int, default=64)
    ap.add_argument('--caption_tokens', type=int, default=15)
    ap.add_argument('--variant', default=None)
    ap.add_argument('--vocab', type=int, default=151936)
    ap.add_argument('--B', type=int, default=8)
    ap.add_argument('--T', type=int, default=96)
    ap.add_argument('--n', type=int, default=512)
    ap.add_argument('--size', type=int, default=384)
    ap.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--batch_size', type=int, default=32)
    ap.add_argument('--data_dir', default='data/synthetic/prepared')
    a = ap.parse_args()
    if a.what == 'losshead' and a.variant:
        _losshead_run(a.variant, a.vocab, a.B, a.T)
    else:
        dict(params=bench_params, losshead=bench_losshead, loader=bench_loader, batching=bench_batching,
             open=bench_open)[a.what](a)
