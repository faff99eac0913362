"""
Benchmarks that print numbers (the README records them with the machine they ran on).

$ python bench.py gpu [--tiny]           # the one-shot GPU check: throughput, MFU, memory, a 30-step e2e run
$ python bench.py params                 # full-size model on the meta device: params, FLOPs/sample, H100 estimate
$ python bench.py losshead               # caption-only loss head vs full-vocab logits (CPU: time, peak memory)
$ python bench.py loader                 # images/s from a folder / images.zip / packed file / tar shards, by workers
$ python bench.py prepare --n 558000 --tokenizer PATH   # prepare of an LCS-558K-sized json (captions only)
$ python bench.py shards --n 1000000     # img2dataset-style shards: prepare time and memory, open time
$ python bench.py batching [--data_dir]  # real-token fraction: length grouping vs random batches
$ python bench.py open [--data_dir]      # prepared-dataset open time
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

from common import UserError

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
    vision = M.build_vision('random:' + M.DEFAULT_VISION, device='meta')
    llm = M.build_llm('random:' + M.DEFAULT_LLM, device='meta')
    print(f'vision tower  {M.count_params(vision) / 1e9:.3f}B params ({M.DEFAULT_VISION}, all 27 layers + head)')
    print(f'LLM           {M.count_params(llm) / 1e9:.3f}B params ({M.DEFAULT_LLM})')
    tok = M.tiny_tokenizer()
    vlm = M.build_vlm(dict(M.MODEL_DEFAULTS, vision='random:' + M.DEFAULT_VISION, llm='random:' + M.DEFAULT_LLM,
                           n_latents=args.n_latents), tok, device='meta')
    print(f'vision used   {M.count_params(vlm.vision) / 1e9:.3f}B params (layers up to the penultimate, no head)')
    print(f'connector     {M.count_params(vlm.connector) / 1e6:.1f}M trainable params (N={args.n_latents})')
    prompt = len(data.encode_prompt(tok, data.TEMPLATE_A, args.n_latents, 1))
    # LCS-558K captions average ~12 words, ~15 Qwen tokens (+ eos); the Qwen prompt text is ~10 tokens
    seq = prompt + args.caption_tokens + 1
    f = M.flops_per_batch(vlm, 1, [seq], args.caption_tokens + 1)
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
    from images import to_rgb
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
    from shards import write_shards
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
    import model as M
    from images import pack_spec
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
        tok = M.tiny_tokenizer()
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
                                          batch_size=args.batch_size))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_bench_shards(job):
    """One worker's shards: 300 small JPEGs reused under different keys, generated captions."""
    from PIL import Image
    from shards import write_shards
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
    import model as M
    from images import pack_spec
    prepared = data.open_prepared(args.data_dir, image_root='.')  # captions only: the images need not exist
    tok = M.load_tokenizer(prepared['meta']['tokenizer'])
    ids = M.special_ids(tok)
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
# The GPU check: one command, one short run on a card, everything a CPU cannot show.
# --tiny runs the same code on the CPU with the tiny backbones (the test suite does), so it
# cannot fail on the card for a reason a CPU could have caught.


class StretchedCaptions:
    """A SampleBuilder whose captions are repeated/cut to a fixed token count: the synthetic
    captions are ~8 tokens, LCS-558K's average ~15, and the sequence length sets the cost."""

    def __init__(self, builder, n_tokens):
        self.builder, self.n = builder, n_tokens
        self.prompt_a, self.prompt_b, self.max_seq_len = builder.prompt_a, builder.prompt_b, builder.max_seq_len

    def build(self, captions, n_images=None):
        return self.builder.build([(list(c) * self.n)[:self.n] for c in captions], n_images)


