"""
The model: a frozen vision tower and a frozen causal LLM joined by the trainable connector
(connector.py).

Read top to bottom:
1) backbone names, the two defaults' known configs, the tiny preset and its tokenizer,
2) the VLM glue: encode images, splice connector outputs into the slot positions of
   inputs_embeds, caption-only loss, batched generation,
3) builders (hub id / local dir with real weights, `random:` from a config, `tiny`) and the
   image preprocessing rule of a tower,
4) checkpoints: load, rebuild the model from one, export the connector,
5) FLOPs per batch and device peaks, for MFU.
"""
import contextlib
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, atomic_write_bytes, first_line, hub_reachable
from connector import Connector
from images import image_spec

# -----------------------------------------------------------------------------
# Backbone specs. A backbone is named by one string:
#   'Qwen/Qwen3-8B-Base' or '/path/to/dir'   real weights (hub id or local directory)
#   'random:Qwen/Qwen3-8B-Base'               the known architecture with random weights (no download)
#   'random:/path/to/dir'                     architecture from a local config.json, random weights
#   'tiny'                                    a few layers, small widths (CPU demo and tests)

DEFAULT_LLM = 'Qwen/Qwen3-8B-Base'
DEFAULT_VISION = 'google/siglip-so400m-patch14-384'


def parse_backbone(name):
    """(kind, base) of a backbone name: kind is 'tiny', 'random' or 'pretrained'; base is the
    hub id or directory without the 'random:' prefix."""
    if name == 'tiny':
        return 'tiny', 'tiny'
    if name.startswith('random:'):
        return 'random', name[len('random:'):]
    return 'pretrained', name


# The model config keys, with their defaults (the design notes' recommendations). train.py
# takes its model globals from here and saves them in every checkpoint; sample.py rebuilds
# the model from them.
MODEL_DEFAULTS = dict(
    vision=DEFAULT_VISION,  # hub id, local dir, 'random:<id or dir>', or 'tiny'
    llm=DEFAULT_LLM,
    tokenizer='',  # '' = the tokenizer the data was prepared with (meta.json)
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
    image_brackets=False,  # wrap slots in <|vision_start|> ... <|vision_end|>
)
MODEL_KEYS = tuple(MODEL_DEFAULTS)

# The architectures of the two defaults are public facts; writing them here lets a
# full-size model be built (meta device for counting, GPU for benchmarks) with no download.
KNOWN_CONFIGS = {
    'Qwen/Qwen3-8B-Base': dict(
        model_type='qwen3', vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, hidden_act='silu', attention_bias=False,
        bos_token_id=151643, eos_token_id=151643),
    'google/siglip-so400m-patch14-384': dict(
        model_type='siglip_vision_model', hidden_size=1152, intermediate_size=4304,
        num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14),
}

# The tiny preset: big enough to learn the synthetic captions on a CPU in about a minute.
# The LLM is initialised wider than transformers' default (0.2 instead of 0.02): at 0.02 a
# random model's logits span a fraction of a nat, so no input could make it predict a caption
# confidently; a pretrained LLM's logits span tens of nats, and 0.2 gives the tiny one that range.
TINY_VISION = dict(model_type='siglip_vision_model', hidden_size=64, intermediate_size=128,
                   num_hidden_layers=3, num_attention_heads=4, image_size=48, patch_size=8)
TINY_LLM = dict(model_type='qwen3', hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-6, initializer_range=0.2)

# Tokens the prompt builder needs. Qwen's tokenizer has all of them; the tiny one copies them
# so the same code path runs on both. Slots reuse an existing token id: the LLM's embedding
# table is frozen, so a new token could never learn an embedding (and it is overwritten anyway).
EOS_TOKEN = '<|endoftext|>'
SLOT_TOKEN = '<|image_pad|>'
VISION_START, VISION_END = '<|vision_start|>', '<|vision_end|>'

# Every word of the synthetic dataset, the prompt templates and the QA set, so that the
# tiny tokenizer has no unknowns on the demo data. Anything else maps to [UNK].
TINY_WORDS = """
a an the one two three four five image images picture photo of in on at and with there is are
red green blue yellow purple orange white black pink brown gray grey cyan
circle circles square squares triangle triangles diamond diamonds star stars cross crosses
small large big top bottom left right center middle corner upper lower background
describe each order sentence per what color colour shape how many
1 2 3 4 5 6 7 8 9 0
""".split() + ['.', ',', ':', '?', '!', '-', "'", '"', '(', ')', '/', '\n']


