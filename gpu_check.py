"""
The one-shot GPU check: one command, one short run on a card, everything a CPU cannot show.

$ python bench.py gpu [--budget 540]      # on one GPU, full-size random backbones, no download
$ python bench.py gpu --tiny              # the same code on the CPU with the tiny backbones (the tests)

A GPU is lent for minutes, once, so the check must leave numbers whatever happens: every part
has its own share of the budget, a part that fails or runs out of time is a note, and
gpu_check.json is rewritten after every configuration (a kill leaves what was measured).
In order:
1) build the backbones once (build seconds, peak host memory);
2) throughput of uniform rows at micro-batch 16 / 32 / 48 / 64 (stops at the first OOM);
3) the worst batch of the real data at each of those sizes (two-image rows at the longest
   captions): the largest batch_size that is safe to put in config/stage1_align.py;
4) packing at the fastest batch, activation checkpointing at the largest;
5) a profile of steady-state steps (self time per op: nested ops are not counted twice);
6) 30 real steps of train.py (eval, golden samples, a checkpoint, a resume, the report), after
   freeing this process's models, at the safe batch;
7) torch.compile, block by block (VLM.compile_blocks), in a child process with a time limit,
   with a profile that says which attention kernel the compiled run takes.
"""
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import time

from common import UserError, atomic_write_text

HERE = os.path.dirname(os.path.abspath(__file__))
# each part's share of the budget, in order; time a part does not use goes to the later ones
# (measured on an H200 with the full-size backbones: sweep 60 s, worst 60 s, packed, checkpointing
# and profile ~15 s each, e2e 160 s, compile 120 s: about 8 minutes with the build)
SHARES = [('sweep', 0.12), ('worst', 0.12), ('packed', 0.04), ('grad_ckpt', 0.04), ('profile', 0.05),
          ('e2e', 0.33), ('compile', 0.30)]
PARTS = tuple(n for n, _ in SHARES)
SAFE_FRACTION = 0.92  # a batch is safe when the worst case peaks under this much of the card's memory


class Check:
    """The check's record and clock. save() rewrites gpu_check.json atomically."""

    def __init__(self, out_dir, budget, parts=PARTS, **head):
        self.path, self.t0, self.budget = os.path.join(out_dir, 'gpu_check.json'), time.time(), budget
        self.shares = [(n, f) for n, f in SHARES if n in parts]
        os.makedirs(out_dir, exist_ok=True)
        self.out = dict(head, status='running', results=[], worst_case=[], notes=[], profile=[], e2e=None)
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


def loader_workers(tiny):
    """8 loader workers, as a real run has; none where /dev/shm is too small to pass their
    batches (a container's default is 64 MB: the workers would die with a bus error)."""
    if tiny:
        return 0
    try:
        free = shutil.disk_usage('/dev/shm').free
    except OSError:
        free = 0
    return 8 if free > 2 * 2**30 else 0


class StretchedCaptions:
    """A SampleBuilder whose captions are repeated/cut to a fixed token count: the synthetic
    captions are ~8 tokens, LCS-558K's average ~15, and the sequence length sets the cost."""

    def __init__(self, builder, n_tokens):
        self.builder, self.n = builder, n_tokens
        self.prompt_a, self.prompt_b, self.max_seq_len = builder.prompt_a, builder.prompt_b, builder.max_seq_len

    def build(self, captions, n_images=None):
        return self.builder.build([(list(c) * self.n)[:self.n] for c in captions], n_images)

# -----------------------------------------------------------------------------
# Measuring one configuration


