"""
The one-shot GPU check: what train.py itself does on a real card, in one short run.

$ python bench.py gpu [--budget 540]      # on one GPU: full-size random backbones, no download
$ python bench.py gpu --tiny              # the same code on the CPU with the tiny backbones (the tests)

Every number is train.py's own: each part runs `train.py config/stage1_align.py` (the tiny
demo's config with --tiny) on data drawn to look like LCS-558K, and reads its log.jsonl.
A GPU is lent for minutes, once, so the check must leave numbers whatever happens: every part
has its own share of the budget, a part that fails or runs out of time is a note, and
gpu_check.json is rewritten after every part (a kill leaves what was measured). In order:
1) train: the real run's settings (compile=True, length grouping, 2 % two-image rows, loader
   workers decoding JPEGs), evals, golden sampling and the report: samples/s, MFU, data wait,
   recompiles and peak memory over the steady steps, and whether it all ran clean;
2) fp8: bf16 against FP8 (torch._scaled_mm, e4m3, weights quantized once, per-tensor or
   per-row scales) for the forward and input-gradient GEMMs at this model's shapes;
2b) ddp: the same run under `torchrun --nproc_per_node=1`: NCCL, the gathers of golden samples
   and checkpoints on CUDA, DDP around the compiled connector, on one card;
3) worst: the data's worst batch (two images, longest captions) at growing batch sizes: the
   largest batch_size whose peak fits the card;
4) eager: the same run without compile, stopped halfway and resumed (the resume on the card);
5) profile: train.py's steady compiled steps under torch.profiler, by self time;
6) packed and grad_ckpt: packing and activation checkpointing.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np

from configurator import UserError, atomic_write_text, leave

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# each part's share of the budget, in order; time a part does not use goes to the later ones
SHARES = [('train', 0.37), ('fp8', 0.04), ('ddp', 0.09), ('worst', 0.14), ('eager', 0.11), ('profile', 0.13),
          ('packed', 0.06), ('grad_ckpt', 0.06)]
PARTS = tuple(n for n, _ in SHARES)
SAFE_FRACTION = 0.92  # a batch is safe when the worst case peaks under this much of the card's memory
# LCS-558K's BLIP captions: ~15 Qwen tokens on average, a tail to the 60-token filter
CAPTION_MEDIAN, CAPTION_SIGMA, MAX_TOKENS = 14, 0.45, 60


class Check:
    """The check's record and clock. save() rewrites gpu_check.json atomically."""

    def __init__(self, out_dir, budget, parts=PARTS, **head):
        self.path, self.t0, self.budget = os.path.join(out_dir, 'gpu_check.json'), time.time(), budget
        self.shares = [(n, f) for n, f in SHARES if n in parts]
        os.makedirs(out_dir, exist_ok=True)
        self.out = dict(head, status='running', runs=[], worst_case=[], fp8=[], notes=[], profile=[])
        self.save()

    def left(self):
        return self.budget - (time.time() - self.t0)

    def deadline(self, part):
        """When `part` must stop: its share, plus what the parts before it left unused."""
        names = [n for n, _ in self.shares]
        later = sum(f for n, f in self.shares[names.index(part) + 1:])
        return time.time() + self.left() * (1 - later / sum(f for n, f in self.shares[names.index(part):]))

    def note(self, msg):
        self.out['notes'].append(msg)
        print(f'  {msg}', flush=True)
        self.save()

    def save(self):
        self.out['seconds'] = time.time() - self.t0
        atomic_write_text(self.path, json.dumps(self.out, indent=2, default=str))

# -----------------------------------------------------------------------------
# Data that looks like LCS-558K


def n_images(args):
    return 240 if args.tiny else 3000