def tiny_tokenizer():
    """A word-level tokenizer built in code: no download, a few hundred ids, same API as Qwen's."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = [EOS_TOKEN, SLOT_TOKEN, VISION_START, VISION_END, '[UNK]']
    vocab = {}
    for w in specials + TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
    tk.normalizer = normalizers.Lowercase()
    # words, single punctuation marks and newlines are tokens; other whitespace separates them
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior='removed', invert=True)
    tk.decoder = decoders.WordPiece(prefix='##', cleanup=True)  # joins with spaces, no space before '.'
    tk.add_special_tokens([AddedToken(t, special=True) for t in specials[:4]])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                  unk_token='[UNK]')
    tok.name_or_path = 'tiny'
    return tok


def load_tokenizer(name):
    """'tiny', a hub id or a local dir. `random:X` uses X's tokenizer."""
    kind, base = parse_backbone(name)
    if kind == 'tiny':
        return tiny_tokenizer()
    from transformers import AutoTokenizer
    return _from_pretrained(AutoTokenizer, base, 'tokenizer')


def special_ids(tok):
    """eos / slot / bracket ids of a tokenizer, checked to be single existing tokens."""
    ids = {}
    for key, t in (('eos', EOS_TOKEN), ('slot', SLOT_TOKEN), ('vision_start', VISION_START),
                   ('vision_end', VISION_END)):
        i = tok.convert_tokens_to_ids(t)
        if i is None or i == tok.unk_token_id:
            raise UserError(f"tokenizer '{tok.name_or_path}' has no token {t}; use a Qwen-family tokenizer "
                            f"or the 'tiny' one")
        ids[key] = int(i)
    return ids

# -----------------------------------------------------------------------------
# The VLM: frozen backbones + connector


