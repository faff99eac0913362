"""
Any decoder family: tiny random LLMs of six families (Llama, Mistral, Gemma, Phi-3, Qwen2,
Qwen3), built from code, each with a tokenizer carrying that family's real special tokens and
bos rule, saved as local folders and used through the real-weights loading path. For each:
the token rules (eos, bos, slot, brackets), prepare, a short training run and its resume, the
caption-only loss against the full-logits loss, bos in every sequence where the family wants
it, generation stopping at the family's eos, and the connector's starting scale. Then the
token rules on tokenizers with no obvious slot token, and on the real Qwen3 and SmolLM2
tokenizers where they are installed.

$ python -m pytest -q tests/test_families.py
"""
import json

import pytest
import torch
import torch.nn.functional as F

import data
import model as M
import prepare_llava as P
from conftest import ASSETS, TINY_ARGS, assert_ok, rand_images, read_log, train_args
from test_train import run_forked
from sources import backbones as B
from sources import tokens as T

# Per family: the model config, the tokenizer's special tokens in id order (as the family's own
# tokenizer numbers them), bos / eos / pad / unk, whether the tokenizer prepends bos to text,
# and the slot token the rules must choose.
FAMILIES = {
    'llama': dict(model_type='llama', specials=['<|begin_of_text|>', '<|end_of_text|>', '<|reserved_special_token_0|>',
                                                 '<|reserved_special_token_1|>', '<|start_header_id|>',
                                                 '<|end_header_id|>', '<|eot_id|>'],
                  bos='<|begin_of_text|>', eos='<|end_of_text|>', pad=None, add_bos=True,
                  slot='<|reserved_special_token_0|>'),
    'mistral': dict(model_type='mistral', specials=['<unk>', '<s>', '</s>', '[INST]', '[/INST]', '[TOOL_CALLS]',
                                                     '[control_8]', '[control_9]'],
                    bos='<s>', eos='</s>', pad=None, add_bos=True, slot='[control_8]'),
    'gemma': dict(model_type='gemma', specials=['<pad>', '<eos>', '<bos>', '<unk>', '<mask>', '<start_of_turn>',
                                                 '<end_of_turn>', '<unused0>', '<unused1>'],
                  bos='<bos>', eos='<eos>', pad='<pad>', add_bos=True, slot='<unused0>'),
    'phi3': dict(model_type='phi3', specials=['<unk>', '<s>', '</s>', '<|endoftext|>', '<|assistant|>',
                                               '<|placeholder1|>', '<|placeholder2|>', '<|end|>', '<|user|>'],
                 bos='<s>', eos='<|endoftext|>', pad='<|endoftext|>', add_bos=False, slot='<|placeholder1|>'),
    'qwen2': dict(model_type='qwen2', specials=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                  bos=None, eos='<|endoftext|>', pad='<|endoftext|>', add_bos=False, slot='<|im_start|>', bpe=True),
    'qwen3': dict(model_type='qwen3', specials=['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|vision_start|>',
                                                 '<|vision_end|>', '<|vision_pad|>', '<|image_pad|>'],
                  bos=None, eos='<|endoftext|>', pad='<|endoftext|>', add_bos=False, slot='<|image_pad|>'),
}
UNK = '<unk>'  # the word-level model's fallback for words outside the vocabulary


def bpe_tokenizer(specials):
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 style: it can encode any text without an
    unknown token) trained in code on the synthetic words."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([' '.join(B.TINY_WORDS)] * 4, trainer)
    tk.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return tk, PreTrainedTokenizerFast


