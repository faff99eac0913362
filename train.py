"""
Stage-1 alignment: train the connector between a frozen vision tower and a frozen LLM on
image-caption pairs, loss on caption tokens only.

One GPU or CPU:
$ python train.py config/stage1_trial.py --lr=1e-4
DDP on one node:
$ torchrun --standalone --nproc_per_node=8 train.py config/stage1_align.py
DDP on several nodes (run on each, node_rank = 0..nnodes-1):
$ torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 train.py config/stage1_align.py
"""
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

import data
import model as M
import sample
from configurator import configure

# -----------------------------------------------------------------------------
# config: every global below can be set by a config file or --key=value
out_dir = 'out'
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
data_dir = 'data/llava_pretrain/prepared'
# model (saved in checkpoints; see model.MODEL_KEYS)
vision = M.DEFAULT_VISION  # hub id, local dir, 'random:<id or dir>', or 'tiny'
llm = M.DEFAULT_LLM
tokenizer = ''  # '' = the tokenizer the data was prepared with (meta.json)
vision_feature_layer = -2  # penultimate layer, as LLaVA
n_latents = 64  # visual tokens per image
resampler_width = 1024
resampler_depth = 2
resampler_heads = 16
resampler_mlp_ratio = 4
proj_hidden = 4096
proj_dropout = 0.0
vision_ln = True
match_embed_scale = True  # connector output RMS starts at the LLM's token-embedding RMS
image_brackets = False  # wrap slots in <|vision_start|> ... <|vision_end|>
# data
batch_size = 16  # micro-batch per rank
gradient_accumulation_steps = 32  # total over all ranks; effective batch = batch_size * this
max_seq_len = 1536
multi_image_frac = 0.02  # fraction of samples that mix two captions into Template B
group_by_length = True
packing = False
num_workers = 4
max_train_samples = 0  # > 0: train on the first N samples only (trial runs)
# optimizer and schedule
learning_rate = 1e-4
weight_decay = 0.01  # matrices only; norms, biases, latents, gains get 0
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
epochs = 1.0
max_iters = -1  # -1: derived from epochs
warmup_frac = 0.02
min_lr_frac = 0.1  # cosine decays to this fraction of the peak
# evaluation, logging, checkpoints
eval_interval = 500
eval_iters = 50  # val batches per eval (0: the whole val split)
log_interval = 10
sample_interval = 1000  # golden-set captions -> out_dir/samples.jsonl (0: never)
eval_report_num = 200  # at the end: evaluation report on this many val samples (0: no report)
always_save_checkpoint = True  # ckpt.pt at every eval; ckpt_best.pt when val improves
max_nonfinite = 5  # consecutive non-finite steps before the run stops
wandb_log = False
wandb_project = 'stage1-align'
wandb_run_name = ''
# system
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bf16 on GPU, fp32 on CPU), 'bfloat16', 'float32'
compile = False
grad_checkpointing = False
attn_implementation = 'sdpa'  # 'sdpa', 'eager', 'flash_attention_2'
tf32 = True
seed = 1337
bench_iters = 0  # > 0: benchmark mode, measure this many steps after warmup, print, exit
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])

# DDP: torchrun sets RANK/WORLD_SIZE; each rank holds its own frozen backbones
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    backend = 'nccl' if torch.cuda.is_available() and device != 'cpu' else 'gloo'
    dist.init_process_group(backend=backend)
    rank, local_rank, world_size = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
    if backend == 'nccl':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
device = torch.device(device)
if dtype == 'auto':
    dtype = 'bfloat16' if device.type == 'cuda' else 'float32'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
