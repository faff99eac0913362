"""
Tests of data.py: the sample templates and labels, truncation, the prepared-dataset reader,
bad images at train time, image sources through DataLoader workers, multi-image mixing,
the resumable (and sharded) batch order, length grouping, and image brackets.

$ python -m pytest -q tests/test_data.py
"""
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch

import data
from evaluation import evaluate
import prepare_llava as P
from configurator import UserError
from sources import backbones as B
from sources import tokens as T
from conftest import N_LAT, build_tiny, image_folder, rand_images, read_meta, tiny_builder


def encode(tok, s):
    return tok(s, add_special_tokens=False)['input_ids']

# -----------------------------------------------------------------------------
# templates and labels


@pytest.fixture(scope='module')
def builder():
    tok = B.load_tokenizer('tiny')
    return tiny_builder(tok), tok, T.special_ids(tok)


def test_labels_template_a(builder):
    b, tok, sp = builder
    cap = encode(tok, 'a red circle at the top left.')
    ids, labels = b.build([cap])
    assert len(ids) == len(labels)
    assert ids.count(sp['slot']) == N_LAT and ids[:N_LAT] == [sp['slot']] * N_LAT  # slots first
    assert ids[N_LAT:len(ids) - len(cap) - 1] == encode(tok, '\nDescribe the image in one sentence.\n')
    n_lab = len(cap) + 1
    assert all(l == -100 for l in labels[:-n_lab])
    assert labels[-n_lab:] == cap + [sp['eos']] == ids[-n_lab:]


def test_labels_template_b(builder):
    b, tok, sp = builder
    c0, c1 = 'a red circle.', 'two blue squares.'
    ids, labels = b.build([encode(tok, c0), encode(tok, c1)])
    assert ids.count(sp['slot']) == 2 * N_LAT
    assert 'describe each image in order' in tok.decode([i for i in ids if i != sp['slot']])
    target = encode(tok, f'Image 1: {c0} Image 2: {c1}') + [sp['eos']]
    lab = [l for l in labels if l != -100]
    assert lab == target
    assert labels[-len(target):] == target and ids[-len(target):] == target  # one contiguous block at the end


def test_labels_of_a_prepared_two_image_record(builder):
    """A prepared two-image record: Template B with its own caption as the target."""
    b, tok, sp = builder
    c0 = 'a red circle.'
    ids2, labels2 = b.build([encode(tok, c0)], n_images=2)
    assert ids2.count(sp['slot']) == 2 * N_LAT
    assert [l for l in labels2 if l != -100] == encode(tok, c0) + [sp['eos']]


def test_truncation_never_cuts_slots(builder):
    _, tok, sp = builder
    long_cap = encode(tok, ' '.join(['a red circle and a blue square'] * 12) + '.')
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
    with pytest.raises(UserError):
        data.SampleBuilder(tok, N_LAT, sp['slot'], sp['eos'], None, len(probe.prompt_b) + 1)


def test_image_brackets_wrap_each_image(tiny):
    """image_brackets=True: <|vision_start|> slots <|vision_end|> around each image, in
    training samples and in sample.py's prompts alike."""
    _, tok = tiny
    vlm, _ = build_tiny(image_brackets=True)
    ids = T.special_ids(tok)
    assert vlm.brackets == (ids['vision_start'], ids['vision_end'])
    b = tiny_builder(tok, brackets=vlm.brackets)
    x, _ = b.build([[10, 11], [12]])
    for prompt in (x, evaluate.prompt_ids(vlm, tok, 2)):
        starts = [i for i, t in enumerate(prompt) if t == ids['vision_start']]
        ends = [i for i, t in enumerate(prompt) if t == ids['vision_end']]
        assert len(starts) == len(ends) == 2
        for s, e in zip(starts, ends):
            assert e - s - 1 == N_LAT and all(t == ids['slot'] for t in prompt[s + 1:e])
    imgs = torch.from_numpy(rand_images(2, vlm.image_spec['size']))
    out = vlm.generate(imgs, [evaluate.prompt_ids(vlm, tok, 2)], max_new_tokens=3)
    assert len(out) == 1

# -----------------------------------------------------------------------------
# the prepared dataset and its images


def test_dataset_lengths_match_built_samples(dataset):
    lens = dataset.lengths()
    for i in range(0, len(dataset), 37):
        assert len(dataset[i]['input_ids']) == lens[i]


