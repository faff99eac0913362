"""
The trainable connector, the only part of the model that learns:
[M, P, vision_dim] patch features -> optional LayerNorm -> Perceiver resampler (N learned
latents attend over the patches) -> MLP projector -> [M, N, llm_dim] vectors that are written
into the LLM's N image-slot positions.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ResamplerBlock(nn.Module):
    """Pre-norm Perceiver block: latents attend over concat(patches, latents), then an MLP."""

    def __init__(self, width, n_heads, mlp_ratio):
        super().__init__()
        assert width % n_heads == 0, f'resampler width {width} not divisible by heads {n_heads}'
        self.n_heads = n_heads
        self.norm_latents = nn.LayerNorm(width)
        self.norm_context = nn.LayerNorm(width)
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.o = nn.Linear(width, width, bias=False)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x, context):
        M, N, D = x.shape
        h = self.norm_latents(x)
        # Flamingo/Idefics2: keys and values also include the latents, so they can pass
        # information among themselves, not only read the patches
        kv_in = torch.cat([self.norm_context(context), h], dim=1)
        q = self.q(h).view(M, N, self.n_heads, -1).transpose(1, 2)
        k, v = self.kv(kv_in).view(M, kv_in.shape[1], 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(M, N, D))
        return x + self.mlp(self.norm_mlp(x))


class Connector(nn.Module):

    def __init__(self, vision_dim, llm_dim, n_latents=64, width=1024, depth=2, n_heads=16, mlp_ratio=4,
                 proj_hidden=4096, dropout=0.0, vision_ln=True, out_rms=None):
        super().__init__()
        self.args = dict(vision_dim=vision_dim, llm_dim=llm_dim, n_latents=n_latents, width=width, depth=depth,
                         n_heads=n_heads, mlp_ratio=mlp_ratio, proj_hidden=proj_hidden, dropout=dropout,
                         vision_ln=vision_ln, out_rms=out_rms)
        self.vision_ln = nn.LayerNorm(vision_dim) if vision_ln else nn.Identity()
        self.proj_in = nn.Linear(vision_dim, width)
        self.latents = nn.Parameter(torch.randn(n_latents, width) * 0.02)
        self.blocks = nn.ModuleList([ResamplerBlock(width, n_heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width)
        self.projector = nn.Sequential(nn.Linear(width, proj_hidden), nn.GELU(), nn.Dropout(dropout),
                                       nn.Linear(proj_hidden, llm_dim))
        # Scale matching: the LLM only ever saw inputs of its embedding table's size. A
        # projector that emits vectors 10-100x larger (the default init does) saturates the
        # first attention layers and stalls alignment, so when out_rms is given the output is
        # RMS-normalised and multiplied by a learnable gain that starts at the mean RMS of
        # the LLM's token embeddings.
        self.out_gain = nn.Parameter(torch.full((llm_dim,), float(out_rms))) if out_rms else None

    def forward(self, feats):
        # Features arrive in the backbone's dtype (bf16 on a GPU) and the weights here are fp32
        # master weights: casting up makes the connector run with or without autocast (under
        # autocast its matmuls still run in bf16), and keeps the residual stream x in fp32.
        ctx = self.proj_in(self.vision_ln(feats.to(self.proj_in.weight.dtype)))
        x = self.latents.expand(feats.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, ctx)
        y = self.projector(self.norm_out(x))
        if self.out_gain is not None:
            y = F.rms_norm(y, (y.shape[-1],)) * self.out_gain
        return y
