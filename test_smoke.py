"""
Smoke tests: the behaviour a user relies on, on tiny random backbones, offline, on CPU.

$ python -m pytest -q test_smoke.py          # about two minutes on 2 CPU cores

The dataset is the synthetic one the CPU demo uses (prepare_llava.py --synthetic), built
once per module. Scripts (train.py, torchrun, sample.py) run as subprocesses where the
behaviour under test is the script's: exit codes, signals, checkpoints, log.jsonl.
"""
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import configurator
import data
import model as M
import prepare_llava as P
from model import TINY_WORDS, tiny_tokenizer
from sample import (OBJECT_WORDS, bleu4, cider_d, hallucination_rate, length_stats, qa_scores,
                    score_rows, tokenize_caption, write_report)

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT.parent / 'shared' / 'assets'  # offline assets; absent in a fresh clone -> those tests skip
TINY_CONFIG = ROOT / 'config' / 'stage1_tiny.py'

# The tiny backbones are a few hundred thousand parameters: one thread per process is
# several times faster than two fighting over two cores (and leaves a core for the
# subprocesses that run beside each other below).
torch.set_num_threads(1)
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
for _k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
    ENV.pop(_k, None)  # a test run launched under torchrun must not turn train.py into a DDP rank


def tiny_config():
    """config/stage1_tiny.py as a dict (the demo's model sizes: the tests use the same ones)."""
    scope = {}
    exec(TINY_CONFIG.read_text(), scope)
    return {k: v for k, v in scope.items() if not k.startswith('_')}


CFG = tiny_config()
MODEL_DEFAULTS = dict(tokenizer='tiny', vision_feature_layer=-2, resampler_mlp_ratio=4, proj_dropout=0.0,
                      vision_ln=True, match_embed_scale=True, image_brackets=False)
TINY_ARGS = {k: CFG.get(k, MODEL_DEFAULTS.get(k)) for k in M.MODEL_KEYS}
N_LAT = TINY_ARGS['n_latents']
MAX_SEQ = CFG['max_seq_len']


def build_tiny(**over):
    tok = M.load_tokenizer('tiny')
    return M.build_vlm({**TINY_ARGS, **over}, tok, 'cpu', torch.float32), tok


def rand_images(n, size, seed=0):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def run(args, timeout=300, **kw):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout, **kw)


def popen(args, log_path):
    f = open(log_path, 'w')
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)


def train_args(data_dir, out_dir, *extra):
    return ['train.py', TINY_CONFIG, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--device=cpu',
            '--num_workers=0', *extra]


def read_log(out_dir):
    """log.jsonl records; a line still being written (no newline yet) is left out."""
    p = Path(out_dir) / 'log.jsonl'
    if not p.exists():
        return []
    text = p.read_text()
    lines = text.split('\n')[:-1]  # the part after the last newline is incomplete (or empty)
    return [json.loads(line) for line in lines if line.strip()]


def assert_ok(proc):
    out = (proc.stdout or '') + (proc.stderr or '')
    assert proc.returncode == 0, f'exit {proc.returncode}:\n{out[-3000:]}'


def assert_one_error_line(proc, *must_contain):
    """Exit non-zero with exactly one line on stderr, starting with 'error:', and no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert 'Traceback' not in out, out[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('error:'), proc.stderr[-2000:]
    for s in must_contain:
        assert s in lines[0], lines[0]
    return lines[0]


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

# -----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    """600 drawn shape images with exact captions, in the LLaVA layout, prepared with the
    tiny tokenizer by the real preparation script. 10 % val so val losses are not noise."""
    d = tmp_path_factory.mktemp('synthetic')
    p = run(['prepare_llava.py', '--synthetic', 600, '--data_dir', d, '--val_ratio', 0.1], timeout=120)
    assert_ok(p)
    prepared = d / 'prepared'
    meta = json.loads((prepared / 'meta.json').read_text())
    assert meta['tokenizer'] == 'tiny' and meta['splits']['val'] >= 40, meta
    return prepared


@pytest.fixture(scope='module')
def tiny():
    vlm, tok = build_tiny()
    return vlm.eval(), tok


@pytest.fixture(scope='module')
def dataset(synthetic, tiny):
    vlm, tok = tiny
    prep = data.open_prepared(str(synthetic))
    ids = M.special_ids(tok)
    assert (prep['meta']['eos_id'], prep['meta']['slot_id']) == (ids['eos'], ids['slot'])
    builder = data.SampleBuilder(tok, N_LAT, ids['slot'], ids['eos'], None, MAX_SEQ)
    return data.CaptionDataset(prep, 'train', builder, vlm.image_spec['size'], vlm.image_spec['resample'])


@pytest.fixture(scope='module')
def demo_run(synthetic, tmp_path_factory):
    """The CPU demo: the tiny config trained for 200 iterations (used by the learning test,
    sample.py and the error tests). `--lr` also exercises the configurator's alias end to end."""
    out = tmp_path_factory.mktemp('demo')
    p = run(train_args(synthetic, out, '--max_iters=200', '--eval_interval=100', '--log_interval=20', '--lr=1.5e-3'))
    assert_ok(p)
    return out

# -----------------------------------------------------------------------------
# 1. connector


@pytest.mark.parametrize('vision_ln', [True, False])
@pytest.mark.parametrize('depth', [1, 2])
@pytest.mark.parametrize('n_latents,width,heads', [(16, 64, 4), (5, 32, 2)])
def test_connector_shapes(vision_ln, depth, n_latents, width, heads):
    c = M.Connector(vision_dim=48, llm_dim=80, n_latents=n_latents, width=width, depth=depth, n_heads=heads,
                    mlp_ratio=2, proj_hidden=96, vision_ln=vision_ln)
    for n_img, n_patches in ((1, 36), (3, 7)):
        y = c(torch.randn(n_img, n_patches, 48))
        assert y.shape == (n_img, n_latents, 80)
        assert torch.isfinite(y).all()
    assert isinstance(c.vision_ln, nn.LayerNorm) == vision_ln
    assert len(c.blocks) == depth


def test_out_gain_matches_llm_embedding_rms(tiny):
    vlm, _ = tiny
    emb = vlm.llm.get_input_embeddings()
    target = emb.weight.float().pow(2).mean().sqrt().item()
    assert vlm.connector.out_gain is not None
    feats = vlm.encode_images(torch.from_numpy(rand_images(3, vlm.image_spec['size'])))
    with torch.no_grad():
        y = vlm.connector(feats)
    assert y.pow(2).mean().sqrt().item() == pytest.approx(target, rel=1e-3)
    # the gain follows the LLM's scale (not a constant that happens to match the tiny LLM),
    # whatever the scale of the patch features
    with torch.no_grad():
        emb.weight.mul_(7.0)
        try:
            assert M.embedding_rms(vlm.llm) == pytest.approx(7 * target, rel=1e-4)
        finally:
            emb.weight.div_(7.0)
        c = M.Connector(**{**vlm.connector.args, 'out_rms': 7 * target})
        for scale in (1.0, 100.0):
            assert c(feats * scale).pow(2).mean().sqrt().item() == pytest.approx(7 * target, rel=1e-3)
    vlm2, _ = build_tiny(match_embed_scale=False)
    assert vlm2.connector.out_gain is None

# -----------------------------------------------------------------------------
# 2. gradient flow


def test_gradients_reach_only_the_connector(dataset):
    vlm, _ = build_tiny()
    vlm.train()
    assert not vlm.llm.training and not vlm.vision.training  # frozen parts stay in eval mode
    batch = data.collate([dataset[i] for i in range(4)] + [dataset[(4, 5)]], pad_id=vlm.eos_id)
    loss = vlm(batch['images'], batch['input_ids'], batch['target_pos'], batch['target_ids'])
    loss.backward()
    named = dict(vlm.connector.named_parameters())
    assert len(named) > 10
    for n, p in named.items():
        assert p.requires_grad, n
        assert p.grad is not None and p.grad.abs().sum() > 0, f'no gradient reaches connector.{n}'
    for part in (vlm.vision, vlm.llm):
        for n, p in part.named_parameters():
            assert not p.requires_grad and p.grad is None, n

# -----------------------------------------------------------------------------
# 3. slot splicing


def _blocks(emb, ids, slot_id):
    """connector-output blocks of n_latents vectors, in row-major slot order."""
    return emb[ids == slot_id].view(-1, N_LAT, emb.shape[-1])