def copy_prepared(src, dst, **meta_changes):
    """A copy of a prepared folder, with meta.json changed; returns the new meta."""
    shutil.copytree(src, dst)
    meta = {**read_meta(dst), **meta_changes}
    (dst / 'meta.json').write_text(json.dumps(meta))
    return meta


def test_moved_dataset_finds_its_images(synthetic, tmp_path):
    """meta.json keeps the image root relative to the prepared folder: data/ moved as a whole
    still works; a prepared folder moved alone falls back to the absolute path it was made with."""
    shutil.copytree(synthetic.parent, tmp_path / 'moved')
    moved = data.open_prepared(str(tmp_path / 'moved' / 'prepared'))
    assert moved['root'] == str(tmp_path / 'moved' / 'images')
    copy_prepared(synthetic, tmp_path / 'alone')
    alone = data.open_prepared(str(tmp_path / 'alone'))
    assert alone['root'] == str(image_folder(synthetic))
    override = data.open_prepared(str(tmp_path / 'alone'), image_root=str(tmp_path / 'moved' / 'images'))
    assert override['root'] == str(tmp_path / 'moved' / 'images')


def test_bad_image_at_train_time_is_replaced_and_counted(synthetic, tiny, tmp_path):
    vlm, tok = tiny
    img_root = tmp_path / 'images'
    shutil.copytree(image_folder(synthetic), img_root)
    prep_dir = tmp_path / 'prepared'
    copy_prepared(synthetic, prep_dir, image_root=str(img_root))
    prepared = data.open_prepared(str(prep_dir))
    ds = data.CaptionDataset(prepared, 'train', tiny_builder(tok), vlm.image_spec)
    good = ds[1]
    (img_root / prepared['image_paths'][ds.image_ids(0)[0]].decode()).write_bytes(b'not a jpeg')  # corrupt
    (img_root / prepared['image_paths'][ds.image_ids(1)[0]].decode()).unlink()  # missing
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
    meta = read_meta(synthetic)
    root = image_folder(synthetic)
    with zipfile.ZipFile(tmp_path / 'images.zip', 'w') as z:
        for f in root.rglob('*.jpg'):
            z.write(f, str(f.relative_to(root)))
    zdir = tmp_path / 'zipped'
    copy_prepared(synthetic, zdir, image_root=str(tmp_path / 'images.zip'), image_kind='zip')
    size = vlm.image_spec['size']
    raw = synthetic.parent
    P.main(['--json', str(raw / 'synthetic.json'), '--images', str(root), '--tokenizer', 'tiny', '--max_dups', '0',
            '--val_ratio', '0.1', '--pack_images', '--pack_size', str(size), '--out_dir', str(tmp_path / 'packed')])
    pmeta = read_meta(tmp_path / 'packed')
    assert pmeta['image_kind'] == 'packed' and pmeta['splits'] == meta['splits']
    sets = []
    for d in (synthetic, zdir, tmp_path / 'packed'):
        prepared = data.open_prepared(str(d))
        ds = data.CaptionDataset(prepared, 'train', tiny_builder(tok), vlm.image_spec)
        batches = [[(i,) for i in range(k, k + 4)] for k in range(0, 24, 4)]
        sets.append([bt['images'] for bt in data.make_loader(ds, batches, num_workers=2)])
    for a, b, c in zip(*sets):
        assert torch.equal(a, b)
        assert (a.float() - c.float()).abs().mean() < 4.0  # JPEG re-encoding noise only

# -----------------------------------------------------------------------------
# batch order: mixing, resuming, sharding, grouping