class VLM(nn.Module):

    def __init__(self, vision, llm, connector, slot_id, eos_id, image_spec, drop_cls=False, brackets=None):
        super().__init__()
        self.vision, self.llm, self.connector = vision, llm, connector
        self.slot_id, self.eos_id, self.image_spec, self.drop_cls = slot_id, eos_id, image_spec, drop_cls
        self.brackets = brackets  # (start_id, end_id) around each image's slots, or None
        self.grad_checkpointing = False
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
        vis = (self.connector if connector is None else connector)(self.encode_images(images))
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
        logits = self.llm.get_output_embeddings()(h).float()
        return F.cross_entropy(logits, target_ids, reduction=reduction)

    @torch.no_grad()
    def generate(self, images, prompts, max_new_tokens=64, temperature=0.0, top_p=1.0, generator=None):
        """Batched generation from inputs_embeds. prompts: list of token-id lists (slots
        included); images ordered as in training. Prompts are left-padded so they all end
        at the same position. Returns one list of new token ids per prompt, eos excluded."""
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
        out = self.llm(inputs_embeds=self.embed(images, ids), attention_mask=mask, position_ids=pos,
                       use_cache=True, logits_to_keep=1)
        # transformers >= 5.24 names the KV cache `cache`; earlier releases `past_key_values`
        cache_key = 'cache' if 'cache' in out else 'past_key_values'
        past, logits = out[cache_key], out.logits[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        new = []
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
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

# -----------------------------------------------------------------------------
# Builders


def backbone_config(name, tiny):
    """The transformers config of a 'tiny' / 'random:' backbone: the tiny preset, one of the
    known configs, or a local dir's / the hub's config.json."""
    from transformers import AutoConfig
    kind, base = parse_backbone(name)
    if kind == 'tiny' or base in KNOWN_CONFIGS:
        d = dict(tiny if kind == 'tiny' else KNOWN_CONFIGS[base])
        return AutoConfig.for_model(d.pop('model_type'), **d)
    return _from_pretrained(AutoConfig, base, 'config')


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars and no loading tables: weights the model does not use (the text half
    of a SigLIP checkpoint) are expected; missing ones are checked by _from_pretrained."""
    from transformers.utils import logging
    logging.disable_progress_bar()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _from_pretrained(cls, name, what, **kw):
    """from_pretrained from a local dir or the cache, else the hub; one line on failure. A
    backbone must find every one of its weights in the checkpoint: a silently random part
    of a frozen model would waste a whole run."""
    if not os.path.isdir(name) and (name.startswith(('/', '.', '~')) or name.count('/') > 1):
        raise UserError(f"cannot load {what} '{name}': no such directory (a hub id looks like 'org/name')")
    weights = what in ('llm', 'vision')

    def load(local):
        with _quiet_transformers():
            return cls.from_pretrained(name, local_files_only=local, **kw,
                                       **(dict(output_loading_info=True) if weights else {}))
    out = None
    try:  # local first: no network needed, no retries
        out = load(True)
    except (OSError, ValueError) as e:
        why = first_line(e)
    if out is None and not os.path.isdir(name):
        if not hub_reachable():
            why = 'not in the local Hugging Face cache and the hub is unreachable'
        else:
            try:
                out = load(False)
            except (OSError, ValueError) as e:
                why = first_line(e)
    if out is None:
        hint = f", or {what}='random:{name}' for random weights" if weights else ''
        raise UserError(f"cannot load {what} '{name}' ({why}); download it on a connected machine "
                        f"(`hf download {name}`) or give a local directory{hint}")
    if not weights:
        return out
    model, info = out
    if info.get('missing_keys'):
        missing = sorted(info['missing_keys'])
        raise UserError(f"{what} '{name}' lacks {len(missing)} of its weights ({missing[0]}, ...): the checkpoint "
                        f"does not match its config.json")
    return model


@contextlib.contextmanager
def seeded(device, seed=0):
    """Random backbones are drawn from a fixed seed: a checkpoint trained on 'tiny' or
    'random:...' backbones only means something with the very same frozen weights, so
    sample.py and resume must rebuild them identically."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(seed)
        yield


def _random_backbone(auto_cls, cfg, dtype, device, attn_implementation):
    cfg._attn_implementation = attn_implementation
    with seeded(device), torch.device(device):
        return auto_cls.from_config(cfg, dtype=dtype)


def build_llm(name, dtype=torch.float32, device='cpu', attn_implementation='sdpa', vocab_size=None):
    from transformers import AutoModelForCausalLM
    kind, base = parse_backbone(name)
    if kind == 'pretrained':
        llm = _from_pretrained(AutoModelForCausalLM, base, 'llm', dtype=dtype,
                               attn_implementation=attn_implementation).to(device)
    else:
        cfg = backbone_config(name, TINY_LLM)
        if kind == 'tiny':
            cfg.vocab_size = vocab_size or 256
        llm = _random_backbone(AutoModelForCausalLM, cfg, dtype, device, attn_implementation)
    return llm.eval().requires_grad_(False)


def build_vision(name, dtype=torch.float32, device='cpu', attn_implementation='sdpa'):
    from transformers import AutoModel
    kind, base = parse_backbone(name)
    # a full SigLIP/CLIP config (text + vision): keep the vision half, and from a full
    # checkpoint load only the vision tower's weights
    cfg = backbone_config(name, TINY_VISION)
    cfg = getattr(cfg, 'vision_config', cfg)
    if kind == 'pretrained':
        cls = AutoModel._model_mapping[type(cfg)]
        vision = _from_pretrained(cls, base, 'vision', dtype=dtype,
                                  attn_implementation=attn_implementation).to(device)
    else:
        vision = _random_backbone(AutoModel, cfg, dtype, device, attn_implementation)
    return vision.eval().requires_grad_(False)


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


def embedding_rms(llm):
    w = llm.get_input_embeddings().weight
    if w.device.type == 'meta':
        return 0.02
    return float(torch.linalg.vector_norm(w, dtype=torch.float32) / math.sqrt(w.numel()))


def build_vlm(args, tokenizer, device='cpu', dtype=torch.float32, connector_state=None,
              attn_implementation='sdpa'):
    """args: the model keys (MODEL_KEYS). The connector is fp32 (its optimizer needs fp32
    master weights); the backbones take `dtype` (bf16 on a GPU). attn_implementation ('sdpa',
    'eager', 'flash_attention_2') is how the backbones compute attention, not part of the
    model: a checkpoint trained with one runs with another."""
    ids = special_ids(tokenizer)
    vision = build_vision(args['vision'], dtype, device, attn_implementation)
    spec = image_spec(args['vision'], vision.config)
    truncate_vision(vision, args['vision_feature_layer'])
    llm = build_llm(args['llm'], dtype, device, attn_implementation, vocab_size=len(tokenizer))
    if llm.get_input_embeddings().num_embeddings < len(tokenizer):
        raise UserError(f"tokenizer '{tokenizer.name_or_path}' has {len(tokenizer)} ids but the LLM's vocabulary "
                        f"has {llm.get_input_embeddings().num_embeddings}: prepare the data with the LLM's tokenizer")
    if connector_state is not None and 'out_gain' in connector_state:
        out_rms = connector_state['out_gain'].float().mean().item()
    else:
        out_rms = embedding_rms(llm) if args['match_embed_scale'] else None
    with torch.device(device):
        connector = Connector(vision.config.hidden_size, llm.config.hidden_size, n_latents=args['n_latents'],
                              width=args['resampler_width'], depth=args['resampler_depth'],
                              n_heads=args['resampler_heads'], mlp_ratio=args['resampler_mlp_ratio'],
                              proj_hidden=args['proj_hidden'], dropout=args['proj_dropout'],
                              vision_ln=args['vision_ln'], out_rms=out_rms)
    if connector_state is not None:
        load_connector(connector, connector_state)
    drop_cls = vision.config.model_type.startswith('clip')  # CLIP prepends a CLS token; LLaVA drops it
    brackets = (ids['vision_start'], ids['vision_end']) if args.get('image_brackets') else None
    return VLM(vision, llm, connector, ids['slot'], ids['eos'], spec, drop_cls, brackets).to(device)

# -----------------------------------------------------------------------------
# Checkpoints


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


def resolve_checkpoint(path):
    """A checkpoint file, an exported connector folder, or an out_dir (its ckpt.pt)."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, 'connector_config.json')):
        if os.path.exists(os.path.join(path, 'ckpt.pt')):
            return os.path.join(path, 'ckpt.pt')
        raise UserError(f'{path} holds neither a ckpt.pt nor an exported connector (connector_config.json)')
    return path


def from_checkpoint(path, device='cpu', dtype=torch.float32, attn_implementation='sdpa'):
    """(model, tokenizer, ckpt) from a training checkpoint, an out_dir or an exported
    connector folder."""
    path = resolve_checkpoint(path)
    if os.path.isdir(path):
        from safetensors.torch import load_file
        try:
            with open(os.path.join(path, 'connector_config.json')) as f:
                args = {**MODEL_DEFAULTS, **json.load(f)}
            state = load_file(os.path.join(path, 'connector.safetensors'))
        except Exception as e:
            raise UserError(f'exported connector in {path} is unreadable ({first_line(e, 100)}); export it again '
                            f'with sample.py --export') from None
        ckpt = dict(model_args=args)
    else:
        ckpt = load_checkpoint(path)
        args, state = ckpt['model_args'], ckpt['connector']
    tok = load_tokenizer(args['tokenizer'])
    model = build_vlm(args, tok, device, dtype, connector_state=state, attn_implementation=attn_implementation)
    return model.eval(), tok, ckpt


def export_connector(ckpt_path, out_dir):
    """Connector weights as safetensors + a JSON of the model config: the artifact to share."""
    from safetensors.torch import save
    ckpt = load_checkpoint(resolve_checkpoint(ckpt_path))
    tensors = {k: v.contiguous() for k, v in ckpt['connector'].items()}
    atomic_write_bytes(os.path.join(out_dir, 'connector.safetensors'), save(tensors))
    atomic_write_bytes(os.path.join(out_dir, 'connector_config.json'),
                       json.dumps(ckpt['model_args'], indent=2).encode())
    return out_dir


def count_params(module):
    return sum(p.numel() for p in module.parameters())

# -----------------------------------------------------------------------------
# FLOPs, for MFU. Counted from the shapes actually run (matmuls only; norms and
# activations are noise). The frozen backbones get no weight gradients, so the LLM costs
# forward + input-gradient backward = 2x its forward, not the usual 3x; the vision tower
# runs forward only; the connector trains, so it costs the usual 3x.


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


# bf16 dense peak FLOP/s by device name; an unknown device gets no MFU rather than a wrong one
PEAK_BF16 = [('H200', 989e12), ('H100 NVL', 835e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('GH200', 989e12),
             ('B200', 2250e12), ('A100', 312e12), ('L40S', 362e12), ('A10G', 70e12), ('RTX 4090', 165e12)]


def peak_flops(device):
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAK_BF16 if key in name), None)
