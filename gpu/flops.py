"""
What MFU divides: the FLOPs of a training batch, counted from the shapes of the modules that
run (norms and activations are noise), and the devices' bf16 peaks. train.py logs MFU with
them on the GPUs it knows; `python bench.py params` prints the FLOPs of a full-size sample.
"""
import functools

import torch.nn as nn

# bf16 dense peak FLOP/s (fp32 accumulate) by device name; an unknown device gets no MFU
# rather than a wrong one. RTX 4090: 165 with fp32 accumulate (330 is fp16 with fp16's).
PEAK_BF16 = {'H200': 989e12, 'H200 NVL': 835e12, 'H100': 989e12, 'H100 NVL': 835e12, 'H100 PCIe': 756e12,
             'GH200': 989e12, 'B200': 2250e12, 'A100': 312e12, 'L40S': 362e12, 'A10G': 70e12, 'RTX 4090': 165e12}


def peak_bf16(name):
    """The peak of a device name as CUDA reports it ('NVIDIA H100 80GB HBM3'), or None. A name
    matches its longest key: an 'H200 NVL' is not an H200 SXM."""
    keys = [k for k in PEAK_BF16 if k in name]
    return PEAK_BF16[max(keys, key=len)] if keys else None


def batch_flops(vlm, n_images, sample_lens, n_targets):
    """Matmul FLOPs of a training batch. The frozen LLM gets no weight gradients: its weight
    matmuls cost forward + input-gradient backward = 2x their forward, not the usual 3x; its
    attention matmuls (QK^T, AV) multiply activations only, whose gradients all flow back:
    3x. The tower runs forward only; the connector trains (3x). sample_lens: each sample's
    tokens (attention is per sample, packed or not); n_targets: the positions lm_head runs on."""
    llm_tok, llm_attn, head, image = _terms(vlm)
    weights = llm_tok * sum(sample_lens) + head * n_targets
    return 2 * weights + 3 * llm_attn * sum(t * t for t in sample_lens) + n_images * image


def _linear(module):
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@functools.lru_cache(maxsize=4)
def _terms(vlm):
    """(LLM per token, LLM per squared sample length, lm_head per target, one image through the
    tower (forward) and the connector (forward + backward)); 2 FLOPs per multiply-add."""
    lc, vc, c = vlm.llm.config, vlm.vision.config, vlm.connector
    layers = vlm.llm.get_decoder().layers
    width = lc.num_attention_heads * (getattr(lc, 'head_dim', None) or lc.hidden_size // lc.num_attention_heads)
    llm_tok = 2 * sum(_linear(layer) for layer in layers)
    llm_attn = 2 * len(layers) * width  # QK^T and AV, causal: half of 2 x 2 T^2 width
    head = 2 * vlm.llm.get_output_embeddings().weight.numel()
    root = getattr(vlm.vision, 'vision_model', vlm.vision)
    P = (vc.image_size // vc.patch_size) ** 2
    patch = next(m for m in root.embeddings.modules() if isinstance(m, nn.Conv2d))
    tower = 2 * P * (patch.weight.numel() + sum(_linear(layer) for layer in root.encoder.layers)) \
        + 4 * len(root.encoder.layers) * P * P * vc.hidden_size
    N, w = c.latents.shape
    blocks = sum(2 * N * (_linear(b) - b.kv.weight.numel()) + 2 * (P + N) * b.kv.weight.numel()
                 + 4 * N * (P + N) * w for b in c.blocks)
    connector = 2 * P * c.proj_in.weight.numel() + blocks + 2 * N * _linear(c.projector)
    return llm_tok, llm_attn, head, tower + 3 * connector
