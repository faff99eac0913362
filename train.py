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
from contextlib import nullcontext

import torch
import torch.distributed as dist

import data
import evaluate
import model as M
from common import atomic_torch_save, autocast as autocast_for, first_line, one_line_errors, resolve_device
from configurator import configure, require

one_line_errors()
# -----------------------------------------------------------------------------
# config: every global below can be set by a config file or --key=value
out_dir = 'out'
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
data_dir = 'data/llava_pretrain/prepared'  # or several with weights: 'data/a/prepared:1.0,data/b/prepared:0.5'
image_root = ''  # '' = where meta.json says; set it when the images moved (one dataset only)
# model (saved in every checkpoint): the defaults and what each key means are in model.MODEL_DEFAULTS
(vision, llm, tokenizer, vision_feature_layer, n_latents, resampler_width, resampler_depth, resampler_heads,
 resampler_mlp_ratio, proj_hidden, proj_dropout, vision_ln, match_embed_scale,
 image_brackets) = M.MODEL_DEFAULTS.values()
# data
batch_size = 16  # micro-batch per rank
gradient_accumulation_steps = 32  # total over all ranks; effective batch = batch_size * this
max_seq_len = 1536
multi_image_frac = 0.02  # fraction of samples that mix two captions into Template B
group_by_length = True
packing = False
num_workers = 4
max_train_samples = 0  # > 0: train on the first N samples (of each dataset) only (trial runs)
# optimizer and schedule
learning_rate = 1e-4
weight_decay = 0.01  # matrices only; norms, biases, latents, gains get 0
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0  # 0: no clipping
epochs = 1.0
max_iters = -1  # -1: derived from epochs
warmup_frac = 0.02
min_lr_frac = 0.1  # cosine decays to this fraction of the peak
# evaluation, logging, checkpoints
eval_interval = 500
eval_iters = 50  # val batches per eval and dataset (0: the whole val split)
log_interval = 10
sample_interval = 1000  # golden-set captions -> out_dir/samples.jsonl (0: never)
eval_report_num = 200  # at the end: evaluation report on this many val samples (0: no report)
eval_max_new_tokens = 64  # caption length cap for golden samples and the report
always_save_checkpoint = True  # ckpt.pt at every eval; ckpt_best.pt when val improves
max_nonfinite = 5  # consecutive non-finite steps before the run stops
wandb_log = False
wandb_project = 'stage1-align'
wandb_run_name = ''
# system
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bf16 on GPU, fp32 on CPU), 'bfloat16', 'float32' (bf16 works on a CPU too)
compile = False
grad_checkpointing = False
attn_implementation = 'sdpa'  # 'sdpa', 'eager', 'flash_attention_2'
tf32 = True
seed = 1337
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
# every setting checked once, before any work: one line per mistake
for _k in ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'max_seq_len',
           'eval_max_new_tokens', 'n_latents', 'resampler_width', 'resampler_depth', 'resampler_heads',
           'resampler_mlp_ratio', 'proj_hidden', 'max_nonfinite'):
    require(config[_k] > 0, f'{_k} must be a positive integer, got {config[_k]}')
for _k in ('num_workers', 'eval_iters', 'sample_interval', 'eval_report_num', 'max_train_samples', 'weight_decay',
           'grad_clip', 'warmup_frac', 'min_lr_frac', 'multi_image_frac', 'proj_dropout', 'beta1', 'beta2'):
    require(0 <= config[_k] < float('inf'), f'{_k} must be >= 0, got {config[_k]}')
require(0 < learning_rate < float('inf'), f'learning_rate must be a positive number, got {learning_rate}')
require(0 < epochs < float('inf'), f'epochs must be positive, got {epochs}')
require(max_iters >= -1, f'max_iters must be -1 (from epochs) or >= 0, got {max_iters}')
require(warmup_frac < 1 and min_lr_frac <= 1 and multi_image_frac <= 1 and proj_dropout < 1 and beta1 < 1 and
        beta2 < 1, 'warmup_frac, proj_dropout, beta1, beta2 must be < 1 and min_lr_frac, multi_image_frac <= 1')
