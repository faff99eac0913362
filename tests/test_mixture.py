"""
Tests of dataset mixtures (data_dir='dirA:1.0,dirB:0.5'): the syntax, refusing datasets
tokenised differently, and the mixed batch order following the weights while staying a pure
function of (seed, position), across ranks and across a resume.

$ python -m pytest -q tests/test_mixture.py
"""
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import data
import prepare_llava as P
from configurator import UserError

# -----------------------------------------------------------------------------
# syntax


@pytest.mark.parametrize('spec,want', [
    ('a', [('a', 1.0)]),
    ('data/cc3m/prepared', [('data/cc3m/prepared', 1.0)]),
    ('a:1.0,b:0.5', [('a', 1.0), ('b', 0.5)]),
    ('a:2, b ,c:1e-3', [('a', 2.0), ('b', 1.0), ('c', 0.001)]),
    ('a:1,', [('a', 1.0)]),
    ('run:2/prepared', [('run:2/prepared', 1.0)]),  # a ':' inside the path
    ('/mnt/x:y/prepared:0.25,b', [('/mnt/x:y/prepared', 0.25), ('b', 1.0)]),
    ('a:x', [('a:x', 1.0)]),  # not a number: the ':' belongs to the path
])
def test_parse_data_dir(spec, want):
    assert data.parse_data_dir(spec) == want


@pytest.mark.parametrize('spec,msg', [
    ('a:0', 'positive'), ('a:-1', 'positive'), ('a:1,b:-0.5', 'positive'), ('a:nan', 'positive'),
    ('a:inf', 'positive'), ('', 'empty'), (' , ', 'empty'), ('a,a:2', 'twice'),
])
def test_parse_data_dir_refuses(spec, msg):
    with pytest.raises(UserError, match=msg) as e:
        data.parse_data_dir(spec)
    assert '\n' not in str(e.value)


def test_weight_that_is_not_a_number_names_the_path(tmp_path):
    with pytest.raises(UserError, match='a:x'):
        data.open_sources(str(tmp_path / 'a:x'))

# -----------------------------------------------------------------------------
# opening a mixture


@pytest.fixture(scope='module')
def two(tmp_path_factory):
    """Two small prepared datasets with the tiny tokenizer: (dir a, dir b)."""
    d = tmp_path_factory.mktemp('mix')
    caps = ['a red circle at the top left.', 'a blue square at the bottom right.', 'two green stars in the center.',
            'a yellow triangle on the left.', 'a white cross on the right.', 'an orange diamond at the top.']
    (d / 'images').mkdir()
    records = []
    for k, c in enumerate(caps):
        buf = io.BytesIO()
        Image.new('RGB', (16, 16), (40 * k, 0, 0)).save(buf, format='PNG')
        (d / 'images' / f'{k}.png').write_bytes(buf.getvalue())
        records.append(dict(id=str(k), image=f'{k}.png', conversations=[{'from': 'human', 'value': '<image>'},
                                                                        {'from': 'gpt', 'value': c}]))
    (d / P.LLAVA_JSON).write_text(json.dumps(records))
    for name in ('a', 'b'):
        P.main(['--data_dir', str(d), '--out_dir', str(d / name / 'prepared'), '--tokenizer=tiny', '--val_ratio=0.2'])
    return d / 'a' / 'prepared', d / 'b' / 'prepared'


def test_open_sources_names_and_weights(two):
    a, b = two
    got = data.open_sources(f'{a}:3,{b}:1')
    assert [(name, w) for name, _, w in got] == [('a', 3.0), ('b', 1.0)]
    assert all(p['meta']['tokenizer'] == 'tiny' for _, p, _ in got)


