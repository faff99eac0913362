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
import datetime
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import data
import model as M
from configurator import (UserError, atomic_copy, atomic_torch_save, atomic_write_text, check_out_dir, configure,
                          first_line, leave, one_line_errors, os_errors, require, resolve_device)
from evaluation import benchmarks, evaluate, report
from gpu import flops
from sources import backbones as B
from sources.backbones import load_tokenizer
from sources.images import image_spec
from sources.tokens import prepared_rules

one_line_errors()
# -----------------------------------------------------------------------------
# config: every global below can be set by a config file or --key=value
out_dir = 'out'
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
data_dir = 'data/llava_pretrain/prepared'  # or several with weights: 'data/a/prepared:1.0,data/b/prepared:0.5'
image_root = ''  # '' = where meta.json says; set it when the images moved (one dataset only)
# model (saved in every checkpoint): the defaults and what each key means are in model.MODEL_DEFAULTS
(vision, llm, tokenizer, slot_token, vision_feature_layer, n_latents, resampler_width, resampler_depth,
 resampler_heads, resampler_mlp_ratio, proj_hidden, proj_dropout, vision_ln, match_embed_scale,
 image_brackets) = M.MODEL_DEFAULTS.values()
# data
batch_size = 16  # micro-batch per rank
total_batch_size = 512  # samples per optimizer step over all ranks (total_batch_size / batch_size micro-batches)
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
eval_controls = True  # also the val loss with the images shuffled and with no image: does the connector see?
eval_bench = ''  # '', 'coco', 'nocaps' or 'flickr30k': also caption a benchmark subset at each eval
eval_bench_ann = ''  # its annotation file as distributed (dataset_coco.json, captions_val2014.json, ...)
eval_bench_images = ''  # its image folder
eval_bench_num = 500  # the first N images of its (test) split
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
compile = False  # torch.compile of each backbone layer and the connector (model.VLM.compile_blocks)
grad_checkpointing = False
attn_implementation = 'sdpa'  # 'sdpa', 'eager', 'flash_attention_2'
tf32 = True
ddp_timeout = 1800  # seconds a rank waits in a collective before the run stops with an error
seed = 1337
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
# every setting checked once, before any work: one line per mistake
for _k in ('batch_size', 'total_batch_size', 'eval_interval', 'log_interval', 'max_seq_len',
           'eval_max_new_tokens', 'n_latents', 'resampler_width', 'resampler_depth', 'resampler_heads',
           'resampler_mlp_ratio', 'proj_hidden', 'max_nonfinite', 'ddp_timeout'):
    require(config[_k] > 0, f'{_k} must be a positive integer, got {config[_k]}')
for _k in ('num_workers', 'eval_iters', 'sample_interval', 'eval_report_num', 'max_train_samples', 'weight_decay',
           'grad_clip', 'warmup_frac', 'min_lr_frac', 'multi_image_frac', 'proj_dropout', 'beta1', 'beta2'):
    require(0 <= config[_k] < float('inf'), f'{_k} must be >= 0, got {config[_k]}')
require(0 < learning_rate < float('inf'), f'learning_rate must be a positive number, got {learning_rate}')
require(0 < epochs < float('inf'), f'epochs must be positive, got {epochs}')
require(max_iters >= -1, f'max_iters must be -1 (from epochs) or >= 0, got {max_iters}')
require(warmup_frac < 1 and min_lr_frac <= 1 and multi_image_frac <= 1 and proj_dropout < 1 and beta1 < 1 and
        beta2 < 1, 'warmup_frac, proj_dropout, beta1, beta2 must be < 1 and min_lr_frac, multi_image_frac <= 1')
require(total_batch_size % batch_size == 0,
        f'total_batch_size={total_batch_size} must be a multiple of batch_size={batch_size}: a step is a whole number '
        f'of micro-batches (e.g. total_batch_size={max(1, total_batch_size // batch_size) * batch_size} or '
        f'{(total_batch_size // batch_size + 1) * batch_size})')