def test_slots_get_the_kth_image(tiny):
    vlm, tok = tiny
    ids = M.special_ids(tok)
    b = data.SampleBuilder(tok, N_LAT, ids['slot'], ids['eos'], None, MAX_SEQ)
    cap = tok('a red circle.', add_special_tokens=False)['input_ids']
    size = vlm.image_spec['size']
    with torch.no_grad():
        # one row, two images (Template B)
        x, _ = b.build([cap, cap])
        x = torch.tensor([x])
        imgs = torch.from_numpy(rand_images(2, size, seed=1))
        vis = vlm.connector(vlm.encode_images(imgs))
        assert (vis[0] - vis[1]).abs().max() > 1e-2  # distinct images give distinct blocks
        emb = vlm.embed(imgs, x)
        got = _blocks(emb, x, vlm.slot_id)
        assert got.shape[0] == 2
        torch.testing.assert_close(got, vis, atol=1e-6, rtol=0)
        # the text positions keep the LLM's own embeddings
        table = vlm.llm.get_input_embeddings()(x)
        assert torch.equal(emb[x != vlm.slot_id], table[x != vlm.slot_id])
        # swapping the images swaps the blocks
        got_sw = _blocks(vlm.embed(imgs.flip(0), x), x, vlm.slot_id)
        torch.testing.assert_close(got_sw[0], vis[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(got_sw[1], vis[0], atol=1e-5, rtol=0)

        # a batch: row 0 has one image (Template A), row 1 two (Template B); images row-major
        imgs3 = rand_images(3, size, seed=2)
        samples = []
        for caps, im in (([cap], [imgs3[0]]), ([cap, cap], [imgs3[1], imgs3[2]])):
            i_, l_ = b.build(caps)
            samples.append(dict(input_ids=i_, labels=l_, images=im))
        batch = data.collate(samples, pad_id=vlm.eos_id)
        assert torch.equal(batch['images'], torch.from_numpy(imgs3))  # row-major image order
        x2 = batch['input_ids']
        emb2 = vlm.embed(batch['images'], x2)
        vis3 = vlm.connector(vlm.encode_images(batch['images']))
        r0 = emb2[0][x2[0] == vlm.slot_id].view(-1, N_LAT, emb2.shape[-1])
        r1 = emb2[1][x2[1] == vlm.slot_id].view(-1, N_LAT, emb2.shape[-1])
        assert r0.shape[0] == 1 and r1.shape[0] == 2
        torch.testing.assert_close(r0[0], vis3[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(r1[0], vis3[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(r1[1], vis3[2], atol=1e-5, rtol=0)

# -----------------------------------------------------------------------------
# 4. labels


@pytest.fixture(scope='module')
def builder():
    tok = M.load_tokenizer('tiny')
    ids = M.special_ids(tok)
    return data.SampleBuilder(tok, N_LAT, ids['slot'], ids['eos'], None, MAX_SEQ), tok, ids


def _enc(tok, s):
    return tok(s, add_special_tokens=False)['input_ids']


def test_labels_template_a(builder):
    b, tok, sp = builder
    cap = _enc(tok, 'a red circle at the top left.')
    ids, labels = b.build([cap])
    assert len(ids) == len(labels)
    assert ids.count(sp['slot']) == N_LAT and ids[:N_LAT] == [sp['slot']] * N_LAT  # slots first
    assert ids[N_LAT:len(ids) - len(cap) - 1] == _enc(tok, '\nDescribe the image in one sentence.\n')
    n_lab = len(cap) + 1
    assert all(l == -100 for l in labels[:-n_lab])
    assert labels[-n_lab:] == cap + [sp['eos']] == ids[-n_lab:]


def test_labels_template_b(builder):
    b, tok, sp = builder
    c0, c1 = 'a red circle.', 'two blue squares.'
    ids, labels = b.build([_enc(tok, c0), _enc(tok, c1)])
    assert ids.count(sp['slot']) == 2 * N_LAT
    assert 'describe each image in order' in tok.decode([i for i in ids if i != sp['slot']])
    target = _enc(tok, f'Image 1: {c0} Image 2: {c1}') + [sp['eos']]
    lab = [l for l in labels if l != -100]
    assert lab == target
    assert labels[-len(target):] == target and ids[-len(target):] == target  # one contiguous block at the end
    # a prepared two-image record: Template B with its own caption as the target
    ids2, labels2 = b.build([_enc(tok, c0)], n_images=2)
    assert ids2.count(sp['slot']) == 2 * N_LAT
    assert [l for l in labels2 if l != -100] == _enc(tok, c0) + [sp['eos']]


def test_truncation_never_cuts_slots(builder):
    _, tok, sp = builder
    long_cap = _enc(tok, ' '.join(['a red circle and a blue square'] * 12) + '.')
    probe = data.SampleBuilder(tok, N_LAT, sp['slot'], sp['eos'], None, 10_000)
    for n_images, caps in ((1, [long_cap]), (2, [long_cap, long_cap])):
        prompt = probe.prompt_a if n_images == 1 else probe.prompt_b
        for room in (2, 5):  # the builder needs room for two-image prompts + 2 tokens
            max_len = len(probe.prompt_b) + room
            b = data.SampleBuilder(tok, N_LAT, sp['slot'], sp['eos'], None, max_len)
            ids, labels = b.build(caps)
            assert len(ids) == len(labels) == max_len
            assert ids.count(sp['slot']) == n_images * N_LAT
            assert ids[:len(prompt)] == prompt
            assert all(l == -100 for l in labels[:len(prompt)])
            assert all(l != -100 for l in labels[len(prompt):])  # the kept part of the target is labelled
    with pytest.raises(SystemExit):
        data.SampleBuilder(tok, N_LAT, sp['slot'], sp['eos'], None, len(probe.prompt_b) + 1)


def test_dataset_lengths_match_built_samples(dataset):
    lens = dataset.lengths()
    for i in range(0, len(dataset), 37):
        assert len(dataset[i]['input_ids']) == lens[i]

# -----------------------------------------------------------------------------
# 5. caption-only loss == full-logits loss


def _full_logits_loss(vlm, batch, attention_mask=None):
    with torch.no_grad():
        emb = vlm.embed(batch['images'], batch['input_ids'])
        logits = vlm.llm(inputs_embeds=emb, attention_mask=attention_mask, use_cache=False).logits.float()
        labels = batch['labels']
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)


def test_caption_only_loss_equals_full_logits_loss(tiny, dataset):
    vlm, _ = tiny
    samples = [dataset[i] for i in range(6)] + [dataset[(6, 7)]]
    batch = data.collate(samples, pad_id=vlm.eos_id)
    lens = torch.tensor(batch['sample_lens'])
    assert len(set(lens.tolist())) > 1 and (batch['labels'] == -100).any()  # right padding present
    with torch.no_grad():
        loss = vlm(batch['images'], batch['input_ids'], batch['target_pos'], batch['target_ids'])
    assert batch['n_targets'] == int((batch['labels'] != -100).sum())
    full = _full_logits_loss(vlm, batch)
    assert abs(loss.item() - full.item()) < 1e-5, (loss.item(), full.item())
    # the dropped attention mask changes nothing: real tokens never see the pads after them
    mask = (torch.arange(batch['input_ids'].shape[1])[None] < lens[:, None]).long()
    masked = _full_logits_loss(vlm, batch, mask)
    assert abs(loss.item() - masked.item()) < 1e-5, (loss.item(), masked.item())

# -----------------------------------------------------------------------------
# 6. packing


def _per_token_losses(vlm, batch):
    with torch.no_grad():
        h = vlm.hidden_states(batch['images'], batch['input_ids'], batch['position_ids'])
        h = h.reshape(-1, h.shape[-1]).index_select(0, batch['target_pos'])
        logits = vlm.llm.get_output_embeddings()(h).float()
        return F.cross_entropy(logits, batch['target_ids'], reduction='none')


def test_packed_loss_equals_unpacked(tiny, dataset):
    vlm, _ = tiny
    samples = [dataset[i] for i in range(9)] + [dataset[(9, 10)]]
    unpacked = data.collate(samples, pad_id=vlm.eos_id)
    row = 4 * max(len(s['input_ids']) for s in samples)  # room for several samples per row
    packed = data.collate(samples, packing=True, max_seq_len=row, pad_id=vlm.eos_id)
    assert packed['input_ids'].shape[0] <= len(samples) // 2  # several samples per row
    assert packed['input_ids'].shape[1] <= row
    assert int((packed['position_ids'] == 0).sum()) == len(samples)  # positions restart per sample
    assert packed['n_targets'] == unpacked['n_targets']
    with torch.no_grad():
        lu = vlm(unpacked['images'], unpacked['input_ids'], unpacked['target_pos'], unpacked['target_ids'])
        lp = vlm(packed['images'], packed['input_ids'], packed['target_pos'], packed['target_ids'],
                 position_ids=packed['position_ids'])
    assert abs(lu.item() - lp.item()) < 1e-5, (lu.item(), lp.item())
    # token by token, too (sorted: the two layouts order the targets differently)
    pu = _per_token_losses(vlm, unpacked).sort().values
    pp = _per_token_losses(vlm, packed).sort().values
    torch.testing.assert_close(pp, pu, atol=1e-4, rtol=0)


def test_packed_samples_do_not_see_each_other(tiny, dataset):
    vlm, tok = tiny
    samples = [dataset[i] for i in range(8)]
    row = 4 * max(len(s['input_ids']) for s in samples)
    a = data.collate(samples, packing=True, max_seq_len=row, pad_id=vlm.eos_id)
    # change sample 0's caption tokens (same length, so the layout stays the same); sample 0
    # is the first of row 0 and the samples after it in that row are the ones that could leak
    s0 = dict(samples[0])
    n_prompt = sum(1 for l in s0['labels'] if l == -100)
    star, cross = tok.convert_tokens_to_ids('star'), tok.convert_tokens_to_ids('cross')
    new_ids = list(s0['input_ids'])
    for t in range(n_prompt, len(new_ids) - 1):  # every caption token, not the eos
        new_ids[t] = cross if new_ids[t] == star else star
    s0['input_ids'] = new_ids
    s0['labels'] = [-100] * n_prompt + new_ids[n_prompt:]
    b = data.collate([s0] + samples[1:], packing=True, max_seq_len=row, pad_id=vlm.eos_id)
    assert torch.equal(a['target_pos'], b['target_pos'])
    changed = (a['input_ids'] != b['input_ids']).nonzero()
    assert len(changed) > 0 and bool((changed[:, 0] == 0).all())
    row0_starts = (a['position_ids'][0] == 0).nonzero().flatten().tolist()
    assert len(row0_starts) >= 3, 'row 0 should hold several samples'
    end0 = row0_starts[1]  # sample 0 occupies row 0, positions [0, end0)
    T = a['input_ids'].shape[1]
    in_s0 = a['target_pos'] < end0  # flat index < end0 means row 0, inside sample 0
    la, lb = _per_token_losses(vlm, a), _per_token_losses(vlm, b)
    assert (la[in_s0] - lb[in_s0]).abs().max() > 1e-3  # the edit did change sample 0's losses
    others = ~in_s0
    assert int((a['target_pos'][others] < T).sum()) > 0  # there are targets of other samples in row 0
    torch.testing.assert_close(la[others], lb[others], atol=1e-6, rtol=0)

# -----------------------------------------------------------------------------
# 7. generation


class ScriptedHead(nn.Module):
    """An lm_head whose argmax follows a script: step k emits script[row][k] for each row."""

    def __init__(self, vocab, script):
        super().__init__()
        self.vocab, self.script, self.calls = vocab, script, 0

    def forward(self, h):
        k = self.calls
        self.calls += 1
        logits = torch.zeros(*h.shape[:-1], self.vocab)
        for r, toks in enumerate(self.script):
            logits[r, ..., toks[min(k, len(toks) - 1)]] = 10.0
        return logits


def _prompts(vlm, tok, sp):
    b = data.SampleBuilder(tok, N_LAT, sp['slot'], sp['eos'], None, MAX_SEQ)
    custom = data.encode_prompt(tok, '<image>\nWhat is in the image?\n', N_LAT, sp['slot'])
    return [b.prompt_a, b.prompt_b, custom], [1, 2, 1]


def test_generation_stops_at_eos():
    vlm, tok = build_tiny()
    sp = M.special_ids(tok)
    V = vlm.llm.config.vocab_size
    red, blue, green = (tok.convert_tokens_to_ids(w) for w in ('red', 'blue', 'green'))
    eos = sp['eos']
    prompts, n_img = _prompts(vlm, tok, sp)
    imgs = torch.from_numpy(rand_images(sum(n_img), vlm.image_spec['size']))
    # eos is the argmax from the first step: nothing is generated, one forward pass only
    vlm.llm.lm_head = ScriptedHead(V, [[eos]] * 3)
    assert vlm.generate(imgs, prompts, max_new_tokens=20) == [[], [], []]
    assert vlm.llm.lm_head.calls == 1
    # rows reach eos at different steps: each stops there, the loop stops when all have
    script = [[red, eos, blue], [red, blue, green, eos, red], [green, green, eos]]
    vlm.llm.lm_head = ScriptedHead(V, script)
    out = vlm.generate(imgs, prompts, max_new_tokens=20)
    assert out == [[red], [red, blue, green], [green, green]]
    assert vlm.llm.lm_head.calls == 4
    # no eos at all: max_new_tokens bounds it
    vlm.llm.lm_head = ScriptedHead(V, [[red]] * 3)
    assert vlm.generate(imgs, prompts, max_new_tokens=5) == [[red] * 5] * 3


def test_batched_generation_equals_one_by_one(tiny):
    vlm, tok = tiny
    sp = M.special_ids(tok)
    prompts, n_img = _prompts(vlm, tok, sp)
    assert len(set(map(len, prompts))) == 3  # different lengths: left padding is exercised
    imgs = torch.from_numpy(rand_images(sum(n_img), vlm.image_spec['size'], seed=3))
    batched = vlm.generate(imgs, prompts, max_new_tokens=10)
    alone, k = [], 0
    for p, n in zip(prompts, n_img):
        alone += vlm.generate(imgs[k:k + n], [p], max_new_tokens=10)
        k += n
    assert batched == alone
    assert all(len(t) >= 3 for t in batched)  # real generations, not an immediate eos
    with pytest.raises(ValueError):  # slots and images must agree
        vlm.generate(imgs[:1], [prompts[1]], max_new_tokens=2)

# -----------------------------------------------------------------------------
# 8. configurator


def _defaults():
    return dict(learning_rate=1e-4, batch_size=16, out_dir='out', vision_ln=True, weight_decay=0.01,
                gradient_accumulation_steps=32, _private=1)


def test_configurator_unknown_key_names_closest():
    with pytest.raises(SystemExit) as e:
        configurator.configure(_defaults(), ['--learnig_rate=1e-3'])
    assert 'learnig_rate' in str(e.value.code) and "'learning_rate'" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        configurator.configure(_defaults(), ['--_private=2'])  # not a config key
    with pytest.raises(SystemExit):
        configurator.configure(_defaults(), ['--batch_size'])  # no value


def test_configurator_types():
    for bad in ('--batch_size=1.5', '--batch_size=True', '--vision_ln=1', '--learning_rate=abc'):
        with pytest.raises(SystemExit) as e:
            configurator.configure(_defaults(), [bad])
        assert str(e.value.code).startswith('error:')
    g = _defaults()
    cfg = configurator.configure(g, ['--learning_rate=1', '--out_dir=2024', '--vision_ln=False'])
    assert g['learning_rate'] == 1.0 and type(g['learning_rate']) is float
    assert g['out_dir'] == '2024' and g['vision_ln'] is False
    assert cfg['learning_rate'] == 1.0 and '_private' not in cfg


def test_configurator_file_then_overrides(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text('batch_size = 8\nlearning_rate = 2e-4\nimport math\n_helper = 3\n')
    g = _defaults()
    configurator.configure(g, [str(f), '--batch_size=4', '--lr=1e-3'])
    assert g['batch_size'] == 4 and g['learning_rate'] == 1e-3 and g['weight_decay'] == 0.01
    g = _defaults()
    configurator.configure(g, [str(f)])
    assert g['batch_size'] == 8 and g['learning_rate'] == 2e-4
    g = _defaults()
    configurator.configure(g, ['--lr=1e-4'])
    assert g['learning_rate'] == 1e-4
    bad = tmp_path / 'bad.py'
    bad.write_text('batch_sise = 8\n')
    with pytest.raises(SystemExit) as e:
        configurator.configure(_defaults(), [str(bad)])
    assert "'batch_size'" in str(e.value.code)
    with pytest.raises(SystemExit):
        configurator.configure(_defaults(), [str(tmp_path / 'missing.py')])

# -----------------------------------------------------------------------------
# 9. resume == uninterrupted


def _by_iter(records):
    """(iter, 'train'|'val') -> record"""
    return {(r['iter'], 'val' if 'val_loss' in r else 'train'): r for r in records}


def _assert_same_trajectory(ref, got, first_iter, last_iter):
    ref = _by_iter(ref)
    train_iters = [r['iter'] for r in got if 'loss' in r]
    assert train_iters == list(range(first_iter, last_iter + 1)), train_iters
    for r in got:
        a = ref[(r['iter'], 'val' if 'val_loss' in r else 'train')]
        for k in ('loss', 'val_loss', 'grad_norm', 'lr'):
            if k in r:
                assert abs(r[k] - a[k]) <= 1e-6, (r['iter'], k, r[k], a[k])


def test_resume_equals_uninterrupted(synthetic, tmp_path):
    N, K = 30, 10  # iterations; eval (and ckpt.pt) every K
    # golden-set sampling in between must not disturb the trajectory either; the final
    # evaluation report is left out (the demo run makes one) to save a few seconds per run
    common = [f'--max_iters={N}', f'--eval_interval={K}', '--log_interval=1', '--eval_iters=2',
              f'--sample_interval={K}', '--eval_report_num=0']
    outs = {k: tmp_path / k for k in 'ABC'}
    procs = {k: popen(train_args(synthetic, outs[k], *common), tmp_path / f'{k}.txt') for k in 'ABC'}
    try:
        # B: SIGKILL once the iteration-K checkpoint exists and a few more steps have run.
        # C: SIGTERM between two checkpoints (after step 3, before the first eval checkpoint).
        pending, t0 = {'B', 'C'}, time.time()
        while pending:
            for k in sorted(pending):
                if procs[k].poll() is not None:
                    pytest.fail(f'run {k} ended (exit {procs[k].returncode}) before it could be interrupted')
            steps = {k: max([r['iter'] for r in read_log(outs[k]) if 'loss' in r], default=0) for k in pending}
            if 'C' in pending and steps['C'] >= 3:
                assert not (outs['C'] / 'ckpt.pt').exists()
                os.kill(procs['C'].pid, signal.SIGTERM)
                pending.discard('C')
            if 'B' in pending and steps['B'] >= K + 2 and (outs['B'] / 'ckpt.pt').exists():
                os.kill(procs['B'].pid, signal.SIGKILL)
                pending.discard('B')
            if time.time() - t0 > 240:
                pytest.fail(f'timed out waiting for runs {pending}')
            time.sleep(0.01)
        assert procs['B'].wait(60) == -signal.SIGKILL
        assert procs['C'].wait(120) == 0, (tmp_path / 'C.txt').read_text()[-2000:]
        assert procs['A'].wait(240) == 0, (tmp_path / 'A.txt').read_text()[-2000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    ref = read_log(outs['A'])
    assert [r['iter'] for r in ref if 'loss' in r] == list(range(1, N + 1))

    # C wrote a checkpoint on SIGTERM at the step it had reached, and said so
    ck = torch.load(outs['C'] / 'ckpt.pt', weights_only=True)
    stopped = ck['iter_num']
    assert 3 <= stopped < K and 'signal received' in (tmp_path / 'C.txt').read_text()
    assert max(r['iter'] for r in read_log(outs['C'])) == stopped

    n_before = {k: len(read_log(outs[k])) for k in 'BC'}
    resumed = {k: popen(train_args(synthetic, outs[k], *common, '--init_from=resume'), tmp_path / f'{k}2.txt')
               for k in 'BC'}
    for k, p in resumed.items():
        assert p.wait(240) == 0, (tmp_path / f'{k}2.txt').read_text()[-2000:]
    # B resumes from the iteration-K checkpoint: iterations K+1..N replay exactly
    _assert_same_trajectory(ref, read_log(outs['B'])[n_before['B']:], K + 1, N)
    _assert_same_trajectory(ref, read_log(outs['C'])[n_before['C']:], stopped + 1, N)
    # and the final connectors are the same
    fa = torch.load(outs['A'] / 'ckpt.pt', weights_only=True)['connector']
    for k in 'BC':
        fk = torch.load(outs[k] / 'ckpt.pt', weights_only=True)['connector']
        for n in fa:
            torch.testing.assert_close(fk[n], fa[n], atol=1e-6, rtol=0)

# -----------------------------------------------------------------------------
# 10. DDP


def test_ddp_two_processes(synthetic, tmp_path):
    """2 ranks x batch_size 8 with gradient_accumulation_steps=2 (one micro-batch per rank per
    step) sees exactly the data of one process with batch_size 8 and 2 accumulation steps:
    rank r takes global micro-batches r, r+2, ... and the single process takes 0, 1, 2, ...
    The single process averages the two micro-batch gradients; DDP must all-reduce (average)
    them across ranks. So the checkpoint rank 0 writes equals the single-process one only if
    the gradients were synchronised every step -- an unsynchronised rank 0 would have trained
    on half the data. Both ranks start from rank 0's weights (DDP broadcasts them) and apply
    the same averaged gradients, so matching rank 0 means the ranks stay identical. Per-step
    grad norms (computed after the all-reduce) must match too."""
    common = ['--max_iters=4', '--eval_interval=4', '--log_interval=1', '--eval_iters=2', '--batch_size=8',
              '--gradient_accumulation_steps=2', '--multi_image_frac=0.0']
    ddp_out, one_out = tmp_path / 'ddp', tmp_path / 'one'
    one = popen(train_args(synthetic, one_out, *common), tmp_path / 'one.txt')
    ddp = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          *map(str, train_args(synthetic, ddp_out, *common))],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert one.wait(300) == 0, (tmp_path / 'one.txt').read_text()[-2000:]
    assert_ok(ddp)
    files = sorted(p.name for p in ddp_out.iterdir())
    assert files.count('ckpt.pt') == 1 and not any(f.endswith('.tmp') for f in files), files
    log = read_log(ddp_out)
    assert [r['iter'] for r in log if 'loss' in r] == [1, 2, 3, 4]  # rank 0 logs, once per step
    a = torch.load(ddp_out / 'ckpt.pt', weights_only=True)
    b = torch.load(one_out / 'ckpt.pt', weights_only=True)
    assert len(a['rng']) == 2 and a['iter_num'] == 4  # both ranks' RNG states were gathered
    for n in b['connector']:
        torch.testing.assert_close(a['connector'][n], b['connector'][n], atol=1e-5, rtol=0)
    ga = [r['grad_norm'] for r in log if 'loss' in r]
    gb = [r['grad_norm'] for r in read_log(one_out) if 'loss' in r]
    assert min(ga) > 0.1  # real updates happened, so equal weights after 4 steps mean something
    assert ga == pytest.approx(gb, abs=1e-5)

# -----------------------------------------------------------------------------
# 11. the CPU demo learns; sample.py captions


def test_cpu_demo_learns(demo_run):
    log = read_log(demo_run)
    val = [(r['iter'], r['val_loss']) for r in log if 'val_loss' in r]
    assert val[0][0] == 0 and val[-1][0] == 200
    assert val[-1][1] < 0.6 * val[0][1], val
    train = [r['loss'] for r in log if 'loss' in r]
    assert len(train) == 10 and train[-1] < train[0], train
    assert all(math.isfinite(r['loss']) and r['bad_images'] == 0 for r in log if 'loss' in r)
    assert json.loads((demo_run / 'config.json').read_text())['learning_rate'] == 1.5e-3  # --lr alias
    ck = torch.load(demo_run / 'ckpt.pt', weights_only=True)
    assert ck['iter_num'] == 200
    assert {k: ck['model_args'][k] for k in ('vision', 'llm', 'tokenizer', 'n_latents')} == \
        {k: TINY_ARGS[k] for k in ('vision', 'llm', 'tokenizer', 'n_latents')}
    assert set(ck['connector']) == set(build_tiny()[0].connector.state_dict())  # only the connector is saved
    assert (demo_run / 'ckpt_best.pt').exists()


def test_sample_cli_captions_a_synthetic_image(demo_run, synthetic):
    meta = json.loads((synthetic / 'meta.json').read_text())
    img = next(Path(meta['image_root']).rglob('*.jpg'))
    p = run(['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--image', img, '--device', 'cpu',
             '--max_new_tokens', '24'], timeout=120)
    assert_ok(p)
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and len(lines[0].split()) >= 2, p.stdout
    assert sum(w.strip('.,:;?!').isalpha() for w in lines[0].split()) >= 2, lines[0]


def test_sample_real_photos_any_mode(demo_run, capsys):
    images = ASSETS / 'images'
    if not images.is_dir():
        pytest.skip('../shared/assets/images not present')
    import sample
    files = {f.name: f for f in images.iterdir()}
    modes = {n: Image.open(f).mode for n, f in files.items()}
    picks = [next((n for n in sorted(files) if modes[n] == m), None) for m in ('RGBA', 'L')]
    if None in picks:
        pytest.skip(f'no RGBA and grayscale photo in {images}: {modes}')
    # read as the model sees them: RGBA composited on white, grayscale replicated to 3 channels
    rgba = data.load_image(str(files[picks[0]]), 48)
    gray = data.load_image(str(files[picks[1]]), 48)
    assert rgba.shape == gray.shape == (3, 48, 48)
    if Image.open(files[picks[0]]).getchannel('A').getpixel((0, 0)) == 0:
        assert (rgba[:, 0, 0] == 255).all()
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    # one line per file of a directory (a 200-step tiny model may well answer a photo with an
    # immediate eos, so only the synthetic image above must get words), then the two files as
    # one Template B prompt
    sample.main(['--ckpt', str(demo_run / 'ckpt.pt'), '--image', str(images), '--device', 'cpu',
                 '--max_new_tokens', '16'])
    lines = capsys.readouterr().out.splitlines()
    for f in files.values():
        if f.suffix.lower() in sample.IMAGE_EXTS:
            assert sum(ln.startswith(f'{f}:') for ln in lines) == 1, lines
    sample.main(['--ckpt', str(demo_run / 'ckpt.pt'), '--image', str(files[picks[0]]), '--image',
                 str(files[picks[1]]), '--device', 'cpu', '--max_new_tokens', '24', '--temperature', '0.7',
                 '--num_samples', '2'])
    lines = capsys.readouterr().out.splitlines()
    assert sum(ln.startswith(f'{files[picks[0]]} + {files[picks[1]]}:') for ln in lines) == 2, lines


def test_load_image_modes(tmp_path):
    S = 48
    transparent = Image.new('RGBA', (20, 10), (0, 0, 0, 0))
    a = data.load_image(transparent, S)
    assert a.shape == (3, S, S) and a.dtype == np.uint8 and (a == 255).all()  # composited on white
    black = Image.new('RGBA', (20, 10), (0, 0, 0, 255))
    assert (data.load_image(black, S) == 0).all()
    g16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    a = data.load_image(g16, S)
    assert a.shape == (3, S, S) and 0 < a.mean() < 255 and a.max() > 200  # rescaled, not clipped
    p = tmp_path / 'x.png'
    Image.new('L', (30, 40), 77).save(p)
    a = data.load_image(str(p), S)
    assert a.shape == (3, S, S) and (a == 77).all()
    Image.new('P', (30, 40)).save(tmp_path / 'p.gif')
    assert data.load_image((tmp_path / 'p.gif').read_bytes(), S).shape == (3, S, S)

# -----------------------------------------------------------------------------
# 12. full-size model on the meta device


def test_full_size_backbones_on_meta():
    llm = M.build_llm('random:' + M.DEFAULT_LLM, device='meta')
    n = M.count_params(llm)
    assert abs(n - 8.19e9) <= 0.01e9, n
    assert llm.config.vocab_size == 151936 and not llm.config.tie_word_embeddings
    vis = M.build_vision('random:' + M.DEFAULT_VISION, device='meta')
    nv = M.count_params(vis)
    assert abs(nv - 0.43e9) <= 0.01e9, nv
    M.truncate_vision(vis, -2)
    root = getattr(vis, 'vision_model', vis)
    assert len(root.encoder.layers) == 26 and M.count_params(vis) < nv
    if (ASSETS / 'Qwen3-8B-Base' / 'config.json').exists():
        # the architecture written into model.py agrees with the real config.json
        llm2 = M.build_llm('random:' + str(ASSETS / 'Qwen3-8B-Base'), device='meta')
        assert M.count_params(llm2) == n


def test_qwen_tokenizer_prompt():
    d = ASSETS / 'Qwen3-8B-Base'
    if not (d / 'tokenizer.json').exists():
        pytest.skip('../shared/assets/Qwen3-8B-Base not present')
    tok = M.load_tokenizer(str(d))
    sp = M.special_ids(tok)
    assert sp == dict(eos=151643, slot=151655, vision_start=151652, vision_end=151653)
    b = data.SampleBuilder(tok, 64, sp['slot'], sp['eos'], (sp['vision_start'], sp['vision_end']), 1536)
    assert b.prompt_a[:66] == [sp['vision_start']] + [sp['slot']] * 64 + [sp['vision_end']]
    assert tok.decode(b.prompt_a[66:]) == '\nDescribe the image in one sentence.\n'
    cap = tok('A cat on a mat.', add_special_tokens=False)['input_ids']
    ids, labels = b.build([cap])
    assert tok.decode([l for l in labels if l != -100]) == 'A cat on a mat.<|endoftext|>'

# -----------------------------------------------------------------------------
# 13. clear errors, never a traceback, never lost work


def test_clear_errors(demo_run, synthetic, tmp_path):
    ckpt = demo_run / 'ckpt.pt'
    corrupt, other = tmp_path / 'corrupt', tmp_path / 'other'
    corrupt.mkdir()
    other.mkdir()
    raw = ckpt.read_bytes()
    (corrupt / 'ckpt.pt').write_bytes(raw[:len(raw) // 2])
    shutil.copy(ckpt, other / 'ckpt.pt')
    before = {d: sha(d / 'ckpt.pt') for d in (corrupt, other)}
    Image.new('RGB', (32, 32), (200, 10, 10)).save(tmp_path / 'x.png')
    jobs = {
        'missing': ['train.py', TINY_CONFIG, f'--data_dir={tmp_path / "nope"}', f'--out_dir={tmp_path / "o"}'],
        'corrupt': train_args(synthetic, corrupt, '--init_from=resume'),
        'latents': train_args(synthetic, other, '--init_from=resume', '--n_latents=8'),
        'typo': ['train.py', TINY_CONFIG, '--learnig_rate=1e-3'],
        'sample': ['sample.py', '--ckpt', corrupt / 'ckpt.pt', '--image', tmp_path / 'x.png'],
    }
    procs = {k: subprocess.Popen([sys.executable, *map(str, a)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, a in jobs.items()}
    res = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=180)
        res[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    assert_one_error_line(res['missing'], 'nope')
    assert not (tmp_path / 'o').exists()  # failed before creating anything
    assert_one_error_line(res['corrupt'], 'ckpt.pt')
    assert_one_error_line(res['latents'], 'n_latents')
    assert_one_error_line(res['typo'], "'learning_rate'")
    assert_one_error_line(res['sample'])
    for d, h in before.items():
        assert sha(d / 'ckpt.pt') == h  # the checkpoint is left untouched
        assert not (d / 'log.jsonl').exists()


# =============================================================================
# prepare_llava.py: messy LLaVA data, zip vs folder, JSONL, packing, split, real tokenizer
# =============================================================================

HERE = ROOT
META_KEYS = {'version', 'source', 'tokenizer', 'vocab_size', 'eos_id', 'slot_id', 'image_root', 'image_kind',
             'packed_size', 'n_images', 'splits', 'golden', 'filters', 'counts', 'min_tokens', 'max_tokens',
             'max_dups', 'seed', 'val_ratio', 'qa_file'}

# -----------------------------------------------------------------------------
# A messy LLaVA-format dataset


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=95, **kw)
    return buf.getvalue()


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()


def exif_rotated():
    """40x20 stored, left half red / right half blue, EXIF orientation 6 (display rotated
    90 degrees clockwise): shown upright it is 20x40, red on top, blue below."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6
    return jpeg_bytes(img, exif=exif.tobytes())


def make_images():
    """{relative path: bytes} of every image of the messy set."""
    gray16 = (np.arange(30 * 30).reshape(30, 30) * 60).astype(np.uint16)  # up to ~54000: 16-bit range
    bomb = io.BytesIO()
    Image.new('1', (10000, 9000)).save(bomb, format='PNG')  # 90M px > PIL's 89.5M limit; ~11 KB on disk
    return {
        'a/rgb.jpg': jpeg_bytes(noise(40, 30)),
        'a/gray.png': png_bytes(noise(30, 30, 1).convert('L')),
        'a/rgba.png': png_bytes(noise(30, 30, 2).convert('RGBA')),
        'b/cmyk.jpg': jpeg_bytes(Image.new('CMYK', (30, 30), (0, 200, 200, 0))),
        'b/i16.png': png_bytes(Image.fromarray(gray16)),
        'b/pal.png': png_bytes(noise(30, 30, 3).convert('P')),
        'b/exif.jpg': exif_rotated(),
        'c/g0.jpg': jpeg_bytes(noise(30, 30, 4)),
        'c/g1.jpg': jpeg_bytes(noise(30, 30, 5)),
        'c/g2.jpg': jpeg_bytes(noise(30, 30, 6)),
        'c/g3.jpg': jpeg_bytes(noise(30, 30, 7)),
        'bad/corrupt.jpg': np.random.default_rng(8).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        'bad/zero.jpg': b'',
        'bad/trunc.jpg': jpeg_bytes(noise(64, 64, 9))[:4000],
        'bad/tiny.png': png_bytes(noise(4, 4)),
        'bad/bomb.png': bomb.getvalue(),
    }


def rec(image, caption, human='Describe the image concisely.\n<image>', gpt='gpt', hum='human'):
    return dict(id=image, image=image, conversations=[{'from': hum, 'value': human}, {'from': gpt, 'value': caption}])


LONG = ' '.join(['red circle'] * 40)  # 80 tokens
# (record, what should happen to it); captions use the tiny tokenizer's words
RECORDS = [
    (rec('a/rgb.jpg', 'a red circle at the top left.'), 'kept'),
    (rec('a/gray.png', 'a blue square at the bottom right.'), 'kept'),
    (rec('a/rgba.png', '  two green triangles and one red star.\n'), 'kept'),
    (rec('b/cmyk.jpg', 'there are three yellow stars.'), 'kept'),
    (rec('b/i16.png', 'a white cross in the center.', human='<image>\nWhat is this?'), 'kept'),
    (rec('b/pal.png', 'a pink diamond on the left.'), 'kept'),
    (rec('b/exif.jpg', 'a purple circle on the right.'), 'kept'),
    (rec('a/rgb.jpg', 'a big red circle in the upper left corner.'), 'kept'),  # same image, second caption
    (rec('c/g0.jpg', 'a red circle at the top left.'), 'duplicate'),
    (rec('c/g1.jpg', 'A red circle, at the TOP left!'), 'duplicate'),  # near duplicate
    (rec('a/missing.jpg', 'a green star at the bottom.'), 'missing_image'),
    (rec('c/g2.jpg', 'a green star at the bottom.'), 'kept'),  # its first occurrence was unusable
    (rec('c/g3.jpg', ''), 'empty_caption'),
    (rec('c/g3.jpg', '   \n '), 'empty_caption'),
    (rec('c/g3.jpg', None), 'empty_caption'),
    (rec('c/g3.jpg', 'a red circle <|image_pad|> at the top.'), 'special_tokens'),
    (rec('c/g3.jpg', 'a blue square in the center<|endoftext|>'), 'special_tokens'),
    (rec('c/g3.jpg', 'a red circle stock photo at the top.'), 'spam'),
    (rec('c/g3.jpg', 'Watermark: a blue square in the center.'), 'spam'),
    (rec('c/g3.jpg', 'download a green star at the top left'), 'spam'),
    (rec('c/g3.jpg', 'a red circle.'), 'too_short'),
    (rec('c/g3.jpg', 'star'), 'too_short'),
    (rec('c/g3.jpg', LONG), 'too_long'),
    (rec('bad/corrupt.jpg', 'a blue circle at the top.'), 'undecodable_image'),
    (rec('bad/trunc.jpg', 'a yellow diamond at the top.'), 'undecodable_image'),
    (rec('bad/zero.jpg', 'a green square at the top.'), 'zero_byte_image'),
    (rec('bad/tiny.png', 'a white star at the top.'), 'tiny_image'),
    (rec('bad/bomb.png', 'an orange cross at the top.'), 'decompression_bomb'),
    ('oops', 'malformed_keys'),
    ({'id': 'x', 'conversations': rec('c/g3.jpg', 'a red circle at the top.')['conversations']}, 'malformed_keys'),
    ({'image': 'c/g3.jpg', 'conversations': [{'from': 'human', 'value': '<image>'}, {'from': 'gpt'}]}, 'malformed_keys'),
    ({'image': 5, 'conversations': rec('c/g3.jpg', 'a red circle at the top.')['conversations']}, 'malformed_types'),
    ({'image': 'c/g3.jpg', 'conversations': 'hello'}, 'malformed_types'),
    (rec('c/g3.jpg', 7), 'malformed_types'),
    ({'image': 'c/g3.jpg', 'conversations': rec('c/g3.jpg', 'a red star at the top.')['conversations'] * 2},
     'malformed_turns'),
    ({'image': 'c/g3.jpg', 'conversations': rec('c/g3.jpg', 'x')['conversations'][:1]}, 'malformed_turns'),
    (rec('c/g3.jpg', 'a red square at the top.', gpt='human', hum='gpt'), 'malformed_roles'),
    (rec('c/g3.jpg', 'a red square at the top.', human='Describe the image.'), 'malformed_image_tokens'),
    (rec('c/g3.jpg', 'a red square at the top.', human='<image> and <image>'), 'malformed_image_tokens'),
]
VERIFY_RULES = ('zero_byte_image', 'undecodable_image', 'tiny_image', 'decompression_bomb')


def expected_filters(verify):
    want = dict.fromkeys(P.RULES, 0)
    for _, what in RECORDS:
        if what != 'kept' and (verify or what not in VERIFY_RULES):
            want[what] += 1
    return want


def kept_records(verify):
    return [r for r, what in RECORDS if what == 'kept' or (not verify and what in VERIFY_RULES)]


@pytest.fixture(scope='module')
def messy(tmp_path_factory):
    """data_dir with the LLaVA json, an images/ folder and an images.zip of the same files."""
    d = tmp_path_factory.mktemp('messy')
    images = make_images()
    with zipfile.ZipFile(d / 'images.zip', 'w') as zf:
        for name, raw in images.items():
            zf.writestr(name, raw)
            (d / 'images' / name).parent.mkdir(parents=True, exist_ok=True)
            (d / 'images' / name).write_bytes(raw)
    (d / P.LLAVA_JSON).write_text(json.dumps([r for r, _ in RECORDS]))
    return d


def prep(*argv):
    return P.main([str(a) for a in argv])


def load(out):
    out = Path(out)
    meta = json.loads((out / 'meta.json').read_text())
    arrays = {name: (np.fromfile(out / name, dtype=np.uint32) if name.endswith('.bin') else np.load(out / name))
              for name in ('train_tokens.bin', 'val_tokens.bin', 'train_index.npy', 'val_index.npy',
                           'image_paths.npy')}
    return meta, arrays


def samples(arrays):
    """[(image paths, caption token ids)] of train + val."""
    paths = [p.decode() for p in arrays['image_paths.npy']]
    out = []
    for split in ('train', 'val'):
        tokens, index = arrays[f'{split}_tokens.bin'], arrays[f'{split}_index.npy']
        for off, n, i0, i1 in index:
            out.append((tuple(paths[i] for i in (i0, i1) if i >= 0), tokens[off:off + n].tolist()))
    return out


def expected_samples(records, tok):
    return sorted(((r['image'],), tok(r['conversations'][1]['value'].strip(), add_special_tokens=False)['input_ids'])
                  for r in records)

# -----------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize('verify', [True, False])
def test_messy_llava_every_filter_counted(messy, tmp_path, verify):
    meta = prep('--data_dir', messy, '--out_dir', tmp_path / 'out', '--tokenizer=tiny', '--workers=2',
               *(['--verify-images'] if verify else []))
    assert meta['filters'] == expected_filters(verify)
    assert list(meta['filters']) == P.RULES
    kept = kept_records(verify)
    assert meta['counts'] == {'records': len(RECORDS), 'kept': len(kept)}
    meta2, arrays = load(tmp_path / 'out')
    assert meta2 == meta and set(meta) == META_KEYS
    assert meta['image_kind'] == 'folder' and meta['image_root'] == os.path.abspath(messy / 'images')
    assert meta['source'] == 'llava' and meta['tokenizer'] == 'tiny' and meta['max_dups'] == 1
    tok = tiny_tokenizer()
    assert sorted(samples(arrays)) == expected_samples(kept, tok)
    assert meta['n_images'] == len({r['image'] for r in kept}) == len(arrays['image_paths.npy'])
    assert arrays['image_paths.npy'].dtype.kind == 'S'
    assert arrays['train_tokens.bin'].dtype == np.uint32 and arrays['train_index.npy'].dtype == np.int64
    assert arrays['train_index.npy'].shape[1] == 4 and (arrays['train_index.npy'][:, 3] == -1).all()
    assert meta['splits'] == {'train': len(kept) - 1, 'val': 1}  # 1% of 9-14 samples rounds up to 1
    assert not list((tmp_path / 'out').glob('*.tmp'))


def test_folder_and_zip_give_identical_outputs(messy, tmp_path):
    # inline verification from the folder, a 2-process pool with per-worker zip handles from the zip
    m1 = prep('--data_dir', messy, '--out_dir', tmp_path / 'f', '--tokenizer=tiny', '--verify_images', '--workers=1')
    m2 = prep('--data_dir', messy, '--images', messy / 'images.zip', '--out_dir', tmp_path / 'z', '--tokenizer=tiny',
             '--verify_images', '--workers', '2')
    assert m2['image_kind'] == 'zip' and m2['image_root'] == os.path.abspath(messy / 'images.zip')
    assert m1['filters'] == m2['filters'] == expected_filters(True)
    _, a1 = load(tmp_path / 'f')
    _, a2 = load(tmp_path / 'z')
    for name in a1:
        assert a1[name].dtype == a2[name].dtype and np.array_equal(a1[name], a2[name]), name
    for key in ('splits', 'golden', 'counts', 'n_images'):
        assert m1[key] == m2[key]


def test_zip_with_top_folder(messy, tmp_path):
    """images.zip whose members sit under images/ (as some re-zips do): found, and the
    stored path is the member name."""
    with zipfile.ZipFile(messy / 'images.zip') as src, zipfile.ZipFile(tmp_path / 'images.zip', 'w') as dst:
        for name in src.namelist():
            dst.writestr('images/' + name, src.read(name))
    meta = prep('--json', messy / P.LLAVA_JSON, '--images', tmp_path / 'images.zip', '--out_dir', tmp_path / 'o',
               '--tokenizer=tiny')
    assert meta['filters'] == expected_filters(False)
    _, arrays = load(tmp_path / 'o')
    with zipfile.ZipFile(tmp_path / 'images.zip') as zf:
        for p in arrays['image_paths.npy']:
            assert p.decode().startswith('images/') and p.decode() in zf.namelist()


def test_max_dups_and_lengths_are_settings(messy, tmp_path):
    meta = prep('--data_dir', messy, '--out_dir', tmp_path / 'o', '--tokenizer=tiny', '--max_dups=2',
               '--min-tokens', '1', '--max_tokens=100')
    f = meta['filters']
    assert f['duplicate'] == 1 and f['too_short'] == 0 and f['too_long'] == 0  # three copies of one caption
    meta = prep('--data_dir', messy, '--out_dir', tmp_path / 'o', '--tokenizer=tiny', '--max_dups=0')
    assert meta['filters']['duplicate'] == 0 and meta['max_dups'] == 0


def test_pack_images(messy, tmp_path):
    size = 32
    meta = prep('--data_dir', messy, '--out_dir', tmp_path / 'f', '--tokenizer=tiny', '--pack-images',
               f'--pack_size={size}', '--workers=2')
    assert meta['image_kind'] == 'packed' and meta['packed_size'] == size
    assert meta['filters'] == expected_filters(True)  # packing implies verification
    _, arrays = load(tmp_path / 'f')
    blob = (tmp_path / 'f' / 'images_packed.bin').read_bytes()
    offs = np.load(tmp_path / 'f' / 'images_packed_offsets.npy')
    paths = [p.decode() for p in arrays['image_paths.npy']]
    assert offs.dtype == np.int64 and offs.shape == (len(paths) + 1,)
    assert offs[0] == 0 and offs[-1] == len(blob) and (np.diff(offs) > 0).all()
    pixels = {}
    for k, p in enumerate(paths):
        img = Image.open(io.BytesIO(blob[offs[k]:offs[k + 1]]))
        assert img.format == 'JPEG' and img.mode == 'RGB' and img.size == (size, size), p
        pixels[p] = np.asarray(img).astype(int)
    # EXIF orientation applied: red on top, blue below (not red left / blue right)
    ex = pixels['b/exif.jpg']
    assert ex[4, 8, 0] > 200 and ex[4, 24, 0] > 200 and ex[4, 24, 2] < 60
    assert ex[28, 8, 2] > 200 and ex[28, 24, 2] > 200 and ex[28, 8, 0] < 60
    assert pixels['b/i16.png'].mean() < 200  # 16-bit gray rescaled, not clipped to white
    # from the zip (per-worker handles): byte-identical pack
    prep('--data_dir', messy, '--images', messy / 'images.zip', '--out_dir', tmp_path / 'z', '--tokenizer=tiny',
        '--pack_images', f'--pack_size={size}', '--workers=2')
    assert (tmp_path / 'z' / 'images_packed.bin').read_bytes() == blob
    # a later run without packing removes the stale pack (its image ids would not match)
    meta = prep('--data_dir', messy, '--out_dir', tmp_path / 'f', '--tokenizer=tiny')
    assert meta['image_kind'] == 'folder' and not (tmp_path / 'f' / 'images_packed.bin').exists()


def test_caption_jsonl_with_two_images(tmp_path):
    d = tmp_path / 'caps'
    (d / 'imgs').mkdir(parents=True)
    (tmp_path / 'elsewhere').mkdir()
    (d / 'imgs' / 'x.jpg').write_bytes(jpeg_bytes(noise(20, 20, 1)))
    (d / 'imgs' / 'y.jpg').write_bytes(jpeg_bytes(noise(20, 20, 2)))
    z = tmp_path / 'elsewhere' / 'z.jpg'
    z.write_bytes(jpeg_bytes(noise(20, 20, 3)))
    lines = [
        json.dumps(dict(id='1', images=['imgs/x.jpg', str(z)], caption='two red circles and one blue square.',
                        source='t')),
        json.dumps(dict(id='2', images=['imgs/y.jpg'], caption='a green star at the top left.', source='t')),
        '{not json',
        '',
        json.dumps(dict(id='3', images=[], caption='a red circle at the top left.')),
        json.dumps(dict(id='4', images=['imgs/x.jpg'] * 3, caption='a red circle at the top left.')),
        json.dumps(dict(id='5', caption='a red circle at the top left.')),
        json.dumps(dict(id='6', images='imgs/x.jpg', caption='a red circle at the top left.')),
        json.dumps(dict(id='7', images=['imgs/nope.jpg'], caption='a blue circle at the top left.')),
    ]
    (d / 'caps.jsonl').write_text('\n'.join(lines) + '\n')
    meta = prep('--json', d / 'caps.jsonl', '--tokenizer=tiny', '--verify_images', '--workers=2')
    assert meta['source'] == 'jsonl' and meta['image_kind'] == 'folder' and meta['image_root'] == os.path.abspath(d)
    f = meta['filters']
    assert (f['malformed_json'], f['malformed_n_images'], f['malformed_keys'], f['malformed_types'],
            f['missing_image']) == (1, 2, 1, 1, 1)
    assert meta['counts'] == {'records': 8, 'kept': 2}
    _, arrays = load(d / 'prepared')  # out_dir defaults to the JSONL's folder
    tok = tiny_tokenizer()
    got = {imgs: ids for imgs, ids in samples(arrays)}
    assert got == {('imgs/x.jpg', str(z)): tok('two red circles and one blue square.')['input_ids'],
                   ('imgs/y.jpg',): tok('a green star at the top left.')['input_ids']}
    for p in arrays['image_paths.npy']:
        assert os.path.isfile(os.path.join(meta['image_root'], p.decode()))


def test_split_deterministic_and_stratified():
    lengths = np.random.default_rng(0).integers(5, 61, 3000)
    a = P.split_val(lengths, 0.1, seed=1)
    assert np.array_equal(a, P.split_val(lengths, 0.1, seed=1))
    assert not np.array_equal(a, P.split_val(lengths, 0.1, seed=2))
    assert len(a) == 300 and len(np.unique(a)) == 300 and np.all(np.diff(a) > 0)
    edges = np.quantile(lengths, [1 / 3, 2 / 3])
    bucket = np.searchsorted(edges, lengths, side='right')
    for b in range(3):  # each length tertile gives its share of val, to within one sample
        assert abs((bucket[a] == b).sum() - 0.1 * (bucket == b).sum()) <= 1
    assert len(P.split_val([7, 9], 0.01, 0)) == 1 and len(P.split_val([7], 0.5, 0)) == 0
    assert len(P.split_val(lengths, 0.0, 0)) == 0
    g = P.golden(lengths[a])
    assert len(g) == 32 and g == sorted(set(g)) and 0 <= g[0] and g[-1] < len(a)
    assert lengths[a][g].min() == lengths[a].min() and lengths[a][g].max() == lengths[a].max()
    assert P.golden(np.array([3, 1, 2])) == [0, 1, 2]


def test_synthetic(tmp_path):
    meta = prep('--synthetic=300', '--data_dir', tmp_path / 's1', '--val_ratio=0.05')
    assert meta['source'] == 'synthetic' and meta['tokenizer'] == 'tiny' and meta['counts']['kept'] == 300
    assert meta['splits'] == {'train': 285, 'val': 15} and len(meta['golden']) == 15
    assert meta['qa_file'] == os.path.abspath(tmp_path / 's1' / 'qa.jsonl')
    saved, arrays = load(tmp_path / 's1' / 'prepared')
    assert saved == meta
    tok = tiny_tokenizer()
    unk = tok.convert_tokens_to_ids('[UNK]')
    for _, ids in samples(arrays):
        assert len(ids) >= 5 and unk not in ids
    records = json.loads((tmp_path / 's1' / 'synthetic.json').read_text())
    assert records[0]['conversations'][0] == {'from': 'human', 'value': '<image>\nDescribe the image in one sentence.'}
    assert records[123]['image'] == '000/000123.jpg'
    assert Image.open(tmp_path / 's1' / 'images' / '000' / '000123.jpg').size == (64, 64)
    words = set(TINY_WORDS)
    for r in records:
        assert set(r['conversations'][1]['value'].rstrip('.').split()) <= words
    qa = [json.loads(line) for line in (tmp_path / 's1' / 'qa.jsonl').read_text().splitlines()]
    assert 150 <= len(qa) <= 300
    for q in qa:
        assert (tmp_path / 's1' / q['image']).is_file() and q['answers'] and q['question']
        assert unk not in tok(q['question'])['input_ids'] and all(unk not in tok(x)['input_ids'] for x in q['answers'])
    assert any(q['question'] == 'What color is the circle?' for q in qa)
    val_images = {p.decode() for p in arrays['image_paths.npy'][arrays['val_index.npy'][:, 2]]}
    assert {q['image'][len('images/'):] for q in qa} >= val_images  # every val image has questions
    # deterministic from the seed; another seed draws another dataset
    prep('--synthetic=300', '--data_dir', tmp_path / 's2', '--val_ratio=0.05')
    _, again = load(tmp_path / 's2' / 'prepared')
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    assert (tmp_path / 's1' / 'qa.jsonl').read_text() == (tmp_path / 's2' / 'qa.jsonl').read_text()
    assert (tmp_path / 's1/images/000/000007.jpg').read_bytes() == (tmp_path / 's2/images/000/000007.jpg').read_bytes()
    prep('--synthetic=300', '--data_dir', tmp_path / 's3', '--seed=7')
    assert json.loads((tmp_path / 's3' / 'synthetic.json').read_text()) != records


def test_interrupted_write_leaves_no_stale_meta(messy, tmp_path, monkeypatch):
    out = tmp_path / 'o'
    prep('--data_dir', messy, '--out_dir', out, '--tokenizer=tiny')
    assert (out / 'meta.json').exists()
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(a, b)
    monkeypatch.setattr(os, 'replace', flaky)
    with pytest.raises(KeyboardInterrupt):
        prep('--data_dir', messy, '--out_dir', out, '--tokenizer=tiny', '--max_dups=0')
    assert not (out / 'meta.json').exists()  # half-replaced arrays must never sit next to a meta
    monkeypatch.setattr(os, 'replace', real)
    meta = prep('--data_dir', messy, '--out_dir', out, '--tokenizer=tiny', '--max_dups=0')
    assert json.loads((out / 'meta.json').read_text()) == meta


def test_one_line_errors(tmp_path):
    def error_of(*argv):
        with pytest.raises(SystemExit) as e:
            prep(*argv)
        msg = str(e.value.code)
        assert msg.startswith('error: ') and '\n' not in msg, msg
        return msg
    assert 'no caption file' in error_of('--json', tmp_path / 'nope.json')
    (tmp_path / 'bad.json').write_text('[{"id": 1,')
    assert 'not valid JSON' in error_of('--json', tmp_path / 'bad.json', '--skip_image_check', '--tokenizer=tiny')
    (tmp_path / 'ok.json').write_text(json.dumps([rec('x.jpg', 'a red circle at the top left.')]))
    assert '--images' in error_of('--json', tmp_path / 'ok.json', '--tokenizer=tiny')  # no images anywhere
    (tmp_path / 'images').mkdir()
    assert 'survived' in error_of('--json', tmp_path / 'ok.json', '--tokenizer=tiny')  # all images missing
    assert 'unrecognized' in error_of('--nope=1')
    assert 'max_tokens' in error_of('--min_tokens=9', '--max_tokens=3')
    assert error_of('--workers', 'two')


def test_cli_spellings():
    a = P.parse_args(['--verify-images', '--max_tokens', '40', '--val-ratio=0.02', '--pack_size=64'])
    assert a.verify_images and a.max_tokens == 40 and a.val_ratio == 0.02 and a.pack_size == 64
    assert P.parse_args(['--pack-images']).verify_images  # packing implies verification


def test_offline_no_args_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), PYTHONPATH=str(HERE))
    r = subprocess.run([sys.executable, str(HERE / 'prepare_llava.py')], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith('error:') and 'liuhaotian/LLaVA-Pretrain' in lines[0]
    assert P.LLAVA_JSON in lines[0] and 'images.zip' in lines[0] and 'data/llava_pretrain' in lines[0]
    assert not (tmp_path / 'data' / 'llava_pretrain' / 'prepared').exists()


@pytest.mark.skipif(not (ASSETS / 'Qwen3-8B-Base' / 'tokenizer.json').exists(), reason='no ../shared/assets')
def test_real_qwen3_tokenizer(tmp_path):
    from transformers import AutoTokenizer
    qwen = ASSETS / 'Qwen3-8B-Base'
    caps = ['select luxury furniture 3 - inch gel memory foam mattress topper',
            'a grey watch with an army style strap',
            'Café ☕ latte art in a white cup, seen from above',
            '  the 2019 Tokyo skyline at night, with lights reflecting on the water  ',
            'a small dog sitting on a wooden bench in the park',
            'a man <think> riding a horse on the beach',  # a Qwen3 added token: dropped
            'a cat sleeping on a sofa<|im_end|>']
    (tmp_path / 'images').mkdir()
    for k in range(len(caps)):
        (tmp_path / 'images' / f'{k}.jpg').write_bytes(jpeg_bytes(noise(16, 16, k)))
    (tmp_path / P.LLAVA_JSON).write_text(json.dumps([rec(f'{k}.jpg', c) for k, c in enumerate(caps)]))
    meta = prep('--data_dir', tmp_path, '--tokenizer', qwen, '--val_ratio=0.3')
    tok = AutoTokenizer.from_pretrained(str(qwen))
    assert meta['tokenizer'] == os.path.abspath(qwen) and meta['vocab_size'] == len(tok)
    assert meta['eos_id'] == 151643 and tok.convert_ids_to_tokens(meta['slot_id']) == '<|image_pad|>'
    assert meta['slot_id'] < len(tok)
    assert meta['filters']['special_tokens'] == 2
    _, arrays = load(tmp_path / 'prepared')
    got = dict(samples(arrays))
    assert got == {(f'{k}.jpg',): tok(c.strip(), add_special_tokens=False)['input_ids'] for k, c in enumerate(caps[:5])}


# =============================================================================
# Evaluation metrics (sample.py): BLEU-4 / CIDEr-D against known values, hallucination, QA, report
# =============================================================================

# A fixed 5-image corpus. Reference numbers below come from pycocoevalcap 1.2 (PyPI wheel;
# Bleu(4) and Cider, which are pure Python), fed the output of tokenize_caption joined by
# spaces, since that toolkit expects pre-tokenized text. Not a dependency of this repo.
CANDS = [
    "A man riding a surfboard on a wave.",
    "Two dogs playing in the grass with a ball.",
    "A plate of rice and broccoli on a table.",
    "A red circle and a green triangle on a white background.",
    "A red stop sign on a city street.",
]
REFS = [
    ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
     "A person on a surfboard riding a wave."],
    ["Two dogs playing with a frisbee in the grass.", "A couple of dogs play in a grassy field.",
     "Two brown dogs running on the grass with a frisbee."],
    ["A plate of food with broccoli and rice.", "A white plate topped with rice and broccoli.",
     "A close up of a plate of food."],
    ["A red circle and a blue square on a white background.", "A red circle to the left of a blue square."],
    ["A stop sign on the corner of a street.", "A red stop sign next to a road."],
]
COCO_BLEU4 = 0.48090517442178216  # pycocoevalcap Bleu(4), 4th value (it adds 1e-15/1e-9 epsilons)
COCO_CIDER = 2.9538221862967697   # pycocoevalcap Cider (CIDEr-D), corpus mean
COCO_CIDER_PER = [2.8610536383950746, 2.7370544283595426, 2.492090431839528,
                  3.388779231495685, 3.2901332013940205]

def test_tokenize_caption():
    assert tokenize_caption("A Dog's T-shirt, on 3.5 'big' mats!\n") == \
        ["a", "dogs", "t", "shirt", "on", "3", "5", "big", "mats"]
    assert tokenize_caption("  ...  ") == []

def test_matches_coco_caption_evaluation():
    b, _ = bleu4(CANDS, REFS)
    c, per = cider_d(CANDS, REFS)
    assert b == pytest.approx(COCO_BLEU4, abs=1e-9)
    assert c == pytest.approx(COCO_CIDER, abs=1e-9)
    assert per == pytest.approx(COCO_CIDER_PER, abs=1e-9)

def test_bleu_by_hand():
    # Papineni et al.'s example. Candidate "the cat sat on the mat" (6 words):
    #   1-grams the x2 (a reference has "the" twice -> both count), cat, on, mat match; sat not: 5/6
    #   2-grams "the cat", "on the", "the mat" match of 5: 3/5;  3-grams "on the mat": 1/4;  4-grams 0/3
    #   closest reference length 6 (vs 7) -> no brevity penalty
    # plus an exact copy of a 6-word reference: 6/6, 5/5, 4/4, 3/3.
    cands = ["the cat sat on the mat", "a dog runs in the park"]
    refs = [["the cat is on the mat", "there is a cat on the mat"], ["a dog runs in the park"]]
    corpus, per = bleu4(cands, refs)
    # corpus: (5+6)/12, (3+5)/10, (1+4)/8, (0+3)/6; lengths 12 vs 12 -> BP 1
    assert corpus == pytest.approx((11 / 12 * 8 / 10 * 5 / 8 * 3 / 6) ** 0.25, abs=1e-12)
    # sentence: the 4-gram zero is smoothed to 0.1/3 (Chen & Cherry method 1)
    assert per[0] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25, abs=1e-12)
    assert per[1] == pytest.approx(1.0, abs=1e-12)

def test_bleu_brevity_penalty_closest_length():
    # every candidate n-gram matches, so BLEU is just the brevity penalty. Closest reference
    # lengths: 6 words -> 7 (not 4); 4 words -> 3 and 5 tie -> the shorter, 3; 2 words -> 6.
    # c = 12, r = 16 -> exp(1 - 16/12). pycocoevalcap gives 0.7165313104046085 (tie to 5 would give exp(-1/2)).
    cands = ["a dog runs in the park", "a big red dog", "the cat"]
    refs = [["a dog runs in the park today", "a big dog runs"], ["a big dog", "a big red dog runs"],
            ["the cat sat on a mat"]]
    corpus, per = bleu4(cands, refs)
    assert corpus == pytest.approx(math.exp(-1 / 3), abs=1e-12)
    assert corpus == pytest.approx(0.7165313104046085, abs=1e-9)
    assert per[0] == pytest.approx(math.exp(1 - 7 / 6), abs=1e-12)
    assert per[1] == pytest.approx(1.0, abs=1e-12)
    # "the cat": 2/2, 1/1, no 3- or 4-grams -> 0.1 each; BP exp(1 - 6/2)
    assert per[2] == pytest.approx(0.01 ** 0.25 * math.exp(-2), abs=1e-12)

def test_cider_d_by_hand():
    # three images, one reference each: "red circle", "blue square", "green circle".
    # IDF = log(3) - log(df): "circle" is in 2 of 3 reference sets -> log 1.5; every other
    # n-gram (including "shape", in no reference: df counts as 1) -> log 3. Captions have no
    # 3-/4-grams, so those orders add 0 and the 1/4 average over n still divides by 4.
    L3, L15 = math.log(3), math.log(1.5)
    cands = ["red circle", "blue circle shape", "circle circle"]
    refs = [["red circle"], ["blue square"], ["green circle"]]
    mean, per = cider_d(cands, refs)
    # 1: identical -> cosine 1 for n = 1 and 2 -> 10 * 2/4
    assert per[0] == pytest.approx(5.0, abs=1e-12)
    # 2: only "blue" shared; one word longer -> exp(-1 / (2 * 6^2))
    cos = L3 * L3 / (math.sqrt(2 * L3 ** 2 + L15 ** 2) * math.sqrt(2) * L3)
    assert per[1] == pytest.approx(10 / 4 * cos * math.exp(-1 / 72), abs=1e-12)
    # 3: "circle" twice is clipped to the reference's once: min(2, 1) * L15 * L15
    cos = L15 * L15 / (2 * L15 * math.sqrt(L3 ** 2 + L15 ** 2))
    assert per[2] == pytest.approx(10 / 4 * cos, abs=1e-12)
    assert mean == pytest.approx(sum(per) / 3, abs=1e-12)
    assert mean == pytest.approx(2.208536957076924, abs=1e-9)  # pycocoevalcap Cider

def test_identical_scores_max_and_unrelated_near_zero():
    refs = [[c] for c in CANDS]
    b, b_per = bleu4(CANDS, refs)
    c, c_per = cider_d(CANDS, refs)
    assert b == pytest.approx(1.0, abs=1e-12) and b_per == pytest.approx([1.0] * 5, abs=1e-12)
    assert c == pytest.approx(10.0, abs=1e-9) and c_per == pytest.approx([10.0] * 5, abs=1e-9)
    # any other caption scores below the identical one in the same corpus
    assert cider_d(["a man riding a wave"] + CANDS[1:], refs)[1][0] < 10.0
    # unrelated captions share only "a", which is in every reference set (IDF 0)
    junk = ["a purple elephant juggling three umbrellas"] * 5
    b, b_per = bleu4(junk, REFS)
    c, c_per = cider_d(junk, REFS)
    assert b == 0.0 and max(b_per) < 0.05
    assert c == pytest.approx(0.0, abs=1e-12)

def test_metric_input_errors():
    with pytest.raises(ValueError, match="2 candidates but 1"):
        bleu4(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no reference"):
        cider_d(["a cat"], [[]])
    assert cider_d(["a cat"], ["a cat"])[0] == 0.0  # one-image corpus: every IDF is log(1) = 0

def test_hallucination_rate():
    cands = [
        "A dog and a cat sitting on a couch.",        # cat is not in the reference
        "Two red circles and a yellow star.",         # plural circle is fine, the star is not
        "A man eating a hot dog.",                    # a hot dog is not a dog; man == person
        "An orange square on a grey background.",     # orange is a colour, not the fruit
        "A photo of the sky at night.",               # names no object
    ]
    refs = [
        ["A dog sitting on a sofa."],
        ["A red circle and a blue square.", "Two circles, one red."],
        ["A person holding a hot dog."],
        ["An orange square."],
        ["The night sky."],
    ]
    summary, per = hallucination_rate(cands, refs)
    assert per == [["cat"], ["star"], [], [], []]
    assert summary["objects_mentioned"] == 3 + 2 + 2 + 1 + 0
    assert summary["chair_i"] == pytest.approx(2 / 8)
    assert summary["chair_s"] == pytest.approx(2 / 5)
    # irregular plurals and -ies plurals map to the same object as the singular
    assert hallucination_rate(["three knives and two ladies"], [["a knife held by a woman"]])[1] == [[]]
    # a plain word list works as a vocabulary
    summary, per = hallucination_rate(["a cat and a dog"], [["a cat"]], vocab=["cat", "dog"])
    assert per == [["dog"]] and summary["chair_s"] == 1.0
    assert all(w in OBJECT_WORDS for w in ["circle", "square", "triangle", "diamond", "star", "cross"])

def test_qa_scores():
    preds = ["A red circle.", "There is a blue square in the image", "the dog", "Cat",
             "a bluesquare", "scattered leaves"]
    answers = [["a red circle"], "blue square", ["dog", "puppy"], ["a cat"], ["blue square"], ["cat"]]
    q = qa_scores(preds, answers)
    assert q["exact_per_sample"] == [True, False, True, True, False, False]
    assert q["contains_per_sample"] == [True, True, True, True, False, False]
    assert q["exact"] == pytest.approx(3 / 6) and q["contains"] == pytest.approx(4 / 6) and q["n"] == 6
    # an answer that normalises to nothing never matches
    assert qa_scores([""], [["the"]])["contains_per_sample"] == [False]

def test_length_stats():
    ls = length_stats(["one two three", "a b c d e f g h i j k l"], [["w " * 5, "w " * 25], ["w " * 70]])
    g, r = ls["generated"], ls["references"]
    assert ls["bins"][0] == "0-4" and ls["bins"][-1] == "60+" and len(ls["bins"]) == len(g["hist"])
    assert g["n"] == 2 and g["mean"] == 7.5 and g["median"] == 7.5
    assert g["p10"] == pytest.approx(3 + 0.1 * 9) and g["p90"] == pytest.approx(3 + 0.9 * 9)
    assert g["hist"] == [1, 0, 1, 0, 0, 0, 0, 0]
    assert r["hist"] == [0, 1, 0, 0, 1, 0, 0, 1] and r["n"] == 3

def test_write_report(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.new("RGB", (640, 480), (200, 30, 30)).save(img_dir / "red.jpg")
    Image.new("L", (50, 300), 128).save(img_dir / "grey.png")
    (img_dir / "broken.jpg").write_bytes(b"not a jpeg")
    rows = [
        {"id": "r0", "image": str(img_dir / "red.jpg"), "prompt": "<image>\nDescribe the image.",
         "generation": "A red square.", "references": ["A red square on a white background."]},
        {"id": "r|1", "image": str(img_dir / "grey.png"), "prompt": "p",
         "generation": "A grey bar with a dog.", "references": ["A grey rectangle."]},
        {"id": "r2", "image": str(img_dir / "missing.jpg"), "prompt": "p",
         "generation": "Nothing.", "references": ["A blue circle."]},
        {"id": "r3", "image": str(img_dir / "broken.jpg"), "prompt": "p",
         "generation": "A cat.", "references": ["A cat."]},
        {"id": "r4", "pil": Image.new("RGBA", (300, 300), (0, 0, 255, 128)), "prompt": "p",
         "generation": "A blue circle.", "references": ["A blue circle."]},
        {"id": "q0", "image": [str(img_dir / "red.jpg"), str(img_dir / "grey.png")],
         "prompt": "What is in the image?", "generation": "a red square", "answers": ["red square"]},
    ]
    metrics = {"val": score_rows(rows[:5]), "qa": score_rows(rows[5:]), "llm_untouched": True}
    out = tmp_path / "report"
    path = write_report(str(out), rows, metrics)
    assert path == str(out / "report.md")

    lines = (out / "generations.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)
    first = json.loads(lines[0])
    assert list(first)[:5] == ["id", "image", "prompt", "generation", "references"]
    assert {"bleu4", "cider_d", "hallucinated"} <= set(first)
    assert json.loads(lines[1])["hallucinated"] == ["dog"]
    assert json.loads(lines[4])["image"] is None and "pil" not in json.loads(lines[4])
    assert json.loads(lines[5])["exact"] is True

    md = (out / "report.md").read_text()
    assert "val.cider_d" in md and "val.bleu4" in md and "qa.qa_exact" in md and "llm_untouched" in md
    assert "Caption length in words: val.length" in md
    assert "r\\|1" in md  # a pipe in a cell must not split the table row
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    # red, grey, the PIL image, and both images of the two-image row; missing/broken skipped
    assert len(links) == 5
    for link in links:
        assert not os.path.isabs(link) and link.startswith("thumbs/")
        with Image.open(out / link) as im:
            assert im.format == "JPEG" and max(im.size) == 128
    assert sorted(os.listdir(out / "thumbs")) == sorted(os.path.basename(l) for l in links)


# =============================================================================
# Real-weight loading, export, evaluation report, non-finite steps
# =============================================================================


def test_backbones_load_from_local_dirs(tmp_path, tiny):
    """The real loading path (from_pretrained on a directory), exercised on tiny backbones:
    the vision tower is saved as a full SigLIP model (text + vision, like the hub's
    google/siglip-so400m-patch14-384) and only its vision half must be loaded. The saved
    weights are perturbed, so a loader that silently kept the seeded init would fail."""
    from transformers import SiglipConfig, SiglipModel
    vlm, tok = tiny
    g = torch.Generator().manual_seed(1)
    ref_vision = M.build_vision('tiny')
    ref_llm = M.build_llm('tiny', vocab_size=len(tok))
    with torch.no_grad():
        for p in list(ref_vision.parameters()) + list(ref_llm.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    vcfg = ref_vision.config.to_dict()
    full = SiglipModel(SiglipConfig(vision_config=vcfg, text_config=dict(hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, vocab_size=100)))
    missing = full.vision_model.load_state_dict(ref_vision.state_dict(), strict=False)
    assert not missing.unexpected_keys
    full.save_pretrained(tmp_path / 'siglip')
    ref_llm.save_pretrained(tmp_path / 'llm')
    loaded = M.build_vlm({**TINY_ARGS, 'vision': str(tmp_path / 'siglip'), 'llm': str(tmp_path / 'llm')}, tok,
                         connector_state=vlm.connector.state_dict()).eval()
    assert loaded.image_spec['size'] == vlm.image_spec['size']
    M.truncate_vision(ref_vision, TINY_ARGS['vision_feature_layer'])
    imgs = torch.from_numpy(rand_images(2, vlm.image_spec['size']))
    x = ((imgs.float() - loaded.pix_mean) / loaded.pix_std)
    with torch.no_grad():
        torch.testing.assert_close(loaded.vision(pixel_values=x).last_hidden_state,
                                   ref_vision(pixel_values=x).last_hidden_state)
        assert not torch.allclose(loaded.encode_images(imgs), vlm.encode_images(imgs))
        ids = torch.tensor([[tok.eos_token_id, 5, 6, 7]])
        torch.testing.assert_close(loaded.llm(input_ids=ids).logits, ref_llm(input_ids=ids).logits)
    with pytest.raises(SystemExit, match='cannot load llm'):
        M.build_llm(str(tmp_path / 'siglip' / 'nothing-here'))


def test_export_connector_roundtrip(demo_run, synthetic, tmp_path):
    """--export writes safetensors + JSON; sample.py loads the folder and captions the same."""
    import sample
    out = tmp_path / 'export'
    sample.main(['--ckpt', str(demo_run / 'ckpt.pt'), '--export', str(out)])
    assert sorted(p.name for p in out.iterdir()) == ['connector.safetensors', 'connector_config.json']
    meta = json.loads((synthetic / 'meta.json').read_text())
    img = str(next(Path(meta['image_root']).rglob('*.jpg')))
    caps = []
    for src in (demo_run / 'ckpt.pt', out):
        vlm, tok, _, _ = sample.setup(str(src), 'cpu')
        caps.append(sample.caption_batch(vlm, tok, [[sample.read_image(img, vlm)]], max_new_tokens=12))
    assert caps[0] == caps[1]


def test_eval_report(demo_run, tmp_path):
    """The report written at the end of training, and sample.py --eval against the untrained
    baseline: files exist, the markdown links resolve, the frozen LLM check passes, and the
    trained connector beats the untrained one on val loss and CIDEr-D."""
    rep = demo_run / 'report'
    md = (rep / 'report.md').read_text()
    for link in re.findall(r'\]\(([^)]+)\)', md):
        assert (rep / link).exists(), link
    m = json.loads((rep / 'metrics.json').read_text())
    assert m['llm_untouched']['ok'] and m['val']['n_captions'] >= 40 and m['qa']['n_qa'] > 0
    rows = [json.loads(line) for line in (rep / 'generations.jsonl').read_text().splitlines()]
    assert any(r['id'].startswith('golden/') for r in rows) and any('answers' in r for r in rows)
    p = run(['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--eval', '--untrained', '--num', '40',
             '--no_llm_check', '--out', tmp_path / 'base', '--device', 'cpu'], timeout=300)
    assert_ok(p)
    base = json.loads((tmp_path / 'base' / 'metrics.json').read_text())
    assert base['val']['loss'] > m['val']['loss'] + 1.0
    assert base['val']['cider_d'] < m['val']['cider_d']


def test_llm_check_fails_when_llm_is_perturbed(tiny):
    import sample
    vlm, tok = build_tiny()
    diff, ok = sample.llm_untouched(vlm, tok, TINY_ARGS, ['a red circle at the top left.'])
    assert ok and diff == 0.0
    with torch.no_grad():
        vlm.llm.get_decoder().layers[0].mlp.down_proj.weight.mul_(1.01)
    diff, ok = sample.llm_untouched(vlm, tok, TINY_ARGS, ['a red circle at the top left.'])
    assert not ok and diff > 1e-4


def test_nonfinite_steps_are_skipped_then_stop(synthetic, tmp_path):
    """An exploding run: non-finite steps are skipped and logged; max_nonfinite in a row stop
    the run with one clear line and a checkpoint of the last state."""
    out = tmp_path / 'nf'
    p = run(train_args(synthetic, out, '--learning_rate=1e30', '--max_nonfinite=2', '--max_iters=20',
                       '--log_interval=1', '--eval_interval=100', '--eval_report_num=0'))
    line = assert_one_error_line(p, 'non-finite')
    assert 'ckpt_last_good.pt' in line and (out / 'ckpt_last_good.pt').exists()
    skipped = [r for r in read_log(out) if r.get('skipped') == 'non-finite']
    assert len(skipped) == 2
    ck = torch.load(out / 'ckpt_last_good.pt', weights_only=True)
    assert ck['nonfinite_total'] == 2


def test_grad_checkpointing_recomputes_and_matches(dataset):
    """With activation checkpointing the LLM's layers run again in the backward pass (that is
    the memory saving), and loss and connector gradients are unchanged."""
    batch = data.collate([dataset[i] for i in range(4)], pad_id=0)
    args = (batch['images'], batch['input_ids'], batch['target_pos'], batch['target_ids'])
    results, state = [], None
    for ckpt in (False, True):
        vlm, _ = build_tiny()
        state = state or {k: v.clone() for k, v in vlm.connector.state_dict().items()}
        vlm.connector.load_state_dict(state)  # the same connector in both runs
        if ckpt:
            vlm.enable_grad_checkpointing()
        vlm.train()
        calls = []
        # a pre-hook inside the checkpointed layer fires again when backward recomputes it
        # (a post-hook may not: torch stops the recompute once it has what backward needs)
        attn = vlm.llm.get_decoder().layers[0].self_attn
        h = attn.register_forward_pre_hook(lambda *a: calls.append(1))
        loss = vlm(*args)
        loss.backward()
        h.remove()
        results.append((loss.item(), [p.grad.clone() for p in vlm.connector.parameters()], len(calls)))
    (l0, g0, c0), (l1, g1, c1) = results
    assert (c0, c1) == (1, 2)
    assert l0 == pytest.approx(l1, abs=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_clip_vision_tower_drops_cls(tmp_path):
    """Any transformers vision tower with patch hidden states works; CLIP's CLS token is dropped."""
    d = tmp_path / 'clip'
    d.mkdir()
    (d / 'config.json').write_text(json.dumps(dict(model_type='clip_vision_model', hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                                   patch_size=8)))
    tok = M.load_tokenizer('tiny')
    vlm = M.build_vlm({**TINY_ARGS, 'vision': f'random:{d}'}, tok)
    imgs = torch.from_numpy(rand_images(3, vlm.image_spec['size']))
    assert vlm.encode_images(imgs).shape == (3, 16, 32)  # 4x4 patches, CLS dropped
    ids = torch.tensor([data.encode_prompt(tok, data.TEMPLATE_A, N_LAT, vlm.slot_id)] * 3)
    assert vlm.embed(imgs, ids).shape == (3, ids.shape[1], vlm.llm.config.hidden_size)


# =============================================================================
# Train-time data: bad images, image sources, mixing, sharding, resumable order, grouping
# =============================================================================


def _copy_prepared(src, dst):
    shutil.copytree(src, dst)
    meta = json.loads((dst / 'meta.json').read_text())
    return meta


def test_bad_image_at_train_time_is_replaced_and_counted(synthetic, tiny, tmp_path):
    vlm, tok = tiny
    prep_dir = tmp_path / 'prepared'
    meta = _copy_prepared(synthetic, prep_dir)
    img_root = tmp_path / 'images'
    shutil.copytree(meta['image_root'], img_root)
    meta['image_root'] = str(img_root)
    (prep_dir / 'meta.json').write_text(json.dumps(meta))
    prep = data.open_prepared(str(prep_dir))
    b = data.SampleBuilder(tok, N_LAT, meta['slot_id'], meta['eos_id'], None, MAX_SEQ)
    ds = data.CaptionDataset(prep, 'train', b, vlm.image_spec['size'])
    good = ds[1]
    (img_root / prep['image_paths'][ds.image_ids(0)[0]].decode()).write_bytes(b'not a jpeg')  # corrupt
    (img_root / prep['image_paths'][ds.image_ids(1)[0]].decode()).unlink()  # missing
    s0, s1 = ds[0], ds[1]
    assert s0['n_bad'] == 1 and s1['n_bad'] == 1
    assert s1['input_ids'] != good['input_ids'] or not np.array_equal(s1['images'][0], good['images'][0])
    assert ds[1]['input_ids'] == s1['input_ids']  # the replacement is deterministic (resume replays it)
    batch = data.collate([s0, s1, ds[2]])
    assert batch['n_bad'] == 2 and batch['images'].shape[0] == 3


def test_zip_and_packed_sources_feed_the_same_batches_with_workers(synthetic, tiny, tmp_path):
    """images.zip read in place gives the same pixels as the folder, and the packed file
    (re-encoded JPEG at the model's size) nearly the same, through DataLoader workers (each
    opens its own handle)."""
    vlm, tok = tiny
    meta = json.loads((synthetic / 'meta.json').read_text())
    root = Path(meta['image_root'])
    with zipfile.ZipFile(tmp_path / 'images.zip', 'w') as z:
        for f in root.rglob('*.jpg'):
            z.write(f, str(f.relative_to(root)))
    zdir = tmp_path / 'zipped'
    _copy_prepared(synthetic, zdir)
    zmeta = dict(meta, image_root=str(tmp_path / 'images.zip'), image_kind='zip')
    (zdir / 'meta.json').write_text(json.dumps(zmeta))
    size = vlm.image_spec['size']
    raw = synthetic.parent
    P.main(['--json', str(raw / 'synthetic.json'), '--images', str(root), '--tokenizer', 'tiny', '--max_dups', '0',
            '--val_ratio', '0.1', '--pack_images', '--pack_size', str(size), '--out_dir', str(tmp_path / 'packed')])
    pmeta = json.loads((tmp_path / 'packed' / 'meta.json').read_text())
    assert pmeta['image_kind'] == 'packed' and pmeta['splits'] == meta['splits']
    sets = []
    for d in (synthetic, zdir, tmp_path / 'packed'):
        prep = data.open_prepared(str(d))
        b = data.SampleBuilder(tok, N_LAT, meta['slot_id'], meta['eos_id'], None, MAX_SEQ)
        ds = data.CaptionDataset(prep, 'train', b, size)
        batches = [[(i,) for i in range(k, k + 4)] for k in range(0, 24, 4)]
        sets.append([bt['images'] for bt in data.make_loader(ds, batches, num_workers=2)])
    for a, b, c in zip(*sets):
        assert torch.equal(a, b)
        assert (a.float() - c.float()).abs().mean() < 4.0  # JPEG re-encoding noise only


def test_multi_image_mixing_and_resumable_sharded_order(dataset):
    lengths = dataset.lengths()
    single = np.asarray(dataset.index[:, 3]) < 0
    kw = dict(multi_image_frac=0.25, group_by_length=True)
    e0 = data.epoch_batches(lengths, 4, 7, 0, single=single, **kw)
    assert e0 == data.epoch_batches(lengths, 4, 7, 0, single=single, **kw)  # a pure function
    assert e0 != data.epoch_batches(lengths, 4, 7, 1, single=single, **kw)  # new order each epoch
    items = [it for b in e0 for it in b]
    frac = sum(len(it) == 2 for it in items) / len(items)
    assert 0.15 < frac < 0.35, frac
    two = next(it for it in items if len(it) == 2)
    s = dataset[two]
    assert len(s['images']) == 2 and s['input_ids'].count(dataset.builder.eos_id) == 1
    n_img_slots = sum(t == M.special_ids(M.load_tokenizer('tiny'))['slot'] for t in s['input_ids'])
    assert n_img_slots == 2 * N_LAT
    # resume: starting at position k yields exactly what an uninterrupted iterator yields from k
    full = data.ResumableBatches(dataset, 4, 7, multi_image_frac=0.25)
    it = iter(full)
    seq = [next(it) for _ in range(full.per_epoch + 5)]  # crosses an epoch boundary
    for k in (3, full.per_epoch - 1, full.per_epoch + 2):
        it_k = iter(data.ResumableBatches(dataset, 4, 7, start=k, multi_image_frac=0.25))
        assert [next(it_k) for _ in range(3)] == seq[k:k + 3]
    # DDP: two ranks take disjoint batches that together are the global order
    r0 = iter(data.ResumableBatches(dataset, 4, 7, rank=0, world_size=2, multi_image_frac=0.25))
    r1 = iter(data.ResumableBatches(dataset, 4, 7, rank=1, world_size=2, multi_image_frac=0.25))
    pairs = [(next(r0), next(r1)) for _ in range(5)]
    assert [b for p in pairs for b in p] == seq[:10]


def test_length_grouping_fills_batches(dataset):
    """Grouped batches waste fewer positions on padding than random ones (the benchmark in
    bench.py measures the real-data number: >= 97 %)."""
    lengths = dataset.lengths()

    def real_fraction(batches):
        real = sum(lengths[i] for b in batches for (i,) in b)
        return real / sum(len(b) * max(lengths[i] for (i,) in b) for b in batches)
    grouped = real_fraction(data.epoch_batches(lengths, 16, 1, 0, group_by_length=True))
    rand = real_fraction(data.epoch_batches(lengths, 16, 1, 0, group_by_length=False))
    assert grouped > rand and grouped > 0.97, (grouped, rand)


def test_image_brackets_wrap_each_image(tiny):
    """image_brackets=True: <|vision_start|> slots <|vision_end|> around each image, in
    training samples and in sample.py's prompts alike."""
    import sample
    _, tok = tiny
    vlm, _ = build_tiny(image_brackets=True)
    ids = M.special_ids(tok)
    assert vlm.brackets == (ids['vision_start'], ids['vision_end'])
    b = data.SampleBuilder(tok, N_LAT, ids['slot'], ids['eos'], vlm.brackets, MAX_SEQ)
    x, _ = b.build([[10, 11], [12]])
    for prompt in (x, sample.prompt_ids(vlm, tok, 2)):
        starts = [i for i, t in enumerate(prompt) if t == ids['vision_start']]
        ends = [i for i, t in enumerate(prompt) if t == ids['vision_end']]
        assert len(starts) == len(ends) == 2
        for s, e in zip(starts, ends):
            assert e - s - 1 == N_LAT and all(t == ids['slot'] for t in prompt[s + 1:e])
    imgs = torch.from_numpy(rand_images(2, vlm.image_spec['size']))
    out = vlm.generate(imgs, [sample.prompt_ids(vlm, tok, 2)], max_new_tokens=3)
    assert len(out) == 1


def test_gradient_accumulation_equals_one_big_batch(synthetic, tmp_path):
    """batch 16 x accum 1 and batch 8 x accum 2 see the same 16 samples per step (random,
    ungrouped order); the loss is normalised by the caption tokens of the whole step, so the
    updates are the same even though the two halves hold different numbers of tokens."""
    common = ['--max_iters=3', '--eval_interval=3', '--log_interval=1', '--eval_iters=1', '--multi_image_frac=0.0',
              '--group_by_length=False', '--eval_report_num=0', '--sample_interval=0']
    big, small = tmp_path / 'big', tmp_path / 'small'
    pa = popen(train_args(synthetic, big, '--batch_size=16', '--gradient_accumulation_steps=1', *common),
               tmp_path / 'big.txt')
    assert_ok(run(train_args(synthetic, small, '--batch_size=8', '--gradient_accumulation_steps=2', *common)))
    assert pa.wait(300) == 0, (tmp_path / 'big.txt').read_text()[-2000:]
    la = [r['loss'] for r in read_log(big) if 'loss' in r]
    lb = [r['loss'] for r in read_log(small) if 'loss' in r]
    assert la == pytest.approx(lb, abs=1e-5)
    a = torch.load(big / 'ckpt.pt', weights_only=True)['connector']
    b = torch.load(small / 'ckpt.pt', weights_only=True)['connector']
    for n in a:  # Adam amplifies float-order noise where v is tiny: 1e-4, not exact
        torch.testing.assert_close(a[n], b[n], atol=1e-4, rtol=1e-3)