def make_data(root, n, seed=0):
    """n JPEG images of a few hundred pixels a side and captions whose token counts spread as
    LCS-558K's (lognormal, median 14 tokens: mean ~15.5, 99 % under 40, cut at 60), written as a
    caption JSONL and prepared by prepare_llava.py with the tiny tokenizer (one token per
    word); and the data's worst case: the same images, every caption 60 tokens. Made once.
    Returns (prepared dir, worst-case prepared dir)."""
    from PIL import Image, ImageDraw
    from sources.backbones import TINY_WORDS
    out = (os.path.join(root, 'prepared'), os.path.join(root, 'worst'))
    if all(os.path.exists(os.path.join(d, 'meta.json')) for d in out):
        return out
    rng, rnd = np.random.default_rng(seed), random.Random(seed)
    words = [w for w in TINY_WORDS if w.isalpha()]
    bases = []
    for _ in range(16):  # photo-like texture: smooth colour gradients, shapes, sensor noise
        a = np.linspace(0, 1, 800)
        img = (rng.uniform(0, 255, 3) * a[:, None, None] + rng.uniform(0, 255, 3) * a[None, :, None]) / 2
        im = Image.fromarray((img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(12):
            x, y = rng.integers(0, 700, 2)
            d.ellipse([x, y, x + rng.integers(20, 200), y + rng.integers(20, 200)], fill=tuple(rng.integers(0, 256, 3)))
        bases.append(im)
    os.makedirs(os.path.join(root, 'images'), exist_ok=True)
    lines, worst = [], []
    for k in range(n):
        w, h = (int(v) for v in rng.integers(256, 640, 2))
        x, y = (int(v) for v in rng.integers(0, 800 - 640, 2))
        name = f'images/{k:06d}.jpg'
        bases[k % len(bases)].crop((x, y, x + w, y + h)).save(os.path.join(root, name), quality=90)
        n_tok = int(min(MAX_TOKENS, max(5, round(rng.lognormal(np.log(CAPTION_MEDIAN), CAPTION_SIGMA)))))
        lines.append(dict(id=str(k), images=[name], caption=' '.join(rnd.choices(words, k=n_tok))))
        worst.append(dict(lines[-1], caption=' '.join(rnd.choices(words, k=MAX_TOKENS))))
    for rows, prepared in ((lines, out[0]), (worst, out[1])):
        path = prepared + '.jsonl'
        atomic_write_text(path, ''.join(json.dumps(r) + '\n' for r in rows))
        p = subprocess.run([sys.executable, os.path.join(HERE, 'prepare_llava.py'), f'--json={path}',
                            f'--out_dir={prepared}', '--tokenizer=tiny', '--max_dups=0', '--min_tokens=1',
                            f'--max_tokens={MAX_TOKENS}', '--val_ratio=0.05'], capture_output=True, text=True)
        if p.returncode:
            raise UserError(f'bench gpu: preparing its data failed: {p.stderr.strip()[-300:]}')
    return out

# -----------------------------------------------------------------------------
# train.py, run and read


def train_args(args, run_dir, data_dir, batch, steps):
    """train.py on the real run's config (the tiny demo's with --tiny), on the check's data."""
    cfg = 'stage1_tiny.py' if args.tiny else 'stage1_align.py'
    # the tiny demo's config, with room for the data's longest rows (two images, 60-token captions)
    backbones = ['--llm=tiny', '--dtype=bfloat16', '--max_seq_len=320'] if args.tiny else \
        ['--vision=random:google/siglip-so400m-patch14-384', '--llm=random:Qwen/Qwen3-8B-Base']
    shm = shutil.disk_usage('/dev/shm').free if os.path.isdir('/dev/shm') else 0
    # a container's /dev/shm (64 MB by default) is too small for the workers' batches
    workers = [] if args.tiny or shm > 2 * 2**30 else ['--num_workers=0']
    return [os.path.join(HERE, 'config', cfg), *backbones, *workers, f'--data_dir={data_dir}',
            f'--out_dir={run_dir}', f'--batch_size={batch}', f'--total_batch_size={batch}',
            f'--max_iters={steps}', '--warmup_frac=0.05', f'--log_interval={2 if args.tiny else 10}',
            '--eval_iters=2', '--eval_max_new_tokens=16', '--eval_report_num=0', '--sample_interval=0']


def run_train(check, name, argv, seconds, fresh=True, torchrun=False):
    """train.py in a child process (under torchrun, one rank, with `torchrun`), its console in
    <run>/train.log: (exit code or None on a timeout, its records, the warnings it printed).
    fresh: an earlier check's run goes first."""
    run_dir = next(a.split('=', 1)[1] for a in argv if a.startswith('--out_dir='))
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(run_dir, 'train.log'), 'a') as f:
        try:
            launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1'] \
                if torchrun else [sys.executable]
            code = subprocess.run([*launch, os.path.join(HERE, 'train.py'), *argv], stdout=f,
                                  stderr=subprocess.STDOUT, timeout=max(10, seconds)).returncode
        except subprocess.TimeoutExpired:
            code = None
    with open(os.path.join(run_dir, 'train.log')) as f:
        out = f.read()
    warnings = [ln for ln in out.splitlines() if 'warning' in ln.lower()]
    print(f'  {name}: exit {code} in {time.time() - t0:.0f}s' + (' (out of its time)' if code is None else ''),
          flush=True)
    if code != 0:
        check.note(f'{name}: ' + ('out of its time' if code is None else f'exit {code}: {out.strip()[-300:]}'))
    from evaluation.report import read_log
    return code, read_log(os.path.join(run_dir, 'log.jsonl')), warnings


def steady(name, records, warm, batch):
    """The numbers of the steps after `warm` (compilation, allocator warm-up): time-weighted
    means of what train.py logged over its log intervals, its recompiles and peak memory."""
    rows = [r for r in records if 'samples_per_s' in r]
    spans = [(r, r['iter'] - (rows[k - 1]['iter'] if k else 0)) for k, r in enumerate(rows)]
    spans = [(r, n) for r, n in spans if r['iter'] - n >= warm] or spans[-1:]
    if not spans:
        return None
    t = [r['dt_ms'] * n for r, n in spans]

    def mean(key):
        return sum(r[key] * w for (r, _), w in zip(spans, t)) / sum(t) if all(r.get(key) is not None
                                                                             for r, _ in spans) else None
    return dict(config=name, batch=batch, steps=sum(n for _, n in spans), samples_per_s=mean('samples_per_s'),
                tokens_per_s=mean('tokens_per_s'), mfu=mean('mfu'), data_wait=mean('data_wait'),
                ms_per_step=sum(t) / sum(n for _, n in spans), recompiles=spans[-1][0].get('recompiles'),
                peak_gib=max((r.get('mem_gib') or 0 for r in records), default=0) or None)


def record(check, key, rec):
    if rec:
        check.out[key].append(rec)
        check.save()
        print(f"  {rec['config']}: {rec['samples_per_s']:.1f} samples/s, {rec['ms_per_step']:.0f} ms/step"
              + (f", MFU {rec['mfu'] * 100:.1f}%" if rec['mfu'] else '')
              + (f", data wait {rec['data_wait'] * 100:.0f}%" if rec['data_wait'] is not None else '')
              + (f", recompiles {rec['recompiles']}" if rec['recompiles'] is not None else '')
              + (f", peak {rec['peak_gib']:.1f} GiB" if rec['peak_gib'] else ''), flush=True)
    return rec

# -----------------------------------------------------------------------------
# The parts


def part_train(args, check, data_dir, steps, warm):
    """The real run's configuration, end to end: compiled steps on length-grouped batches,
    evals, golden sampling and the final report; 'ok' only if all ran clean."""
    run_dir = os.path.join(args.out_dir, 'train')
    every = max(steps // 3, 1)
    argv = train_args(args, run_dir, data_dir, args.batch_size, steps) + [
        '--compile=True', f'--eval_interval={every}', f'--sample_interval={every}', '--eval_report_num=16']
    code, records, warnings = run_train(check, 'train', argv, check.deadline('train') - time.time())
    rec = record(check, 'runs', steady(f'batch {args.batch_size}, compile=True (train.py)', records, warm,
                                       args.batch_size))
    report = os.path.exists(os.path.join(run_dir, 'report', 'report.md'))
    check.out['train'] = dict(exit=code, ok=code == 0 and not warnings and report, report=report,
                              warnings=warnings[:5], evals=sum('val_loss' in r for r in records),
                              limit_hit=any('recompile limit' in w for w in warnings))
    check.save()
    return rec


def part_ddp(args, check, data_dir, steps, warm):
    """The compiled run under torchrun with one rank: DDP around the compiled connector, NCCL,
    the golden samples' and checkpoints' gathers on CUDA, a stop flag in the step's collective."""
    run_dir = os.path.join(args.out_dir, 'ddp')
    every = max(steps // 2, 1)
    argv = train_args(args, run_dir, data_dir, args.batch_size, steps) + [
        '--compile=True', f'--eval_interval={every}', f'--sample_interval={every}']
    code, records, warnings = run_train(check, 'ddp', argv, check.deadline('ddp') - time.time(), torchrun=True)
    record(check, 'runs', steady(f'batch {args.batch_size}, compile=True, torchrun 1 rank (train.py)', records, warm,
                                 args.batch_size))
    check.out['ddp'] = dict(exit=code, ok=code == 0 and not warnings and (os.path.exists(os.path.join(
        run_dir, 'samples.jsonl'))), warnings=warnings[:5], evals=sum('val_loss' in r for r in records))
    check.save()


def part_eager(args, check, data_dir, steps, warm):
    """The same run without compile, stopped halfway and resumed: the resume on the card."""
    run_dir = os.path.join(args.out_dir, 'eager')
    argv = train_args(args, run_dir, data_dir, args.batch_size, steps) + [f'--eval_interval={steps // 2}']
    end = check.deadline('eager')
    code, _, _ = run_train(check, 'eager, first half', [*argv, f'--max_iters={steps // 2}'],
                           (end - time.time()) / 2)
    if code == 0:
        code, records, _ = run_train(check, 'eager, resumed', [*argv, '--init_from=resume'], end - time.time(),
                                     fresh=False)
        record(check, 'runs', steady(f'batch {args.batch_size}, eager, resumed (train.py)', records,
                                     steps // 2 + warm // 2, args.batch_size))
    check.out['resume_ok'] = code == 0
    check.save()


def part_worst(args, check, worst_dir, sizes, total_gib):
    """The data's worst batch at each size (every row two images at the longest captions, eager:
    compiled steps take less memory): the largest batch_size that fits the card."""
    end, safe = check.deadline('worst'), None
    for bs in sizes:
        if time.time() > end:
            check.note(f'worst case at batch {bs}: skipped, out of its time')
            break
        argv = train_args(args, os.path.join(args.out_dir, f'worst_{bs}'), worst_dir, bs, 3) + [
            '--multi_image_frac=1.0', '--eval_iters=1']
        code, records, _ = run_train(check, f'worst case, batch {bs}', argv, min(end - time.time(), 300))
        rec = record(check, 'worst_case', steady(f'worst case, batch {bs}', records, 1, bs))
        if code != 0 or rec is None or (total_gib and rec['peak_gib'] and rec['peak_gib'] > SAFE_FRACTION * total_gib):
            break
        safe = bs
    return safe


def part_train_option(args, check, name, data_dir, steps, warm, flag):
    run_dir = os.path.join(args.out_dir, name)
    argv = train_args(args, run_dir, data_dir, args.batch_size, steps) + [flag, f'--eval_interval={steps}']
    _, records, _ = run_train(check, name, argv, check.deadline(name) - time.time())
    record(check, 'runs', steady(f'batch {args.batch_size}, {name} (train.py)', records, warm, args.batch_size))


def part_profile(args, check, data_dir, warm):
    """train.py's steady steps under torch.profiler, in a child process (bench.py gpu --part
    profile): the compiled step as shipped, with the attention kernel it ran."""
    out = os.path.join(args.out_dir, 'profile.json')
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, os.path.join(HERE, 'bench.py'), 'gpu', '--part', 'profile', f'--out_dir={args.out_dir}',
           f'--batch_size={args.batch_size}', f'--warm={warm}'] + (['--tiny'] if args.tiny else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True,
                           timeout=max(10, check.deadline('profile') - time.time()))
        if p.returncode:
            check.note(f'profile: the child exited {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}')
    except subprocess.TimeoutExpired:
        check.note('profile: not done within its time')
    if os.path.exists(out):
        with open(out) as f:
            check.out.update(json.load(f))
        check.save()


def profile_child(args):
    """Runs train.py in this process under torch.profiler: an optimizer step hook steps the
    profiler, which waits out the warm-up steps, warms up on one and records two."""
    import runpy
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule
    data_dir, _ = make_data(os.path.join(args.out_dir, 'data'), n_images(args))
    run_dir = os.path.join(args.out_dir, 'profile')
    shutil.rmtree(run_dir, ignore_errors=True)
    cuda = torch.cuda.is_available() and not args.tiny
    argv = train_args(args, run_dir, data_dir, args.batch_size, args.warm + 4) + [
        f'--compile={not args.tiny}', f'--eval_interval={args.warm + 10}', '--log_interval=1']  # the shipped step
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    marks = {}  # when the recorded steps began and ended
    with profile(activities=acts, schedule=schedule(wait=args.warm, warmup=1, active=2)) as prof:
        def on_step(*_):
            if cuda:
                torch.cuda.synchronize()
            prof.step()
            marks[prof.step_num] = time.time()
        register_optimizer_step_post_hook(on_step)
        sys.argv = ['train.py', *argv]
        runpy.run_path(os.path.join(HERE, 'train.py'), run_name='__main__')
    ops, total_ms, kernel = top_ops(prof, torch.device('cuda' if cuda else 'cpu'))
    wall_ms = (marks[args.warm + 3] - marks[args.warm + 1]) * 1000
    atomic_write_text(os.path.join(args.out_dir, 'profile.json'), json.dumps(dict(
        profile=ops, profile_total_ms=total_ms, profile_wall_ms=wall_ms, attention_kernel=kernel)))
    leave(0)  # all is written: the loader workers' exit handlers must not hold a lent card (seen on torch 2.11)


def top_ops(prof, device, n=15):
    """The ops that took the time, by *self* time: an op's own time, not that of the ops it
    calls (linear > mm > kernel would otherwise be counted three times). On a GPU each kernel
    is also an event of its own, besides being in the self device time of the op that
    launched it: only the ops are counted (seen on an H200: counting both gave 1.5x the wall
    time). Returns (top ops, their total ms, the attention kernel SDPA took)."""
    from torch.autograd import DeviceType
    cuda = device.type == 'cuda'
    key = 'self_device_time_total' if cuda else 'self_cpu_time_total'
    events = [e for e in prof.key_averages() if not e.key.startswith('ProfilerStep')
              and getattr(e, 'device_type', DeviceType.CPU) == DeviceType.CPU]
    own = lambda e: getattr(e, key, None) or (getattr(e, 'self_cuda_time_total', 0) if cuda else 0)  # noqa: E731
    total = sum(own(e) for e in events) or 1
    ranked = sorted(events, key=own, reverse=True)[:n]
    ops = [dict(op=e.key, ms=own(e) / 1000, share=own(e) / total, calls=e.count) for e in ranked]
    return ops, total / 1000, attention_kernel([e.key for e in events])


def attention_kernel(op_names):
    """Which SDPA kernel the profiled steps ran, from every op's name (attention is a small
    share of the time and rarely in the top ops): cuDNN, flash, memory-efficient or the math
    fallback (a dense mask takes SDPA off its fused kernels)."""
    names = ' '.join(n.lower() for n in op_names if 'attention' in n.lower())
    for kernel in ('cudnn', 'flash', 'efficient', 'math'):
        if kernel in names:
            return kernel
    return 'no SDPA op seen'


def fp8_gemms(tiny):
    """bf16 against FP8 (e4m3, torch._scaled_mm) for the frozen backbones' GEMMs: the forward
    y = x W^T and the input gradient dx = dy W (the frozen layers need no weight gradient).
    Weights are quantized once; activations and gradients on every call (timed with it).
    M: a micro-batch's tokens (48 rows of ~90: 4,304, a multiple of 16 as FP8 GEMMs want; SigLIP:
    729 patches x 48 images)."""
    import torch
    dev = torch.device('cpu' if tiny else 'cuda')
    shapes = [('tiny', 64, 64, 128), ('tiny', 64, 128, 64)] if tiny else \
        [('Qwen3-8B', 4304, k, n) for k, n in ((4096, 4096), (4096, 12288), (12288, 4096), (4096, 1024))] + \
        [('SigLIP', 729 * 48, k, n) for k, n in ((1152, 1152), (1152, 4304), (4304, 1152))]
    e4m3 = torch.float8_e4m3fn

    def quant(t, rowwise, dim):
        """(e4m3 tensor, fp32 scale): per tensor, or per row along `dim` (kept as a column)."""
        amax = t.abs().amax(dim=dim, keepdim=True) if rowwise else t.abs().amax()
        scale = (amax.float() / torch.finfo(e4m3).max).clamp(min=1e-12)
        return (t / scale).to(e4m3), scale

    def timed(fn, n=3 if tiny else 20):
        for _ in range(2):
            fn()
        if dev.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(n):
            out = fn()
        if dev.type == 'cuda':
            torch.cuda.synchronize()
        return (time.time() - t0) / n * 1000, out

    rows = []
    for model, M, K, N in shapes:
        g = torch.Generator(dev).manual_seed(0)
        x = torch.randn(M, K, device=dev, generator=g, dtype=torch.bfloat16)
        dy = torch.randn(M, N, device=dev, generator=g, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, generator=g, dtype=torch.bfloat16) * K ** -0.5
        for gemm, a, b_ref, b_t in (('forward', x, w.t(), w), ('input grad', dy, w, w.t())):
            # b must be column-major: b_t holds it transposed, row-major, quantized once per row of b_t
            ms_bf16, ref = timed(lambda: a @ b_ref)
            rec = dict(model=model, gemm=gemm, M=M, K=a.shape[1], N=b_ref.shape[1], bf16_ms=ms_bf16)
            for scaling, rowwise in (('tensor', False), ('row', True)):
                b8, sb = quant(b_t.contiguous(), rowwise, 1)
                b8, sb = b8.t(), sb.t() if rowwise else sb

                def fp8():
                    a8, sa = quant(a, rowwise, 1)
                    return torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
                try:
                    ms, out = timed(fp8)
                    err = float((out.float() - ref.float()).norm() / ref.float().norm())
                    rec.update({f'fp8_{scaling}_ms': ms, f'ratio_{scaling}': ms_bf16 / ms, f'rel_err_{scaling}': err})
                except RuntimeError as e:  # a card or build without FP8 GEMMs
                    rec[f'fp8_{scaling}'] = f'not run: {str(e).splitlines()[0][:120]}'
            rows.append(rec)
    return rows

# -----------------------------------------------------------------------------
# The check


def summary(check):
    out = check.out
    print(f"\n{out['device']}, torch {out['torch']}, transformers {out['transformers']}, bf16 backbones; data: "
          f"LCS-like JPEGs and caption lengths (lognormal, median {CAPTION_MEDIAN} tokens)\n")
    print('| train.py run | samples/s | tokens/s | MFU | data wait | recompiles | peak GiB | ms/step |\n'
          '|---|---|---|---|---|---|---|---|')
    pct = lambda v: f'{v * 100:.1f}%' if v is not None else 'n/a'  # noqa: E731
    for r in out['runs'] + out['worst_case']:
        print(f"| {r['config']} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {pct(r['mfu'])} | "
              f"{pct(r['data_wait'])} | {r['recompiles'] if r['recompiles'] is not None else 'n/a'} | "
              f"{r['peak_gib'] or 0:.1f} | {r['ms_per_step']:.0f} |")
    if out['fp8']:
        print('\n| GEMM | M x K x N | bf16 ms | FP8 per-tensor (x) | FP8 per-row (x) |\n|---|---|---|---|---|')
        for r in out['fp8']:
            x = lambda s: f"{r[f'fp8_{s}_ms']:.3f} (x{r[f'ratio_{s}']:.2f})" if f'ratio_{s}' in r else 'n/a'  # noqa
            print(f"| {r['model']} {r['gemm']} | {r['M']} x {r['K']} x {r['N']} | {r['bf16_ms']:.3f} | {x('tensor')} | "
                  f"{x('row')} |")
    for n in out['notes']:
        print(f'- {n}')
    if out.get('safe_batch'):
        print(f"largest safe batch_size (the data's worst batch fits): {out['safe_batch']}")
    if out.get('attention_kernel'):
        print(f"attention kernel of the profiled steps: {out['attention_kernel']}")
    t, d = out.get('train') or {}, out.get('ddp') or {}
    print(f"train.py end to end: {'not run' if not t else 'ok' if t.get('ok') else 'FAILED'}; under torchrun: "
          f"{'not run' if not d else 'ok' if d.get('ok') else 'FAILED'}; JSON: {check.path}; "
          f"{out['seconds']:.0f}s in all")


def main(args):
    import torch
    import transformers
    args.batch_size = args.batch_size or (4 if args.tiny else 32)  # stage1_align.py's
    if args.part == 'profile':
        return profile_child(args)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise UserError('bench gpu: no GPU visible; use --tiny for the CPU rehearsal')
    parts = PARTS if args.parts == 'all' else tuple(args.parts.split(','))
    if set(parts) - set(PARTS):
        raise UserError(f"bench gpu: unknown part(s) {', '.join(sorted(set(parts) - set(PARTS)))}; "
                        f"choose from {','.join(PARTS)}")
    check = Check(args.out_dir, args.budget, parts, torch=torch.__version__, transformers=transformers.__version__,
                  device=torch.cuda.get_device_name() if cuda else 'CPU (tiny backbones)', batch_size=args.batch_size)
    steps, warm = (12, 4) if args.tiny else (150, 40)
    try:
        data_dir, worst_dir = make_data(os.path.join(args.out_dir, 'data'), n_images(args))
        total = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None
        check.out['gpu_total_gib'] = total
        for part in parts:
            if check.deadline(part) - time.time() < (5 if args.tiny else 20):
                check.note(f'{part}: skipped, out of time')
                continue
            if part == 'train':
                part_train(args, check, data_dir, steps, warm)
            elif part == 'fp8':
                check.out['fp8'] = fp8_gemms(args.tiny)
            elif part == 'ddp':
                part_ddp(args, check, data_dir, warm + (4 if args.tiny else 30), warm)
            elif part == 'worst':
                check.out['safe_batch'] = part_worst(args, check, worst_dir, (2, 4) if args.tiny else (16, 32, 48, 64),
                                                     total)
            elif part == 'eager':
                part_eager(args, check, data_dir, 2 * warm + 8 if args.tiny else 60, warm)
            elif part == 'profile':
                part_profile(args, check, data_dir, warm)
            else:
                flag = '--packing=True' if part == 'packed' else '--grad_checkpointing=True'
                part_train_option(args, check, part, data_dir, warm + (4 if args.tiny else 16), warm, flag)
            check.save()
        check.out['status'] = 'done'
    except BaseException as e:  # a kill by the scheduler is not an exception, but everything else is recorded
        check.out['status'] = f'failed: {type(e).__name__}: {str(e)[:300]}'
        check.save()
        raise
    check.save()
    summary(check)
