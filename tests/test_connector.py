"""
Tests of the connector's attention structure (model.py) and of the numerics around it: the
Perceiver resampler block computed by hand from its weights, the latents' path into the
keys and values, bf16 (the residual stream stays fp32, bf16 features without autocast),
attn_implementation reaching both backbones, and activation checkpointing zeroing every
attention dropout.

$ python -m pytest -q tests/test_connector.py
"""
import math

import pytest
import torch

import data
import model as M
from conftest import TINY_ARGS, build_tiny, rand_images, tiny_builder
from model import Connector, ResamplerBlock
from sources import backbones as B
from sources import tokens as T

# -----------------------------------------------------------------------------
# the resampler block, by hand


def randomise(module, seed=0):
    """Every parameter drawn at random (LayerNorm gains and biases too: at their init of 1 and
    0 a missing affine would go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            gain = p.dim() == 1 and name.endswith('weight')  # a LayerNorm gain: around 1
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if gain else 0.0))
    return module


def layer_norm(ln, t):
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def block_by_hand(b, x, ctx, latents_in_kv=True, context_norm=True, residuals=True):
    """Pre-norm Perceiver block: q from the normed latents, k/v from concat(normed context,
    normed latents), softmax attention per head, output projection, residual; then a pre-norm
    MLP (GELU) with its residual. The flags give the usual mistakes, for the test's own check."""
    M_, N, D = x.shape
    H = b.n_heads
    hd = D // H
    h = layer_norm(b.norm_latents, x)
    c = layer_norm(b.norm_context, ctx) if context_norm else ctx
    kv_in = torch.cat([c, h], dim=1) if latents_in_kv else c
    L = kv_in.shape[1]
    q = (h @ b.q.weight.T).view(M_, N, H, hd)
    kv = (kv_in @ b.kv.weight.T).view(M_, L, 2, H, hd)
    k, v = kv[:, :, 0], kv[:, :, 1]
    out = torch.zeros(M_, N, H, hd, dtype=x.dtype)
    for m in range(M_):
        for head in range(H):
            scores = q[m, :, head] @ k[m, :, head].T / math.sqrt(hd)  # [N, L]
            out[m, :, head] = torch.softmax(scores, dim=-1) @ v[m, :, head]
    x = (x if residuals else 0) + out.reshape(M_, N, D) @ b.o.weight.T
    lin1, lin2 = b.mlp[0], b.mlp[2]
    z = layer_norm(b.norm_mlp, x) @ lin1.weight.T + lin1.bias
    z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))  # exact GELU
    return (x if residuals else 0) + z @ lin2.weight.T + lin2.bias


@pytest.mark.parametrize('width,heads,n_lat,n_ctx', [(32, 4, 5, 9), (24, 1, 3, 1), (48, 6, 16, 30)])
def test_resampler_block_equals_the_hand_computation(width, heads, n_lat, n_ctx):
    # float64: the two orders of summation then agree to ~1e-12, so a tight tolerance cannot
    # fail by rounding yet any real difference shows
    b = randomise(ResamplerBlock(width, heads, mlp_ratio=2)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, n_lat, width, generator=g, dtype=torch.float64) * 2 + 0.5  # a missing norm shows
    ctx = torch.randn(2, n_ctx, width, generator=g, dtype=torch.float64) * 3 - 1
    with torch.no_grad():
        torch.testing.assert_close(b(x, ctx), block_by_hand(b, x, ctx), atol=1e-9, rtol=1e-9)


def test_hand_computation_tells_the_known_mistakes_apart():
    """The comparison above has teeth: each usual slip moves the output far beyond 1e-5."""
    b = randomise(ResamplerBlock(32, 4, mlp_ratio=2))
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 5, 32, generator=g) * 2, torch.randn(2, 9, 32, generator=g) * 3
    with torch.no_grad():
        y = b(x, ctx)
        for slip in (dict(latents_in_kv=False), dict(context_norm=False), dict(residuals=False)):
            assert (y - block_by_hand(b, x, ctx, **slip)).abs().max() > 1e-3, slip


