# The full Stage-1 run on LCS-558K with the recommended defaults (design notes):
# N=64, LN + resampler + MLP trainable, AdamW lr 1e-4 (wd 0.01 on matrices), 2 % warmup,
# cosine to 10 %, clip 1.0, bf16, effective batch 512, one epoch.
# torchrun --standalone --nproc_per_node=8 train.py config/stage1_align.py
out_dir = 'out-align'
data_dir = 'data/llava_pretrain/prepared'
vision = 'google/siglip-so400m-patch14-384'
llm = 'Qwen/Qwen3-8B-Base'
n_latents = 64
batch_size = 32  # per GPU: the data's worst batch (two images, longest captions) peaks at 68 GiB, so
# an 80 GB H100 holds it; 48 is 3 % faster on an H200 (94 GiB worst case). bench.py gpu measures it.
compile = True  # block by block; 165 vs 112 samples/s eager on one H200 (54 % vs 36 % MFU)
total_batch_size = 512  # samples per step, any number of GPUs: 16 micro-batches of 32 (over 16 GPUs: batch_size=16)
max_seq_len = 1536
multi_image_frac = 0.02
epochs = 1.0
learning_rate = 1e-4
warmup_frac = 0.02
min_lr_frac = 0.1
weight_decay = 0.01
grad_clip = 1.0
eval_interval = 100
eval_iters = 40
sample_interval = 200
log_interval = 10
num_workers = 8
