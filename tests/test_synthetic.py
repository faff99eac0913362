"""
Tests of sources/synthetic.py (prepare_llava.py --synthetic): the drawn shapes dataset the CPU demo
and the other tests use, its QA set, and its determinism.

$ python -m pytest -q tests/test_synthetic.py
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

import prepare_llava as P
from conftest import load_prepared, prepared_samples
from sources.backbones import TINY_WORDS, tiny_tokenizer
from sources import backbones as B


def prepare_synthetic(data_dir, *extra):
    """300 scenes into data_dir, without the tiny LLM pretraining: these tests are
    about the data."""
    return P.main(['--synthetic=300', '--data_dir', str(data_dir), '--no_llm', *extra])


@pytest.fixture(scope='module')
def s300(tmp_path_factory):
    """The same 300 scenes drawn twice (s1, s2): (s1 folder, s2 folder, meta of s1)."""
    d = tmp_path_factory.mktemp('s300')
    meta = prepare_synthetic(d / 's1')  # the synthetic default: 10 % val
    prepare_synthetic(d / 's2')
    return d / 's1', d / 's2', meta


def test_synthetic_meta_and_split(s300):
    s1, _, meta = s300
    assert meta['source'] == 'synthetic' and meta['tokenizer'] == 'tiny' and meta['counts']['kept'] == 300
    assert meta['splits'] == {'train': 270, 'val': 30} and len(meta['golden']) == 30
    # qa_file is relative to the prepared folder, like the image root
    assert os.path.normpath(os.path.join(s1 / 'prepared', meta['qa_file'])) == os.path.abspath(s1 / 'qa.jsonl')
    saved, _ = load_prepared(s1 / 'prepared')
    assert saved == meta


def test_synthetic_captions_in_the_tiny_vocabulary(s300):
    s1, _, _ = s300
    _, arrays = load_prepared(s1 / 'prepared')
    tok = tiny_tokenizer()
    unk = tok.convert_tokens_to_ids('[UNK]')
    for _, ids in prepared_samples(arrays):
        assert len(ids) >= 5 and unk not in ids
    words = set(TINY_WORDS)
    for r in json.loads((s1 / 'synthetic.json').read_text()):
        assert set(r['conversations'][1]['value'].rstrip('.').split()) <= words


def test_synthetic_in_the_llava_layout(s300):
    s1, _, _ = s300
    records = json.loads((s1 / 'synthetic.json').read_text())
    assert records[0]['conversations'][0] == {'from': 'human', 'value': '<image>\nDescribe the image in one sentence.'}
    assert records[123]['image'] == '000/000123.jpg'
    assert Image.open(s1 / 'images' / '000' / '000123.jpg').size == (64, 64)


def test_synthetic_qa_covers_every_val_image(s300):
    s1, _, _ = s300
    tok = tiny_tokenizer()
    unk = tok.convert_tokens_to_ids('[UNK]')
    qa = [json.loads(line) for line in (s1 / 'qa.jsonl').read_text().splitlines()]
    assert 150 <= len(qa) <= 300
    for q in qa:
        assert (s1 / q['image']).is_file() and q['answers'] and q['question']
        assert unk not in tok(q['question'])['input_ids'] and all(unk not in tok(x)['input_ids'] for x in q['answers'])
    assert any(q['question'] == 'What color is the circle?' for q in qa)
    _, arrays = load_prepared(s1 / 'prepared')
    val_images = {p.decode() for p in arrays['image_paths.npy'][arrays['val_index.npy'][:, 2]]}
    assert {q['image'][len('images/'):] for q in qa} >= val_images  # every val image has questions


def test_synthetic_is_deterministic_from_the_seed(s300, tmp_path):
    s1, s2, _ = s300
    _, arrays = load_prepared(s1 / 'prepared')
    _, again = load_prepared(s2 / 'prepared')
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    assert (s1 / 'qa.jsonl').read_text() == (s2 / 'qa.jsonl').read_text()
    assert (s1 / 'images/000/000007.jpg').read_bytes() == (s2 / 'images/000/000007.jpg').read_bytes()
    # another seed draws another dataset
    prepare_synthetic(tmp_path / 's3', '--seed=7')
    assert json.loads((tmp_path / 's3' / 'synthetic.json').read_text()) != \
        json.loads((s1 / 'synthetic.json').read_text())


def test_pretrained_tiny_llm_is_made_once_and_loads_as_a_real_llm(tmp_path, capsys):
    """pretrain_llm writes a save_pretrained folder that build_llm loads by its path (the same
    branch as Qwen3-8B-Base from a local dir); a second call with the same scenes and settings
    reuses it; other scenes retrain it."""
    import torch
    from sources import synthetic
    rng = np.random.default_rng(0)
    scenes = [synthetic.draw_scene(rng)[1:] for _ in range(40)]
    out = tmp_path / 'tiny_llm'
    synthetic.pretrain_llm(scenes, str(out), steps=3, batch_size=8)
    weights = next(out.glob('*.safetensors'))
    first = weights.read_bytes()
    llm = B.build_llm(str(out))
    assert not any(p.requires_grad for p in llm.parameters())  # frozen, as the real LLM
    from safetensors.torch import load_file
    saved, loaded = load_file(str(weights)), llm.state_dict()
    assert saved and all(torch.equal(loaded[k], v) for k, v in saved.items())  # the trained weights, not an init
    capsys.readouterr()
    synthetic.pretrain_llm(scenes, str(out), steps=3, batch_size=8)
    assert 'up to date' in capsys.readouterr().out and weights.read_bytes() == first
    synthetic.pretrain_llm(scenes[:30], str(out), steps=3, batch_size=8)
    assert 'pretrained 3 steps' in capsys.readouterr().out and weights.read_bytes() != first