def test_connector_output_depends_on_the_latents_through_keys_and_values():
    c = randomise(Connector(vision_dim=20, llm_dim=16, n_latents=6, width=32, depth=2, n_heads=4, mlp_ratio=2,
                            proj_hidden=24))
    feats = torch.randn(3, 10, 20, generator=torch.Generator().manual_seed(3))
    rows = []

    def check(mod, args):  # kv sees the 10 patches followed by the 6 latents
        rows.append(args[0].shape[1])

    def zero_latent_rows(mod, args):
        t = args[0].clone()
        t[:, 10:] = 0
        return (t,)
    with torch.no_grad():
        hooks = [blk.kv.register_forward_pre_hook(check) for blk in c.blocks]
        ref = c(feats)
        for h in hooks:
            h.remove()
        assert rows == [16, 16]
        hooks = [blk.kv.register_forward_pre_hook(zero_latent_rows) for blk in c.blocks]
        cut = c(feats)
        for h in hooks:
            h.remove()
    assert (ref - cut).abs().max() > 1e-3

def connector_by_hand(c, feats):
    """The whole connector from its weights: optional LayerNorm on the patch features, proj_in,
    the learned latents through every block (by hand, above), final LayerNorm, the MLP
    projector (exact GELU), then RMS-normalised and scaled by the gain when it has one."""
    f = layer_norm(c.vision_ln, feats) if isinstance(c.vision_ln, torch.nn.LayerNorm) else feats
    ctx = f @ c.proj_in.weight.T + c.proj_in.bias
    x = c.latents.expand(feats.shape[0], -1, -1)
    for b in c.blocks:
        x = block_by_hand(b, x, ctx)
    lin1, lin2 = c.projector[0], c.projector[3]
    z = layer_norm(c.norm_out, x) @ lin1.weight.T + lin1.bias
    y = 0.5 * z * (1 + torch.erf(z / math.sqrt(2))) @ lin2.weight.T + lin2.bias
    if c.out_gain is not None:
        y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + torch.finfo(y.dtype).eps) * c.out_gain
    return y