require(resampler_width % resampler_heads == 0,
        f'resampler_width ({resampler_width}) must be divisible by resampler_heads ({resampler_heads})')
require(init_from in ('scratch', 'resume'), f"init_from must be 'scratch' or 'resume', got '{init_from}'")
require(attn_implementation in ('sdpa', 'eager', 'flash_attention_2'),
        f"attn_implementation must be sdpa, eager or flash_attention_2, got '{attn_implementation}'")
require(out_dir.strip() != '', "out_dir is empty: give a folder for checkpoints and logs (e.g. --out_dir=out)")
require(eval_bench in ('', 'coco', 'nocaps', 'flickr30k'),
        f"eval_bench must be '', coco, nocaps or flickr30k, got '{eval_bench}'")
require(not eval_bench or (eval_bench_ann and eval_bench_images and eval_bench_num >= 0),
        'eval_bench needs eval_bench_ann (the annotation file) and eval_bench_images (the image folder)')

# DDP: torchrun sets RANK/WORLD_SIZE; each rank holds its own frozen backbones
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    backend = 'nccl' if torch.cuda.is_available() and device != 'cpu' else 'gloo'
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=ddp_timeout))
    if sys.version_info < (3, 12):
        # CPython before 3.12 can fork a loader worker while a torch thread holds the lock of the
        # interpreter's thread states (taken to let go of a finished collective's tensors): that
        # worker then hangs before its first line, and the run with it. Before each fork, the
        # GIL is let go long enough for those threads to finish.
        os.register_at_fork(before=lambda: time.sleep(0.05))
    rank, local_rank, world_size = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
    if backend == 'nccl':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
device, ptdtype = resolve_device(device, dtype)
if tf32 and device.type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
micro_per_step = total_batch_size // batch_size  # global micro-batches per step, spread over the ranks
torch.manual_seed(seed + rank)


def log(*a, sep=' '):
    if master and a:
        print(*a, sep=sep, flush=True)


ranks_ok, agreed = evaluate.ranks_ok, evaluate.agreed  # a failure on one rank stops every rank


# preemption: a stop signal asks for a checkpoint at the next safe point, then exit 0. A
# scheduler's stop signals every process of the job, and torchrun forwards SIGTERM to its
# workers once more (then SIGKILL 30 s later): any number of SIGTERMs is one stop. Only a
# person's second Ctrl-C, a second apart, stops at once without a checkpoint. Long work
# (evals, captioning, the report) checks the flag between batches. Installed before the
# loaders start their workers, which ignore both signals (data.make_loader).
stop = evaluate.stop
first_sigint = None


def on_signal(signum, frame):
    global first_sigint
    if signum == signal.SIGINT:
        now = time.monotonic()
        if first_sigint is not None and now - first_sigint > 1.0:  # not torchrun's echo of the same one
            raise KeyboardInterrupt('a second Ctrl-C stops at once, without a checkpoint')
        first_sigint = first_sigint or now
    stop.set()


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)

# -----------------------------------------------------------------------------
# data first: a missing dataset should fail in a second, not after loading 16 GB of weights.
# Every rank checks what it reads itself (node-local copies differ): a failure on any rank
# stops all of them with its line.