def _steps(ctx, conn, opt, it, n, profiler=None):
    """n optimizer steps of one micro-batch each; returns (seconds, samples, tokens, flops)."""
    import torch
    import data
    import flops
    vlm = ctx['vlm']
    ctx['sync']()
    t0, samples, tokens, n_flops = time.time(), 0, 0, 0.0
    for _ in range(n):
        b = next(it)
        images, input_ids, target_pos, target_ids, position_ids = data.to_device(b, ctx['device'])
        with ctx['autocast']:
            loss = vlm(images, input_ids, target_pos, target_ids, position_ids=position_ids, connector=conn)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(conn.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        samples, tokens = samples + b['n_samples'], tokens + b['n_tokens']
        n_flops += flops.flops_per_batch(vlm, b['images'].shape[0], b['sample_lens'], b['n_targets'])
        if profiler is not None:
            profiler.step()
    loss.item()
    ctx['sync']()
    return time.time() - t0, samples, tokens, n_flops


def _loader(ctx, bs, packing, worst):
    import data
    ds = ctx['worst_ds'] if worst else ctx['ds']
    # worst: every item mixes two samples (Template B, two images), captions at the longest
    order = data.BatchOrder([ds], [1.0], bs, 0, multi_image_frac=1.0 if worst else 0.0)
    return iter(data.make_loader(data.Mixture([ds]), order, packing, ds.builder.max_seq_len, ctx['workers'],
                                 ctx['eos'], ctx['device'].type == 'cuda'))


def measure(ctx, name, bs, packing=False, grad_ckpt=False, worst=False, steps=None, profiler=None):
    """Steady-state numbers of one configuration (a fresh connector each time)."""
    import torch
    dev = ctx['device']
    conn = type(ctx['vlm'].connector)(**ctx['vlm'].connector.args).to(dev)
    if ctx.get('compile'):
        conn = torch.compile(conn, backend=ctx['backend'])
    opt = torch.optim.AdamW(conn.parameters(), lr=1e-4, fused=True)
    it = _loader(ctx, bs, packing, worst)
    if dev.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    warm = 2 if ctx['tiny'] else (4 if ctx.get('compile') else 3)
    steps = steps or (2 if ctx['tiny'] or worst else 8)
    _steps(ctx, conn, opt, it, warm)  # compilation, allocator warm-up
    dt, samples, tokens, n_flops = _steps(ctx, conn, opt, it, steps, profiler)
    rec = dict(config=name, batch=bs, packing=packing, compile=bool(ctx.get('compile')), grad_checkpointing=grad_ckpt,
               samples_per_s=samples / dt, tokens_per_s=tokens / dt, ms_per_step=dt / steps * 1000,
               tokens_per_row=tokens / samples, mfu=n_flops / dt / ctx['peak'] if ctx['peak'] else None,
               peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == 'cuda' else None)
    print(f"  {name}: {rec['samples_per_s']:.1f} samples/s, {rec['ms_per_step']:.0f} ms/step"
          + (f", MFU {rec['mfu'] * 100:.1f}%" if rec['mfu'] else '')
          + (f", peak {rec['peak_gib']:.1f} GiB" if rec['peak_gib'] is not None else ''), flush=True)
    return rec


def attempt(check, ctx, key, name, bs, **kw):
    """measure(), recorded under out[key]; an out-of-memory or any other failure is a note."""
    import torch
    try:
        rec = measure(ctx, name, bs, **kw)
        check.out[key].append(rec)
        check.save()
        return rec
    except torch.cuda.OutOfMemoryError:
        check.note(f'{name}: out of memory')
    except Exception as e:  # the check goes on; the JSON says what failed
        check.note(f'{name}: {type(e).__name__}: {str(e)[:200]}')
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None


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
    fallback (a dense mask, as dynamo tracing builds, takes SDPA off its fused kernels)."""
    names = ' '.join(n.lower() for n in op_names if 'attention' in n.lower())
    for kernel in ('cudnn', 'flash', 'efficient', 'math'):
        if kernel in names:
            return kernel
    return 'no SDPA op seen'


def profile(ctx, bs, name):
    """Steady-state steps only: the profiler skips the first (allocator, autotuning) and
    warms up on the next before recording. Returns (top ops, total ms, wall ms, kernel)."""
    from torch.profiler import ProfilerActivity, profile as run, schedule
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx['device'].type == 'cuda' else [])
    with run(activities=acts, schedule=schedule(wait=1, warmup=1, active=2)) as prof:
        rec = measure(ctx, name, bs, steps=4, profiler=prof)
    ops, total_ms, kernel = top_ops(prof, ctx['device'])
    return ops, total_ms, 2 * rec['ms_per_step'], kernel  # the two recorded steps' wall time

# -----------------------------------------------------------------------------
# The check


def build(args, check):
    import torch
    import data
    import flops
    import model as M
    from common import autocast, resolve_device
    tiny = args.tiny
    device, dtype = resolve_device('cpu' if tiny else 'auto', 'bfloat16')
    if device.type != 'cuda' and not tiny:
        raise UserError('bench gpu: no GPU visible; use --tiny for the CPU rehearsal')
    prepared = data.open_prepared(args.data_dir)
    tok = M.load_tokenizer(prepared['meta']['tokenizer'])
    sizes = dict(n_latents=8, resampler_width=32, resampler_heads=2, proj_hidden=64) if tiny else {}
    backbones = dict(vision='tiny', llm='tiny') if tiny else \
        dict(vision='random:' + M.DEFAULT_VISION, llm='random:' + M.DEFAULT_LLM)
    model_args = dict(M.MODEL_DEFAULTS, tokenizer=prepared['meta']['tokenizer'], **backbones, **sizes)
    t0 = time.time()
    vlm = M.build_vlm(model_args, tok, device, dtype)  # built once, reused by every configuration
    check.out.update(build_s=time.time() - t0, host_peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                     / 2**20, gpu_total_gib=torch.cuda.get_device_properties(device).total_memory / 2**30
                     if device.type == 'cuda' else None)
    print(f'backbones built in {time.time() - t0:.0f}s ({check.out["device"]}), host peak RSS '
          f'{check.out["host_peak_rss_gib"]:.1f} GiB', flush=True)
    builder = data.SampleBuilder(tok, model_args['n_latents'], vlm.slot_id, vlm.eos_id, None, 1536, vlm.bos_id)
    max_tokens = prepared['meta'].get('max_tokens', 60)
    ds = lambda n: data.CaptionDataset(prepared, 'train', StretchedCaptions(builder, n), vlm.image_spec)  # noqa: E731
    check.out['loader_workers'] = workers = loader_workers(tiny)
    if not tiny and not workers:
        check.note('/dev/shm has under 2 GiB free: the loader runs in the main process (start the container '
                   'with --ipc=host or a larger --shm-size)')
    return dict(vlm=vlm.train(), device=device, tiny=tiny, workers=workers, eos=vlm.eos_id,
                peak=flops.peak_flops(device), autocast=autocast(device, dtype),
                backend='eager' if tiny else 'inductor', model_args=model_args,
                sync=torch.cuda.synchronize if device.type == 'cuda' else (lambda: None),
                ds=ds(args.caption_tokens), worst_ds=ds(max_tokens), max_tokens=max_tokens)


def run_parts(args, check, ctx, parts):
    """The sweep of uniform rows: (fastest batch, largest batch that ran). Without the sweep
    (a rerun of some parts), both are --batch_size."""
    if 'sweep' not in parts:
        return args.batch_size, args.batch_size
    batches = (2, 4) if ctx['tiny'] else (16, 32, 48, 64)
    end = check.deadline('sweep')
    for bs in batches:  # uniform rows; the sweep stops at the first out-of-memory
        if time.time() > end:
            check.note(f'batch {bs}: skipped, out of its time')
            break
        if not attempt(check, ctx, 'results', f'batch {bs}', bs):
            break
    ok = check.out['results']
    if not ok:
        return None, None
    best = max(ok, key=lambda r: r['samples_per_s'])['batch']
    largest = max(r['batch'] for r in ok)
    return best, largest


def worst_part(check, ctx, best):
    """The data's worst batch at each size the sweep ran: the largest safe batch_size."""
    end, safe = check.deadline('worst'), None
    total = check.out['gpu_total_gib']
    for bs in [r['batch'] for r in check.out['results']] or [best]:
        if time.time() > end:
            check.note(f'worst case at batch {bs}: skipped, out of its time')
            break
        rec = attempt(check, ctx, 'worst_case', f'worst case, batch {bs}', bs, worst=True)
        if rec is None or (total and rec['peak_gib'] > SAFE_FRACTION * total):
            break
        safe = bs
    return safe


def other_parts(check, ctx, parts, best, largest):
    """Packing at the fastest batch, activation checkpointing at the largest, a profile."""
    for part, go in (('packed', lambda: attempt(check, ctx, 'results', f'batch {best} packed', best, packing=True)),
                     ('grad_ckpt', lambda: _with_grad_ckpt(check, ctx, largest)),
                     ('profile', lambda: _profile_part(check, ctx, best))):
        if part not in parts:
            continue
        if check.deadline(part) - time.time() < (5 if ctx['tiny'] else 15):
            check.note(f'{part}: skipped, out of time')
            continue
        go()


def _with_grad_ckpt(check, ctx, bs):
    ctx['vlm'].enable_grad_checkpointing()
    try:
        attempt(check, ctx, 'results', f'batch {bs} grad checkpointing', bs, grad_ckpt=True)
    finally:
        ctx['vlm'].disable_grad_checkpointing()


def _profile_part(check, ctx, bs):
    try:
        (check.out['profile'], check.out['profile_total_ms'], check.out['profile_wall_ms'],
         check.out['attention_kernel']) = profile(ctx, bs, f'profile b{bs}')
        check.save()
    except Exception as e:
        check.note(f'profile: {type(e).__name__}: {str(e)[:200]}')


def e2e(args, check, model_args, device, bs, seconds):
    """30 real training steps through train.py: eval, golden sampling, checkpoints, a stop
    and a resume at step 15, the final report. 'ok' means every part exited 0, the report
    exists and train.py printed no warning (golden sampling and the report only warn)."""
    out_dir = os.path.join(args.out_dir, 'e2e')
    cfg = [f'--{k}={v}' for k, v in model_args.items() if k != 'tokenizer'] + [
        f'--device={device.type}', '--dtype=bfloat16', f"--num_workers={check.out['loader_workers']}",
        f'--data_dir={args.data_dir}', f'--out_dir={out_dir}', f'--batch_size={bs}', '--gradient_accumulation_steps=1',
        '--eval_interval=10', '--eval_iters=2', '--sample_interval=10', '--log_interval=5', '--eval_max_new_tokens=16']
    res, end = dict(batch=bs), time.time() + seconds
    check.out['e2e'] = res
    for part, extra in (('first 15 steps', ['--max_iters=15', '--eval_report_num=0']),
                        ('resume to 30 + report', ['--max_iters=30', '--init_from=resume', '--eval_report_num=32'])):
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, os.path.join(HERE, 'train.py')] + cfg + extra, capture_output=True,
                               text=True, timeout=max(10, end - time.time()))
            out = p.stdout + p.stderr
            res[part] = dict(exit=p.returncode, seconds=time.time() - t0, tail=out[-1500:],
                             warnings=[ln for ln in out.splitlines() if 'warning' in ln.lower()][:5])
        except subprocess.TimeoutExpired as e:
            res[part] = dict(exit=None, seconds=time.time() - t0, tail=str(e.stdout or '')[-1500:], warnings=[],
                             timeout=True)
        print(f"  e2e {part}: exit {res[part]['exit']} in {time.time() - t0:.0f}s"
              + (' (out of its time)' if res[part].get('timeout') else ''), flush=True)
        check.save()
        if res[part]['exit'] != 0:
            break
    res['report'] = os.path.exists(os.path.join(out_dir, 'report', 'report.md'))
    parts = [v for v in res.values() if isinstance(v, dict)]
    res['ok'] = len(parts) == 2 and all(v['exit'] == 0 and not v['warnings'] for v in parts) and res['report']
    check.save()


