# Trial run on real backbones: a ~5k-sample subset of LCS-558K, frequent eval.
# Mirrors the design notes' trial (4,900 train samples), to check the loss curve and the
# captions before paying for a full epoch.
# python prepare_llava.py && python train.py config/stage1_trial.py --lr=1e-4
out_dir = 'out-trial'
data_dir = 'data/llava_pretrain/prepared'
vision = 'google/siglip-so400m-patch14-384'
llm = 'Qwen/Qwen3-8B-Base'
n_latents = 64
batch_size = 16
total_batch_size = 64  # many steps from a small subset
max_train_samples = 4900
epochs = 2.0
learning_rate = 1e-4
warmup_frac = 0.05
eval_interval = 20
eval_iters = 10
sample_interval = 40
log_interval = 5
num_workers = 8