def open_inputs():
    if master:  # the one rank that writes there (other nodes need not see the folder)
        check_out_dir(out_dir)
    srcs = data.open_sources(data_dir, image_root)
    if eval_bench:  # read now: a wrong file fails in a second, not after the first eval
        benchmarks.read_benchmark(eval_bench, eval_bench_ann, eval_bench_images, num=eval_bench_num)
    # the loader workers of every rank on this node share its /dev/shm
    size = image_spec(vision, B.vision_config(vision))['size']
    data.check_shm(batch_size, size, num_workers, int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    return srcs


sources = agreed(open_inputs)
meta = sources[0][1]['meta']
tokenizer = tokenizer or meta['tokenizer']
require(tokenizer == meta['tokenizer'], f"data in {data_dir} was tokenised with '{meta['tokenizer']}' but "
                                        f"tokenizer='{tokenizer}'; re-run prepare_llava.py --tokenizer={tokenizer}")
tok = load_tokenizer(tokenizer)
slot_token = prepared_rules(tok, meta, slot_token, f'data in {data_dir}')['slot_token']  # the data's, checked
model_args = {k: globals()[k] for k in M.MODEL_KEYS}
config['tokenizer'], config['slot_token'] = tokenizer, slot_token
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
# what a resumed run must share with the run it continues, or its data order means nothing
ORDER_KEYS = ('data_dir', 'batch_size', 'total_batch_size', 'seed', 'multi_image_frac', 'group_by_length',
              'max_train_samples')

# -----------------------------------------------------------------------------
# model: frozen backbones + connector (the checkpoint's, when resuming)
ckpt = None
if init_from == 'resume':
    ckpt = M.load_checkpoint(ckpt_path)
    require(ckpt.get('version', 1) >= 2 and all(k in ckpt for k in ('optimizer', 'iter_num', 'global_pos', 'rng')),
            f'{ckpt_path} cannot be resumed exactly: it is from an older train.py or not a full training checkpoint '
            f'(sample.py still loads it); start a new out_dir')
    diff = [f'{k}: {ckpt["model_args"].get(k)!r} -> {v!r}' for k, v in model_args.items()
            if ckpt['model_args'].get(k) != v and not (k == 'slot_token' and not ckpt['model_args'][k])]
    require(not diff, f'{ckpt_path} was trained with a different model config ({", ".join(diff)}); resume with '
                      f'the original config')
    diff = [f'{k}: {ckpt["config"].get(k)!r} -> {config[k]!r}' for k in ORDER_KEYS
            if k in ckpt.get('config', {}) and ckpt['config'][k] != config[k]]
    require(not diff, f'{ckpt_path} was trained with other data settings ({", ".join(diff)}): its data position '
                      f'would point elsewhere; resume with the original values or start a new out_dir')
t0 = time.time()
vlm = agreed(lambda: M.build_vlm(model_args, tok, device, ptdtype, attn_implementation=attn_implementation,
                                 connector_state=ckpt['connector'] if ckpt else None))
connector = vlm.connector  # the module that is optimised and saved
if grad_checkpointing:
    vlm.enable_grad_checkpointing()
log(f'model: vision {M.count_params(vlm.vision) / 1e6:.1f}M + llm {M.count_params(vlm.llm) / 1e6:.1f}M frozen '
    f'({str(ptdtype).removeprefix("torch.")}, {attn_implementation} attention), connector '
    f'{M.count_params(connector) / 1e6:.2f}M trainable ({time.time() - t0:.1f}s to build)')
if compile:
    vlm.compile_blocks()
# the forward pass goes through DDP's wrapper, which all-reduces the connector's gradients;
# only the connector is wrapped: DDP would otherwise broadcast all 8B frozen weights. The
# gradients are views into DDP's buckets: no second copy of them
train_connector = torch.nn.parallel.DistributedDataParallel(
    connector, device_ids=[device.index] if device.type == 'cuda' else None,
    gradient_as_bucket_view=True) if ddp else connector

# -----------------------------------------------------------------------------
# optimizer: decay matrices only (norms, biases, latents and gains are not weights to shrink)
decay = [p for n, p in connector.named_parameters() if p.dim() >= 2 and n != 'latents']
no_decay = [p for n, p in connector.named_parameters() if p.dim() < 2 or n == 'latents']
optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)],
                              lr=learning_rate, betas=(beta1, beta2), fused=device.type in ('cuda', 'cpu'))
# fused AdamW skips its update on the device when told a step is non-finite (as under a
# GradScaler), so no step waits for the GPU to find out; other devices decide on the host
skip_on_device = optimizer.defaults.get('fused', False)

