"""
Smoke tests: the behaviour a user relies on, on tiny random backbones, offline, on CPU.

$ python -m pytest -q test_smoke.py          # about two minutes on 2 CPU cores

The dataset is the synthetic one the CPU demo uses (prepare_llava.py --synthetic), built
once per module. Scripts (train.py, torchrun, sample.py) run as subprocesses where the
behaviour under test is the script's: exit codes, signals, checkpoints, log.jsonl.
"""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
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
    p = run(train_args(synthetic, out, '--max_iters=200', '--eval_interval=100', '--log_interval=20', '--lr=3e-3'))
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
    for M_, P in ((1, 36), (3, 7)):
        y = c(torch.randn(M_, P, 48))
        assert y.shape == (M_, n_latents, 80)
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
    assert json.loads((demo_run / 'config.json').read_text())['learning_rate'] == 3e-3  # --lr alias
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