def test_open_sources_refuses_different_tokenizers(two, tmp_path):
    a, b = two
    other = tmp_path / 'other' / 'prepared'
    shutil.copytree(b, other)
    meta = json.loads((other / 'meta.json').read_text())
    meta['image_root'] = meta['image_root_abs']
    meta['tokenizer'] = 'Qwen/Qwen3-8B-Base'
    (other / 'meta.json').write_text(json.dumps(meta))
    data.open_prepared(str(other))  # fine on its own
    with pytest.raises(UserError, match='same tokenizer'):
        data.open_sources(f'{a}:1,{other}:1')
    meta.update(tokenizer='tiny', slot_id=meta['slot_id'] + 1)  # same name, other ids
    (other / 'meta.json').write_text(json.dumps(meta))
    with pytest.raises(UserError, match='same tokenizer'):
        data.open_sources(f'{a},{other}')


def test_image_root_override_needs_a_single_dataset(two):
    a, b = two
    with pytest.raises(UserError, match='image_root'):
        data.open_sources(f'{a},{b}', image_root='/somewhere')

# -----------------------------------------------------------------------------
# the mixed batch order


class Lengths:
    """What BatchOrder reads of a dataset: lengths() and index[:, 3] (second image id)."""

    def __init__(self, n, seed):
        self.index = np.full((n, 4), -1, np.int64)
        self._len = np.random.default_rng(seed).integers(70, 90, n)

    def lengths(self):
        return self._len


def order(sizes=(48, 36), weights=(3.0, 1.0), **kw):
    return data.BatchOrder([Lengths(n, k) for k, n in enumerate(sizes)], list(weights), 4, 11, **kw)


def take(o, n):
    it = iter(o)
    return [next(it) for _ in range(n)]


def test_batch_order_follows_the_weights():
    n = 8000
    seq = take(order(), n)
    share = np.mean([b[0][0] == 0 for b in seq])
    assert abs(share - 0.75) < 5 * np.sqrt(0.75 * 0.25 / n), share  # 5 sigma
    assert all(len({item[0] for item in b}) == 1 for b in seq)  # a batch comes from one dataset
    seq = take(order(weights=(1.0, 1.0, 2.0), sizes=(48, 36, 24)), n)
    shares = np.bincount([b[0][0] for b in seq], minlength=3) / n
    assert np.abs(shares - [0.25, 0.25, 0.5]).max() < 5 * np.sqrt(0.25 / n), shares


def test_each_dataset_walks_its_own_epochs():
    """Mixed or not, dataset s gives its batches in its own epoch order, none skipped or repeated."""
    seq = take(order(), 400)
    for s, size in enumerate((48, 36)):
        own = [[item[1:] for item in b] for b in seq if b[0][0] == s]
        lengths = Lengths(size, s).lengths()
        epochs = [data.epoch_batches(lengths, 4, 11 + s, e, single=np.ones(size, bool)) for e in range(40)]
        assert own == [b for e in epochs for b in e][:len(own)]


def test_batch_order_is_a_pure_function_of_seed_and_position():
    """Any rank, started at any position (across a 65,536-batch block of draws), yields what an
    uninterrupted run of that rank yields there; the ranks together are the single-rank order."""
    single = take(order(), 3 * 40)
    ranks = [take(order(rank=r, world_size=3), 40) for r in range(3)]
    assert [ranks[g % 3][g // 3] for g in range(120)] == single
    # 2 ranks, although dataset 1 has 9 batches an epoch (not whole rounds of 2): the same order,
    # so a run resumed on another number of GPUs goes on with the batches it would have had
    halves = [take(order(rank=r, world_size=2), 60) for r in range(2)]
    assert [halves[g % 2][g // 2] for g in range(120)] == single
    assert take(order(), 5) == single[:5]  # a new object: the same order
    long = take(order(rank=1, world_size=2), 32770)  # global positions 1, 3, ..., 65,539
    for start in (0, 7, 8, 65533, 65536):  # both sides of the block edge; rank 1 from global position start on
        assert take(order(rank=1, world_size=2, start=start), 2) == long[start // 2:start // 2 + 2]
    other_seed = data.BatchOrder([Lengths(48, 0), Lengths(36, 1)], [3.0, 1.0], 4, 12)
    assert take(other_seed, 20) != single[:20]