autocast = torch.autocast(device.type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
if tf32 and device.type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
if gradient_accumulation_steps % world_size:
    raise SystemExit(f'error: gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by '
                     f'the number of ranks ({world_size})')
accum = gradient_accumulation_steps // world_size
torch.manual_seed(seed + rank)


def log(*a):
    if master:
        print(*a, flush=True)


# -----------------------------------------------------------------------------
# data first: a missing dataset should fail in a second, not after loading 16 GB of weights
prepared = data.open_prepared(data_dir)
meta = prepared['meta']
tokenizer = tokenizer or meta['tokenizer']
if tokenizer != meta['tokenizer']:
    raise SystemExit(f"error: data in {data_dir} was tokenised with '{meta['tokenizer']}' but tokenizer="
                     f"'{tokenizer}'; re-run prepare_llava.py --tokenizer={tokenizer}")
tok = M.load_tokenizer(tokenizer)
model_args = {k: globals()[k] for k in M.MODEL_KEYS}
model_args['tokenizer'] = tokenizer
config['tokenizer'] = tokenizer
ckpt_path = os.path.join(out_dir, 'ckpt.pt')

# -----------------------------------------------------------------------------
# model: frozen backbones + connector (the checkpoint's, when resuming)
ckpt = None
if init_from == 'resume':
    ckpt = M.load_checkpoint(ckpt_path)
    diff = {k: (ckpt['model_args'].get(k), v) for k, v in model_args.items() if ckpt['model_args'].get(k) != v}
    if diff:
        raise SystemExit(f'error: {ckpt_path} was trained with a different model config '
                         f'({", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())}); '
                         f'resume with the original config')
elif init_from != 'scratch':
    raise SystemExit(f"error: init_from must be 'scratch' or 'resume', got '{init_from}'")
t0 = time.time()
vlm = M.build_vlm(model_args, tok, device, ptdtype if device.type == 'cuda' else torch.float32,
                  connector_state=ckpt['connector'] if ckpt else None)
connector = vlm.connector  # the raw module: what is optimised and saved
if grad_checkpointing:
    vlm.enable_grad_checkpointing()
log(f'model: vision {M.count_params(vlm.vision) / 1e6:.1f}M + llm {M.count_params(vlm.llm) / 1e6:.1f}M frozen, '
    f'connector {M.count_params(connector) / 1e6:.2f}M trainable ({time.time() - t0:.1f}s to build)')
if compile:
    vlm.llm.get_decoder().compile()
    vlm.vision.compile()
    connector.compile()
if ddp:
    # only the connector is wrapped: DDP would otherwise broadcast all 8B frozen weights
    vlm.connector = torch.nn.parallel.DistributedDataParallel(
        connector, device_ids=[device.index] if device.type == 'cuda' else None)

# -----------------------------------------------------------------------------
# optimizer: decay matrices only (norms, biases, latents and gains are not weights to shrink)
decay = [p for n, p in connector.named_parameters() if p.dim() >= 2 and n != 'latents']
no_decay = [p for n, p in connector.named_parameters() if p.dim() < 2 or n == 'latents']
optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)],
                              lr=learning_rate, betas=(beta1, beta2), fused=device.type == 'cuda')

builder = data.SampleBuilder(tok, n_latents, meta['slot_id'], meta['eos_id'], vlm.brackets, max_seq_len)
spec = vlm.image_spec
train_ds = data.CaptionDataset(prepared, 'train', builder, spec['size'], spec['resample'])
val_ds = data.CaptionDataset(prepared, 'val', builder, spec['size'], spec['resample'])
if max_train_samples > 0:
    train_ds.index = train_ds.index[:max_train_samples]
steps_per_epoch = len(train_ds) // (batch_size * gradient_accumulation_steps)
if max_iters < 0:
    max_iters = max(1, int(epochs * steps_per_epoch))
warmup_iters = int(warmup_frac * max_iters)


def get_lr(it):
    """linear warmup, then cosine decay to min_lr_frac of the peak"""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    ratio = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return learning_rate * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * ratio)))