def compile_child(args, check, bs, seconds):
    """torch.compile in a child process, killed at its time limit: (record or None)."""
    out = os.path.join(args.out_dir, 'compile.json')
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, os.path.join(HERE, 'bench.py'), 'gpu', '--part', 'compile', f'--batch_size={bs}',
           f'--data_dir={args.data_dir}', f'--out_dir={args.out_dir}', f'--caption_tokens={args.caption_tokens}'] + \
        (['--tiny'] if args.tiny else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, seconds))
        if p.returncode:
            check.note(f'torch.compile: the child exited {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}')
    except subprocess.TimeoutExpired:
        check.note(f'torch.compile: not done within its {seconds:.0f}s (compiling is slow; measured eagerly only)')
    if not os.path.exists(out):
        return None
    with open(out) as f:
        rec = json.load(f)
    check.out['results'].append(rec['result'])
    check.out['compiled_profile'], check.out['compiled_attention_kernel'] = rec['profile'], rec['attention_kernel']
    check.save()
    return rec['result']


def compile_part(args):
    """The child: build, compile the backbones and the connector, measure, profile."""
    check = Check(args.out_dir + '/compile_part', 1e9, device='child')
    ctx = build(args, check)
    vlm = ctx['vlm']
    vlm.compile_blocks(ctx['backend'])
    ctx['compile'] = True
    rec = measure(ctx, f'batch {args.batch_size} torch.compile', args.batch_size)
    ops, _, _, kernel = profile(ctx, args.batch_size, 'compiled profile')
    atomic_write_text(os.path.join(args.out_dir, 'compile.json'),
                      json.dumps(dict(result=rec, profile=ops, attention_kernel=kernel), default=str))