builder = data.SampleBuilder(tok, n_latents, vlm.slot_id, vlm.eos_id, vlm.brackets, max_seq_len, vlm.bos_id)
train_sets = [data.CaptionDataset(p, 'train', builder, vlm.image_spec) for _, p, _ in sources]
val_sets = [data.CaptionDataset(p, 'val', builder, vlm.image_spec, replace_bad=False) for _, p, _ in sources]
if max_train_samples > 0:
    for ds in train_sets:
        ds.index = ds.index[:max_train_samples]
order = data.BatchOrder(train_sets, [w for _, _, w in sources], batch_size, seed, rank, world_size,
                        multi_image_frac=multi_image_frac, group_by_length=group_by_length)
steps_per_epoch = max(1, order.per_epoch // micro_per_step)
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
order.start = global_pos
pin = device.type == 'cuda'
# packed rows: max_seq_len tokens each; under flash-attention one row per micro-batch (data.collate)
row_len = None if attn_implementation == 'flash_attention_2' else max_seq_len
train_iter = iter(data.make_loader(data.Mixture(train_sets), order, packing, row_len, num_workers, meta['eos_id'],
                                   pin, seed))
# val: a fixed order (the first samples of each dataset), each rank a share of the batches,
# decoded by loader workers that exist only while an eval runs (at most 2 per rank: persistent
# ones would sit idle between evals, a few hundred MB each, 8 ranks a node)
val_loaders = [data.make_loader(data.Mixture(val_sets), data.eval_batches(len(v), batch_size, eval_iters or None,
                                                                          source=s)[rank::world_size],
                                packing, row_len, min(num_workers, 2), meta['eos_id'], pin, seed, persistent=False)
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
    """Token-weighted caption loss on each dataset's val batches, summed over ranks, and (with
    eval_controls) the same batches with the images shuffled and with no image. Returns
    dict(loss, by_source, shuffled, no_image, tokens, seconds, stopped); a loss with nothing to
    measure is None, never a number. stopped: a stop was asked for on some rank meanwhile (the
    losses are then partial and must not be used); every rank learns it in the same collective."""
    t0 = time.time()
    vlm.eval()
    sums = torch.zeros(len(val_loaders), 3 if eval_controls else 1, 2, dtype=torch.float64)  # (sum, tokens)
    stopped = False
    try:
        for s, vl in enumerate(val_loaders):
            sums[s] = torch.tensor(evaluate.control_loss_sums(vlm, vl, controls=eval_controls)[0])
    except evaluate.Stopped:
        stopped = True
    if ddp:
        flat = torch.cat([sums.flatten(), torch.tensor([float(stopped)], dtype=torch.float64)]).to(device)
        dist.all_reduce(flat)
        sums, stopped = flat[:-1].cpu().view_as(sums), bool(flat[-1])
    vlm.train()
    mean = lambda s: (s[..., 0].sum() / s[..., 1].sum()).item() if s[..., 1].sum() > 0 else None  # noqa: E731
    out = dict(loss=mean(sums[:, 0]), tokens=int(sums[:, 0, 1].sum()), seconds=time.time() - t0, stopped=stopped,
               by_source={name: mean(sums[s, 0]) for s, (name, _, _) in enumerate(sources) if sums[s, 0, 1] > 0})
    if eval_controls:
        out.update(shuffled=mean(sums[:, 1]), no_image=mean(sums[:, 2]))
    return out


def checkpoint_all_ranks(path, best=False):
    """Collective: every rank calls it (the RNG states are gathered); rank 0 writes the file,
    atomically (temp file, fsync, rename: a crash mid-write leaves the old file intact), and
    copies it to ckpt_best.pt the same way when `best`. A failed write stops every rank."""
    if pending_nonfinite:
        settle_nonfinite()  # the saved count of skipped steps must be exact
    rng = evaluate.all_gather(dict(cpu=torch.get_rng_state(),  # every rank's
                                   cuda=torch.cuda.get_rng_state(device) if device.type == 'cuda' else None))
    # what the steps since the last log line counted, so the total and the next log line of a
    # run resumed from a checkpoint between two log lines still count those steps
    counts = torch.tensor([bad_since_log, *source_counts], dtype=torch.float64, device=device)
    if ddp:
        dist.all_reduce(counts)
    counts = [int(c) for c in counts]

    def write():
        if master:
            atomic_torch_save(dict(
                version=2, connector=connector.state_dict(), optimizer=optimizer.state_dict(), model_args=model_args,
                config=config, iter_num=iter_num, global_pos=global_pos, best_val_loss=best_val_loss,
                nonfinite_total=nonfinite_total, bad_images_total=bad_total + counts[0], unlogged_counts=counts,
                last_eval_iter=last_eval_iter, rng=rng), path)
            if best:
                atomic_copy(path, os.path.join(out_dir, 'ckpt_best.pt'))
    agreed(write)


def open_out_dir():
    """Rank 0 makes out_dir, drops the log records a resume redoes, writes config.json and
    opens log.jsonl; a refusal of the operating system stops every rank with one line."""
    if not master:
        return None
    with os_errors(out_dir):
        os.makedirs(out_dir, exist_ok=True)
        if init_from == 'resume':  # the records of the steps about to be redone go
            for name in ('log.jsonl', 'samples.jsonl'):
                report.trim_log(os.path.join(out_dir, name), iter_num, last_eval_iter)
        atomic_write_text(os.path.join(out_dir, 'config.json'), json.dumps(config, indent=2))
        return open(os.path.join(out_dir, 'log.jsonl'), 'a')


logf = agreed(open_out_dir)
if master and wandb_log:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name or None, config=config)
log(f'data: {" + ".join(f"{name} {len(ds):,}" for (name, _, _), ds in zip(sources, train_sets))} train / '
    f'{sum(len(v) for v in val_sets):,} val samples, {steps_per_epoch} steps/epoch at {total_batch_size} samples/step'
    f' ({micro_per_step} micro-batches of {batch_size} over {world_size} rank(s)); training {max_iters} steps')
if micro_per_step % world_size:
    log(f'note: {micro_per_step} micro-batches per step do not split evenly over {world_size} ranks: each step waits '
        f'for the ranks with {-(-micro_per_step // world_size)}; a batch_size that makes them split evenly is faster')
rank_error = None  # a failure on this rank (its log file), carried to every rank by the next step's collective


def write_log(rec, line=None):
    """A record to log.jsonl (and wandb); `line` to the console. Rank 0 only."""
    global rank_error
    if not master:
        return
    try:
        with os_errors(os.path.join(out_dir, 'log.jsonl')):
            logf.write(json.dumps(rec) + '\n')
            logf.flush()
    except UserError as e:
        if not ddp:
            raise
        rank_error = rank_error or str(e)
    if wandb_log:
        wandb.log(rec, step=rec['iter'])
    if line:
        print(line, flush=True)


def sample_golden():
    """Greedy captions of the golden val samples into samples.jsonl, each rank its share.
    Returns True when a stop was asked for on some rank meanwhile."""
    vlm.eval()
    try:
        log(*evaluate.sample_golden(vlm, tok, val_sets[0], meta.get('golden', []),
                                    os.path.join(out_dir, 'samples.jsonl'), iter_num, eval_max_new_tokens,
                                    batch_size, rank, world_size), sep='\n')
    except evaluate.Stopped:
        return True
    finally:
        vlm.train()
    return False


def bench_eval():
    """Caption eval_bench_num images of a captioning benchmark, spread over the ranks, and log
    its scores (CIDEr, BLEU-4, ...) beside the val loss. A failure is a warning on every rank
    alike. Returns True when a stop was asked for on some rank meanwhile."""
    try:
        m = benchmarks.evaluate_bench(vlm, tok, eval_bench, eval_bench_ann, eval_bench_images, eval_bench_num,
                                      batch_size, max_new_tokens=eval_max_new_tokens, rank=rank, world_size=world_size)
        if master:
            write_log(*benchmarks.log_entry(m, eval_bench, iter_num))
    except evaluate.Stopped:
        return True
    except Exception as e:
        log(f'  warning: {eval_bench} at iter {iter_num} failed ({first_line(e)}); training goes on')
    return False


def run_evals():
    """The eval of iter_num: val losses, benchmark captions, then ckpt.pt (ckpt_best.pt when val
    improved). Returns True when a stop was asked for on some rank meanwhile: the eval is left
    unfinished and unrecorded (a resume does it again)."""
    global best_val_loss, last_eval_iter
    improved = False
    if has_val:
        ev = estimate_loss()
        if ev['stopped']:
            return True
        if ev['loss'] is None:  # every val sample skipped (unreadable images)
            log(f'eval {iter_num}: no val caption was measured (all skipped); val loss not recorded')
        else:
            improved = ev['loss'] < best_val_loss
            best_val_loss = min(best_val_loss, ev['loss'])
            rec = dict(iter=iter_num, val_loss=ev['loss'], val_ppl=math.exp(min(ev['loss'], 50)),
                       val_tokens=ev['tokens'], eval_s=ev['seconds'],
                       **{f'val_loss_{k}': ev[k] for k in ('shuffled', 'no_image') if ev.get(k) is not None},
                       **(dict(val_loss_by_source=ev['by_source']) if len(sources) > 1 else {}))
            write_log(rec, report.eval_line(rec, improved and iter_num > 0))
    if eval_bench and bench_eval():
        return True
    last_eval_iter = iter_num
    if iter_num > 0 and (always_save_checkpoint or improved or iter_num >= max_iters):
        checkpoint_all_ranks(ckpt_path, best=improved)
    return False


# a dataset prepared without a val split has no val loss: say so once, and never let an
# empty set read as a loss of 0 (it would make ckpt_best.pt the step-0 connector)
no_val = [name for (name, _, _), v in zip(sources, val_sets) if len(v) == 0]
has_val = len(no_val) < len(sources)
if no_val:
    log(f'note: no val split in {", ".join(no_val)}: ' + ('its val loss is not measured' if has_val else
        'the val loss is not measured and no ckpt_best.pt is written; ckpt.pt is still written every eval_interval'))

pending_nonfinite = []  # (iter, device flag) of the steps since the last log line


def settle_nonfinite():
    """Reads the non-finite flags of the steps since the last call (one wait for the GPU, at
    a log line or a checkpoint), logs the skipped steps, and stops the run after max_nonfinite
    in a row. The weights never saw those steps, so the connector saved is the last good one."""
    global consecutive_nonfinite, nonfinite_total
    flags = torch.stack([f for _, f in pending_nonfinite]).tolist() if pending_nonfinite else []
    steps = [it for it, _ in pending_nonfinite]
    pending_nonfinite.clear()
    for it, bad in zip(steps, flags):
        if not bad:
            consecutive_nonfinite = 0
            continue
        consecutive_nonfinite += 1
        nonfinite_total += 1
        write_log(dict(iter=it, skipped='non-finite', nonfinite_total=nonfinite_total),
                  f'iter {it}: non-finite loss/grad, step skipped ({consecutive_nonfinite} in a row)')
        if consecutive_nonfinite >= max_nonfinite:
            checkpoint_all_ranks(os.path.join(out_dir, 'ckpt_last_good.pt'))
            # the same decision on every rank (the grad norm is all-reduced): every rank stops
            ranks_ok(f'{consecutive_nonfinite} non-finite steps in a row at iter {it}; stopped. The last good '
                     f'connector is in {out_dir}/ckpt_last_good.pt: lower learning_rate or check the data, then resume')


peak = flops.peak_bf16(torch.cuda.get_device_name(device)) if device.type == 'cuda' else None  # for MFU

# -----------------------------------------------------------------------------
# the loop
vlm.train()
consecutive_nonfinite, bad_since_log, source_counts = 0, unlogged[0], unlogged[1:]
t_start, it_start = time.time(), iter_num
t_log, work = time.time(), dict.fromkeys(('steps', 'samples', 'tokens', 'flops', 'data_s', 'pause_s'), 0)
while True:
    t_pause = time.time()  # evals and golden sampling are no part of the steps' rates
    # a checkpoint written right after an eval resumes without redoing it; a preemption
    # checkpoint (written before its step's eval) does not
    resumed_here = iter_num == last_eval_iter
    stopping = False  # a stop asked for, agreed on by every rank in a collective
    if (iter_num % eval_interval == 0 or iter_num >= max_iters) and not resumed_here:
        stopping = run_evals()
    if not stopping and sample_interval and iter_num % sample_interval == 0 and iter_num > 0 and not resumed_here:
        stopping = sample_golden()
    work['pause_s'] += time.time() - t_pause
    if iter_num >= max_iters and not stopping:
        break

    # this rank's micro-batches of the step: the global ones from global_pos on (already
    # prefetched by the loader's workers) that are its own, g % world_size == rank
    mine = len(range(global_pos + (rank - global_pos) % world_size, global_pos + micro_per_step, world_size))
    td = time.time()
    batches, error = evaluate.caught(lambda: [next(train_iter) for _ in range(mine)]) if not stopping else ([], None)
    work['data_s'] += time.time() - td
    # one collective before the step carries what every rank must agree on: the step's caption
    # tokens (the loss is their mean over all ranks, so every token weighs the same whatever
    # micro-batch or rank it landed in), a stop asked for, a failure on some rank. The host
    # reads it, so under DDP it waits here once per step for the step before to finish.
    flags = [sum(b['n_targets'] for b in batches or []), stopping or stop.is_set(), bool(error or rank_error)]
    if ddp:
        flags = torch.tensor(flags, dtype=torch.float64, device=device)
        dist.all_reduce(flags)
        flags = flags.tolist()
    n_step, stopping, failed = flags
    if failed:
        ranks_ok(error or rank_error)
    if stopping:
        checkpoint_all_ranks(ckpt_path)
        log(f'signal received: checkpoint written to {ckpt_path} at iter {iter_num}; resume with --init_from=resume')
        break

    lr = get_lr(iter_num)
    for g in optimizer.param_groups:
        g['lr'] = lr
    global_pos += micro_per_step
    loss_sum = torch.zeros((), device=device)
    for micro, batch in enumerate(batches):
        images, input_ids, target_pos, target_ids, position_ids = data.to_device(batch, device)
        # sync connector gradients across ranks only on the last micro-step
        with nullcontext() if not ddp or micro == len(batches) - 1 else train_connector.no_sync():
            loss = vlm(images, input_ids, target_pos, target_ids, position_ids=position_ids, reduction='sum',
                       connector=train_connector)
            # DDP averages gradients over ranks; x world_size makes that the token mean over all
            (loss * (world_size / max(n_step, 1))).backward()
        loss_sum += loss.detach()
    if ddp and not batches:  # no micro-batch of this step is this rank's: it still joins the all-reduce
        with M.eager():
            (train_connector(torch.zeros(1, 1, connector.args['vision_dim'], device=device)).sum() * 0).backward()
    # grad_clip=0: no clipping, but the norm is still measured (and logged)
    grad_norm = torch.nn.utils.clip_grad_norm_(connector.parameters(), grad_clip or float('inf'))
    # a non-finite step never reaches the weights. Grads are all-reduced, so every rank sees the
    # same norm and takes the same decision; the flag is read on the host at the next log line
    nonfinite = ~torch.isfinite(grad_norm)
    if skip_on_device:
        optimizer.found_inf = nonfinite.float()
        optimizer.step()
    elif not bool(nonfinite):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    pending_nonfinite.append((iter_num, nonfinite))
    bad_since_log += sum(b['n_bad'] for b in batches)
    for b in batches:
        for s in b['sources']:
            source_counts[s] += 1
    work['steps'] += 1
    work['samples'] += sum(b['n_samples'] for b in batches)
    work['tokens'] += sum(b['n_tokens'] for b in batches)
    if peak:
        work['flops'] += sum(flops.batch_flops(vlm, b['images'].shape[0], b['sample_lens'], b['n_targets'])
                             for b in batches)

    if iter_num % log_interval == 0 or iter_num == max_iters:
        settle_nonfinite()
        # every rank's counts since the last line: bad images, samples per source, and the work
        # the rates are made of (a rank's share of a step need not be the same as another's)
        counts = torch.tensor([bad_since_log, work['samples'], work['tokens'], work['flops'], *source_counts],
                              dtype=torch.float64, device=device)
        if ddp:
            dist.all_reduce(counts)
            dist.all_reduce(loss_sum)
        bad_since_log, samples, tokens, step_flops = (float(c) for c in counts[:4])
        bad_since_log, source_counts = int(bad_since_log), [int(c) for c in counts[4:]]
        bad_total += bad_since_log
        lossf = (loss_sum / n_step).item()  # token mean over the step; the sync point, only on log steps
        if device.type == 'cuda':
            torch.cuda.synchronize()
        # rates over every step since the last log line (evals and golden sampling left out)
        dt = time.time() - t_log - work['pause_s']
        per_step = (time.time() - t_start) / (iter_num - it_start)
        rec = dict(iter=iter_num, loss=lossf, lr=lr, grad_norm=float(grad_norm), dt_ms=dt / work['steps'] * 1000,
                   samples_per_s=samples / dt, tokens_per_s=tokens / dt,
                   mfu=step_flops / dt / (peak * world_size) if peak else None, data_wait=work['data_s'] / dt,
                   eta_s=per_step * (max_iters - iter_num),
                   eta_epoch_s=per_step * (order.per_epoch - global_pos % order.per_epoch) / micro_per_step,
                   epoch=global_pos / order.per_epoch, bad_images=bad_since_log, bad_images_total=bad_total)
        if device.type == 'cuda':  # the peak since the start, for the GPU check
            rec['mem_gib'] = torch.cuda.max_memory_allocated(device) / 2**30
        if compile:
            rec['recompiles'], limit_hit = vlm.recompiles()
            if limit_hit:
                log('warning: torch.compile hit its recompile limit: the blocks past it run eagerly')
        if len(sources) > 1:
            rec['samples_by_source'] = {name: c for (name, _, _), c in zip(sources, source_counts)}
        write_log(rec, report.step_line(rec, max_iters))
        bad_since_log, source_counts, t_log, work = 0, [0] * len(sources), time.time(), dict.fromkeys(work, 0)

# a failure on rank 0 after the last step (its log file) still stops every rank with its line;
# then every rank leaves the process group here, together: a rank that left while rank 0 was
# still writing the report below would shut down against a peer that is busy (the report
# needs no other rank)
ranks_ok(rank_error)
if ddp:
    dist.barrier()
    del train_connector  # DDP's reducer holds the process group: it goes first
    dist.destroy_process_group()

# the evaluation report of the final connector (rank 0; the others are done). The run's
# result is already saved, so a failure here is a warning, not a failed run.
if master and eval_report_num and iter_num >= max_iters and not stopping:
    vlm.eval()
    try:
        m = evaluate.evaluate(vlm, tok, dict(model_args, checkpoint=ckpt_path), sources[0][1],
                              os.path.join(out_dir, 'report'), num=eval_report_num, batch_size=batch_size,
                              max_new_tokens=eval_max_new_tokens, log_path=os.path.join(out_dir, 'log.jsonl'))
        log(f'report: {evaluate.summary_line(m)} -> {out_dir}/report/report.md')
    except evaluate.Stopped:
        log(f'stopped before the report was written; the checkpoint is saved - run `python sample.py --ckpt '
            f'{ckpt_path} --eval` to write it')
    except Exception as e:
        log(f'warning: the final report failed ({type(e).__name__}: {first_line(e)}); the checkpoint is saved - '
            f'run `python sample.py --ckpt {ckpt_path} --eval` to write it')

# a DDP rank leaves without the interpreter's teardown, in which torch's gloo threads can abort
# the process after its work is done (configurator.leave); so no exit handler runs
if ddp:
    if master and wandb_log:
        wandb.finish()
    data.stop_workers()
    leave(0)
