"""
The model: a frozen vision tower and a frozen causal LLM joined by the trainable connector
(connector.py).

Read top to bottom:
1) the model keys, the two defaults' known configs, the tiny preset and its tokenizer,
2) the token rules of any LLM family (eos, bos, the slot token, brackets), in one place,
3) the VLM glue: encode images, splice connector outputs into the slot positions of
   inputs_embeds, caption-only loss (with the family's own logit post-processing), batched
   generation,
4) builders (hub id / local dir with real weights, loaded straight onto the device;
   `random:` from a config; `tiny`), with the head check and the weights' fingerprint,
5) checkpoints: load, rebuild the model from one, export the connector.
FLOPs and device peaks, for MFU, are in flops.py.
"""
import contextlib
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, atomic_write_bytes, first_line, hub_reachable, parse_backbone
from connector import Connector
from images import image_spec

# -----------------------------------------------------------------------------
# Backbones are named by one string (common.parse_backbone): a hub id or local directory
# (real weights), 'random:<id or dir>' (that architecture, random weights) or 'tiny'.

DEFAULT_LLM = 'Qwen/Qwen3-8B-Base'
DEFAULT_VISION = 'google/siglip-so400m-patch14-384'


# The model config keys, with their defaults (the design notes' recommendations). train.py
# takes its model globals from here and saves them in every checkpoint; sample.py rebuilds
# the model from them.
MODEL_DEFAULTS = dict(
    vision=DEFAULT_VISION,  # hub id, local dir, 'random:<id or dir>', or 'tiny'
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

# The tiny tokenizer's special tokens: Qwen's names, so the tiny preset takes the same token
# rules (below) as the default LLM.
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


# -----------------------------------------------------------------------------
# Token rules: everything the prompt builder asks of a tokenizer, for any LLM family, decided
# here and nowhere else.
# - eos: the tokenizer's own end of text (Qwen base <|endoftext|>, Llama-3 <|end_of_text|>,
#   Mistral </s>, Gemma <eos>, SmolLM2-Instruct <|im_end|>);
# - bos: prepended to every sequence exactly when the tokenizer itself prepends one to text
#   (Llama, Mistral, Gemma do; Qwen does not), so the LLM sees the start it was trained on;
# - the slot token: an existing token that text never produces. The LLM's embedding table is
#   frozen, so a new token could never learn an embedding, and the slots' embeddings are
#   overwritten anyway; any special token that is not bos/eos/pad will do. Chosen from the
#   table below, overridable with slot_token; captions that contain it are dropped when the
#   data is prepared;
# - brackets around each image's slots, only where the tokenizer has such a pair.
SLOT_NAMES = ('<|image_pad|>', '<image_soft_token>', '<|image|>', '<image>', '[IMG]', '<|IMAGE|>')
SLOT_RESERVED = re.compile(r'reserved|unused|placeholder|control|extra_id', re.I)  # tokens kept spare
BRACKET_PAIRS = (('<|vision_start|>', '<|vision_end|>'), ('<start_of_image>', '<end_of_image>'),
                 ('<|image_start|>', '<|image_end|>'), ('<image_start>', '<image_end>'), ('<img>', '</img>'))
# text a tokenizer with an unknown-token fallback cannot cover: accents, CJK, emoji, a control byte
UNK_PROBE = 'zqx Ærøskøbing 東京 \U0001F600 \u2603 ~^` \x07'


def single_id(tok, text):
    """The id of `text` if it is one token of the tokenizer's vocabulary, else None."""
    i = tok.convert_tokens_to_ids(text)
    if i is None or (i == tok.unk_token_id and text != tok.unk_token):
        return None
    return int(i)


def _bos_id(tok):
    """The id the tokenizer puts before text on its own (add_special_tokens), or None."""
    plain = tok('a b', add_special_tokens=False)['input_ids']
    full = tok('a b')['input_ids']
    return int(full[0]) if full[:1] != plain[:1] and full[1:1 + len(plain)] == plain else None


def _slot_candidates(tok, taken):
    """Token texts that could hold the image slots, best first: the known image-slot names,
    then the spare tokens a family reserves, then its other special tokens, and as a last
    resort the unknown token of a tokenizer that never produces it (byte-level BPE)."""
    added = {int(i): t for i, t in tok.added_tokens_decoder.items()}
    special = {i: t.content for i, t in sorted(added.items()) if t.special}
    bracket_texts = {t for pair in BRACKET_PAIRS for t in pair}
    ok = lambda t: t not in bracket_texts and single_id(tok, t) not in taken | {tok.unk_token_id}  # noqa: E731
    names = [t for t in SLOT_NAMES if single_id(tok, t) is not None]
    spare = [t.content for _, t in sorted(added.items()) if SLOT_RESERVED.search(t.content)]
    yield from (t for t in names + spare + list(special.values()) if ok(t))
    unk = tok.unk_token_id
    if unk is not None and unk not in taken and unk not in tok(UNK_PROBE, add_special_tokens=False)['input_ids']:
        yield tok.unk_token


def special_ids(tok, slot_token=''):
    """The token rules of a tokenizer: dict(eos, bos (None: no bos), slot, slot_token,
    vision_start / vision_end (None: no bracket pair)). slot_token: '' chooses it (above)."""
    name = tok.name_or_path
    eos = None if tok.eos_token is None else single_id(tok, tok.eos_token)
    if eos is None:
        raise UserError(f"tokenizer '{name}' has no eos token (eos_token in its tokenizer_config.json): give the "
                        f"LLM's own tokenizer, or set eos_token there")
    bos = _bos_id(tok)
    taken = {eos, bos, tok.pad_token_id, tok.bos_token_id} - {None}
    if slot_token:
        slot = single_id(tok, slot_token)
        if slot is None or slot in taken:
            why = 'is not one token of its vocabulary' if slot is None else 'is its bos, eos or pad token'
            raise UserError(f"slot_token '{slot_token}' {why} for tokenizer '{name}': give an existing special token "
                            f"that is none of those")
    else:
        slot_token = next(_slot_candidates(tok, taken), None)
        if slot_token is None:
            raise UserError(f"tokenizer '{name}' has no special token free for the image slots (its special tokens "
                            f"are all bos/eos/pad, and its unknown token can come from text): give one with "
                            f"--slot_token=TOKEN (prepare_llava.py), a rare single token that captions do not use")
        slot = single_id(tok, slot_token)
    pair = next(((a, b) for a, b in BRACKET_PAIRS if None not in (single_id(tok, a), single_id(tok, b))
                 and slot not in (single_id(tok, a), single_id(tok, b))), (None, None))
    return dict(eos=eos, bos=bos, slot=slot, slot_token=slot_token,
                vision_start=single_id(tok, pair[0]) if pair[0] else None,
                vision_end=single_id(tok, pair[1]) if pair[1] else None)


def control_ids(ids):
    """The ids a caption must never contain: they steer the sequence, not describe the image."""
    return {ids[k] for k in ('eos', 'bos', 'slot', 'vision_start', 'vision_end') if ids.get(k) is not None}

# -----------------------------------------------------------------------------
# The VLM: frozen backbones + connector


class VLM(nn.Module):

    def __init__(self, vision, llm, connector, ids, image_spec, drop_cls=False, brackets=None):
        super().__init__()
        self.vision, self.llm, self.connector = vision, llm, connector
        self.ids = ids  # the tokenizer's token rules (special_ids)
        self.slot_id, self.eos_id, self.bos_id = ids['slot'], ids['eos'], ids['bos']
        self.image_spec, self.drop_cls = image_spec, drop_cls
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

    def compile_blocks(self, backend='inductor'):
        """torch.compile each repeated block of the backbones (every entry of their layer lists)
        and the connector, not each backbone whole: the 36 decoder layers share one compiled
        graph, so compiling costs one layer's time instead of minutes, and the causal mask is
        still built eagerly outside the graphs, where SDPA keeps its flash kernel."""
        def blocks(module):
            for child in module.children():
                if isinstance(child, nn.ModuleList):
                    yield from child
                else:
                    yield from blocks(child)
        for block in [*blocks(self.llm), *blocks(self.vision)]:
            block.compile(backend=backend)
        self.connector.compile(backend=backend)
        return self

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
        return F.cross_entropy(lm_logits(self.llm, h), target_ids, reduction=reduction)

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


@torch.no_grad()
def check_head(llm, n=6):
    """The caption-only head (decoder + lm_logits) must give the LLM's own logits: a family
    that post-processes its logits in a way lm_logits does not know would otherwise train on a
    wrong loss, silently. One forward pass of a few tokens, once per build."""
    p = next(llm.parameters())
    if p.device.type == 'meta':
        return
    table = llm.get_input_embeddings()
    emb = table(torch.arange(n, device=p.device)[None] * (table.num_embeddings // n))
    own = llm(inputs_embeds=emb, use_cache=False).logits.float()
    ours = lm_logits(llm, llm.get_decoder()(inputs_embeds=emb, use_cache=False).last_hidden_state)
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
    # the generator lives on the logits' device (sample.py, evaluate): drawing there keeps the
    # vocabulary-sized distribution off the host, one token per row per step
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


def _from_pretrained(cls, name, what, device=None, **kw):
    """from_pretrained from a local dir or the cache, else the hub; one line on failure. A
    backbone must find every one of its weights in the checkpoint: a silently random part
    of a frozen model would waste a whole run. Weights load straight onto `device`
    (device_map): going through host memory first would cost every rank a full copy of the
    LLM in RAM (8 ranks x 16 GB) and twice the load time."""
    if not os.path.isdir(name) and (name.startswith(('/', '.', '~')) or name.count('/') > 1):
        raise UserError(f"cannot load {what} '{name}': no such directory (a hub id looks like 'org/name')")
    weights = what in ('llm', 'vision')
    if device is not None:
        kw['device_map'] = str(torch.device(device))

    def load(local):
        with _quiet_transformers():
            return cls.from_pretrained(name, local_files_only=local, **kw,
                                       **(dict(output_loading_info=True) if weights else {}))
    try:  # local first: no network needed, no retries
        out = load(True)
    except (OSError, ValueError, ImportError) as e:
        out, why = None, first_line(e)
    if out is None and os.path.isdir(name):  # a folder on this disk: no download would help
        raise UserError(f"cannot load {what} from the folder '{name}': {why}")
    if out is None:
        if not hub_reachable():
            why = 'not in the local Hugging Face cache, and the hub is unreachable'
        else:
            try:
                out = load(False)
            except (OSError, ValueError, ImportError) as e:
                why = first_line(e)
    if out is None:
        hint = f", or {what}='random:{name}' for random weights" if weights else ''
        raise UserError(f"cannot load {what} '{name}' ({why}); download it on a connected machine "
                        f"(`hf download {name}`) and give its local directory{hint}")
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
        llm = _from_pretrained(AutoModelForCausalLM, base, 'llm', dtype=dtype, device=device,
                               attn_implementation=attn_implementation)
    else:
        cfg = backbone_config(name, TINY_LLM)
        if kind == 'tiny':
            cfg.vocab_size = vocab_size or 256
        llm = _random_backbone(AutoModelForCausalLM, cfg, dtype, device, attn_implementation)
    llm.eval().requires_grad_(False)
    check_head(llm)
    llm.frozen_fingerprint = weights_fingerprint(llm)  # for evaluate.llm_untouched
    return llm


@torch.no_grad()
def weights_fingerprint(module):
    """{name: (sum, sum of squares)} of every weight, in float64, computed where the weights
    live: comparing two of them tells whether any weight changed, without a second copy."""
    return {n: (float(p.sum(dtype=torch.float64)), float(torch.linalg.vector_norm(p, dtype=torch.float64)))
            for n, p in module.named_parameters() if p.device.type != 'meta'}


def build_vision(name, dtype=torch.float32, device='cpu', attn_implementation='sdpa'):
    from transformers import AutoModel
    kind, base = parse_backbone(name)
    # a full SigLIP/CLIP config (text + vision): keep the vision half, and from a full
    # checkpoint load only the vision tower's weights
    cfg = backbone_config(name, TINY_VISION)
    cfg = getattr(cfg, 'vision_config', cfg)
    if kind == 'pretrained':
        cls = AutoModel._model_mapping[type(cfg)]
        vision = _from_pretrained(cls, base, 'vision', dtype=dtype, device=device,
                                  attn_implementation=attn_implementation)
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


def check_attention(attn_implementation, device):
    """flash_attention_2 needs the flash-attn package and a CUDA GPU: one line before loading."""
    if attn_implementation != 'flash_attention_2':
        return
    import importlib.util
    if importlib.util.find_spec('flash_attn') is None:
        raise UserError("attn_implementation='flash_attention_2' needs the flash-attn package (pip install flash-attn "
                        "--no-build-isolation); or use attn_implementation='sdpa'")
    if torch.device(device).type != 'cuda':
        raise UserError(f"attn_implementation='flash_attention_2' runs on CUDA GPUs only, not on {device}; use 'sdpa'")


def build_vlm(args, tokenizer, device='cpu', dtype=torch.float32, connector_state=None,
              attn_implementation='sdpa'):
    """args: the model keys (MODEL_KEYS). The connector is fp32 (its optimizer needs fp32
    master weights); the backbones take `dtype` (bf16 on a GPU). attn_implementation ('sdpa',
    'eager', 'flash_attention_2') is how the backbones compute attention, not part of the
    model: a checkpoint trained with one runs with another."""
    check_attention(attn_implementation, device)
    ids = special_ids(tokenizer, args.get('slot_token', ''))
    if args.get('image_brackets') and ids['vision_start'] is None:
        raise UserError(f"image_brackets=True but tokenizer '{tokenizer.name_or_path}' has no bracket pair "
                        f"({', '.join(' '.join(p) for p in BRACKET_PAIRS)}); set image_brackets=False")
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
    return VLM(vision, llm, connector, ids, spec, drop_cls, brackets).to(device)

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