require(resampler_width % resampler_heads == 0,
        f'resampler_width ({resampler_width}) must be divisible by resampler_heads ({resampler_heads})')
require(init_from in ('scratch', 'resume'), f"init_from must be 'scratch' or 'resume', got '{init_from}'")
require(attn_implementation in ('sdpa', 'eager', 'flash_attention_2'),
        f"attn_implementation must be sdpa, eager or flash_attention_2, got '{attn_implementation}'")
require(out_dir.strip() != '', "out_dir is empty: give a folder for checkpoints and logs (e.g. --out_dir=out)")

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
device, ptdtype = resolve_device(device, dtype)
autocast = autocast_for(device, ptdtype)
if tf32 and device.type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
require(gradient_accumulation_steps % world_size == 0,
        f'gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the number of ranks '
        f'({world_size})')
accum = gradient_accumulation_steps // world_size
torch.manual_seed(seed + rank)


def log(*a):
    if master:
        print(*a, flush=True)


# preemption: SIGTERM/SIGINT (a scheduler stops the whole process group) ask for a checkpoint
# at the next step boundary, then a clean exit. Installed before the loaders start their
# workers, which ignore both signals (data.make_loader), so the run always gets to save.
stop_signal = None


def on_signal(signum, frame):
    global stop_signal
    if stop_signal is not None:  # asked twice: stop now, without the checkpoint
        raise KeyboardInterrupt
    stop_signal = signum


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)

# -----------------------------------------------------------------------------
# data first: a missing dataset should fail in a second, not after loading 16 GB of weights
sources = data.open_sources(data_dir, image_root)
meta = sources[0][1]['meta']
tokenizer = tokenizer or meta['tokenizer']
require(tokenizer == meta['tokenizer'], f"data in {data_dir} was tokenised with '{meta['tokenizer']}' but "
                                        f"tokenizer='{tokenizer}'; re-run prepare_llava.py --tokenizer={tokenizer}")
tok = M.load_tokenizer(tokenizer)
model_args = {k: globals()[k] for k in M.MODEL_KEYS}
config['tokenizer'] = tokenizer
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
# what a resumed run must share with the run it continues, or its data order means nothing
ORDER_KEYS = ('data_dir', 'batch_size', 'gradient_accumulation_steps', 'seed', 'multi_image_frac',
              'group_by_length', 'max_train_samples')

# -----------------------------------------------------------------------------
# model: frozen backbones + connector (the checkpoint's, when resuming)
ckpt = None
if init_from == 'resume':
    ckpt = M.load_checkpoint(ckpt_path)
    require(ckpt.get('version', 1) >= 2 and all(k in ckpt for k in ('optimizer', 'iter_num', 'global_pos', 'rng')),
            f'{ckpt_path} cannot be resumed exactly: it is from an older train.py or not a full training checkpoint '
            f'(sample.py still loads it); start a new out_dir')
    diff = [f'{k}: {ckpt["model_args"].get(k)!r} -> {v!r}' for k, v in model_args.items()
            if ckpt['model_args'].get(k) != v]
    require(not diff, f'{ckpt_path} was trained with a different model config ({", ".join(diff)}); resume with '
                      f'the original config')
    diff = [f'{k}: {ckpt["config"].get(k)!r} -> {config[k]!r}' for k in ORDER_KEYS
            if k in ckpt.get('config', {}) and ckpt['config'][k] != config[k]]
    require(not diff, f'{ckpt_path} was trained with other data settings ({", ".join(diff)}): its data position '
                      f'would point elsewhere; resume with the original values or start a new out_dir')
t0 = time.time()
vlm = M.build_vlm(model_args, tok, device, ptdtype, connector_state=ckpt['connector'] if ckpt else None,
                  attn_implementation=attn_implementation)
connector = vlm.connector  # the module that is optimised and saved
if grad_checkpointing:
    vlm.enable_grad_checkpointing()