# -----------------------------------------------------------------------------
# state: fresh, or exactly where the checkpoint left off
iter_num, micro_pos, best_val_loss, nonfinite_total, last_eval_iter = 0, 0, float('inf'), 0, -1
if ckpt:
    optimizer.load_state_dict(ckpt['optimizer'])
    iter_num, micro_pos, best_val_loss = ckpt['iter_num'], ckpt['micro_pos'], ckpt['best_val_loss']
    nonfinite_total = ckpt.get('nonfinite_total', 0)
    last_eval_iter = ckpt.get('last_eval_iter', -1)
    torch.set_rng_state(ckpt['rng'][min(rank, len(ckpt['rng']) - 1)])
    log(f'resumed from {ckpt_path} at iter {iter_num}')
    del ckpt

sampler = data.ResumableBatches(train_ds, batch_size, seed, rank, world_size, start=micro_pos,
                                multi_image_frac=multi_image_frac, group_by_length=group_by_length)
pin = device.type == 'cuda'
train_loader = data.make_loader(train_ds, sampler, packing, max_seq_len, num_workers, meta['eos_id'], pin)
train_iter = iter(train_loader)
# val: a fixed order (the first samples), decoded by the loader's workers like training data
val_loader = data.make_loader(val_ds, data.eval_batches(len(val_ds), batch_size, eval_iters or None), packing,
                              max_seq_len, num_workers, meta['eos_id'], pin) if len(val_ds) else []


def estimate_loss():
    """Mean caption-token loss on val (token-weighted)."""
    vlm.eval()
    loss = sample.caption_loss(vlm, val_loader, autocast)
    vlm.train()
    return loss


def rng_states():
    states = [torch.get_rng_state()]
    if ddp:  # each rank's own state, so resume restores all of them
        gathered = [None] * world_size
        dist.all_gather_object(gathered, states[0])
        states = gathered
    return states


def save_checkpoint(path, rng):
    """Atomic: write a temp file, fsync, rename. A crash mid-write leaves the old file intact."""
    ckpt = dict(version=1, connector=connector.state_dict(), optimizer=optimizer.state_dict(),
                model_args=model_args, config=config, iter_num=iter_num, micro_pos=micro_pos,
                best_val_loss=best_val_loss, nonfinite_total=nonfinite_total, last_eval_iter=last_eval_iter, rng=rng)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint(path):
    rng = rng_states()  # collective under DDP: every rank calls it
    if master:
        save_checkpoint(path, rng)


# preemption: SIGTERM/SIGINT ask for a checkpoint at the next step boundary, then exit
stop_signal = None


def on_signal(signum, frame):
    global stop_signal
    stop_signal = signum


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)

peak = M.peak_flops(device)
if master:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    logf = open(os.path.join(out_dir, 'log.jsonl'), 'a')
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name or None, config=config)
log(f'data: {len(train_ds)} train / {len(val_ds)} val samples, {steps_per_epoch} steps/epoch at '
    f'{batch_size * gradient_accumulation_steps} samples/step; training {max_iters} steps')


def write_log(rec):
    if master:
        logf.write(json.dumps(rec) + '\n')
        logf.flush()
        if wandb_log:
            wandb.log(rec, step=rec['iter'])


@contextmanager
def raw_connector():
    """Generation runs on rank 0 only, so it must not go through the DDP wrapper."""
    wrapped = vlm.connector
    vlm.connector = connector
    vlm.eval()
    try:
        yield
    finally:
        vlm.connector = wrapped
        vlm.train()


def sample_golden():
    """Greedy captions for the golden val samples, appended to samples.jsonl."""
    golden = [i for i in meta.get('golden', []) if i < len(val_ds)]
    if not golden:
        return
    with raw_connector():
        rows = sample.caption_split(vlm, tok, val_ds, golden, val_ds.reader, 0.0, 1.0, 64, None, batch_size,
                                    prefix='golden')
    with open(os.path.join(out_dir, 'samples.jsonl'), 'a') as f:
        for r in rows:
            f.write(json.dumps(dict(iter=iter_num, id=r['id'], generation=r['generation'],
                                    reference=r['references'][0])) + '\n')
    for r in rows[:2]:
        log(f'  sample {r["id"]}: {r["generation"]!r}  (ref: {r["references"][0]!r})')


