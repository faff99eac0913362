"""
The frozen backbones by name, and what the code knows of them without a download. A backbone
is named by one string:
  'Qwen/Qwen3-8B-Base' or '/path/to/dir'   real weights (hub id or local directory)
  'random:Qwen/Qwen3-8B-Base'               the known architecture with random weights (no download)
  'random:/path/to/dir'                     architecture from a local config.json, random weights
  'tiny'                                    a few layers, small widths (the CPU demo and the tests)
Here: how a name parses, the architectures (and SigLIP's preprocessing) of the two defaults,
the tiny preset with its tokenizer (built in code), and the builders: real weights from a
local folder or the hub cache (local first, one line on failure, straight onto the device),
random ones from a config, drawn from a fixed seed.
"""
import contextlib
import os

import torch

from configurator import UserError, first_line, hub_reachable

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


# The architectures of the two defaults are public facts; writing them here lets a full-size
# model be built (meta device for counting, GPU for benchmarks) with no download.
KNOWN_CONFIGS = {
    DEFAULT_LLM: dict(
        model_type='qwen3', vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, hidden_act='silu', attention_bias=False,
        bos_token_id=151643, eos_token_id=151643),
    DEFAULT_VISION: dict(
        model_type='siglip_vision_model', hidden_size=1152, intermediate_size=4304,
        num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14),
}
# The default tower's preprocessor_config.json: straight to 384x384, bicubic, mean/std 0.5
KNOWN_PROCESSORS = {
    DEFAULT_VISION: dict(size=dict(height=384, width=384), resample=3, do_normalize=True,
                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
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
# rules (inputs/tokens.py) as the default LLM.
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

# -----------------------------------------------------------------------------
# Builders


def load_tokenizer(name):
    """'tiny', a hub id or a local dir. `random:X` uses X's tokenizer."""
    kind, base = parse_backbone(name)
    if kind == 'tiny':
        return tiny_tokenizer()
    from transformers import AutoTokenizer
    return _from_pretrained(AutoTokenizer, base, 'tokenizer')


def backbone_config(name, tiny=None):
    """The transformers config of a 'tiny' / 'random:' backbone: the tiny preset (`tiny`, a
    dict of sources/backbones.py), one of the known configs, or a local dir's / the hub's."""
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
    """Random weights are drawn from a fixed seed: a checkpoint trained on 'tiny' or
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
    return llm.eval().requires_grad_(False)


def vision_config(name):
    """The tower's config: of a full SigLIP/CLIP config (text + vision), the vision half."""
    cfg = backbone_config(name, TINY_VISION)
    return getattr(cfg, 'vision_config', cfg)


def build_vision(name, dtype=torch.float32, device='cpu', attn_implementation='sdpa'):
    from transformers import AutoModel
    kind, base = parse_backbone(name)
    cfg = vision_config(name)  # from a full checkpoint only the vision tower's weights load
    if kind == 'pretrained':
        cls = AutoModel._model_mapping[type(cfg)]
        vision = _from_pretrained(cls, base, 'vision', dtype=dtype, device=device,
                                  attn_implementation=attn_implementation)
    else:
        vision = _random_backbone(AutoModel, cfg, dtype, device, attn_implementation)
    return vision.eval().requires_grad_(False)


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