log(f'model: vision {M.count_params(vlm.vision) / 1e6:.1f}M + llm {M.count_params(vlm.llm) / 1e6:.1f}M frozen '
    f'({str(ptdtype).removeprefix("torch.")}, {attn_implementation} attention), connector '
    f'{M.count_params(connector) / 1e6:.2f}M trainable ({time.time() - t0:.1f}s to build)')
if compile:
    vlm.llm.get_decoder().compile()
    vlm.vision.compile()
    connector.compile()
# the forward pass goes through DDP's wrapper, which all-reduces the connector's gradients;
# only the connector is wrapped: DDP would otherwise broadcast all 8B frozen weights
train_connector = torch.nn.parallel.DistributedDataParallel(
    connector, device_ids=[device.index] if device.type == 'cuda' else None) if ddp else connector

# -----------------------------------------------------------------------------
# optimizer: decay matrices only (norms, biases, latents and gains are not weights to shrink)
decay = [p for n, p in connector.named_parameters() if p.dim() >= 2 and n != 'latents']
no_decay = [p for n, p in connector.named_parameters() if p.dim() < 2 or n == 'latents']
optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)],
                              lr=learning_rate, betas=(beta1, beta2), fused=device.type == 'cuda')

builder = data.SampleBuilder(tok, n_latents, meta['slot_id'], meta['eos_id'], vlm.brackets, max_seq_len)
train_sets = [data.CaptionDataset(p, 'train', builder, vlm.image_spec) for _, p, _ in sources]
val_sets = [data.CaptionDataset(p, 'val', builder, vlm.image_spec, replace_bad=False) for _, p, _ in sources]
if max_train_samples > 0:
    for ds in train_sets:
        ds.index = ds.index[:max_train_samples]
order = data.BatchOrder(train_sets, [w for _, _, w in sources], batch_size, seed, rank, world_size,
                        multi_image_frac=multi_image_frac, group_by_length=group_by_length)
steps_per_epoch = max(1, order.per_epoch // accum)
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
iter_num, global_pos, best_val_loss, nonfinite_total, bad_total, last_eval_iter = 0, 0, float('inf'), 0, 0, -1
unlogged = [0] * (1 + len(sources))  # bad images and samples per source since the last log line, all ranks
if ckpt:
    optimizer.load_state_dict(ckpt['optimizer'])
    iter_num, best_val_loss, last_eval_iter = ckpt['iter_num'], ckpt['best_val_loss'], ckpt['last_eval_iter']
    global_pos = ckpt['global_pos']  # micro-batches over all ranks: resumable with another world size
    nonfinite_total, bad_total = ckpt['nonfinite_total'], ckpt['bad_images_total']
    saved = ckpt.get('unlogged_counts') or unlogged
    bad_total -= saved[0]  # counted again at the next log line, with the steps after the checkpoint
    if master:  # rank 0 carries the sums over all ranks
        unlogged = saved
micro_pos = global_pos // world_size

order.start = micro_pos
pin = device.type == 'cuda'
train_loader = data.make_loader(data.Mixture(train_sets), order, packing, max_seq_len, num_workers, meta['eos_id'],
                                pin, seed)
train_iter = iter(train_loader)
# val: a fixed order (the first samples of each dataset), each rank a share of the batches,
# decoded by the loader's workers like training data
val_loaders = [data.make_loader(data.Mixture(val_sets), data.eval_batches(len(v), batch_size, eval_iters or None,
                                                                          source=s)[rank::world_size],
                                packing, max_seq_len, num_workers, meta['eos_id'], pin, seed)
               for s, v in enumerate(val_sets)]
if ckpt:
    # the RNG state is restored after the loader iterators exist: creating one can draw from
    # the global generator, and dropout must continue exactly where it stopped
    rng = ckpt['rng'][min(rank, len(ckpt['rng']) - 1)]
    torch.set_rng_state(rng['cpu'])
    if device.type == 'cuda' and rng.get('cuda') is not None:
        torch.cuda.set_rng_state(rng['cuda'], device)
    log(f'resumed from {ckpt_path} at iter {iter_num}')
    del ckpt


def estimate_loss():
    """Token-weighted caption loss on each dataset's val batches, summed over ranks: (loss,
    loss per dataset, caption tokens it was measured on)."""
    vlm.eval()
    sums = torch.tensor([evaluate.caption_loss_sums(vlm, vl, autocast)[:2] for vl in val_loaders],
                        dtype=torch.float64, device=device).reshape(-1, 2)
    if ddp:
        dist.all_reduce(sums)
    vlm.train()
    per_source = {name: (s / c).item() if c else float('nan') for (name, _, _), (s, c) in zip(sources, sums)}
    return (sums[:, 0].sum() / sums[:, 1].sum().clamp(min=1)).item(), per_source, int(sums[:, 1].sum())


def rng_states():
    """Every rank's RNG state (collective under DDP: every rank must call it)."""
    state = dict(cpu=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state(device) if device.type == 'cuda' else None)
    if not ddp:
        return [state]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, state)
    return gathered


