"""
Tests of model.py (the connector included) on the tiny backbones: the connector, what is trained,
how images are spliced into the LLM's input, the caption-only loss (padded and packed),
generation, activation checkpointing, other vision towers, the full-size backbones on the
meta device, and loading real weights from local directories.

$ python -m pytest -q tests/test_model.py
"""
import contextlib
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from evaluation import evaluate
from gpu import flops
import model as M
from configurator import UserError
from conftest import ASSETS, N_LAT, TINY_ARGS, build_tiny, rand_images, tiny_builder
from model import Connector
from sources import backbones as B
from sources import tokens as T

# -----------------------------------------------------------------------------
# connector


@pytest.mark.parametrize('vision_ln', [True, False])
@pytest.mark.parametrize('depth', [1, 2])
@pytest.mark.parametrize('n_latents,width,heads', [(16, 64, 4), (5, 32, 2)])
def test_connector_shapes(vision_ln, depth, n_latents, width, heads):
    c = Connector(vision_dim=48, llm_dim=80, n_latents=n_latents, width=width, depth=depth, n_heads=heads,
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
        saved = emb.weight.clone()  # the session's tiny model: restored bit for bit afterwards
        emb.weight.mul_(7.0)
        try:
            assert M.embedding_rms(vlm.llm) == pytest.approx(7 * target, rel=1e-4)
        finally:
            emb.weight.copy_(saved)
        c = Connector(**{**vlm.connector.args, 'out_rms': 7 * target})
        for scale in (1.0, 100.0):
            assert c(feats * scale).pow(2).mean().sqrt().item() == pytest.approx(7 * target, rel=1e-3)
    vlm2, _ = build_tiny(match_embed_scale=False)
    assert vlm2.connector.out_gain is None


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
# slot splicing


def slot_blocks(emb, ids, slot_id):
    """connector-output blocks of n_latents vectors, in row-major slot order."""
    return emb[ids == slot_id].view(-1, N_LAT, emb.shape[-1])


def test_slots_get_the_kth_image(tiny):
    vlm, tok = tiny
    b = tiny_builder(tok)
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
        got = slot_blocks(emb, x, vlm.slot_id)
        assert got.shape[0] == 2
        torch.testing.assert_close(got, vis, atol=1e-6, rtol=0)
        # the text positions keep the LLM's own embeddings
        table = vlm.llm.get_input_embeddings()(x)
        assert torch.equal(emb[x != vlm.slot_id], table[x != vlm.slot_id])
        # swapping the images swaps the blocks
        got_sw = slot_blocks(vlm.embed(imgs.flip(0), x), x, vlm.slot_id)
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
# caption-only loss, padded and packed


def full_logits_loss(vlm, batch, attention_mask=None):
    """The textbook loss: logits at every position, cross-entropy over the labels."""
    with torch.no_grad():
        emb = vlm.embed(batch['images'], batch['input_ids'])
        logits = vlm.llm(inputs_embeds=emb, attention_mask=attention_mask, use_cache=False).logits.float()
        labels = batch['labels']
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)


def per_token_losses(vlm, batch):
    with torch.no_grad():
        h = vlm.hidden_states(batch['images'], batch['input_ids'], batch['position_ids'])
        h = h.reshape(-1, h.shape[-1]).index_select(0, batch['target_pos'])
        logits = vlm.llm.get_output_embeddings()(h).float()
        return F.cross_entropy(logits, batch['target_ids'], reduction='none')


def test_caption_only_loss_equals_full_logits_loss(tiny, dataset):
    vlm, _ = tiny
    samples = [dataset[i] for i in range(6)] + [dataset[(6, 7)]]
    batch = data.collate(samples, pad_id=vlm.eos_id)
    lens = torch.tensor(batch['sample_lens'])
    assert len(set(lens.tolist())) > 1 and (batch['labels'] == -100).any()  # right padding present
    with torch.no_grad():
        loss = vlm(batch['images'], batch['input_ids'], batch['target_pos'], batch['target_ids'])
    assert batch['n_targets'] == int((batch['labels'] != -100).sum())
    full = full_logits_loss(vlm, batch)
    assert abs(loss.item() - full.item()) < 1e-5, (loss.item(), full.item())
    # the dropped attention mask changes nothing: real tokens never see the pads after them
    mask = (torch.arange(batch['input_ids'].shape[1])[None] < lens[:, None]).long()
    masked = full_logits_loss(vlm, batch, mask)
    assert abs(loss.item() - masked.item()) < 1e-5, (loss.item(), masked.item())