# -----------------------------------------------------------------------------
# the loop
vlm.train()
consecutive_nonfinite = 0
bench = dict(t=[], samples=0, tokens=0, flops=0.0)
t_start, it_start = time.time(), iter_num
while True:
    # a checkpoint written right after an eval resumes without redoing it; a preemption
    # checkpoint (written before its step's eval) does not
    resumed_here = iter_num == last_eval_iter
    if (iter_num % eval_interval == 0 or iter_num >= max_iters) and not bench_iters and not resumed_here:
        val_loss = estimate_loss() if len(val_ds) else float('nan')
        last_eval_iter = iter_num
        improved = val_loss < best_val_loss
        best_val_loss = min(best_val_loss, val_loss)
        log(f'eval {iter_num}: val loss {val_loss:.4f} | caption ppl {math.exp(min(val_loss, 50)):.2f}'
            f'{" (best)" if improved and iter_num > 0 else ""}')
        write_log(dict(iter=iter_num, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50))))
        if iter_num > 0 and (always_save_checkpoint or improved or iter_num >= max_iters):
            checkpoint(ckpt_path)
            if improved and master:
                shutil.copyfile(ckpt_path, ckpt_path + '.best.tmp')
                os.replace(ckpt_path + '.best.tmp', os.path.join(out_dir, 'ckpt_best.pt'))
    if sample_interval and iter_num % sample_interval == 0 and iter_num > 0 and master and not bench_iters \
            and not resumed_here:
        sample_golden()
    if iter_num >= max_iters:
        break

    t0 = time.time()
    lr = get_lr(iter_num)
    for g in optimizer.param_groups:
        g['lr'] = lr
    # the step's micro-batches (already prefetched by the loader's workers), so the loss can
    # be normalised by the number of caption tokens in the whole step, over all ranks: every
    # token weighs the same whatever micro-batch or rank it landed in
    td = time.time()
    batches = [next(train_iter) for _ in range(accum)]
    t_data = time.time() - td
    micro_pos += accum
    n_targets = sum(b['n_targets'] for b in batches)
    n_step = torch.tensor(float(n_targets), device=device)  # caption tokens in the step, all ranks after the reduce
    if ddp:
        dist.all_reduce(n_step)
    loss_sum = torch.zeros((), device=device)
    samples = sum(b['n_samples'] for b in batches)
    tokens = sum(b['n_tokens'] for b in batches)
    n_images = sum(b['images'].shape[0] for b in batches)
    n_bad = sum(b['n_bad'] for b in batches)
    sample_lens = [n for b in batches for n in b['sample_lens']]  # for FLOPs
    for micro, batch in enumerate(batches):
        images, input_ids, target_pos, target_ids, position_ids = data.to_device(batch, device)
        # sync connector gradients across ranks only on the last micro-step
        sync = not ddp or micro == accum - 1
        with (nullcontext() if sync else vlm.connector.no_sync()), autocast:
            loss = vlm(images, input_ids, target_pos, target_ids, position_ids=position_ids, reduction='sum')
        # DDP averages gradients over ranks; x world_size makes that the token mean over all
        (loss * (world_size / n_step)).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(connector.parameters(), grad_clip)
    # grads are all-reduced, so every rank sees the same norm and takes the same decision
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        consecutive_nonfinite += 1
        nonfinite_total += 1
        log(f'iter {iter_num}: non-finite loss/grad, step skipped ({consecutive_nonfinite} in a row)')
        write_log(dict(iter=iter_num, skipped='non-finite', nonfinite_total=nonfinite_total))
        if consecutive_nonfinite >= max_nonfinite:
            iter_num += 1
            checkpoint(os.path.join(out_dir, 'ckpt_last_good.pt'))
            raise SystemExit(f'error: {consecutive_nonfinite} non-finite steps in a row at iter {iter_num}; '
                             f'stopped. The last good connector is in {out_dir}/ckpt_last_good.pt: lower '
                             f'learning_rate or check the data, then resume')
        iter_num += 1
        continue
    consecutive_nonfinite = 0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    if iter_num % log_interval == 0 or iter_num == max_iters or bench_iters:
        if ddp:  # all ranks' tokens, not rank 0's share
            dist.all_reduce(loss_sum)
        lossf = (loss_sum / n_step).item()  # token mean over the step; the sync point, only on log steps
        if device.type == 'cuda':
            torch.cuda.synchronize()
        dt = time.time() - t0
        flops = M.flops_per_batch(vlm, n_images, sample_lens, n_targets) * world_size
        rate = samples * world_size / dt
        done = iter_num - it_start
        per_step = (time.time() - t_start) / done
        eta = per_step * (max_iters - iter_num)
        eta_epoch = per_step * (sampler.per_epoch - micro_pos % sampler.per_epoch) / accum
        mfu = flops / dt / (peak * world_size) if peak else None
        rec = dict(iter=iter_num, loss=lossf, lr=lr, grad_norm=float(grad_norm), dt_ms=dt * 1000,
                   samples_per_s=rate, tokens_per_s=tokens * world_size / dt, mfu=mfu,
                   data_wait=t_data / dt, eta_s=eta, eta_epoch_s=eta_epoch, epoch=micro_pos / sampler.per_epoch, bad_images=n_bad)
        write_log(rec)
        log(f'iter {iter_num}/{max_iters} | loss {lossf:.4f} | lr {lr:.2e} | grad {float(grad_norm):.3f} | '
            f'{dt * 1000:.0f} ms | {rate:.1f} samples/s | {rec["tokens_per_s"]:.0f} tok/s | '
            + (f'mfu {mfu * 100:.1f}% | ' if mfu is not None else '')
            + f'data {t_data / dt * 100:.0f}% | epoch {rec["epoch"]:.2f} (ends in {eta_epoch / 60:.1f} min) | '
            f'eta {eta / 60:.1f} min')
        if bench_iters and done > 2:  # the first steps pay for compilation and warmup
            bench['t'].append(dt)
            bench['samples'] += samples * world_size
            bench['tokens'] += tokens * world_size
            bench['flops'] += flops
            if len(bench['t']) >= bench_iters:
                T = sum(bench['t'])
                mem = f'{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB' if device.type == 'cuda' else 'n/a'
                log(f'bench: {bench["samples"] / T:.1f} samples/s | {bench["tokens"] / T:.0f} tok/s | '
                    + (f'mfu {bench["flops"] / T / (peak * world_size) * 100:.1f}% | ' if peak else 'mfu n/a | ')
                    + f'peak mem {mem} | {T / len(bench["t"]) * 1000:.0f} ms/step')
                break

    # preemption: agree across ranks, checkpoint, exit cleanly
    stop = stop_signal is not None
    if ddp:
        flag = torch.tensor([int(stop)], device=device if device.type == 'cuda' else 'cpu')
        dist.all_reduce(flag)
        stop = bool(flag.item())
    if stop:
        checkpoint(ckpt_path)
        log(f'signal received: checkpoint written to {ckpt_path} at iter {iter_num}; '
            f'resume with --init_from=resume')
        break

# the evaluation report of the final connector (rank 0; the others are done)
if master and eval_report_num and iter_num >= max_iters and not bench_iters and stop_signal is None:
    with raw_connector():
        m = sample.evaluate(vlm, tok, dict(model_args, checkpoint=ckpt_path), prepared,
                            os.path.join(out_dir, 'report'), eval_report_num,
                            batch_size=batch_size)
    log(f'report: {sample.summary_line(m)} -> {out_dir}/report/report.md')
if ddp:
    dist.destroy_process_group()
