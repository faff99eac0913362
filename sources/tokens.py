"""
The token rules of any LLM family: everything the prompt builder asks of a tokenizer, decided
here and nowhere else.
- eos: the tokenizer's own end of text (Qwen base <|endoftext|>, Llama-3 <|end_of_text|>,
  Mistral </s>, Gemma <eos>, SmolLM2-Instruct <|im_end|>);
- bos: prepended to every sequence exactly when the tokenizer itself prepends one to text
  (Llama, Mistral, Gemma do; Qwen does not), so the LLM sees the start it was trained on;
- the slot token: an existing token that text never produces. The LLM's embedding table is
  frozen, so a new token could never learn an embedding, and the slots' embeddings are
  overwritten anyway; any special token that is not bos/eos/pad will do. Chosen from the
  table below, overridable with slot_token; captions that contain it are dropped when the
  data is prepared;
- brackets around each image's slots, only where the tokenizer has such a pair.
"""
import re

from configurator import UserError

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


def prepared_rules(tok, meta, slot_token='', where='the data'):
    """The token rules a prepared dataset was made with (its meta.json's slot token), checked
    against what the tokenizer gives: one line when the data needs preparing again."""
    ids = special_ids(tok, slot_token or meta.get('slot_token', ''))
    for key, want in (('slot', meta['slot_id']), ('eos', meta['eos_id']), ('bos', meta.get('bos_id', ids['bos']))):
        if ids[key] != want:
            raise UserError(f"{where} was prepared with {key} id {want} but the tokenizer and slot_token="
                            f"'{ids['slot_token']}' give {ids[key]}; re-run prepare_llava.py with this tokenizer (and "
                            f"--slot_token), or train with the data's settings")
    return ids