def checkpoint_all_ranks(path):
    """Collective: every rank calls it (the RNG states are gathered); rank 0 writes the file,
    atomically (temp file, fsync, rename: a crash mid-write leaves the old file intact)."""
    rng = rng_states()
    # what the steps since the last log line counted, so the total and the next log line of a
    # run resumed from a checkpoint between two log lines still count those steps
    counts = torch.tensor([bad_since_log, *source_counts], dtype=torch.float64, device=device)
    if ddp:
        dist.all_reduce(counts)
    counts = [int(c) for c in counts]
    if master:
        atomic_torch_save(dict(
            version=2, connector=connector.state_dict(), optimizer=optimizer.state_dict(), model_args=model_args,
            config=config, iter_num=iter_num, global_pos=global_pos, best_val_loss=best_val_loss,
            nonfinite_total=nonfinite_total, bad_images_total=bad_total + counts[0], unlogged_counts=counts,
            last_eval_iter=last_eval_iter, rng=rng), path)


def trim_logs(upto_iter, upto_eval):
    """On resume, drop the records of the steps that are about to be redone, so a plotted
    curve has one point per step (and a torn last line from a kill is dropped too)."""
    for name in ('log.jsonl', 'samples.jsonl'):
        path = os.path.join(out_dir, name)
        keep = [r for r in evaluate.read_log(path)
                if r.get('iter', 0) <= (upto_eval if 'val_loss' in r else upto_iter)]
        if os.path.exists(path):
            with open(path, 'w') as f:
                f.writelines(json.dumps(r) + '\n' for r in keep)


if master:
    os.makedirs(out_dir, exist_ok=True)
    if init_from == 'resume':
        trim_logs(iter_num, last_eval_iter)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    logf = open(os.path.join(out_dir, 'log.jsonl'), 'a')
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name or None, config=config)
log(f'data: {" + ".join(f"{name} {len(ds):,}" for (name, _, _), ds in zip(sources, train_sets))} train / '
    f'{sum(len(v) for v in val_sets):,} val samples, {steps_per_epoch} steps/epoch at '
    f'{batch_size * gradient_accumulation_steps} samples/step; training {max_iters} steps')


def write_log(rec):
    if master:
        logf.write(json.dumps(rec) + '\n')
        logf.flush()
        if wandb_log:
            wandb.log(rec, step=rec['iter'])


def sample_golden():
    """Greedy captions for the golden val samples, appended to samples.jsonl. A failure here
    is a warning: sample logs are worth less than the run."""
    golden = [i for i in meta.get('golden', []) if i < len(val_sets[0])]
    if not golden:
        return
    vlm.eval()
    try:
        rows, skipped = evaluate.caption_rows(vlm, tok, val_sets[0], golden, dict(max_new_tokens=eval_max_new_tokens),
                                              batch_size, prefix='golden')
        with open(os.path.join(out_dir, 'samples.jsonl'), 'a') as f:
            for r in rows:
                f.write(json.dumps(dict(iter=iter_num, id=r['id'], generation=r['generation'],
                                        reference=r['references'][0])) + '\n')
        for r in rows[:2]:
            log(f'  sample {r["id"]}: {r["generation"]!r}  (ref: {r["references"][0]!r})')
        if skipped:
            log(f'  warning: {skipped} golden samples skipped (unreadable images)')
    except Exception as e:
        log(f'  warning: golden-set sampling failed at iter {iter_num} ({type(e).__name__}: {first_line(e)}); '
            f'training goes on')
    vlm.train()


