"""
FLOPs per batch and the devices' bf16 peaks: what train.py's MFU and the GPU check divide.
Counted from the shapes actually run, not from a parameter count.
"""
import torch

# Matmuls only (norms and activations are noise). The frozen backbones get no weight
# gradients, so the LLM costs forward + input-gradient backward = 2x its forward, not the
# usual 3x; the vision tower runs forward only; the connector trains, so it costs the usual 3x.


def _decoder_matmul_params(cfg):
    d, hd = cfg.hidden_size, getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, getattr(cfg, 'num_key_value_heads', cfg.num_attention_heads) * hd
    return d * q + 2 * d * kv + q * d + (3 if cfg.model_type != 'siglip_vision_model' and
                                          'clip' not in cfg.model_type else 2) * d * cfg.intermediate_size


def flops_per_batch(model, n_images, sample_lens, n_targets):
    """sample_lens: token length of each sample (packed or not, attention is per sample)."""
    lc, vc, ca = model.llm.config, model.vision.config, model.connector_args
    n_tok = sum(sample_lens)
    # LLM: forward + input-gradient backward
    attn = 2 * lc.num_hidden_layers * lc.num_attention_heads * (getattr(lc, 'head_dim', None) or
                                                               lc.hidden_size // lc.num_attention_heads)
    llm_fwd = 2 * lc.num_hidden_layers * _decoder_matmul_params(lc) * n_tok \
        + attn * sum(t * t for t in sample_lens)  # QK^T and AV, causal: half of 2*2*T^2*d each layer
    llm_fwd += 2 * lc.hidden_size * lc.vocab_size * n_targets  # lm_head on caption positions only
    # vision tower: forward only, the layers we kept
    root = getattr(model.vision, 'vision_model', model.vision)
    n_layers_v, P = len(root.encoder.layers), (vc.image_size // vc.patch_size) ** 2
    vis = n_images * (2 * n_layers_v * _decoder_matmul_params(vc) * P + 4 * n_layers_v * vc.hidden_size * P * P
                      + 2 * 3 * vc.patch_size ** 2 * vc.hidden_size * P)
    # connector: forward + full backward
    N, w, Dv = ca['n_latents'], ca['width'], ca['vision_dim']
    blk = 2 * N * (w * w * 2 + 2 * ca['mlp_ratio'] * w * w) + 2 * (P + N) * 2 * w * w + 4 * N * (P + N) * w
    proj = 2 * N * (w * ca['proj_hidden'] + ca['proj_hidden'] * ca['llm_dim'])
    con = n_images * (2 * P * Dv * w + ca['depth'] * blk + proj)
    return 2 * llm_fwd + vis + 3 * con


# bf16 dense peak FLOP/s by device name; an unknown device gets no MFU rather than a wrong one.
# A name matches its longest key: 'H200 NVL' must not take the H200 SXM's peak.
PEAK_BF16 = {'H200': 989e12, 'H200 NVL': 835e12, 'H100': 989e12, 'H100 NVL': 835e12, 'H100 PCIe': 756e12,
             'GH200': 989e12, 'B200': 2250e12, 'A100': 312e12, 'L40S': 362e12, 'A10G': 70e12, 'RTX 4090': 165e12}


def peak_for_name(name):
    """The bf16 peak of a device name as CUDA reports it ('NVIDIA H100 80GB HBM3'), or None."""
    keys = [k for k in PEAK_BF16 if k in name]
    return PEAK_BF16[max(keys, key=len)] if keys else None


def peak_flops(device):
    if device.type != 'cuda':
        return None
    return peak_for_name(torch.cuda.get_device_name(device))