def free(ctx):
    """This process's models off the GPU before a child loads its own copy."""
    import torch
    ctx.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summary(check):
    out = check.out
    print(f"\n{out['device']}, torch {out['torch']}, transformers {out['transformers']}, "
          f"{out['caption_tokens']}-token captions, bf16; backbones built in {out.get('build_s', 0):.0f}s, host peak "
          f"RSS {out.get('host_peak_rss_gib') or 0:.1f} GiB\n")
    print('| configuration | samples/s | tokens/s | MFU | peak GiB | ms/step |\n|---|---|---|---|---|---|')
    for r in out['results'] + out['worst_case']:
        mfu = f"{r['mfu'] * 100:.1f}%" if r['mfu'] else 'n/a'
        mem = f"{r['peak_gib']:.1f}" if r['peak_gib'] is not None else 'n/a'
        print(f"| {r['config']} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {mfu} | {mem} | "
              f"{r['ms_per_step']:.0f} |")
    for n in out['notes']:
        print(f'- {n}')
    if out.get('fastest'):
        print(f"fastest: {out['fastest']['config']}; largest safe batch_size (the data's worst batch fits): "
              f"{out.get('safe_batch')}; put batch_size = {out.get('recommended_batch')} in config/stage1_align.py")
    if out.get('attention_kernel'):
        print(f"attention kernel: eager {out['attention_kernel']}, compiled {out.get('compiled_attention_kernel')}")
    e = out.get('e2e') or {}
    e2e_state = 'not run' if not e else 'ok' if e.get('ok') else 'FAILED'
    print(f"e2e: {e2e_state}; JSON: {check.path}; {out['seconds']:.0f}s in all")