@pytest.mark.parametrize('vision_ln,out_rms', [(True, 0.7), (False, None)])
def test_connector_equals_the_hand_computation(vision_ln, out_rms):
    c = randomise(Connector(vision_dim=20, llm_dim=16, n_latents=6, width=32, depth=2, n_heads=4, mlp_ratio=2,
                            proj_hidden=24, vision_ln=vision_ln, out_rms=out_rms)).eval().double()
    feats = torch.randn(3, 10, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3 + 1
    with torch.no_grad():  # float64, as above: rounding cannot fail the test on another CPU
        torch.testing.assert_close(c(feats), connector_by_hand(c, feats), atol=1e-9, rtol=1e-9)


def test_fresh_latents_give_distinct_visual_tokens():
    """At initialisation every latent is its own query: the N visual tokens of an image differ
    (identical latents would get identical gradients and stay one token copied N times)."""
    c = Connector(vision_dim=20, llm_dim=16, n_latents=6, width=32, depth=2, n_heads=4, mlp_ratio=2, proj_hidden=24,
                  out_rms=0.5)
    with torch.no_grad():
        y = c(torch.randn(2, 10, 20, generator=torch.Generator().manual_seed(6)))
    d = (y[:, :, None] - y[:, None]).abs().amax(-1)  # [M, N, N] distance between tokens
    off = ~torch.eye(6, dtype=torch.bool)
    assert d[:, off].min() > 1e-3


def test_proj_dropout_is_live_in_training_only():
    c = Connector(vision_dim=20, llm_dim=16, n_latents=6, width=32, depth=1, n_heads=4, mlp_ratio=2, proj_hidden=24,
                  dropout=0.5)
    feats = torch.randn(2, 10, 20, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        c.train()
        assert not torch.equal(c(feats), c(feats))
        c.eval()
        assert torch.equal(c(feats), c(feats))
    vlm, _ = build_tiny(proj_dropout=0.5)
    vlm.train()
    assert vlm.connector.training and any(isinstance(m, torch.nn.Dropout) and m.p == 0.5
                                          for m in vlm.connector.modules())

# -----------------------------------------------------------------------------
# bf16


def small_connector():
    return Connector(vision_dim=24, llm_dim=40, n_latents=8, width=32, depth=3, n_heads=4, mlp_ratio=2, proj_hidden=48,
                     out_rms=0.5)


def test_resampler_residual_stream_stays_fp32_under_bf16_autocast():
    c = small_connector()
    dtypes = []
    for blk in c.blocks:
        blk.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    feats = torch.randn(2, 12, 24).to(torch.bfloat16)  # the frozen tower's output on a GPU
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = c(feats)
    assert dtypes == [torch.float32] * 3
    assert torch.isfinite(y.float()).all()


def test_connector_takes_bf16_features_without_autocast():
    c = small_connector()
    feats = torch.randn(2, 12, 24).to(torch.bfloat16)
    with torch.no_grad():
        y = c(feats)  # fp32 weights, bf16 input: cast up, no dtype mismatch
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, c(feats.float()), atol=0, rtol=0)

# -----------------------------------------------------------------------------
# attention implementation and dropout in the backbones


def caption_batch(tok, n=3):
    """n Template-A samples with random images, collated."""
    b = tiny_builder(tok)
    caps = ['a red circle at the top left.', 'two blue squares.', 'a green star on the right.'][:n]
    imgs = rand_images(n, 48, seed=4)
    samples = []
    for cap, img in zip(caps, imgs):
        ids, labels = b.build([tok(cap, add_special_tokens=False)['input_ids']])
        samples.append(dict(input_ids=ids, labels=labels, images=[img]))
    batch = data.collate(samples, pad_id=T.special_ids(tok)['eos'])
    return batch['images'], batch['input_ids'], batch['target_pos'], batch['target_ids']


def test_eager_attention_reaches_both_backbones_and_matches_sdpa():
    tok = B.load_tokenizer('tiny')
    sdpa = M.build_vlm(TINY_ARGS, tok).eval()
    eager = M.build_vlm(TINY_ARGS, tok, attn_implementation='eager',
                        connector_state=sdpa.connector.state_dict()).eval()
    for vlm, want in ((sdpa, 'sdpa'), (eager, 'eager')):
        assert vlm.vision.config._attn_implementation == want
        assert vlm.llm.config._attn_implementation == want
    batch = caption_batch(tok)
    with torch.no_grad():
        assert abs(sdpa(*batch).item() - eager(*batch).item()) < 1e-4


def test_grad_checkpointing_zeroes_every_attention_dropout(tmp_path):
    from transformers import AutoConfig
    cfg = dict(B.TINY_LLM, attention_dropout=0.1, vocab_size=128)
    AutoConfig.for_model(cfg.pop('model_type'), **cfg).save_pretrained(tmp_path)
    tok = B.load_tokenizer('tiny')
    batch = caption_batch(tok)
    vlm, _ = build_tiny(llm=f'random:{tmp_path}')
    vlm.llm.train()  # without the fix: the attention modules' own copy of the dropout is live
    with torch.no_grad():
        assert vlm(*batch).item() != vlm(*batch).item()
    vlm.enable_grad_checkpointing()
    vlm.train()
    assert vlm.llm.training
    assert all(getattr(m, 'attention_dropout', 0.0) == 0.0 for m in vlm.llm.modules())
    assert vlm.llm.config.attention_dropout == 0.0
    losses = [vlm(*batch) for _ in range(2)]
    assert losses[0].item() == losses[1].item()
    losses[0].backward()  # and checkpointing still gives gradients
    assert all(p.grad is not None for p in vlm.connector.parameters())