def _steps(vlm, conn, opt, it, n, autocast, sync):
    """n optimizer steps of one micro-batch each; returns (seconds, samples, tokens, flops)."""
    import torch
    import data
    import model as M
    sync()
    t0, samples, tokens, flops = time.time(), 0, 0, 0.0
    for _ in range(n):
        b = next(it)
        images, input_ids, target_pos, target_ids, position_ids = data.to_device(b, vlm.pix_mean.device)
        with autocast:
            loss = vlm(images, input_ids, target_pos, target_ids, position_ids=position_ids, connector=conn)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(conn.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        samples, tokens = samples + b['n_samples'], tokens + b['n_tokens']
        flops += M.flops_per_batch(vlm, b['images'].shape[0], b['sample_lens'], b['n_targets'])
    loss.item()
    sync()
    return time.time() - t0, samples, tokens, flops


def _measure(ctx, name, bs, packing=False, compile=False, grad_ckpt=False, steps=None):
    """Steady-state numbers of one configuration (a fresh connector each time)."""
    import torch
    import data
    vlm, dev, tiny = ctx['vlm'], ctx['device'], ctx['tiny']
    conn = type(vlm.connector)(**vlm.connector.args).to(dev)
    opt = torch.optim.AdamW(conn.parameters(), lr=1e-4, fused=dev.type == 'cuda')
    if compile:
        conn = torch.compile(conn, backend=ctx['backend'])
    order = data.BatchOrder([ctx['ds']], [1.0], bs, 0, multi_image_frac=0.0)
    loader = data.make_loader(data.Mixture([ctx['ds']]), order, packing, ctx['ds'].builder.max_seq_len,
                              0 if tiny else 8, ctx['eos'], dev.type == 'cuda')
    it = iter(loader)
    if dev.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    warm, steps = (2, steps or 2) if tiny else (4 if compile else 3, steps or 8)
    _steps(vlm, conn, opt, it, warm, ctx['autocast'], ctx['sync'])  # compilation, allocator warm-up
    dt, samples, tokens, flops = _steps(vlm, conn, opt, it, steps, ctx['autocast'], ctx['sync'])
    peak = ctx['peak']
    rec = dict(config=name, batch=bs, packing=packing, compile=compile, grad_checkpointing=grad_ckpt,
               samples_per_s=samples / dt, tokens_per_s=tokens / dt, ms_per_step=dt / steps * 1000,
               mfu=flops / dt / peak if peak else None,
               peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == 'cuda' else None)
    print(f"  {name}: {rec['samples_per_s']:.1f} samples/s, {rec['ms_per_step']:.0f} ms/step"
          + (f", MFU {rec['mfu'] * 100:.1f}%" if rec['mfu'] else '')
          + (f", peak {rec['peak_gib']:.1f} GiB" if rec['peak_gib'] is not None else ''), flush=True)
    return rec


def _try(ctx, results, notes, *a, **kw):
    """_measure, with an out-of-memory or any other failure recorded instead of raised."""
    import torch
    try:
        results.append(_measure(ctx, *a, **kw))
        return results[-1]
    except torch.cuda.OutOfMemoryError:
        notes.append(f'{a[0]}: out of memory')
    except Exception as e:  # the check goes on; the JSON says what failed
        notes.append(f'{a[0]}: {type(e).__name__}: {str(e)[:200]}')
    print(f'  {notes[-1]}', flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None


def _profile(ctx, bs):
    """The top ops of a few steps at the best batch, by device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx['device'].type == 'cuda' else [])
    with profile(activities=acts) as prof:
        _measure(ctx, f'profile b{bs}', bs, steps=2)
    key = 'device_time_total' if ctx['device'].type == 'cuda' else 'cpu_time_total'
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:15]
    total = sum(getattr(e, key, 0) for e in prof.key_averages() if not e.key.startswith('ProfilerStep')) or 1
    return [dict(op=e.key, ms=getattr(e, key, 0) / 1000, calls=e.count) for e in events], total / 1000


def _e2e(ctx, out_dir, bs, budget):
    """30 real training steps through train.py on these backbones: eval, golden sampling,
    checkpoints, a stop and a resume at step 15, the final report."""
    cfg = ctx['train_args'] + [f'--data_dir={ctx["data_dir"]}', f'--out_dir={out_dir}', f'--batch_size={bs}',
                               '--gradient_accumulation_steps=1', '--eval_interval=10', '--eval_iters=2',
                               '--sample_interval=10', '--log_interval=5', '--eval_max_new_tokens=16']
    res = {}
    for part, extra in (('first 15 steps', ['--max_iters=15', '--eval_report_num=0']),
                        ('resume to 30 + report', ['--max_iters=30', '--init_from=resume', '--eval_report_num=32'])):
        t0 = time.time()
        p = subprocess.run([sys.executable, os.path.join(HERE, 'train.py')] + cfg + extra, capture_output=True,
                           text=True, timeout=max(60, budget))
        res[part] = dict(exit=p.returncode, seconds=time.time() - t0, tail=(p.stdout + p.stderr)[-1500:])
        print(f'  e2e {part}: exit {p.returncode} in {time.time() - t0:.0f}s', flush=True)
        if p.returncode:
            break
    res['report'] = os.path.exists(os.path.join(out_dir, 'report', 'report.md'))
    return res


def bench_gpu(args):
    import torch
    import transformers
    import data
    import model as M
    from common import autocast, resolve_device
    t_start = time.time()
    left = lambda: args.budget - (time.time() - t_start)  # noqa: E731
    tiny = args.tiny
    data_dir = args.data_dir
    if not os.path.exists(os.path.join(data_dir, 'meta.json')):
        print(f'preparing the synthetic dataset in {os.path.dirname(data_dir)}', flush=True)
        run_prepare(['--synthetic=2000', f'--data_dir={os.path.dirname(data_dir)}', '--no_llm'])
    device, dtype = resolve_device('cpu' if tiny else 'auto', 'bfloat16')
    if device.type != 'cuda' and not tiny:
        raise UserError('bench gpu: no GPU visible; use --tiny for the CPU rehearsal')
    prepared = data.open_prepared(data_dir)
    tok = M.load_tokenizer(prepared['meta']['tokenizer'])
    sizes = dict(n_latents=8, resampler_width=32, resampler_heads=2, proj_hidden=64) if tiny else {}
    backbones = dict(vision='tiny', llm='tiny') if tiny else \
        dict(vision='random:' + M.DEFAULT_VISION, llm='random:' + M.DEFAULT_LLM)
    model_args = dict(M.MODEL_DEFAULTS, tokenizer=prepared['meta']['tokenizer'], **backbones, **sizes)
    t0 = time.time()
    vlm = M.build_vlm(model_args, tok, device, dtype)  # built once, reused by every configuration
    print(f'backbones built in {time.time() - t0:.0f}s ({"tiny, CPU" if tiny else torch.cuda.get_device_name()})',
          flush=True)
    builder = data.SampleBuilder(tok, model_args['n_latents'], vlm.slot_id, vlm.eos_id, None, 1536)
    ctx = dict(vlm=vlm.train(), device=device, tiny=tiny, eos=vlm.eos_id, peak=M.peak_flops(device),
               autocast=autocast(device, dtype), backend='eager' if tiny else 'inductor',
               sync=torch.cuda.synchronize if device.type == 'cuda' else (lambda: None),
               ds=data.CaptionDataset(prepared, 'train', StretchedCaptions(builder, args.caption_tokens),
                                      vlm.image_spec),
               data_dir=data_dir, train_args=[f'--{k}={v}' for k, v in model_args.items() if k != 'tokenizer'] +
               [f'--device={device.type}', '--dtype=bfloat16', '--num_workers=0' if tiny else '--num_workers=8'])
    results, notes = [], []
    batches = (2, 4) if tiny else (16, 32, 48, 64)
    for bs in batches:  # the sweep stops at the first out-of-memory
        if left() < 120 or not _try(ctx, results, notes, f'batch {bs}', bs):
            notes += [] if left() >= 120 else [f'batch {bs}: skipped, out of time']
            break
    best = max(results, key=lambda r: r['samples_per_s'])['batch'] if results else batches[0]
    largest = max((r['batch'] for r in results), default=batches[0])
    if left() > 90:
        _try(ctx, results, notes, f'batch {best} packed', best, packing=True)
    profile, total_ms = _profile(ctx, best) if left() > 90 else ([], 0)
    if left() > 120:
        vlm.enable_grad_checkpointing()
        _try(ctx, results, notes, f'batch {largest} grad checkpointing', largest, grad_ckpt=True)
        vlm.disable_grad_checkpointing()
    e2e = None
    if left() > 100:
        e2e = _e2e(ctx, os.path.join(args.out_dir, 'e2e'), best, left() - 60)
    else:
        notes.append('e2e run: skipped, out of time')
    if left() > 150:  # compile last: it changes the modules in place
        vlm.llm.get_decoder().compile(backend=ctx['backend'])
        vlm.vision.compile(backend=ctx['backend'])
        _try(ctx, results, notes, f'batch {best} torch.compile', best, compile=True)
    else:
        notes.append('torch.compile: skipped, out of time')
    out = dict(device='CPU (tiny backbones)' if tiny else torch.cuda.get_device_name(), torch=torch.__version__,
               transformers=transformers.__version__, backbones=backbones, caption_tokens=args.caption_tokens,
               results=results, notes=notes, profile=profile, profile_total_ms=total_ms, e2e=e2e,
               seconds=time.time() - t_start)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, 'gpu_check.json'), 'w') as f:
        json.dump(out, f, indent=2)
    print(f"\n{out['device']}, torch {out['torch']}, transformers {out['transformers']}, "
          f"{args.caption_tokens}-token captions, bf16\n")
    print('| configuration | samples/s | tokens/s | MFU | peak GiB | ms/step |\n|---|---|---|---|---|---|')
    for r in results:
        mfu = f"{r['mfu'] * 100:.1f}%" if r['mfu'] else 'n/a'
        mem = f"{r['peak_gib']:.1f}" if r['peak_gib'] is not None else 'n/a'
        print(f"| {r['config']} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {mfu} | {mem} | "
              f"{r['ms_per_step']:.0f} |")
    for n in notes:
        print(f'- {n}')
    print(f"e2e: {'ok' if e2e and all(v.get('exit') == 0 for v in e2e.values() if isinstance(v, dict)) else 'FAILED'}"
          f"; JSON: {os.path.join(args.out_dir, 'gpu_check.json')}; {out['seconds']:.0f}s in all")


if __name__ == '__main__':
    from common import one_line_errors
    one_line_errors()
    ap = argparse.ArgumentParser(description='benchmarks (see the top of bench.py)')
    ap.add_argument('what', choices=['gpu', 'params', 'losshead', 'loader', 'prepare', 'shards', 'batching', 'open'])
    ap.add_argument('--tiny', action='store_true', help='gpu: tiny backbones on the CPU (the test-suite run)')
    ap.add_argument('--out_dir', default='bench_out', help='gpu: where the JSON and the e2e run go')
    ap.add_argument('--budget', type=float, default=420, help='gpu: seconds for the whole check (it skips what '
                                                              'does not fit and says so)')
    ap.add_argument('--n_latents', type=int, default=64)
    ap.add_argument('--caption_tokens', type=int, default=15)
    ap.add_argument('--variant', default=None)
    ap.add_argument('--vocab', type=int, default=151936)
    ap.add_argument('--B', type=int, default=8)
    ap.add_argument('--T', type=int, default=96)
    ap.add_argument('--n', type=int, default=None, help='loader: images (512); prepare/shards: records')
    ap.add_argument('--size', type=int, default=384)
    ap.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--batch_size', type=int, default=32)
    ap.add_argument('--tokenizer', default='tiny', help="prepare/shards: 'tiny' or a Qwen tokenizer dir/id")
    ap.add_argument('--data_dir', default='data/synthetic/prepared')
    a = ap.parse_args()
    a.n = a.n or dict(loader=512, prepare=558000, shards=100000).get(a.what, 0)
    if a.what == 'losshead' and a.variant:
        _losshead_run(a.variant, a.vocab, a.B, a.T)
    else:
        dict(gpu=bench_gpu, params=bench_params, losshead=bench_losshead, loader=bench_loader, prepare=bench_prepare,
             shards=bench_shards, batching=bench_batching, open=bench_open)[a.what](a)
