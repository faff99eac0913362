"""
Tests of evaluation/evaluate.py's parts, each against a computation by hand on the tiny model: the val
loss and its shuffled-image and no-image controls, the references a generation is scored
against, the prompts for captions and for QA questions.

$ python -m pytest -q tests/test_evaluate.py
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from evaluation import evaluate
from configurator import UserError
from conftest import N_LAT, build_tiny, tiny_builder


@pytest.fixture(scope='module')
def bracketed(synthetic):
    """The tiny VLM with image brackets (eval mode) and the synthetic val split built for it."""
    vlm, tok = build_tiny(image_brackets=True)
    vlm.eval()
    assert vlm.brackets
    prepared = data.open_prepared(str(synthetic))
    ds = data.CaptionDataset(prepared, 'val', tiny_builder(tok, brackets=vlm.brackets), vlm.image_spec,
                             replace_bad=False)
    return vlm, tok, ds, prepared


def loss_sum(vlm, samples):
    """(summed caption-token loss, caption tokens) of samples, one forward pass each."""
    tot, cnt = 0.0, 0
    for s in samples:
        b = data.collate([s], pad_id=vlm.eos_id)
        images, input_ids, target_pos, target_ids, position_ids = data.to_device(b, 'cpu')
        with torch.no_grad():
            tot += vlm(images, input_ids, target_pos, target_ids, reduction='sum').item()
        cnt += b['n_targets']
    return tot, cnt


def text_only_loss_sum(vlm, s):
    """The caption's loss from the frozen LLM alone: the sample's tokens without image slots
    and brackets, full logits, next-token cross-entropy on the caption positions."""
    drop = {vlm.slot_id, *vlm.brackets}
    keep = [k for k, t in enumerate(s['input_ids']) if t not in drop]
    ids = torch.tensor([[s['input_ids'][k] for k in keep]])
    labels = torch.tensor([s['labels'][k] for k in keep])
    with torch.no_grad():
        logits = vlm.llm(input_ids=ids).logits[0]
    loss = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction='sum')
    return loss.item(), int((labels[1:] >= 0).sum())


class Listed:
    """What val_losses reads of a dataset: ds[i]."""

    def __init__(self, samples):
        self.samples = samples

    def __getitem__(self, i):
        return self.samples[i]


def test_val_losses_by_hand(bracketed):
    """loss: caption-token mean over all samples (not a mean of per-sample means); shuffled:
    each caption with the previous sample's image in its batch (a batch of one has no other
    image: left out); no image: the LLM alone, on every sample (the two-image one too)."""
    vlm, tok, ds, _ = bracketed
    n, bs = 9, 4  # batches of 4, 4, 1
    samples = [ds[i] for i in range(n)]
    assert all(len(s['images']) == 1 for s in samples)
    # sample 5 as a prepared two-image record: its caption, both images, Template B
    ids, labels = ds.builder.build([ds.caption(5)], n_images=2)
    samples[5] = dict(samples[5], input_ids=ids, labels=labels, images=samples[5]['images'] + samples[6]['images'])
    got = evaluate.val_losses(vlm, Listed(samples), n, bs)
    tot, cnt = loss_sum(vlm, samples)
    assert got['loss'] == pytest.approx(tot / cnt, rel=1e-5)
    shuffled = []
    for s in range(0, n, bs):
        chunk = samples[s:s + bs]
        if len(chunk) > 1:  # images move by one row; a two-image row takes two
            flat = [im for x in chunk for im in x['images']]
            flat = flat[-1:] + flat[:-1]
            k = 0
            for x in chunk:
                shuffled.append(dict(x, images=flat[k:k + len(x['images'])]))
                k += len(x['images'])
    tot, cnt = loss_sum(vlm, shuffled)
    assert got['loss_shuffled_images'] == pytest.approx(tot / cnt, rel=1e-5)
    assert got['loss_shuffled_images'] != pytest.approx(got['loss'], rel=1e-4)
    sums = [text_only_loss_sum(vlm, s) for s in samples]
    assert got['loss_no_image'] == pytest.approx(sum(t for t, _ in sums) / sum(c for _, c in sums), rel=1e-5)
    assert got['skipped_samples'] == 0


@pytest.mark.parametrize('packing', [False, True])
def test_without_images_equals_samples_built_without_slots(bracketed, packing):
    """The no-image control works on collated batches (training's val loaders give those):
    removing the slots from a padded or packed batch gives the loss of the same samples built
    with no slots, samples apart and positions restarting in packed rows."""
    vlm, tok, ds, _ = bracketed
    samples = [ds[i] for i in range(5)]
    ids, labels = ds.builder.build([ds.caption(3), ds.caption(4)])  # a Template B row among them
    samples[3] = dict(samples[3], input_ids=ids, labels=labels, images=samples[3]['images'] + samples[4]['images'])
    drop = [vlm.slot_id, *vlm.brackets]
    stripped = [dict(s, images=[], input_ids=[t for t in s['input_ids'] if t not in drop],
                     labels=[l for t, l in zip(s['input_ids'], s['labels']) if t not in drop]) for s in samples]

    def loss(b):
        images, input_ids, target_pos, target_ids, position_ids = data.to_device(b, 'cpu')
        with torch.no_grad():
            return vlm(images, input_ids, target_pos, target_ids, position_ids=position_ids, reduction='sum').item()
    batch = data.collate(samples, packing=packing, max_seq_len=400, pad_id=vlm.eos_id)
    got = evaluate.without_images(batch, drop, vlm.eos_id)
    want = data.collate(stripped, pad_id=vlm.eos_id)  # padded, one sample per row
    assert got['n_targets'] == want['n_targets'] and got['images'].shape[0] == 0
    assert loss(got) == pytest.approx(loss(want), rel=1e-5)
    if packing:
        assert got['input_ids'].shape[0] < len(samples)  # the packed rows stayed packed
        assert (got['position_ids'] == 0).sum() == len(samples)  # one restart per sample


def test_each_caption_is_one_line(bracketed, monkeypatch):
    """Whatever the tokens decode to (a newline, runs of spaces), a caption is one line."""
    vlm, tok, ds, _ = bracketed
    ids = tok('a red\n\n circle  at the\ttop.', add_special_tokens=False)['input_ids']
    monkeypatch.setattr(vlm, 'generate', lambda images, prompts, *a, **kw: [ids] * len(prompts))
    img = ds.images((0,))
    assert evaluate.caption_batch(vlm, tok, [img, img]) == ['a red circle at the top.'] * 2


def test_references_are_every_single_image_caption_of_the_image(tiny):
    """A two-image record's caption describes two images: it is no reference for either."""
    _, tok = tiny
    caps = ['a red circle.', 'a blue square.', 'a red triangle.', 'two circles on the left.', 'a green star.']
    enc = [tok(c, add_special_tokens=False)['input_ids'] for c in caps]

    def split(rows):  # rows: (caption k, image, second image)
        tokens = np.concatenate([enc[k] for k, _, _ in rows]).astype(np.uint32)
        index, off = [], 0
        for k, i0, i1 in rows:
            index.append((off, len(enc[k]), i0, i1))
            off += len(enc[k])
        return tokens, np.array(index, np.int64)
    prepared = dict(train=split([(0, 0, -1), (1, 1, -1), (3, 0, 1)]), val=split([(2, 0, -1), (4, 2, -1)]))
    refs = evaluate.references_by_image(prepared, tok)
    assert all(tok.decode(e) == c for e, c in zip(enc, caps))  # words of the tiny vocabulary
    assert refs(0) == ['a red circle.', 'a red triangle.']
    assert refs(1) == ['a blue square.'] and refs(2) == ['a green star.'] and refs(7) == []


def test_caption_rows_score_against_the_own_caption_and_the_others(bracketed):
    vlm, tok, ds, _ = bracketed
    own = [tok.decode(ds.caption(i), skip_special_tokens=True).strip() for i in range(3)]
    refs = lambda i0: ['another caption of it.', own[0]]  # noqa: E731 (own[0] is row 0's own: not twice)
    rows, skipped = evaluate.caption_rows(vlm, tok, ds, range(3), dict(temperature=0.0, max_new_tokens=3), 2,
                                          refs=refs)
    assert skipped == 0 and [r['id'] for r in rows] == ['val/0', 'val/1', 'val/2']
    assert rows[0]['references'] == [own[0], 'another caption of it.']
    assert rows[1]['references'] == [own[1], 'another caption of it.', own[0]]


def test_a_user_prompt_gets_the_images_before_it(bracketed):
    vlm, tok, _, _ = bracketed

    def enc(text):
        return data.encode_prompt(tok, text, N_LAT, vlm.slot_id, vlm.brackets)
    assert evaluate.prompt_ids(vlm, tok, 1) == enc(data.TEMPLATE_A)
    assert evaluate.prompt_ids(vlm, tok, 2) == enc(data.TEMPLATE_B)
    assert evaluate.prompt_ids(vlm, tok, 1, 'What color is the circle?') == enc('<image>\nWhat color is the circle?\n')
    assert evaluate.prompt_ids(vlm, tok, 2, 'Compare.') == enc('<image>\n<image>\nCompare.\n')
    assert evaluate.prompt_ids(vlm, tok, 1, 'Look: <image> what is it?') == enc('Look: <image> what is it?\n')
    with pytest.raises(UserError, match='1 <image> markers for 2 images'):
        evaluate.prompt_ids(vlm, tok, 2, 'Look: <image>')


def test_qa_asks_each_question_about_its_image(bracketed, synthetic, tmp_path, monkeypatch):
    """Each question is the prompt for its images (batched per question), not the caption
    template; an unreadable image skips its row."""
    vlm, tok, _, _ = bracketed
    images = sorted((synthetic.parent / 'images').rglob('*.jpg'))[:3]
    qa = [dict(image=str(images[0]), question='What color is the circle?', answers=['red']),
          dict(image=str(images[1]), question='How many stars are there?', answers=['two']),
          dict(image=str(images[2]), question='What color is the circle?', answers=['blue']),
          dict(image=str(tmp_path / 'gone.jpg'), question='What color is the circle?', answers=['red'])]
    path = tmp_path / 'qa.jsonl'
    path.write_text(''.join(json.dumps(q) + '\n' for q in qa))
    asked = []
    real = evaluate.caption_batch

    def spy(vlm_, tok_, groups, prompt=None, **kw):
        asked.append((prompt, len(groups)))
        return real(vlm_, tok_, groups, prompt, **kw)
    monkeypatch.setattr(evaluate, 'caption_batch', spy)
    rows, skipped = evaluate.qa_rows(vlm, tok, str(path), dict(temperature=0.0, max_new_tokens=3), 8)
    assert skipped == 1 and len(rows) == 3
    assert sorted(asked) == [('<image>\nHow many stars are there?\n', 1), ('<image>\nWhat color is the circle?\n', 2)]
    assert [r['prompt'] for r in rows] == [q['question'] for q in qa[:3]]
    assert [r['answers'] for r in rows] == [['red'], ['two'], ['blue']]


# -----------------------------------------------------------------------------
# golden and benchmark captions spread over DDP ranks (two gloo processes)

RANKS = r'''
import json, os, sys
import torch
import torch.distributed as dist
import configurator, data
from evaluation import benchmarks, evaluate
from conftest import build_tiny, tiny_builder
mode, prepared_dir, out_dir, ann, images = sys.argv[1:6]
dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
vlm, tok = build_tiny()
vlm.eval()
prepared = data.open_prepared(prepared_dir)
ds = data.CaptionDataset(prepared, 'val', tiny_builder(tok), vlm.image_spec, replace_bad=False)
seen, seen_bench = [], []
real_rows, real_items = evaluate.caption_rows, benchmarks.caption_items
def rows(vlm_, tok_, ds_, indices, *a, **k):  # what this rank captions
    seen.extend(indices)
    if mode == 'fail' and rank == 1:
        raise RuntimeError('rank 1 broke')
    return real_rows(vlm_, tok_, ds_, indices, *a, **k)
def items(vlm_, tok_, its, *a, **k):
    seen_bench.extend(it['image_id'] for it in its)
    if mode == 'fail' and rank == 1:
        raise RuntimeError('rank 1 broke')
    return real_items(vlm_, tok_, its, *a, **k)
evaluate.caption_rows, benchmarks.caption_items = rows, items
if mode == 'stop' and rank == 1:  # a stop signal that reached rank 1 only (its handler sets the flag)
    evaluate.stop.set()
try:
    lines = evaluate.sample_golden(vlm, tok, ds, prepared['meta']['golden'], os.path.join(out_dir, 'samples.jsonl'),
                                   7, 4, 8, rank, world)
except evaluate.Stopped as e:
    lines = f'Stopped: {e}'
try:
    m = benchmarks.evaluate_bench(vlm, tok, 'coco', ann, images, num=12, batch_size=4, max_new_tokens=4, rank=rank,
                                  world_size=world)
    bench, error = (None if m is None else m['images']), None
except Exception as e:
    bench, error = None, f'Stopped: {e}' if isinstance(e, evaluate.Stopped) else str(e)
print(json.dumps(dict(rank=rank, seen=seen, lines=lines, seen_bench=seen_bench, bench=bench, bench_error=error)))
dist.destroy_process_group()
configurator.leave(0)  # as train.py's ranks leave: torch's teardown after gloo aborts now and then
'''


@pytest.fixture(scope='module')
def two_ranks(synthetic, tmp_path_factory):
    """RANKS in two gloo processes, without and with a failure or a stop on rank 1: {mode: (results by
    rank, samples.jsonl lines, the benchmark's first 12 image ids)}."""
    from conftest import run_ranks
    from evaluation import benchmarks
    tmp = tmp_path_factory.mktemp('ranks')
    files = benchmarks.write_synthetic(str(synthetic.parent), str(tmp / 'bench'))
    images = synthetic.parent / 'images'
    ids = [it['image_id'] for it in benchmarks.read_benchmark('coco', files['karpathy'], str(images), num=12)['items']]
    out = {}
    for mode in ('ok', 'fail', 'stop'):
        (tmp / mode).mkdir()
        done = run_ranks(['-c', RANKS, mode, synthetic, tmp / mode, files['karpathy'], images], timeout=300)
        for p in done:
            assert p.returncode == 0, p.stderr[-3000:]
        results = [json.loads(p.stdout.splitlines()[-1]) for p in done]
        path = tmp / mode / 'samples.jsonl'
        out[mode] = (results, path.read_text().splitlines() if path.exists() else [], ids)
    return out


def test_each_rank_captions_its_share(two_ranks, synthetic):
    """Golden samples and benchmark images are split over the ranks, rank r taking items
    r, r+2, ...: neither rank captions the other's share (or everything), and rank 0 gathers
    all of them, in order."""
    results, lines, ids = two_ranks['ok']
    golden = [i for i in json.loads((synthetic / 'meta.json').read_text())['golden']]
    assert [r['seen'] for r in results] == [golden[0::2], golden[1::2]]
    assert [json.loads(ln)['id'] for ln in lines] == [f'golden/{i}' for i in golden]
    assert [r['seen_bench'] for r in results] == [ids[0::2], ids[1::2]]
    assert [r['bench'] for r in results] == [12, None]  # rank 0 scores all 12


def test_an_error_on_one_rank_comes_back_to_all(two_ranks):
    """A failure in rank 1's share is not swallowed there: every rank gets it, golden sampling
    as the same warning on both (training goes on), a benchmark as the same error on both
    (the caller's warning), and no rank waits in a collective for another."""
    results, lines, _ = two_ranks['fail']
    assert results[0]['lines'] == results[1]['lines'] and len(results[0]['lines']) == 1
    assert 'golden-set sampling failed on rank 1' in results[0]['lines'][0] and 'rank 1 broke' in results[0]['lines'][0]
    assert lines == []  # nothing half-written
    assert results[0]['bench_error'] == results[1]['bench_error'] == 'rank 1: RuntimeError: rank 1 broke'


def test_a_stop_on_one_rank_stops_the_captioning_of_all(two_ranks):
    """A stop asked for on rank 1 only (the signal reached that rank first) gives up golden
    sampling and benchmark captioning on every rank alike, as Stopped, so that all of them go
    to the stop's checkpoint together; nothing is half-written."""
    results, lines, _ = two_ranks['stop']
    assert [r['lines'] for r in results] == ['Stopped: stopped on rank 1'] * 2
    assert [r['bench_error'] for r in results] == ['Stopped: stopped on rank 1'] * 2
    assert lines == []