# -----------------------------------------------------------------------------
# the loop
vlm.train()
consecutive_nonfinite, bad_since_log, source_counts = 0, unlogged[0], unlogged[1:]
peak = M.peak_flops(device)
t_start, it_start = time.time(), iter_num
while True:
    # a checkpoint written right after an eval resumes without redoing it; a preemption
    # checkpoint (written before its step's eval) does not
    resumed_here = iter_num == last_eval_iter
    if (iter_num % eval_interval == 0 or iter_num >= max_iters) and not resumed_here:
        val_loss, val_by_source, val_tokens = estimate_loss()
        last_eval_iter = iter_num
        improved = val_loss < best_val_loss
        best_val_loss = min(best_val_loss, val_loss)
        log(f'eval {iter_num}: val loss {val_loss:.4f} | caption ppl {math.exp(min(val_loss, 50)):.2f}'
            + (' | ' + ' | '.join(f'{k} {v:.4f}' for k, v in val_by_source.items()) if len(sources) > 1 else '')
            + (' (best)' if improved and iter_num > 0 else ''))
        write_log(dict(iter=iter_num, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)), val_tokens=val_tokens,
                       **({'val_loss_by_source': val_by_source} if len(sources) > 1 else {})))
        if iter_num > 0 and (always_save_checkpoint or improved or iter_num >= max_iters):
            checkpoint_all_ranks(ckpt_path)
            if improved and master:
                shutil.copyfile(ckpt_path, ckpt_path + '.best.tmp')
                os.replace(ckpt_path + '.best.tmp', os.path.join(out_dir, 'ckpt_best.pt'))
    if sample_interval and iter_num % sample_interval == 0 and iter_num > 0 and master and not resumed_here:
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
    global_pos += accum * world_size
    micro_pos = global_pos // world_size
    n_targets = sum(b['n_targets'] for b in batches)
    n_step = torch.tensor(float(n_targets), device=device)  # caption tokens in the step, all ranks after the reduce
    if ddp:
        dist.all_reduce(n_step)
    loss_sum = torch.zeros((), device=device)
    for micro, batch in enumerate(batches):
        images, input_ids, target_pos, target_ids, position_ids = data.to_device(batch, device)
        # sync connector gradients across ranks only on the last micro-step
        sync = not ddp or micro == accum - 1
        with (nullcontext() if sync else train_connector.no_sync()), autocast:
            loss = vlm(images, input_ids, target_pos, target_ids, position_ids=position_ids, reduction='sum',
                       connector=train_connector)
        # DDP averages gradients over ranks; x world_size makes that the token mean over all
        (loss * (world_size / n_step)).backward()
        loss_sum += loss.detach()
    bad_since_log += sum(b['n_bad'] for b in batches)
    for b in batches:
        for s in b['sources']:
            source_counts[s] += 1
    # grad_clip=0: no clipping, but the norm is still measured (and logged)
    grad_norm = torch.nn.utils.clip_grad_norm_(connector.parameters(), grad_clip or float('inf'))
    # grads are all-reduced, so every rank sees the same norm and takes the same decision
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        consecutive_nonfinite += 1
        nonfinite_total += 1
        iter_num += 1
        log(f'iter {iter_num}: non-finite loss/grad, step skipped ({consecutive_nonfinite} in a row)')
        write_log(dict(iter=iter_num, skipped='non-finite', nonfinite_total=nonfinite_total))
        if consecutive_nonfinite >= max_nonfinite:
            checkpoint_all_ranks(os.path.join(out_dir, 'ckpt_last_good.pt'))
            require(False, f'{consecutive_nonfinite} non-finite steps in a row at iter {iter_num}; stopped. The '
                           f'last good connector is in {out_dir}/ckpt_last_good.pt: lower learning_rate or check '
                           f'the data, then resume')
        continue
    consecutive_nonfinite = 0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    if iter_num % log_interval == 0 or iter_num == max_iters:
        if ddp:  # all ranks' tokens and bad images, not rank 0's share
            counts = torch.tensor([bad_since_log, *source_counts], dtype=torch.float64, device=device)
            dist.all_reduce(counts)
            dist.all_reduce(loss_sum)
            bad_since_log, source_counts = int(counts[0]), [int(c) for c in counts[1:]]
        bad_total += bad_since_log
        lossf = (loss_sum / n_step).item()  # token mean over the step; the sync point, only on log steps
        if device.type == 'cuda':
            torch.cuda.synchronize()
        dt = time.time() - t0
        samples = sum(b['n_samples'] for b in batches) * world_size
        flops = M.flops_per_batch(vlm, sum(b['images'].shape[0] for b in batches),
                                  [n for b in batches for n in b['sample_lens']], n_targets) * world_size
        per_step = (time.time() - t_start) / (iter_num - it_start)
        eta = per_step * (max_iters - iter_num)
        eta_epoch = per_step * (order.per_epoch - micro_pos % order.per_epoch) / accum
        mfu = flops / dt / (peak * world_size) if peak else None
        rec = dict(iter=iter_num, loss=lossf, lr=lr, grad_norm=float(grad_norm), dt_ms=dt * 1000,
                   samples_per_s=samples / dt, tokens_per_s=sum(b['n_tokens'] for b in batches) * world_size / dt,
                   mfu=mfu, data_wait=t_data / dt, eta_s=eta, eta_epoch_s=eta_epoch, epoch=micro_pos / order.per_epoch,
                   bad_images=bad_since_log, bad_images_total=bad_total)
        if len(sources) > 1:
            rec['samples_by_source'] = {name: c for (name, _, _), c in zip(sources, source_counts)}
        write_log(rec)
        log(f'iter {iter_num}/{max_iters} | loss {lossf:.4f} | lr {lr:.2e} | grad {float(grad_norm):.3f} | '
            f'{dt * 1000:.0f} ms | {rec["samples_per_s"]:.1f} samples/s | {rec["tokens_per_s"]:.0f} tok/s | '
            + (f'mfu {mfu * 100:.1f}% | ' if mfu is not None else '')
            + f'data {t_data / dt * 100:.0f}% | epoch {rec["epoch"]:.2f} (ends in {eta_epoch / 60:.1f} min) | '
            f'eta {eta / 60:.1f} min' + (f' | bad images {bad_since_log} ({bad_total} in all)' if bad_since_log else '')
            + (' | ' + ' '.join(f'{k} {v}' for k, v in rec['samples_by_source'].items()) if len(sources) > 1 else ''))
        bad_since_log, source_counts = 0, [0] * len(sources)

    # preemption: agree across ranks, checkpoint, exit cleanly
    stop = stop_signal is not None
    if ddp:
        flag = torch.tensor([int(stop)], device=device)
        dist.all_reduce(flag)
        stop = bool(flag.item())
    if stop:
        checkpoint_all_ranks(ckpt_path)
        log(f'signal received: checkpoint written to {ckpt_path} at iter {iter_num}; resume with --init_from=resume')
        break

# the evaluation report of the final connector (rank 0; the others are done). The run's
# result is already saved, so a failure here is a warning, not a failed run.
if master and eval_report_num and iter_num >= max_iters and stop_signal is None:
    vlm.eval()
    try:
        m = evaluate.evaluate(vlm, tok, dict(model_args, checkpoint=ckpt_path), sources[0][1],
                              os.path.join(out_dir, 'report'), num=eval_report_num, batch_size=batch_size,
                              max_new_tokens=eval_max_new_tokens, log_path=os.path.join(out_dir, 'log.jsonl'))
        log(f'report: {evaluate.summary_line(m)} -> {out_dir}/report/report.md')
    except Exception as e:
        log(f'warning: the final report failed ({type(e).__name__}: {first_line(e)}); the checkpoint is saved - '
            f'run `python sample.py --ckpt {ckpt_path} --eval` to write it')
if ddp:
    dist.destroy_process_group()