def test_multi_image_mixing(dataset):
    lengths = dataset.lengths()
    single = np.asarray(dataset.index[:, 3]) < 0
    kw = dict(multi_image_frac=0.25, group_by_length=True)
    e0 = data.epoch_batches(lengths, 4, 7, 0, single=single, **kw)
    assert e0 == data.epoch_batches(lengths, 4, 7, 0, single=single, **kw)  # a pure function
    assert e0 != data.epoch_batches(lengths, 4, 7, 1, single=single, **kw)  # new order each epoch
    items = [it for b in e0 for it in b]
    frac = sum(len(it) == 2 for it in items) / len(items)
    assert 0.15 < frac < 0.35, frac
    # a record that already has two images is never a partner (nor mixed itself): 3 images
    # would not fit the two-image template
    two_image = np.zeros(len(lengths), bool)
    two_image[::5] = True
    mixed = data.epoch_batches(lengths, 4, 7, 0, single=~two_image, multi_image_frac=1.0)
    pairs = [it for b in mixed for it in b if len(it) == 2]
    assert len(pairs) > len(lengths) // 2 and not any(two_image[i] or two_image[j] for i, j in pairs)
    two = next(it for it in items if len(it) == 2)
    s = dataset[two]
    assert len(s['images']) == 2 and s['input_ids'].count(dataset.builder.eos_id) == 1
    n_img_slots = sum(t == T.special_ids(B.load_tokenizer('tiny'))['slot'] for t in s['input_ids'])
    assert n_img_slots == 2 * N_LAT


def batch_order(dataset, **kw):
    """The resumable order of one dataset: batch size 4, seed 7, a quarter mixed."""
    return data.BatchOrder([dataset], [1.0], 4, 7, multi_image_frac=0.25, **kw)


def test_resumed_order_equals_uninterrupted(dataset):
    """Starting at position k yields exactly what an uninterrupted iterator yields from k."""
    full = batch_order(dataset)
    it = iter(full)
    seq = [next(it) for _ in range(full.per_epoch + 5)]  # crosses an epoch boundary
    for k in (3, full.per_epoch - 1, full.per_epoch + 2):
        it_k = iter(batch_order(dataset, start=k))
        assert [next(it_k) for _ in range(3)] == seq[k:k + 3]
    # the items name their dataset for data.Mixture; with one dataset it is dataset 0
    assert all(item[0] == 0 for b in seq for item in b)
    mixed = data.Mixture([dataset])[seq[0][0]]
    assert mixed['input_ids'] == dataset[seq[0][0][1:]]['input_ids'] and mixed['source'] == 0


def test_ranks_split_the_global_order(dataset):
    """DDP: two ranks take disjoint batches that together are the global order."""
    it = iter(batch_order(dataset))
    seq = [next(it) for _ in range(10)]
    r0 = iter(batch_order(dataset, rank=0, world_size=2))
    r1 = iter(batch_order(dataset, rank=1, world_size=2))
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


def test_grouped_batches_come_in_random_order(dataset):
    """Length grouping sorts within groups, then shuffles the batches: an epoch does not walk
    from short to long batches (a curriculum nobody asked for), yet every sample comes once."""
    lengths = dataset.lengths()
    batches = data.epoch_batches(lengths, 4, 3, 0, group_by_length=True, group_size=64)
    longest = [max(lengths[i] for (i,) in b) for b in batches]
    down = sum(b < a for a, b in zip(longest, longest[1:])) / (len(longest) - 1)
    assert down > 0.2, down  # sorted order would step down only at the few group edges
    items = [i for b in batches for (i,) in b]
    assert len(items) == len(set(items)) == len(batches) * 4 >= len(lengths) - 3


def test_packing_is_first_fit_up_to_max_seq_len():
    """Packed rows take the samples in order, each into the first row with room for it, a row
    filled to exactly max_seq_len included; positions restart at every sample."""
    samples = [dict(input_ids=[5] * n, labels=[-100] * (n - 1) + [7], images=[]) for n in (6, 4, 10, 3, 5, 2)]
    b = data.collate(samples, packing=True, max_seq_len=10, pad_id=0)
    assert b['input_ids'].shape == (3, 10)  # rows [6, 4] [10] [3, 5, 2], each exactly full
    assert b['position_ids'][0].tolist() == list(range(6)) + list(range(4))
    assert b['position_ids'][2].tolist() == list(range(3)) + list(range(5)) + list(range(2))


def test_eval_batches_cover_every_val_sample_in_order():
    """The val loss covers all n samples, the short last batch included, in index order."""
    assert data.eval_batches(10, 4) == [[(0,), (1,), (2,), (3,)], [(4,), (5,), (6,), (7,)], [(8,), (9,)]]
    assert data.eval_batches(10, 4, max_batches=2) == data.eval_batches(8, 4)
    assert data.eval_batches(3, 4, source=1) == [[(1, 0), (1, 1), (1, 2)]]
    assert data.eval_batches(0, 4) == []