def family_tokenizer(fam):
    """A tokenizer over the synthetic words with the family's special tokens: byte-level BPE
    where the family's own is (transformers rebuilds a Qwen2 tokenizer as BPE from its files),
    else word-level."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    if fam.get('bpe'):
        tk, cls = bpe_tokenizer(fam['specials'])
        return cls(tokenizer_object=tk, bos_token=fam['bos'], eos_token=fam['eos'], pad_token=fam['pad'])
    vocab = {}
    for w in fam['specials'] + [UNK] + B.TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior='removed', invert=True)
    tk.decoder = decoders.WordPiece(prefix='##', cleanup=True)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fam['specials']])
    if fam['add_bos']:
        bos = fam['bos']
        tk.post_processor = processors.TemplateProcessing(single=f'{bos} $A', pair=f'{bos} $A {bos} $B',
                                                          special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=fam['bos'], eos_token=fam['eos'],
                                   pad_token=fam['pad'], unk_token=UNK)


def family_folder(root, name):
    """A tiny random LLM of the family and its tokenizer, saved as a local folder."""
    from transformers import AutoConfig, AutoModelForCausalLM
    fam = FAMILIES[name]
    tok = family_tokenizer(fam)
    sizes = {k: v for k, v in B.TINY_LLM.items() if k not in ('model_type', 'tie_word_embeddings')}
    cfg = AutoConfig.for_model(fam['model_type'], **sizes, vocab_size=len(tok),
                               tie_word_embeddings=name in ('gemma', 'qwen2'),  # both layouts of the head
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    with B.seeded('cpu', 0):
        llm = AutoModelForCausalLM.from_config(cfg)
    folder = root / name
    llm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def families(tmp_path_factory):
    """{family: (LLM folder, prepared data)}: 200 synthetic images prepared with each tokenizer."""
    root = tmp_path_factory.mktemp('families')
    out = {}
    for name in FAMILIES:
        folder = family_folder(root, name)
        d = root / f'data_{name}'
        P.main(['--synthetic=200', f'--data_dir={d}', f'--tokenizer={folder}', '--llm=none', '--workers=1'])
        out[name] = (folder, d / 'prepared')
    return out


RUN = ['--log_interval=1', '--eval_interval=2', '--eval_iters=1', '--sample_interval=0', '--eval_report_num=0',
       '--warmup_frac=0', '--min_lr_frac=1', '--batch_size=8', '--multi_image_frac=0.2']


@pytest.fixture(scope='module')
def runs(families, tmp_path_factory):
    """Per family: 4 steps uninterrupted (A), and 2 steps (B) then resumed to 4 (R)."""
    tmp = tmp_path_factory.mktemp('family_runs')

    def args(name, run, *extra):
        folder, prepared = families[name]
        return train_args(prepared, tmp / f'{name}_{run}', *RUN, f'--llm={folder}', *extra)
    first = run_forked({f'{n}_{r}': args(n, r, f'--max_iters={k}') for n in FAMILIES for r, k in (('A', 4), ('B', 2))},
                       tmp, alarm=240)  # twelve runs side by side on two cores
    for p in first.values():
        assert_ok(p)
    second = run_forked({f'{n}_R': args(n, 'B', '--max_iters=4', '--init_from=resume') for n in FAMILIES}, tmp,
                        alarm=240)
    for p in second.values():
        assert_ok(p)
    return {n: (tmp / f'{n}_A', tmp / f'{n}_B') for n in FAMILIES}


def losses(out):
    return {r['iter']: r['loss'] for r in read_log(out) if 'loss' in r}


def build(name, families, **over):
    folder, prepared = families[name]
    args = {**TINY_ARGS, 'llm': str(folder), 'tokenizer': str(folder), **over}
    tok = B.load_tokenizer(str(folder))
    return M.build_vlm(args, tok).eval(), tok, data.open_prepared(str(prepared))


@pytest.mark.parametrize('name', list(FAMILIES))
def test_token_rules_follow_the_family(name, families):
    fam = FAMILIES[name]
    folder, prepared = families[name]
    tok = B.load_tokenizer(str(folder))
    ids = T.special_ids(tok)
    assert tok.convert_ids_to_tokens(ids['eos']) == fam['eos']
    assert ids['bos'] == (tok.convert_tokens_to_ids(fam['bos']) if fam['add_bos'] else None)
    assert ids['slot_token'] == fam['slot'] and tok.convert_ids_to_tokens(ids['slot']) == fam['slot']
    assert (ids['vision_start'] is not None) == (name == 'qwen3')  # only Qwen3 has a bracket pair
    meta = json.loads((prepared / 'meta.json').read_text())
    assert (meta['eos_id'], meta['slot_id'], meta['bos_id'], meta['slot_token']) == \
        (ids['eos'], ids['slot'], ids['bos'], fam['slot'])
    assert meta['splits']['train'] > 150  # the family's tokenizer reads every synthetic caption


@pytest.mark.parametrize('name', list(FAMILIES))
def test_training_and_resume(name, runs):
    """The run trains (finite losses), writes its checkpoint with the slot token, and the
    resumed steps equal the uninterrupted ones."""
    a, b = runs[name]
    la, lb = losses(a), losses(b)
    assert sorted(la) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for v in la.values())
    for it in (3, 4):
        assert lb[it] == pytest.approx(la[it], rel=1e-5, abs=1e-6), (name, la, lb)
    ckpt = M.load_checkpoint(str(b / 'ckpt.pt'))
    assert ckpt['model_args']['slot_token'] == FAMILIES[name]['slot']


@pytest.mark.parametrize('name', list(FAMILIES))
def test_caption_only_loss_equals_full_logits_loss_and_bos_leads(name, families):
    vlm, tok, prepared = build(name, families)
    b = data.SampleBuilder(tok, TINY_ARGS['n_latents'], vlm.slot_id, vlm.eos_id, vlm.brackets, 256, vlm.bos_id)
    ds = data.CaptionDataset(prepared, 'train', b, vlm.image_spec)
    batch = data.collate([ds[0], ds[(1, 2)], ds[3]], pad_id=vlm.eos_id)  # Template A and B rows
    bos = FAMILIES[name]['add_bos']
    first = batch['input_ids'][:, 0].tolist()
    assert first == [vlm.bos_id] * 3 if bos else vlm.bos_id is None and vlm.slot_id in first
    if FAMILIES[name]['bos']:  # once per sequence, at its start; never where the tokenizer does not prepend it
        declared = tok.convert_tokens_to_ids(FAMILIES[name]['bos'])
        assert int((batch['input_ids'] == declared).sum()) == (3 if bos else 0)
    images, input_ids, target_pos, target_ids, _ = data.to_device(batch, 'cpu')
    with torch.no_grad():
        ours = vlm(images, input_ids, target_pos, target_ids)
        logits = vlm.llm(inputs_embeds=vlm.embed(images, input_ids)).logits.float()
        labels = batch['labels']
        full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    assert ours.item() == pytest.approx(full.item(), rel=1e-5)
    # the prompt at sample time is the training prompt
    from evaluation.evaluate import prompt_ids
    assert prompt_ids(vlm, tok, 1) == b.prompt_a


@pytest.mark.parametrize('name', list(FAMILIES))
def test_generation_stops_at_the_family_eos(name, families):
    """A head that makes eos the argmax from the third step on: every row stops there, and
    eos (the family's own) is not part of the output."""
    vlm, tok, _ = build(name, families)
    head = vlm.llm.get_output_embeddings()
    red = tok('red', add_special_tokens=False)['input_ids'][0]
    calls = []

    def forced(module, inputs, out):
        calls.append(1)
        bias = torch.zeros(out.shape[-1])
        bias[red if len(calls) < 3 else vlm.eos_id] = 1e4
        return out + bias
    handle = head.register_forward_hook(forced)
    try:
        from evaluation.evaluate import prompt_ids
        imgs = torch.from_numpy(rand_images(2, vlm.image_spec['size']))
        out = vlm.generate(imgs, [prompt_ids(vlm, tok, 1)] * 2, max_new_tokens=10)
    finally:
        handle.remove()
    assert out == [[red, red]] * 2 and len(calls) == 3


@pytest.mark.parametrize('name', ['gemma', 'llama'])
def test_connector_starts_at_the_scale_the_llm_receives(name, families):
    """Gemma's embedding module multiplies its weight by sqrt(hidden): the connector's output
    gain starts at the RMS of the module's output, not of its weight."""
    vlm, _, _ = build(name, families)
    emb = vlm.llm.get_input_embeddings()
    with torch.no_grad():
        out = emb(torch.arange(emb.num_embeddings))
    rms = out.pow(2).mean().sqrt().item()
    assert vlm.connector.out_gain.mean().item() == pytest.approx(rms, rel=1e-4)
    weight_rms = emb.weight.pow(2).mean().sqrt().item()
    scale = vlm.llm.config.hidden_size ** 0.5 if name == 'gemma' else 1.0
    assert rms == pytest.approx(weight_rms * scale, rel=1e-4)


def test_qwen3_brackets_wrap_each_image(families):
    vlm, tok, _ = build('qwen3', families, image_brackets=True)
    start, end = vlm.brackets
    assert tok.convert_ids_to_tokens([start, end]) == ['<|vision_start|>', '<|vision_end|>']
    with pytest.raises(M.UserError, match='image_brackets=False'):
        build('llama', families, image_brackets=True)


# -----------------------------------------------------------------------------
# Tokenizers without an obvious slot token

def test_a_tokenizer_with_no_free_special_token_is_one_line():
    """GPT-2's only special token is <|endoftext|>, its bos, eos and unk at once: no token is
    free for the slots, and the error names the setting that fixes it."""
    tk, cls = bpe_tokenizer(['<|endoftext|>'])
    tok = cls(tokenizer_object=tk, bos_token='<|endoftext|>', eos_token='<|endoftext|>', unk_token='<|endoftext|>')
    with pytest.raises(M.UserError, match='--slot_token') as e:
        T.special_ids(tok)
    assert '\n' not in str(e.value)
    # given a rare ordinary token instead, the rules take it
    ids = T.special_ids(tok, 'Ġcyan')
    assert ids['slot'] == tok.convert_tokens_to_ids('Ġcyan') and ids['eos'] == tok.eos_token_id


def test_unknown_token_is_the_last_resort_only_where_text_cannot_produce_it():
    """Mistral v0.1 has only <unk>, <s>, </s>. With byte fallback (here: byte-level BPE) text
    never becomes <unk>, so <unk> can hold the slots; a word-level tokenizer does produce
    <unk> from unknown words, so there it is refused."""
    tk, cls = bpe_tokenizer(['<unk>', '<s>', '</s>'])
    tok = cls(tokenizer_object=tk, bos_token='<s>', eos_token='</s>', unk_token='<unk>')
    assert T.special_ids(tok)['slot_token'] == '<unk>'
    word = family_tokenizer(dict(FAMILIES['mistral'], specials=['<unk>', '<s>', '</s>']))
    with pytest.raises(M.UserError, match='no special token free'):
        T.special_ids(word)


def test_slot_token_setting_is_checked(families):
    folder, _ = families['llama']
    tok = B.load_tokenizer(str(folder))
    assert T.special_ids(tok, '<|eot_id|>')['slot'] == tok.convert_tokens_to_ids('<|eot_id|>')
    for bad in ('<|end_of_text|>', '<|begin_of_text|>', '<no such token>'):
        with pytest.raises(M.UserError, match='slot_token'):
            T.special_ids(tok, bad)


def test_an_ordinary_word_as_slot_token_drops_the_captions_that_use_it(tmp_path):
    """slot_token='cross' (an ordinary word of the tiny vocabulary): every caption holding it
    is dropped and counted under special_tokens, and the kept ones never contain it."""
    meta = P.main(['--synthetic=200', f'--data_dir={tmp_path}', '--tokenizer=tiny', '--slot_token=cross', '--llm=none'])
    assert meta['slot_token'] == 'cross' and meta['filters']['special_tokens'] > 0
    cross = B.load_tokenizer('tiny').convert_tokens_to_ids('cross')
    tokens = data.open_prepared(str(tmp_path / 'prepared'))['train'][0]
    assert cross not in set(tokens.tolist())
    with pytest.raises(M.UserError, match='slot'):  # a word the prompt itself uses cannot be the slot
        P.main(['--synthetic=20', f'--data_dir={tmp_path}/b', '--tokenizer=tiny', '--slot_token=image', '--llm=none'])


def test_the_real_qwen3_tokenizer():
    d = ASSETS / 'Qwen3-8B-Base'
    if not (d / 'tokenizer.json').exists():
        pytest.skip('../shared/assets/Qwen3-8B-Base not present')
    ids = T.special_ids(B.load_tokenizer(str(d)))
    assert (ids['eos'], ids['bos'], ids['slot_token']) == (151643, None, '<|image_pad|>')


def test_the_real_smollm2_tokenizer(smollm2_dir):
    tok = B.load_tokenizer(str(smollm2_dir))
    ids = T.special_ids(tok)
    assert tok.convert_ids_to_tokens(ids['eos']) == '<|im_end|>' and ids['bos'] is None
    assert ids['slot'] not in (tok.unk_token_id, tok.bos_token_id, tok.pad_token_id, ids['eos'])
    assert ids['slot'] not in tok('a red circle at the top <|x|> 東京 \U0001F600')['input_ids']
