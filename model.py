"""
The model: a frozen vision tower and a frozen causal LLM joined by the trainable connector.

Read top to bottom:
1) the model keys (saved in every checkpoint) and their defaults,
2) the connector: LayerNorm -> Perceiver resampler (N latents) -> MLP projector,
3) the VLM glue: uint8 images normalised on the device, the connector's outputs spliced into
   the slot positions of inputs_embeds, the caption-only loss, batched generation, FLOPs,
4) builders: a backbone by name (hub id or local folder with real weights, loaded straight
   onto the device; 'random:' from a config; 'tiny'), the whole VLM, loading a checkpoint.
Backbone names and presets, the token rules of any LLM family and the towers' image rules
live in sources/ (backbones.py, tokens.py, images.py).
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UserError, first_line
from sources import backbones as B
from sources.backbones import DEFAULT_LLM, DEFAULT_VISION
from sources.images import image_spec
from sources.tokens import BRACKET_PAIRS, special_ids

# The model keys with their defaults (the design notes' recommendations). train.py takes its
# model globals from here and saves them in every checkpoint; sample.py rebuilds the model
# from them.
MODEL_DEFAULTS = dict(
    vision=DEFAULT_VISION,  # hub id, local dir, 'random:<id or dir>', or 'tiny' (sources/backbones.py)
    llm=DEFAULT_LLM,
    tokenizer='',  # '' = the tokenizer the data was prepared with (meta.json)
    slot_token='',  # the token the image slots reuse; '' = the data's (meta.json), chosen per tokenizer
    vision_feature_layer=-2,  # penultimate layer, as LLaVA
    n_latents=64,  # visual tokens per image
    resampler_width=1024,
    resampler_depth=2,
    resampler_heads=16,
    resampler_mlp_ratio=4,
    proj_hidden=4096,
    proj_dropout=0.0,
    vision_ln=True,
    match_embed_scale=True,  # connector output RMS starts at the LLM's token-embedding RMS
    image_brackets=False,  # wrap slots in a start/end pair the tokenizer has (<|vision_start|> ...)
)
MODEL_KEYS = tuple(MODEL_DEFAULTS)

# -----------------------------------------------------------------------------
# The connector: the only part of the model that learns


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
    """[M, P, vision_dim] patch features -> [M, N, llm_dim] vectors for the N slot positions."""

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
        # master weights: casting up keeps the residual stream x in fp32 (under autocast the
        # matmuls still run in bf16).
        ctx = self.proj_in(self.vision_ln(feats.to(self.proj_in.weight.dtype)))
        x = self.latents.expand(feats.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, ctx)
        y = self.projector(self.norm_out(x))
        if self.out_gain is not None:
            y = F.rms_norm(y, (y.shape[-1],)) * self.out_gain
        return y

# -----------------------------------------------------------------------------
# The VLM: frozen backbones + connector


def eager():
    """Compiled blocks run eagerly inside this context: generation (a KV cache, one more graph
    per layer index) and the text-only checks would otherwise spend the recompile budget that
    training needs (past it, dynamo silently runs everything eager)."""
    return torch.compiler.set_stance('force_eager')


class VLM(nn.Module):

    def __init__(self, vision, llm, connector, ids, image_spec, drop_cls=False, brackets=None):
        super().__init__()
        self.vision, self.llm, self.connector = vision, llm, connector
        self.slot_id, self.eos_id, self.bos_id = ids['slot'], ids['eos'], ids['bos']  # sources/tokens.py
        self.image_spec, self.drop_cls = image_spec, drop_cls
        self.brackets = brackets  # (start_id, end_id) around each image's slots, or None
        self.grad_checkpointing, self.compiled = False, []
        self.register_buffer('pix_mean', torch.tensor(image_spec['mean']).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer('pix_std', torch.tensor(image_spec['std']).view(1, 3, 1, 1) * 255, persistent=False)

    @property
    def connector_args(self):
        return self.connector.args

    def train(self, mode=True):
        # the backbones stay in eval mode whatever the caller does (no dropout in frozen
        # parts), except that transformers only checkpoints activations in train mode: with
        # grad_checkpointing the LLM trains "in train mode" with every dropout set to 0
        super().train(mode)
        self.vision.eval()
        self.llm.train(mode and self.grad_checkpointing)
        return self

    def enable_grad_checkpointing(self):
        """Recompute the LLM's layer activations in the backward pass instead of storing
        them: less memory for longer sequences or bigger micro-batches, ~1/3 more LLM compute."""
        # attention modules copy config.attention_dropout into their own attribute when they
        # are built, so zeroing the config alone would leave dropout on in train mode
        for m in [self.llm.config, *self.llm.modules()]:
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            for key in ('attention_dropout', 'hidden_dropout', 'dropout'):
                if isinstance(getattr(m, key, None), float):
                    setattr(m, key, 0.0)
        if hasattr(self.llm, 'activation_checkpointing_enable'):  # transformers >= 5.2x name
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(use_reentrant=False))
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
        self.grad_checkpointing = True
        return self.train(self.training)

    def disable_grad_checkpointing(self):
        (getattr(self.llm, 'activation_checkpointing_disable', None) or self.llm.gradient_checkpointing_disable)()
        self.grad_checkpointing = False
        return self.train(self.training)

    def compile_blocks(self, backend='inductor'):
        """torch.compile each repeated block of the backbones (every entry of their layer lists)
        and the connector, not each backbone whole: the 36 decoder layers share one compiled
        graph, so compiling costs one layer's time instead of minutes, and the causal mask is
        still built eagerly outside the graphs, where SDPA keeps its fused kernel. dynamic=True:
        one graph serves every sequence length and batch size (length-grouped batches change
        both), instead of a recompile for the second of each."""
        def blocks(module):
            for child in module.children():
                if isinstance(child, nn.ModuleList):
                    yield from child
                else:
                    yield from blocks(child)
        self.compiled = [*blocks(self.llm), *blocks(self.vision), self.connector]
        # under DDP (train.py wraps the connector), dynamo's DDP optimizer would split the
        # connector's graph at every gradient bucket (5 graphs at the default sizes) to overlap
        # their all-reduce with its backward; but its gradients all arrive at the end of the
        # whole backward anyway, so the split buys nothing and costs graph breaks
        torch._dynamo.config.optimize_ddp = False
        for block in self.compiled:
            block.compile(backend=backend, dynamic=True)
        return self

    def recompiles(self):
        """(graphs compiled beyond the first of each compiled function, whether one of them
        hit dynamo's recompile limit, past which it runs eagerly)."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        entries = [len(_debug_get_cache_entry_list(code)) for code in {b.forward.__code__ for b in self.compiled}]
        limit = getattr(torch._dynamo.config, 'recompile_limit', None) or torch._dynamo.config.cache_size_limit
        return sum(max(0, n - 1) for n in entries), any(n >= limit for n in entries)

    def encode_images(self, images):
        """uint8 [M, 3, H, W] -> patch features [M, P, Dv]. Normalising here, on the device,
        keeps the host->device copy 4x smaller than float pixels."""
        dtype = next(self.vision.parameters()).dtype
        x = ((images.float() - self.pix_mean) / self.pix_std).to(dtype)
        with torch.no_grad():
            feats = self.vision(pixel_values=x).last_hidden_state
        return feats[:, 1:] if self.drop_cls else feats

    def embed(self, images, input_ids, connector=None):
        """inputs_embeds with the slots overwritten by the connector's outputs.
        masked_scatter fills slots in row-major order: batch row, then position; the
        collator orders `images` the same way, so the k-th <image> of a row gets that
        row's k-th image with no Python loop. connector: the module to run instead of
        self.connector (training passes its DDP wrapper, which syncs the gradients)."""
        emb = self.llm.get_input_embeddings()(input_ids)
        if images is None or images.shape[0] == 0:
            return emb
        feats = self.encode_images(images)
        # autocast around the connector alone: its fp32 master weights run their matmuls in the
        # backbones' bf16; the frozen backbones are bf16 already, and autocast around them
        # would only add casts (norms and softmax to fp32)
        with torch.autocast(feats.device.type, dtype=emb.dtype, enabled=emb.dtype != torch.float32):
            vis = (self.connector if connector is None else connector)(feats)
        slots = (input_ids == self.slot_id).unsqueeze(-1)
        return emb.masked_scatter(slots, vis.to(emb.dtype))

    def hidden_states(self, images, input_ids, position_ids=None, attention_mask=None, connector=None):
        emb = self.embed(images, input_ids, connector)
        # use_cache=False matters: with a cache, transformers ignores the restarts in
        # position_ids and packed samples would attend to each other.
        out = self.llm.get_decoder()(inputs_embeds=emb, position_ids=position_ids,
                                     attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def forward(self, images, input_ids, target_pos, target_ids, position_ids=None, attention_mask=None,
                reduction='mean', connector=None):
        """Cross-entropy over the caption tokens only (mean, or 'sum' for the caller to normalise).
        target_pos: flat indices into [B*T] of the positions whose *next* token is a label;
        target_ids: those labels. lm_head runs on these rows only: [K, vocab] logits
        instead of [B, T, vocab] (vocab is 151,936 for Qwen3)."""
        h = self.hidden_states(images, input_ids, position_ids, attention_mask, connector)
        h = h.reshape(-1, h.shape[-1]).index_select(0, target_pos)
        return F.cross_entropy(lm_logits(self.llm, h), target_ids, reduction=reduction)

    @torch.no_grad()
    def generate(self, images, prompts, max_new_tokens=64, temperature=0.0, top_p=1.0, generator=None):
        """Batched generation from inputs_embeds, eager (see eager()). prompts: list of token-id
        lists (slots included); images ordered as in training. Prompts are left-padded so they
        all end at the same position. Returns one list of new token ids per prompt, eos excluded."""
        device = self.pix_mean.device
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, L), self.eos_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        n_slots = int((ids == self.slot_id).sum())
        n_vis = 0 if images is None else images.shape[0] * self.connector_args['n_latents']
        if n_slots != n_vis:
            raise ValueError(f'{n_slots} slot positions but {n_vis} image vectors')
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        new = []
        with eager():
            out = self.llm(inputs_embeds=self.embed(images, ids), attention_mask=mask, position_ids=pos,
                           use_cache=True, logits_to_keep=1)
            # transformers >= 5.24 names the KV cache `cache`; earlier releases `past_key_values`
            cache_key = 'cache' if 'cache' in out else 'past_key_values'
            past, logits = out[cache_key], out.logits[:, -1]
            done = torch.zeros(B, dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                nxt = sample_next(logits.float(), temperature, top_p, generator)
                nxt = torch.where(done, torch.full_like(nxt, self.eos_id), nxt)
                new.append(nxt)
                done |= nxt == self.eos_id
                if bool(done.all()):
                    break
                mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
                pos = pos[:, -1:] + 1
                out = self.llm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                               **{cache_key: past})
                past, logits = out[cache_key], out.logits[:, -1]
        toks = torch.stack(new, 1).tolist() if new else [[] for _ in range(B)]
        return [t[:t.index(self.eos_id)] if self.eos_id in t else t for t in toks]


def lm_logits(llm, h):
    """The LLM's logits for final hidden states h [..., d], in fp32: its output head plus what
    the family does after it (Gemma 2/3 soft-cap the logits, Cohere scales them, Granite divides
    them), which a caption-only head must repeat to compute the LLM's own loss."""
    logits = llm.get_output_embeddings()(h).float()
    cfg = llm.config.get_text_config() if hasattr(llm.config, 'get_text_config') else llm.config
    scale = getattr(llm, 'logit_scale', None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    if getattr(cfg, 'logits_scaling', None) not in (None, 1):
        logits = logits / cfg.logits_scaling
    cap = getattr(cfg, 'final_logit_softcapping', None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def probe_logits(llm, n=6):
    """The LLM's own logits on n fixed tokens spread over its vocabulary: taken once when it is
    built (llm.probe), they are what the report's frozen-LLM check compares against later."""
    table = llm.get_input_embeddings()
    ids = torch.arange(n, device=table.weight.device)[None] * (table.num_embeddings // n)
    return ids, llm(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def check_head(llm):
    """The caption-only head (decoder + lm_logits) must give the LLM's own logits: a family
    that post-processes its logits in a way lm_logits does not know would otherwise train on a
    wrong loss, silently. One forward pass of a few tokens, once per build."""
    p = next(llm.parameters())
    if p.device.type == 'meta':
        return
    ids, own = probe_logits(llm)
    llm.probe = (ids, own)
    ours = lm_logits(llm, llm.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state)
    tol = 1e-3 if p.dtype == torch.float32 else 5e-2
    err = float((own - ours).abs().max() / own.abs().max().clamp(min=1e-6))
    if not err <= tol:
        raise UserError(f"LLM '{llm.config.model_type}': its logits are not its output head's ({err:.2g} apart); "
                        f"model.lm_logits must learn what this family does after the head")


def sample_next(logits, temperature, top_p, generator=None):
    """Greedy when temperature == 0, else temperature + nucleus (top_p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # always keeps the most likely token
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    # the generator lives on the logits' device: drawing there keeps the vocabulary-sized
    # distribution off the host, one token per row per step
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

# -----------------------------------------------------------------------------
# Builders


def truncate_vision(vision, feature_layer):
    """Keep only the layers up to `feature_layer` (-2 = penultimate, as LLaVA does) and drop
    the final norm and pooling head, so last_hidden_state *is* that layer's output and no
    compute is spent on layers whose output is thrown away."""
    root = getattr(vision, 'vision_model', vision)
    layers = root.encoder.layers
    n = len(layers)
    keep = n + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= keep <= n:
        raise UserError(f'vision_feature_layer={feature_layer} out of range for a {n}-layer tower '
                        f'(use -1..-{n} or 1..{n})')
    root.encoder.layers = layers[:keep]
    if hasattr(root, 'post_layernorm'):
        root.post_layernorm = nn.Identity()
    if getattr(root, 'head', None) is not None:
        root.head, root.use_head = None, False
    return vision


@torch.no_grad()
def embedding_rms(llm, chunk=8192):
    """RMS of what the LLM's input-embedding module emits over its whole vocabulary: its output,
    not its weight, since some families scale inside the module (Gemma: x sqrt(hidden))."""
    emb = llm.get_input_embeddings()
    if emb.weight.device.type == 'meta':
        return 0.02
    total, n = 0.0, emb.num_embeddings
    for s in range(0, n, chunk):
        out = emb(torch.arange(s, min(s + chunk, n), device=emb.weight.device))
        total += float(torch.linalg.vector_norm(out, dtype=torch.float32) ** 2)
    return math.sqrt(total / (n * emb.embedding_dim))


def new_connector(args, vision_dim, llm_dim, out_rms, device='cpu'):
    """A freshly initialised connector for the model keys `args` (fp32: its optimizer needs
    fp32 master weights); out_rms: the gain's start (None without match_embed_scale)."""
    with torch.device(device):
        return Connector(vision_dim, llm_dim, n_latents=args['n_latents'], width=args['resampler_width'],
                         depth=args['resampler_depth'], n_heads=args['resampler_heads'],
                         mlp_ratio=args['resampler_mlp_ratio'], proj_hidden=args['proj_hidden'],
                         dropout=args['proj_dropout'], vision_ln=args['vision_ln'], out_rms=out_rms)


def build_vlm(args, tokenizer, device='cpu', dtype=torch.float32, connector_state=None,
              attn_implementation='sdpa'):
    """args: the model keys (MODEL_KEYS). The backbones take `dtype` (bf16 on a GPU).
    attn_implementation ('sdpa', 'eager', 'flash_attention_2') is how the backbones compute
    attention, not part of the model: a checkpoint trained with one runs with another."""
    B.check_attention(attn_implementation, device)
    ids = special_ids(tokenizer, args.get('slot_token', ''))
    if args.get('image_brackets') and ids['vision_start'] is None:
        raise UserError(f"image_brackets=True but tokenizer '{tokenizer.name_or_path}' has no bracket pair "
                        f"({', '.join(' '.join(p) for p in BRACKET_PAIRS)}); set image_brackets=False")
    vision = B.build_vision(args['vision'], dtype, device, attn_implementation)
    spec = image_spec(args['vision'], vision.config)
    truncate_vision(vision, args['vision_feature_layer'])
    llm = B.build_llm(args['llm'], dtype, device, attn_implementation, vocab_size=len(tokenizer))
    check_head(llm)
    if llm.get_input_embeddings().num_embeddings < len(tokenizer):
        raise UserError(f"tokenizer '{tokenizer.name_or_path}' has {len(tokenizer)} ids but the LLM's vocabulary "
                        f"has {llm.get_input_embeddings().num_embeddings}: prepare the data with the LLM's tokenizer")
    if connector_state is not None and 'out_gain' in connector_state:
        out_rms = connector_state['out_gain'].float().mean().item()
    else:
        out_rms = embedding_rms(llm) if args['match_embed_scale'] else None
    connector = new_connector(args, vision.config.hidden_size, llm.config.hidden_size, out_rms, device)
    if connector_state is not None:
        load_connector(connector, connector_state)
    drop_cls = vision.config.model_type.startswith('clip')  # CLIP prepends a CLS token; LLaVA drops it
    brackets = (ids['vision_start'], ids['vision_end']) if args.get('image_brackets') else None
    return VLM(vision, llm, connector, ids, spec, drop_cls, brackets).to(device)

# -----------------------------------------------------------------------------
# Checkpoints (written by train.py, read here; exported by sample.py)


def load_connector(connector, state):
    """Load connector weights, or say in one line why they do not fit."""
    own = connector.state_dict()
    bad = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
           for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if bad or missing or extra:
        what = '; '.join(bad[:2] + ([f'missing {missing[:3]}'] if missing else []) +
                         ([f'unexpected {extra[:3]}'] if extra else []))
        raise UserError(f'checkpoint does not fit this connector/backbone config ({what}); use the config it '
                        f'was trained with')
    connector.load_state_dict(state)


def load_checkpoint(path, map_location='cpu'):
    """torch.load with weights_only=True, checked to be one of ours; one line when it is
    missing, corrupt, or not a training checkpoint."""
    if os.path.isdir(path):
        raise UserError(f'{path} is a directory: give the checkpoint file in it (e.g. {path}/ckpt.pt)')
    if not os.path.exists(path):
        raise UserError(f'no checkpoint at {path}')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f'checkpoint {path} is unreadable ({type(e).__name__}: {first_line(e, 100)}); it is '
                        f'corrupt or truncated - use another checkpoint (e.g. ckpt_best.pt) from the same '
                        f'out_dir') from None
    missing = [k for k in ('connector', 'model_args') if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f'{path} is not a training checkpoint of this project (no {" / ".join(missing)})')
    # checkpoints from before a model key existed get its default
    ckpt['model_args'] = {**MODEL_DEFAULTS, **ckpt['model_args']}
    return ckpt


def count_params(module):
    return sum(p.numel() for p in module.parameters())