@pytest.mark.parametrize('autocast', [True, False])
def test_bf16_loss_is_computed_in_fp32(dataset, autocast):
    """With bf16 backbones the caption-only logits are cast up before the cross-entropy, with
    or without autocast (which would cast a bf16 cross-entropy up by itself): a log-softmax
    over the vocabulary in bf16 is off by ~1e-3 relative, which shows in loss curves and in
    the val loss that picks ckpt_best."""
    tok = B.load_tokenizer(TINY_ARGS['tokenizer'])
    vlm = M.build_vlm(TINY_ARGS, tok, 'cpu', torch.bfloat16).eval()
    batch = data.collate([dataset[i] for i in range(8)], pad_id=vlm.eos_id)
    ctx = torch.autocast('cpu', dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        loss = vlm(batch['images'], batch['input_ids'], batch['target_pos'], batch['target_ids'], reduction='sum')
        h = vlm.hidden_states(batch['images'], batch['input_ids'])
        h = h.reshape(-1, h.shape[-1]).index_select(0, batch['target_pos'])
        logits = vlm.llm.get_output_embeddings()(h)
    assert logits.dtype == torch.bfloat16
    want = F.cross_entropy(logits.float(), batch['target_ids'], reduction='sum')
    in_bf16 = F.cross_entropy(logits, batch['target_ids'], reduction='sum')
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want.item(), rel=1e-6)
    if not autocast:  # the tolerance above is one that bf16 logits break
        assert in_bf16.item() != pytest.approx(want.item(), rel=1e-6)


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
    pu = per_token_losses(vlm, unpacked).sort().values
    pp = per_token_losses(vlm, packed).sort().values
    torch.testing.assert_close(pp, pu, atol=1e-4, rtol=0)


def test_flash_attention_layout_is_one_packed_row(tiny, dataset):
    """Under flash-attention, transformers treats a batch as packed (attention restarting
    where position_ids restart) only when it has one row, so train.py packs each micro-batch
    into one row (max_seq_len=None). That layout, run here with SDPA (which masks by the same
    position_ids), gives the unpacked loss, token by token; and its position_ids give flash
    the cumulative lengths of exactly the samples."""
    vlm, _ = tiny
    samples = [dataset[i] for i in range(7)] + [dataset[(7, 8)]]
    unpacked = data.collate(samples, pad_id=vlm.eos_id)
    one = data.collate(samples, packing=True, max_seq_len=None, pad_id=vlm.eos_id)
    lengths = [len(s['input_ids']) for s in samples]
    assert one['input_ids'].shape == (1, sum(lengths))
    pos = one['position_ids'][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert starts == [0, *np.cumsum(lengths)[:-1].tolist()]  # what flash's cu_seqlens are built from
    with torch.no_grad():
        lu = vlm(unpacked['images'], unpacked['input_ids'], unpacked['target_pos'], unpacked['target_ids'])
        lp = vlm(one['images'], one['input_ids'], one['target_pos'], one['target_ids'],
                 position_ids=one['position_ids'])
    assert lp.item() == pytest.approx(lu.item(), abs=1e-5)
    torch.testing.assert_close(per_token_losses(vlm, one).sort().values, per_token_losses(vlm, unpacked).sort().values,
                               atol=1e-4, rtol=0)


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
    la, lb = per_token_losses(vlm, a), per_token_losses(vlm, b)
    assert (la[in_s0] - lb[in_s0]).abs().max() > 1e-3  # the edit did change sample 0's losses
    others = ~in_s0
    assert int((a['target_pos'][others] < T).sum()) > 0  # there are targets of other samples in row 0
    torch.testing.assert_close(la[others], lb[others], atol=1e-6, rtol=0)


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


def test_compile_blocks_compiles_every_layer_and_matches(dataset):
    """compile=True compiles each layer of both backbones and the connector (one graph per
    kind of block, not a whole 36-layer decoder), and loss and gradients are unchanged."""
    batch = data.collate([dataset[i] for i in range(4)], pad_id=0)
    args = (batch['images'], batch['input_ids'], batch['target_pos'], batch['target_ids'])
    results, state = [], None
    for compiled in (False, True):
        torch._dynamo.reset()
        vlm, _ = build_tiny()
        state = state or {k: v.clone() for k, v in vlm.connector.state_dict().items()}
        vlm.connector.load_state_dict(state)  # the same connector in both runs
        if compiled:
            vlm.compile_blocks(backend='eager')
            layers = [*vlm.llm.get_decoder().layers, *vlm.vision.encoder.layers, vlm.connector]
            assert all(m._compiled_call_impl is not None for m in layers)
        loss = vlm.train()(*args)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in vlm.connector.parameters()]))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, abs=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_compiled_run_stays_compiled(dataset, tiny):
    """compile=True over what a run does: training steps on batches of changing length and
    size (length grouping, a two-image row), no-grad val losses with their controls (a last
    batch of one), golden captions. Only the training steps may add graphs: the two kinds of
    layer share transformers' checkpointing wrapper (one recompile), and nothing comes near
    dynamo's recompile limit, past which everything would silently run eager."""
    torch._dynamo.reset()
    vlm, tok = build_tiny()
    vlm.compile_blocks(backend='eager')  # dynamo's guards decide recompiles, whatever the backend
    for k, items in enumerate([range(4), range(4, 9), [(9, 10), 11, 12], range(13, 20)]):
        b = data.collate([dataset[i] for i in items], pad_id=vlm.eos_id)
        vlm.train()(b['images'], b['input_ids'], b['target_pos'], b['target_ids']).backward()
        vlm.eval()
        evaluate.control_loss_sums(vlm, [data.collate([dataset[i] for i in items][:1 + k % 2], pad_id=vlm.eos_id)])
        vlm.generate(b['images'][:1], [evaluate.prompt_ids(vlm, tok, 1)], max_new_tokens=3)
    recompiles, limit_hit = vlm.recompiles()
    assert recompiles <= 1 and not limit_hit, recompiles


