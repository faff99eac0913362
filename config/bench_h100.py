# Throughput benchmark: full-size Qwen3-8B-Base + SigLIP-so400m-384 with RANDOM weights
# (no download) on the synthetic dataset; prints steady-state samples/s, tokens/s, MFU and
# peak memory, then exits.
# python prepare_llava.py --synthetic=2000 && python train.py config/bench_h100.py
out_dir = 'bench_out'
data_dir = 'data/synthetic/prepared'
vision = 'random:google/siglip-so400m-patch14-384'
llm = 'random:Qwen/Qwen3-8B-Base'
n_latents = 64
batch_size = 32
gradient_accumulation_steps = 1
num_workers = 8
bench_iters = 10
log_interval = 1
eval_interval = 1000000
max_iters = 1000000
