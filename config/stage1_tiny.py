# CPU demo: a random tiny vision tower, the tiny Qwen3 pretrained on the shapes' text by
# prepare_llava.py --synthetic (frozen, like the real LLM), on the drawn shapes dataset.
# About two minutes in all on 2 CPU cores.
# python prepare_llava.py --synthetic=2000 && python train.py config/stage1_tiny.py
# (llm='tiny' instead: a random tiny LLM, no pretraining)
out_dir = 'out-tiny'
data_dir = 'data/synthetic/prepared'
vision = 'tiny'
llm = 'data/synthetic/tiny_llm'
n_latents = 32
resampler_width = 128
resampler_depth = 2
resampler_heads = 4
proj_hidden = 256
batch_size = 16
total_batch_size = 16
max_seq_len = 128
multi_image_frac = 0.02
num_workers = 0
learning_rate = 1e-3
warmup_frac = 0.05
max_iters = 1000
eval_interval = 250
eval_iters = 8
log_interval = 50
sample_interval = 500
device = 'cpu'