def test_the_recompile_meter_reads_dynamo_own_count(dataset):
    """vlm.recompiles() (on every log line) against what dynamo itself reports, each time it
    compiles a function again: 1 for a training step (the two kinds of layer share a wrapper),
    then more when a forward runs without grad outside the eager stance (a new guard)."""
    import logging
    records = []

    class Count(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith('Recompiling function'):
                records.append(record)
    torch._dynamo.reset()
    torch._logging.set_logs(recompiles=True)
    handler = Count()
    logging.getLogger('torch._dynamo').addHandler(handler)
    try:
        vlm, tok = build_tiny()
        vlm.compile_blocks(backend='eager')
        b = data.collate([dataset[i] for i in range(4)], pad_id=vlm.eos_id)
        args = (b['images'], b['input_ids'], b['target_pos'], b['target_ids'])
        vlm.train()(*args).backward()
        assert vlm.recompiles() == (len(records), False) and len(records) >= 1
        with torch.no_grad():
            vlm.eval()(*args)
        assert vlm.recompiles() == (len(records), False) and len(records) >= 2
    finally:
        logging.getLogger('torch._dynamo').removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()


def test_compiled_connector_under_ddp_is_one_graph():
    """compile_blocks turns off dynamo's DDP optimizer: it would split the connector's graph at
    every gradient bucket of the DDP wrapper train.py puts around it (5 graphs at the default
    sizes) for an overlap the connector cannot give (its gradients arrive at the end of the
    backward). A one-rank gloo group, the default-size connector, a backend that counts graphs."""
    import torch.distributed as dist
    from conftest import free_port
    graphs = []

    def counting(gm, inputs):
        graphs.append(gm)
        return gm.forward
    vlm, _ = build_tiny()
    torch._dynamo.config.optimize_ddp = True  # as before any compile_blocks
    vlm.compile_blocks(backend='eager')
    connector = M.new_connector(M.MODEL_DEFAULTS, 1152, 4096, 0.02)
    connector.compile(backend=counting, dynamic=True)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(connector)
        ddp(torch.randn(2, 16, 1152)).sum().backward()
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
    assert len(graphs) == 1


def test_a_family_whose_logits_the_head_does_not_reproduce_is_stopped(monkeypatch):
    """check_head compares the caption-only head (decoder + lm_logits) with the LLM's own
    logits when a model is built: a family that changes its logits after the head in a way
    lm_logits does not know (here: doubled) would train on a wrong loss, so building stops
    with one line naming the family. One that lm_logits knows (soft-capping) builds."""
    from transformers import Qwen3ForCausalLM
    forward = Qwen3ForCausalLM.forward

    def doubled(self, *a, **k):
        out = forward(self, *a, **k)
        out.logits = out.logits * 2
        return out
    monkeypatch.setattr(Qwen3ForCausalLM, 'forward', doubled)
    with pytest.raises(UserError, match=r"LLM 'qwen3': its logits are not its output head's .*lm_logits") as e:
        build_tiny()
    assert '\n' not in str(e.value)
    monkeypatch.setattr(Qwen3ForCausalLM, 'forward', forward)
    llm = B.build_llm('tiny', vocab_size=64)
    llm.config.final_logit_softcapping = 0.5  # Gemma 2's rule, applied by lm_logits too
    cap = llm.forward

    def capped(*a, **k):
        out = cap(*a, **k)
        out.logits = torch.tanh(out.logits / 0.5) * 0.5
        return out
    llm.forward = capped
    M.check_head(llm)


def test_autocast_wraps_the_connector_alone(dataset):
    """With bf16 backbones the connector's fp32 master weights run their matmuls in bf16 under
    autocast, and the frozen backbones run outside it (autocast would only add casts there:
    their norms and softmax to fp32); with fp32 backbones nothing is cast."""
    batch = data.collate([dataset[i] for i in range(2)], pad_id=0)
    for dtype in (torch.bfloat16, torch.float32):
        vlm, _ = build_tiny()
        vlm.to(dtype).connector.float()
        seen = {}
        vlm.connector.proj_in.register_forward_hook(lambda m, i, o: seen.update(connector=(o.dtype, torch.is_autocast_enabled('cpu'))))
        vlm.llm.get_decoder().layers[0].register_forward_hook(lambda m, i, o: seen.update(llm=torch.is_autocast_enabled('cpu')))
        loss = vlm.train()(batch['images'], batch['input_ids'], batch['target_pos'], batch['target_ids'])
        assert seen['connector'] == ((torch.bfloat16, True) if dtype == torch.bfloat16 else (torch.float32, False))
        assert seen['llm'] is False and loss.dtype == torch.float32


# -----------------------------------------------------------------------------
# generation


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


def three_prompts(tok):
    """Template A, Template B and a user prompt (different lengths), and their image counts."""
    sp = T.special_ids(tok)
    custom = data.encode_prompt(tok, '<image>\nWhat is in the image?\n', N_LAT, sp['slot'])
    b = tiny_builder(tok)
    return [b.prompt_a, b.prompt_b, custom], [1, 2, 1]


def test_generation_stops_at_eos():
    vlm, tok = build_tiny()
    V = vlm.llm.config.vocab_size
    red, blue, green = (tok.convert_tokens_to_ids(w) for w in ('red', 'blue', 'green'))
    eos = T.special_ids(tok)['eos']
    prompts, n_img = three_prompts(tok)
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
    prompts, n_img = three_prompts(tok)
    assert len(set(map(len, prompts))) == 3  # different lengths: left padding is exercised
    imgs = torch.from_numpy(rand_images(sum(n_img), vlm.image_spec['size'], seed=3))
    batched = vlm.generate(imgs, prompts, max_new_tokens=10)
    alone, k = [], 0
    for p, n in zip(prompts, n_img):
        alone += vlm.generate(imgs[k:k + n], [p], max_new_tokens=10)
        k += n
    assert batched == alone
    assert all(len(t) >= 3 for t in batched)  # real generations, not an immediate eos


def test_generation_is_the_argmax_of_a_full_forward_pass(tiny):
    """Greedy tokens from the KV-cached, left-padded loop are exactly what one plain forward
    pass over prompt + generated tokens predicts at every step (positions, mask and cache
    agree with training's layout), and a row that stopped early stopped at eos."""
    vlm, tok = tiny
    prompts, n_img = three_prompts(tok)
    imgs = torch.from_numpy(rand_images(sum(n_img), vlm.image_spec['size'], seed=5))
    out = vlm.generate(imgs, prompts, max_new_tokens=12)
    assert max(map(len, out)) >= 4
    k = 0
    for p, n, gen in zip(prompts, n_img, out):
        table = vlm.llm.get_input_embeddings()
        with torch.no_grad():  # generated ids embed as text, whatever they are
            emb = torch.cat([vlm.embed(imgs[k:k + n], torch.tensor([p])), table(torch.tensor([gen]))], dim=1)
            logits = vlm.llm(inputs_embeds=emb, use_cache=False).logits[0]
        assert logits[len(p) - 1:].argmax(-1).tolist()[:len(gen)] == gen
        if len(gen) < 12:
            assert logits[-1].argmax().item() == vlm.eos_id
        k += n


def test_sampling_follows_temperature_and_top_p():
    """sample_next draws from softmax(logits / temperature), restricted to the smallest set of
    most likely tokens whose mass reaches top_p (the most likely token always in it)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)

    def freq(t, p):
        x = M.sample_next(logits, t, p, generator=g)
        return torch.bincount(x, minlength=5).float() / len(x)
    for t in (0.5, 2.0):
        want = torch.softmax(logits[0] / t, -1)
        torch.testing.assert_close(freq(t, 1.0), want, atol=0.03, rtol=0)
    p = torch.softmax(logits[0], -1)  # 0.56, 0.21, 0.13, 0.08, 0.03
    f = freq(1.0, 0.75)  # the first two reach 0.75: renormalised over them, the rest never drawn
    torch.testing.assert_close(f, torch.cat([p[:2] / p[:2].sum(), torch.zeros(3)]), atol=0.03, rtol=0)
    assert torch.equal(freq(1.0, 0.1), torch.tensor([1.0, 0, 0, 0, 0]))  # top token alone exceeds top_p
    assert torch.equal(M.sample_next(logits[:3], 0.0, 0.9), torch.zeros(3, dtype=torch.long))  # greedy


def test_generation_needs_as_many_images_as_slots(tiny):
    vlm, tok = tiny
    prompts, _ = three_prompts(tok)
    imgs = torch.from_numpy(rand_images(1, vlm.image_spec['size']))
    with pytest.raises(ValueError):
        vlm.generate(imgs, [prompts[1]], max_new_tokens=2)  # Template B has slots for two

# -----------------------------------------------------------------------------
# backbones: other towers, full size, real weights, the frozen-LLM check


def test_clip_vision_tower_drops_cls(tmp_path):
    """Any transformers vision tower with patch hidden states works; CLIP's CLS token is dropped."""
    d = tmp_path / 'clip'
    d.mkdir()
    (d / 'config.json').write_text(json.dumps(dict(model_type='clip_vision_model', hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                                   patch_size=8)))
    tok = B.load_tokenizer('tiny')
    vlm = M.build_vlm({**TINY_ARGS, 'vision': f'random:{d}'}, tok)
    imgs = torch.from_numpy(rand_images(3, vlm.image_spec['size']))
    feats = vlm.encode_images(imgs)
    assert feats.shape == (3, 16, 32)  # 4x4 patches, CLS dropped
    with torch.no_grad():  # the CLS token is the first position; the patches are kept in order
        full = vlm.vision(pixel_values=(imgs.float() - vlm.pix_mean) / vlm.pix_std).last_hidden_state
    torch.testing.assert_close(feats, full[:, 1:], atol=1e-6, rtol=0)
    # SigLIP has no CLS token: every patch is kept
    tiny_vlm, _ = build_tiny()
    tiny_imgs = torch.from_numpy(rand_images(2, tiny_vlm.image_spec['size']))
    n_patches = (tiny_vlm.vision.config.image_size // tiny_vlm.vision.config.patch_size) ** 2
    assert tiny_vlm.encode_images(tiny_imgs).shape[1] == n_patches
    ids = torch.tensor([data.encode_prompt(tok, data.TEMPLATE_A, N_LAT, vlm.slot_id)] * 3)
    assert vlm.embed(imgs, ids).shape == (3, ids.shape[1], vlm.llm.config.hidden_size)


def test_full_size_backbones_on_meta():
    llm = B.build_llm('random:' + M.DEFAULT_LLM, device='meta')
    n = M.count_params(llm)
    assert abs(n - 8.19e9) <= 0.01e9, n
    assert llm.config.vocab_size == 151936 and not llm.config.tie_word_embeddings
    vis = B.build_vision('random:' + M.DEFAULT_VISION, device='meta')
    nv = M.count_params(vis)
    assert abs(nv - 0.43e9) <= 0.01e9, nv
    M.truncate_vision(vis, -2)
    root = getattr(vis, 'vision_model', vis)
    assert len(root.encoder.layers) == 26 and M.count_params(vis) < nv
    if (ASSETS / 'Qwen3-8B-Base' / 'config.json').exists():
        # the architecture written into model.py agrees with the real config.json
        llm2 = B.build_llm('random:' + str(ASSETS / 'Qwen3-8B-Base'), device='meta')
        assert M.count_params(llm2) == n


def test_flops_per_batch_counts_what_runs():
    """MFU's FLOPs against torch's FLOP counter on the tiny model: the frozen LLM costs forward +
    input-gradient backward (2x its forward, no weight gradients), the tower a forward, the
    connector forward + backward; lm_head runs on the caption targets only."""
    from torch.utils.flop_counter import FlopCounterMode
    vlm, _ = build_tiny()
    vlm.train()
    d, V = vlm.llm.config.hidden_size, vlm.llm.config.vocab_size
    emb = torch.randn(1, 16, d, requires_grad=True)  # short: attention is a few % of it
    with FlopCounterMode(display=False) as fc:
        vlm.llm.get_decoder()(inputs_embeds=emb, use_cache=False).last_hidden_state.sum().backward()
    assert flops.batch_flops(vlm, 0, [16], 0) == pytest.approx(fc.get_total_flops(), rel=0.05)
    with FlopCounterMode(display=False) as fc:
        vlm.connector(vlm.encode_images(torch.from_numpy(rand_images(2, 48)))).sum().backward()
    assert flops.batch_flops(vlm, 2, [], 0) == pytest.approx(fc.get_total_flops(), rel=0.1)
    assert flops.batch_flops(vlm, 0, [16], 5) - flops.batch_flops(vlm, 0, [16], 4) == 2 * 2 * d * V


def test_flops_of_long_sequences_count_attention():
    """At the real run's lengths attention is a large part of the LLM's FLOPs. Against torch's
    counter with eager attention (plain matmuls the counter sees; SDPA's CPU kernel it does
    not), over sequences of 256 and 1024 tokens: the term linear in the length and the one in
    its square, each on its own. The counter counts the full T x T score matrix; a causal
    kernel does half of it, which is what MFU must count. The forward and both backward
    matmuls of attention run (3x), the frozen weights' two (2x)."""
    from torch.utils.flop_counter import FlopCounterMode
    tok = B.load_tokenizer('tiny')
    vlm = M.build_vlm(TINY_ARGS, tok, attn_implementation='eager')
    d = vlm.llm.config.hidden_size
    counted = {}
    for n in (256, 1024):
        emb = torch.randn(1, n, d, requires_grad=True)
        with FlopCounterMode(display=False) as fc:
            vlm.llm.get_decoder()(inputs_embeds=emb, use_cache=False).last_hidden_state.sum().backward()
        counted[n] = fc.get_total_flops()
    square = (counted[1024] / 1024 - counted[256] / 256) / (1024 - 256)  # FLOPs per T^2, full matrix
    linear = counted[256] / 256 - square * 256
    for n in (256, 1024):
        assert flops.batch_flops(vlm, 0, [n], 0) == pytest.approx(linear * n + square / 2 * n * n, rel=0.01)
    assert square / 2 * 1024 ** 2 > 0.3 * flops.batch_flops(vlm, 0, [1024], 0)  # not a rounding error at 1024
    # attention is per sample: two samples of 512 cost half the T^2 term of one of 1024
    assert flops.batch_flops(vlm, 0, [512, 512], 0) == pytest.approx(linear * 1024 + square / 2 * 2 * 512 ** 2,
                                                                     rel=0.01)


def test_device_peaks_match_the_longest_name():
    """A card's bf16 peak comes from the most specific table key: an H200 NVL is not an H200
    SXM, an H100 PCIe not an SXM; an unknown card has no peak (no MFU), never a guess."""
    want = {'NVIDIA H200 NVL': 835e12, 'NVIDIA H200': 989e12, 'NVIDIA H100 80GB HBM3': 989e12,
            'NVIDIA H100 PCIe': 756e12, 'NVIDIA H100 NVL': 835e12, 'NVIDIA GH200 480GB': 989e12,
            'NVIDIA A100-SXM4-80GB': 312e12, 'Tesla T4': None}
    assert {name: flops.peak_bf16(name) for name in want} == want


def test_qwen_tokenizer_prompt():
    d = ASSETS / 'Qwen3-8B-Base'
    if not (d / 'tokenizer.json').exists():
        pytest.skip('../shared/assets/Qwen3-8B-Base not present')
    tok = B.load_tokenizer(str(d))
    sp = T.special_ids(tok)
    assert sp == dict(eos=151643, bos=None, slot=151655, slot_token='<|image_pad|>', vision_start=151652,
                      vision_end=151653)
    b = data.SampleBuilder(tok, 64, sp['slot'], sp['eos'], (sp['vision_start'], sp['vision_end']), 1536)
    assert b.prompt_a[:66] == [sp['vision_start']] + [sp['slot']] * 64 + [sp['vision_end']]
    assert tok.decode(b.prompt_a[66:]) == '\nDescribe the image in one sentence.\n'
    cap = tok('A cat on a mat.', add_special_tokens=False)['input_ids']
    ids, labels = b.build([cap])
    assert tok.decode([l for l in labels if l != -100]) == 'A cat on a mat.<|endoftext|>'


def test_backbones_load_from_local_dirs(tmp_path, tiny):
    """The real loading path (from_pretrained on a directory), exercised on tiny backbones:
    the vision tower is saved as a full SigLIP model (text + vision, like the hub's
    google/siglip-so400m-patch14-384) and only its vision half must be loaded. The saved
    weights are perturbed, so a loader that silently kept the seeded init would fail."""
    from transformers import SiglipConfig, SiglipModel
    vlm, tok = tiny
    g = torch.Generator().manual_seed(1)
    ref_vision = B.build_vision('tiny')
    ref_llm = B.build_llm('tiny', vocab_size=len(tok))
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
    with pytest.raises(UserError, match='cannot load llm'):
        B.build_llm(str(tmp_path / 'siglip' / 'nothing-here'))


def test_llm_check_fails_when_llm_is_perturbed():
    vlm, tok = build_tiny()
    got = evaluate.llm_untouched(vlm, tok, ['a red circle at the top left.'])
    assert got['ok'] and got['max_abs_logit_diff'] == 0.0 and got['probe_logit_diff'] == 0.0
    with torch.no_grad():
        vlm.llm.get_decoder().layers[0].mlp.down_proj.weight[3, 5] += 1e-3  # one weight
    got = evaluate.llm_untouched(vlm, tok, ['a red circle at the top left.'])
    # the LLM's logits on the probe tokens taken at build time no longer match
    assert not got['ok'] and got['probe_logit_diff'] > 0
    # the embedding path is checked too: a splice that altered text tokens would show in the logits
    vlm.embed = lambda images, ids, connector=None: vlm.llm.get_input_embeddings()(ids) * 1.01
    assert evaluate.llm_untouched(vlm, tok, ['a red circle.'])['max_abs_logit_diff'] > 1e-4


def test_a_backbone_checkpoint_missing_weights_is_one_line(tmp_path, tiny):
    """A checkpoint that lacks some of its architecture's weights would leave part of the
    frozen LLM random without a word: it is refused, naming a missing weight."""
    from safetensors.torch import load_file, save_file
    _, tok = tiny
    B.build_llm('tiny', vocab_size=len(tok)).save_pretrained(tmp_path / 'llm')
    weights = load_file(tmp_path / 'llm' / 'model.safetensors')
    dropped = next(k for k in sorted(weights) if 'layers.1.mlp' in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / 'llm' / 'model.safetensors',
              metadata={'format': 'pt'})
    with pytest.raises(UserError, match='lacks 1 of its weights') as e:
        B.build_llm(str(tmp_path / 'llm'), vocab_size=len(tok))
    assert dropped in str(e.value)
    with pytest.raises(UserError, match='no such directory'):
        B.build_llm(str(tmp_path / 'nope'))