def main(args):
    import torch
    import transformers
    if args.part == 'compile':
        return compile_part(args)
    if not os.path.exists(os.path.join(args.data_dir, 'meta.json')):
        from bench import run_prepare
        print(f'preparing the synthetic dataset in {os.path.dirname(args.data_dir)}', flush=True)
        run_prepare(['--synthetic=2000', f'--data_dir={os.path.dirname(args.data_dir)}', '--llm=none'])
    parts = PARTS if args.parts == 'all' else tuple(args.parts.split(','))
    if set(parts) - set(PARTS):
        raise UserError(f"bench gpu: unknown part(s) {', '.join(sorted(set(parts) - set(PARTS)))}; "
                        f"choose from {','.join(PARTS)}")
    check = Check(args.out_dir, args.budget, parts, torch=torch.__version__, transformers=transformers.__version__,
                  caption_tokens=args.caption_tokens, device='CPU (tiny backbones)' if args.tiny else
                  (torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'))
    try:
        ctx = build(args, check)
        best, largest = run_parts(args, check, ctx, parts)
        if best is None:
            raise UserError('bench gpu: no configuration ran (see the notes in the JSON)')
        safe = worst_part(check, ctx, best) if 'worst' in parts else None
        other_parts(check, ctx, parts, best, largest)
        model_args, device = ctx['model_args'], ctx['device']
        check.out['backbones'] = {k: model_args[k] for k in ('vision', 'llm')}
        free(ctx)
        batch = min(best, safe or best)  # the child meets the data's worst batches too
        seconds = check.deadline('e2e') - time.time() if 'e2e' in parts else 0
        if seconds > (20 if args.tiny else 60):
            e2e(args, check, model_args, device, batch, seconds)
        elif 'e2e' in parts:
            check.note('e2e run: skipped, out of time')
        seconds, compiled = check.deadline('compile') - time.time() if 'compile' in parts else 0, None
        if seconds > (20 if args.tiny else 90):
            compiled = compile_child(args, check, best, seconds)
        elif 'compile' in parts:
            check.note('torch.compile: skipped, out of time')
        eager = [r for r in check.out['results'] if r['config'] == f'batch {best}']
        fastest = max(eager + ([compiled] if compiled else []), key=lambda r: r['samples_per_s'], default=None)
        check.out.update(fastest=fastest, safe_batch=safe, recommended_batch=batch,
                         use_compile=compiled is not None and fastest is compiled)
        check.out['status'] = 'done'
    except BaseException as e:  # a kill by the scheduler is not an exception, but everything else is recorded
        check.out['status'] = f'failed: {type(e).__name__}: {str(e)[:300]}'
        check.save()
        raise
    check.save()
    summary(check)
    # Everything is saved. Exit now: on torch 2.11 the loader workers of the measured
    # configurations held the interpreter's exit for minutes (their atexit joins, seen on an
    # H200), which a lease's time limit turns into a lost run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

