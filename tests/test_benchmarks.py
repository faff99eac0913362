"""
Tests of evaluation/benchmarks.py and evaluation/coco_caption.py: the benchmark files in each layout (small files
written here, and the synthetic val split with five references per image), bad files, the
PTB tokenizer against the official one, the scores against pycocoevalcap, CHAIR on COCO, and
sample.py --bench end to end on the CPU demo's checkpoint.

$ python -m pytest -q tests/test_benchmarks.py

The checks against the official toolkit skip where pycocoevalcap or Java is not installed
(`pip install pycocoevalcap`; .ci/run installs it); everything else runs without them.
"""
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from evaluation import benchmarks
from evaluation import coco_caption
from evaluation import metrics
import sample
from configurator import UserError
from conftest import ENV, ROOT, assert_ok, assert_one_error_line


def needs_toolkit():
    """Skips the test where the official toolkit cannot run."""
    pytest.importorskip('pycocoevalcap')
    if shutil.which('java') is None:
        pytest.skip('no Java runtime')

# -----------------------------------------------------------------------------
# The PTB tokenizer
#
# A fixed set covering contractions, possessives, hyphens, numbers, currency, quotes of every
# kind, brackets, abbreviations, unicode, emoji and odd spacing. The expected text is what
# pycocoevalcap 1.2's PTBTokenizer (Stanford CoreNLP 3.4.1, Java 17) made of these captions,
# tokenized together in this order, as the toolkit tokenizes a set.

PTB_FIXED = [
    ("A man's dog doesn't like the rain.", "a man 's dog does n't like the rain"),
    ("They're sitting on a bench, and it's raining.", "they 're sitting on a bench and it 's raining"),
    ("I can't see what won't fit; we'll try.", "i ca n't see what wo n't fit we 'll try"),
    ("The dogs' owner wasn't there.", "the dogs owner was n't there"),
    ('A cat that is "happy" and \'sleepy\'.', 'a cat that is happy and sleepy'),
    ('Two people (a man and a woman) stand near a [red] sign.',
     'two people -lrb- a man and a woman -rrb- stand near a -lsb- red -rsb- sign'),
    ("A young boy in a t-shirt plays with a well-known 5-year-old's toy.",
     "a young boy in a t-shirt plays with a well-known 5-year-old 's toy"),
    ('A black-and-white photo of a double-decker bus -- in London.',
     'a black-and-white photo of a double-decker bus in london'),
    ('The price is $3.50, about 50% off at 10:30 a.m. on 12/25/2010.',
     'the price is $ 3.50 about 50 % off at 10:30 a.m. on 12/25/2010'),
    ('A 1,000-piece puzzle and 3.5 inches of snow.', 'a 1,000-piece puzzle and 3.5 inches of snow'),
    ('A sign that reads "STOP".', 'a sign that reads stop'),
    ("Mr. Smith and Dr. Jones walk down St. Mary's street in the U.S.",
     "mr. smith and dr. jones walk down st. mary 's street in the u.s."),
    ('A man who is gonna ride a bike, I wanna go.', 'a man who is gon na ride a bike i wan na go'),
    ("It cannot be a dog... it's a cat!", "it can not be a dog it 's a cat"),
    ('What is this? A giraffe!!', 'what is this a giraffe !!'),
    ('A café with naïve art and a jalapeño pizza.', 'a café with naïve art and a jalapeño pizza'),
    ('A man \u2013 with a hat \u2014 stands \u201cquoted\u201d \u2018single\u2019 in the rain\u2026',
     'a man with a hat stands quoted single in the rain'),
    ('A dog\u2019s bone and a cat\u2019s toy.', "a dog 's bone and a cat 's toy"),
    ('A bowl of \u65e5\u672c noodles \U0001F600 and a cup of tea.', 'a bowl of \u65e5\u672c noodles and a cup of tea'),
    ('An elephant; a zebra: a giraffe.', 'an elephant a zebra a giraffe'),
    ("Several 3-d glasses and a 4k TV from the '90s.", "several 3-d glasses and a 4k tv from the '90s"),
    ('A man & woman at AT&T park, no. 5 jersey.', 'a man & woman at at&t park no. 5 jersey'),
    ('The U.K. flag etc. flies over a co-op.', 'the u.k. flag etc. flies over a co-op'),
    ('A plate with 1/2 sandwich and \u00bd apple.', 'a plate with 1/2 sandwich and 1/2 apple'),
    ('a dog', 'a dog'),
    ('A DOG RUNNING ON THE BEACH.', 'a dog running on the beach'),
    ('  A cat   sitting   on a mat .  ', 'a cat sitting on a mat'),
    # the Java tokenizer reads the set as one text: the next caption decides these periods
    ('A jersey with the word no.', 'a jersey with the word no.'),  # "5 men" follows: "no." before a number
    ('5 men play soccer.', '5 men play soccer'),
    ('A sign with the letter b.', 'a sign with the letter b'),  # "The" follows: the sentence ends there
    ('The sign is red.', 'the sign is red'),
    ('A 2 1/2 year old child.', 'a 2\u00a01/2 year old child'),  # one token with a no-break space
    ('Tickets for U.S. games.', 'tickets for u.s. games'),
]


def test_ptb_tokenize_equals_the_official_tokenizer_on_the_fixed_set():
    caps = [c for c, _ in PTB_FIXED]
    got = [coco_caption.ptb_tokenize(c, caps[i + 1] if i + 1 < len(caps) else '') for i, c in enumerate(caps)]
    assert got == [want for _, want in PTB_FIXED]


def test_tokenize_all_without_the_toolkit_is_the_python_tokenizer():
    caps = {i: [c] for i, (c, _) in enumerate(PTB_FIXED)}
    out, name, _ = coco_caption.tokenize_all(caps, official=False)
    assert name == coco_caption.FALLBACK_TOKENIZER
    assert [out[i][0] for i in caps] == [want for _, want in PTB_FIXED]


def test_the_official_tokenizer_gives_the_fixed_set():
    """The recorded outputs are still what the installed toolkit says."""
    needs_toolkit()
    out, name, why = coco_caption.tokenize_all({i: [c] for i, (c, _) in enumerate(PTB_FIXED)})
    assert name == coco_caption.OFFICIAL_TOKENIZER, why
    assert [out[i][0] for i in range(len(PTB_FIXED))] == [want for _, want in PTB_FIXED]


def test_ptb_tokenize_equals_the_official_tokenizer_on_random_captions():
    """Caption-like sentences drawn at random (words, the fixed set's hard cases, punctuation
    attached, quotes, brackets, case) are tokenized the same by both."""
    needs_toolkit()
    rnd = random.Random(7)
    words = 'a man dog on the in with red two sitting table bus giraffe of near'.split()
    hard = [w for c, _ in PTB_FIXED for w in c.split()]
    sents = []
    for _ in range(400):
        ws = [rnd.choice(hard) if rnd.random() < 0.3 else rnd.choice(words) for _ in range(rnd.randint(3, 14))]
        ws = [w + rnd.choice('.,;:!?') if rnd.random() < 0.05 else w for w in ws]
        ws = [f'"{w}"' if rnd.random() < 0.03 else f'({w})' if rnd.random() < 0.02 else w for w in ws]
        s = ' '.join(ws)
        sents.append(s[0].upper() + s[1:] + rnd.choice(['.', '', '!', ' .']))
    official, name, why = coco_caption.tokenize_all({i: [s] for i, s in enumerate(sents)})
    assert name == coco_caption.OFFICIAL_TOKENIZER, why
    ours, _, _ = coco_caption.tokenize_all({i: [s] for i, s in enumerate(sents)}, official=False)
    diff = [(sents[i], official[i][0], ours[i][0]) for i in range(len(sents)) if official[i] != ours[i]]
    assert not diff, diff[:5]


def test_a_line_break_inside_a_caption_cannot_shift_the_others():
    """The Java tokenizer ends a line at \\r, \\v, \\f and U+2028: one inside a caption would move
    every later caption onto the wrong image. They become spaces first."""
    needs_toolkit()
    caps = {1: ['a red\rbus', 'a dog\u2028on grass'], 2: ['two cats.'], 3: ['a kite\x0bin the sky']}
    out, name, why = coco_caption.tokenize_all(caps)
    assert name == coco_caption.OFFICIAL_TOKENIZER, why
    assert out == {1: ['a red bus', 'a dog on grass'], 2: ['two cats'], 3: ['a kite in the sky']}

# -----------------------------------------------------------------------------
# Scores equal to the toolkit's


REFS = {i: rs for i, rs in enumerate([
    ['A man riding a wave on top of a surfboard.', 'A surfer rides a large wave in the ocean.',
     "A person on a surfboard riding a wave, isn't it?"],
    ['Two dogs playing with a frisbee in the grass.', "A couple of dogs play in a grassy field.",
     'Two brown dogs running on the grass with a frisbee.'],
    ['A plate of food with broccoli and rice.', 'A white plate topped with rice and broccoli.', ''],
    ['A red stop sign on a city street.', 'A stop sign (red) next to a road.'],
    ['A giraffe standing next to a tree.'],
])}
CANDS = {0: 'A man riding a surfboard on a wave.', 1: 'Two dogs play with a ball in the grass.',
         2: 'A plate of rice and broccoli on a table.', 3: "A stop sign on the street's corner.", 4: ''}
# pycocoevalcap 1.2's Bleu(4), Rouge, Cider on this set after its PTBTokenizer
TOOLKIT = {'Bleu_1': 0.6463552449190693, 'Bleu_2': 0.5618294223044641, 'Bleu_3': 0.410493886320152,
           'Bleu_4': 0.22491631390073896, 'ROUGE_L': 0.5301782233361181, 'CIDEr': 1.761376004781597}
TOOLKIT_METEOR = 0.3000209922625386  # pycocoevalcap's Meteor (meteor-1.5.jar) on the official tokens


def test_scores_equal_the_recorded_toolkit_numbers():
    m, per = coco_caption.score(REFS, CANDS, meteor=False, spice=False, official_tokenizer=False)
    for k, v in TOOLKIT.items():
        assert m[k] == pytest.approx(v, abs=1e-9), k
    assert m['images'] == 5 and set(per) == set(REFS)
    assert m['not_computed'] == {'METEOR': 'not asked for', 'SPICE': 'not asked for'}


def test_scores_equal_pycocoevalcap_live():
    """BLEU, ROUGE-L and CIDEr-D from evaluation/metrics.py against the toolkit's own Python scorers on the
    same tokens (these need no Java: the tokens come from the Python tokenizer)."""
    pytest.importorskip('pycocoevalcap')
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    gts, _, _ = coco_caption.tokenize_all(REFS, official=False)
    res, _, _ = coco_caption.tokenize_all({i: [c] for i, c in CANDS.items()}, official=False)
    want = dict(zip(('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4'), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    want['ROUGE_L'] = Rouge().compute_score(gts, res)[0]
    want['CIDEr'], cider_per = Cider().compute_score(gts, res)
    m, per = coco_caption.score(REFS, CANDS, meteor=False, spice=False, official_tokenizer=False)
    for k, v in want.items():
        assert m[k] == pytest.approx(v, abs=1e-9), k
        assert TOOLKIT[k] == pytest.approx(v, abs=1e-9), k  # the recorded numbers still hold
    assert [per[i]['CIDEr'] for i in REFS] == pytest.approx(list(cider_per), abs=1e-9)


def test_official_scores_with_meteor_and_spice_not_computed():
    """With the toolkit: the official tokenizer, METEOR from its jar (the value it gives on
    this set), SPICE "not computed" with the reason unless its CoreNLP models were downloaded,
    and the same BLEU/ROUGE/CIDEr."""
    needs_toolkit()
    m, _ = coco_caption.score(REFS, CANDS)
    assert m['tokenizer'] == coco_caption.OFFICIAL_TOKENIZER
    for k, v in TOOLKIT.items():
        assert m[k] == pytest.approx(v, abs=1e-9), k
    assert m['METEOR'] == pytest.approx(TOOLKIT_METEOR, abs=1e-9)
    assert 'SPICE' in m or 'CoreNLP' in m['not_computed']['SPICE']


def test_without_the_toolkit_meteor_is_not_computed_and_says_why(monkeypatch):
    monkeypatch.setattr(coco_caption, 'toolkit_missing', lambda: 'pycocoevalcap is not installed')
    m, _ = coco_caption.score(REFS, CANDS)
    assert m['tokenizer'] == coco_caption.FALLBACK_TOKENIZER
    assert m['not_computed'] == {'METEOR': 'pycocoevalcap is not installed', 'SPICE': 'pycocoevalcap is not installed'}
    assert m['CIDEr'] == pytest.approx(TOOLKIT['CIDEr'], abs=1e-9)


def test_rouge_lcs_equals_the_table_lcs():
    def table(a, b):
        t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a)):
            for j in range(len(b)):
                t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
        return t[-1][-1]
    rnd = random.Random(0)
    for _ in range(300):
        a, b = ([rnd.choice('abcde') for _ in range(rnd.randint(0, 20))] for _ in range(2))
        assert metrics._lcs(a, b) == table(a, b)

# -----------------------------------------------------------------------------
# Readers: small files in each layout, and bad ones


def _jpeg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', (8, 8), (200, 30, 30)).save(path)


def _write(path, obj):
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


def _sent(*caps):
    return [dict(raw=c, tokens=c.lower().split()) for c in caps]


@pytest.fixture
def karpathy(tmp_path):
    """A dataset_coco.json-like file over a folder with val2014/ images (one missing)."""
    for k in (1, 2, 3, 5, 6):
        _jpeg(str(tmp_path / 'coco' / 'val2014' / f'COCO_val2014_{k:012d}.jpg'))
    imgs = [dict(filepath='val2014', filename=f'COCO_val2014_{k:012d}.jpg', cocoid=k, imgid=k, split=s,
                 sentences=_sent(f'a photo number {k}.', 'another caption.'))
            for k, s in ((1, 'test'), (2, 'test'), (3, 'val'), (4, 'test'), (5, 'restval'), (6, 'test'))]
    imgs[5]['sentences'] = [dict(raw='  '), dict(tokens=['x'])]  # no usable reference
    imgs += [dict(filepath='val2014', filename='x.jpg', cocoid=7, split='holdout', sentences=_sent('a')),
             dict(cocoid=8, split='test', sentences=_sent('no file name')), 'not a record',
             dict(filepath='..', filename='passwd', cocoid=9, split='test', sentences=_sent('a')),
             dict(filename='y.jpg', cocoid=[10], split='test', sentences=_sent('a'))]
    return _write(tmp_path / 'dataset_coco.json', dict(images=imgs, dataset='coco')), str(tmp_path / 'coco')


def test_karpathy_split_file(karpathy):
    ann, images = karpathy
    b = benchmarks.read_benchmark('coco', ann, images)
    assert b['layout'] == 'karpathy' and b['split'] == 'test'
    assert [it['image_id'] for it in b['items']] == [1, 2]
    assert b['items'][0]['references'] == ['a photo number 1.', 'another caption.']
    assert b['items'][0]['image'] == os.path.join(images, 'val2014', 'COCO_val2014_000000000001.jpg')
    assert b['skipped'] == dict(missing_image=1, no_references=1, unknown_split=1, malformed_image=3, unsafe_path=1)
    assert [it['image_id'] for it in benchmarks.read_benchmark('coco', ann, images, 'val')['items']] == [3]
    assert [it['image_id'] for it in benchmarks.read_benchmark('coco', ann, images, num=1)['items']] == [1]
    # --images may also be the folder of the files themselves
    flat = benchmarks.read_benchmark('coco', ann, os.path.join(images, 'val2014'), 'restval')
    assert [it['image_id'] for it in flat['items']] == [5]


def test_flickr30k_ids_are_the_photo_ids(tmp_path):
    for name in ('1000092795.jpg', 'photo.jpg'):
        _jpeg(str(tmp_path / 'img' / name))
    ann = _write(tmp_path / 'dataset_flickr30k.json', dict(images=[
        dict(filename='1000092795.jpg', imgid=0, split='test', sentences=_sent('Two young guys.')),
        dict(filename='photo.jpg', imgid=1, split='test', sentences=_sent('A dog.'))], dataset='flickr30k'))
    b = benchmarks.read_benchmark('flickr30k', ann, str(tmp_path / 'img'))
    assert [it['image_id'] for it in b['items']] == [1000092795, 1]


def test_coco_style_captions_and_nocaps_domains(tmp_path):
    for k in (1, 2, 3):
        _jpeg(str(tmp_path / 'img' / f'{k:04d}.jpg'))
    images = [dict(id=k, file_name=f'{k:04d}.jpg', domain=d) for k, d in ((1, 'in-domain'), (2, 'out'), (3, 'far'))]
    images.append(dict(id=9, file_name='gone.jpg', domain='near-domain'))
    anns = [dict(image_id=k, id=10 * k + j, caption=f'caption {j} of {k}') for k in (1, 2, 3, 9) for j in range(3)]
    anns += [dict(image_id=1, caption=None), dict(id=5)]
    ann = _write(tmp_path / 'nocaps_val_4500_captions.json', dict(images=images, annotations=anns))
    b = benchmarks.read_benchmark('nocaps', ann, str(tmp_path / 'img'))
    assert [(it['image_id'], it['domain']) for it in b['items']] == [(1, 'in-domain'), (2, 'out-domain')]
    assert b['items'][0]['references'] == ['caption 0 of 1', 'caption 1 of 1', 'caption 2 of 1']
    assert b['skipped'] == dict(malformed_caption=2, unknown_domain=1, missing_image=1)
    c = benchmarks.read_benchmark('coco', ann, str(tmp_path / 'img'))  # as COCO captions: no domains needed
    assert [it['image_id'] for it in c['items']] == [1, 2, 3] and c['items'][0]['domain'] is None


def test_coco_captions_file_names_resolve_under_val2014(tmp_path):
    _jpeg(str(tmp_path / 'coco' / 'val2014' / 'COCO_val2014_000000000042.jpg'))
    ann = _write(tmp_path / 'captions_val2014.json', dict(
        images=[dict(id=42, file_name='COCO_val2014_000000000042.jpg')],
        annotations=[dict(image_id=42, id=1, caption='A cat.')]))
    b = benchmarks.read_benchmark('coco', ann, str(tmp_path / 'coco'))
    assert b['items'][0]['image'].endswith(os.path.join('val2014', 'COCO_val2014_000000000042.jpg'))


@pytest.mark.parametrize('content, bench, words', [
    (None, 'coco', 'not found'),
    ('{"images": [', 'coco', 'not valid JSON'),
    ([1, 2], 'coco', 'neither a Karpathy'),
    ({'images': {}}, 'coco', 'neither a Karpathy'),
    ({'images': [dict(filename='a.jpg', split='test', sentences=[])]}, 'nocaps', 'NoCaps is read from'),
    ({'images': [], 'annotations': {}}, 'coco', 'annotations is not a list'),
    ({'images': [dict(filename='gone.jpg', cocoid=1, split='test', sentences=_sent('a'))]}, 'coco',
     'no usable image'),
])
def test_a_bad_file_is_one_user_error(tmp_path, content, bench, words):
    ann = str(tmp_path / 'ann.json') if content is None else _write(tmp_path / 'ann.json', content)
    with pytest.raises(UserError, match=words):
        benchmarks.read_benchmark(bench, ann, str(tmp_path))


def test_bad_arguments_are_user_errors(karpathy, tmp_path):
    ann, images = karpathy
    with pytest.raises(UserError, match="unknown split 'dev'"):
        benchmarks.read_benchmark('coco', ann, images, 'dev')
    with pytest.raises(UserError, match='image folder'):
        benchmarks.read_benchmark('coco', ann, str(tmp_path / 'nowhere'))
    coco_style = _write(tmp_path / 'c.json', dict(images=[], annotations=[]))
    with pytest.raises(UserError, match='--split is for Karpathy'):
        benchmarks.read_benchmark('coco', coco_style, images, 'test')

# -----------------------------------------------------------------------------
# CHAIR on COCO


def test_coco_objects_use_coco_class_names():
    objs = benchmarks.coco_objects('A man and a puppy near a sofa, two TVs, a potted plant and a cellphone on a desk.')
    assert objs == ['person', 'dog', 'couch', 'tv', 'potted plant', 'cell phone', 'dining table']
    assert benchmarks.coco_objects('A baby elephant and a passenger train.') == ['elephant', 'train']
    assert benchmarks.coco_objects('An orange cat beside an orange and two oranges.') == ['cat', 'orange', 'orange']
    assert benchmarks.coco_objects('An orange and white bus, a glass of orange juice.') == ['bus']
    assert benchmarks.coco_objects('A tall tree next to a building.') == []  # not COCO classes
    assert len(benchmarks.COCO_CLASSES) == 80 and set(benchmarks.COCO_WORDS.values()) == set(benchmarks.COCO_CLASSES)


def test_chair_with_instances_and_with_captions_only(tmp_path):
    inst = _write(tmp_path / 'instances_val2014.json', dict(
        categories=[dict(id=1, name='person'), dict(id=18, name='dog'), dict(id=62, name='chair')],
        annotations=[dict(image_id=1, category_id=18), dict(image_id=1, category_id=62)]))
    items = [dict(image_id=1, references=['A man with his pet.']), dict(image_id=2, references=['A cat on a bed.'])]
    caps = ['A man and a dog on a chair with a frisbee.', 'A cat and a dog.']
    m, per = benchmarks.chair_coco(caps, items, inst)
    # image 1: person (caption), dog + chair (segments) are there, the frisbee is not; image 2: no dog
    assert per == [['frisbee'], ['dog']]
    assert (m['objects_mentioned'], m['objects_hallucinated']) == (6, 2)
    assert m['CHAIRi'] == pytest.approx(2 / 6) and m['CHAIRs'] == 1.0 and m['images_without_instances'] == 1
    m2, per2 = benchmarks.chair_coco(caps, items)
    assert per2 == [['chair', 'dog', 'frisbee'], ['dog']] and 'captions only' in m2['ground_truth']
    with pytest.raises(UserError, match='not a COCO instances file'):
        benchmarks.chair_coco(caps, items, _write(tmp_path / 'bad.json', {'annotations': []}))
    assert benchmarks.find_instances(str(tmp_path / 'captions_val2014.json')) == inst

# -----------------------------------------------------------------------------
# End to end on the CPU demo's checkpoint


@pytest.fixture(scope='module')
def bench_files(synthetic, tmp_path_factory):
    """The synthetic val split as benchmark files (five references per image), and a
    Flickr30k-style file over a small folder with one corrupt and one missing image."""
    tmp = tmp_path_factory.mktemp('bench')
    files = benchmarks.write_synthetic(str(synthetic.parent), str(tmp / 'files'))
    d = json.loads(open(files['karpathy']).read())
    test = [im for im in d['images'] if im['split'] == 'test'][:12]
    small = tmp / 'flickr'
    small.mkdir()
    for k, im in enumerate(test):  # Flickr30k's layout: no cocoid, no filepath, the photo id as file name
        shutil.copy(synthetic.parent / 'images' / im.pop('filepath') / im['filename'], small / f'{1000 + k}.jpg')
        im.pop('cocoid')
        im['filename'] = f'{1000 + k}.jpg'
    (small / test[0]['filename']).write_bytes(b'\xff\xd8 not a jpeg')
    (small / test[1]['filename']).unlink()
    files['flickr30k'] = _write(tmp / 'dataset_flickr30k.json', dict(images=test, dataset='flickr30k'))
    return files, str(synthetic.parent / 'images'), str(small)


def _no_java_env():
    """The scripts' environment with no Java on the PATH: the pure-Python path of a machine
    without the toolkit."""
    return {**ENV, 'PATH': os.path.dirname(sys.executable)}


@pytest.fixture(scope='module')
def bench_runs(demo_run, bench_files, tmp_path_factory):
    """sample.py --bench side by side: COCO (Karpathy layout) with the toolkit when installed,
    NoCaps and Flickr30k without Java; a bad file. {name: (CompletedProcess, out dir)}."""
    files, images, small = bench_files
    tmp = tmp_path_factory.mktemp('bench_out')
    ck = str(demo_run / 'ckpt.pt')
    jobs = {
        'coco': (['--bench', 'coco', '--ann', files['karpathy'], '--images', images, '--out', tmp / 'coco'], ENV),
        'nocaps': (['--bench', 'nocaps', '--ann', files['nocaps'], '--images', images, '--out', tmp / 'nocaps',
                    '--batch_size', '16', '--num', '40'], _no_java_env()),
        'flickr30k': (['--bench', 'flickr30k', '--ann', files['flickr30k'], '--images', small], _no_java_env()),
        'bad_file': (['--bench', 'coco', '--ann', files['karpathy'] + '.missing', '--images', images], ENV),
        'bad_instances': (['--bench', 'coco', '--ann', files['karpathy'], '--images', images, '--instances',
                           tmp / 'instances_val2014.json', '--out', tmp / 'never'], ENV),
    }
    procs = {k: subprocess.Popen([sys.executable, 'sample.py', '--ckpt', ck, '--device', 'cpu',
                                  '--max_new_tokens', '24', *map(str, a)], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, (a, env) in jobs.items()}
    done = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        done[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done, dict(coco=tmp / 'coco', nocaps=tmp / 'nocaps', flickr30k=demo_run / 'report' / 'flickr30k')


def test_bench_coco_writes_results_metrics_and_report(bench_runs, bench_files):
    p, out = bench_runs[0]['coco'], bench_runs[1]['coco']
    assert_ok(p)
    assert 'CIDEr' in p.stdout and 'results file' in p.stdout
    files = bench_files[0]
    n_test = sum(im['split'] == 'test' for im in json.loads(open(files['karpathy']).read())['images'])
    results = json.loads((out / 'results.json').read_text())
    assert len(results) == n_test and all(set(r) == {'image_id', 'caption'} for r in results)
    assert all(isinstance(r['image_id'], int) for r in results)
    m = json.loads((out / 'metrics.json').read_text())
    for k in ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'ROUGE_L', 'CIDEr'):
        assert 0 <= m[k] <= (10 if k == 'CIDEr' else 1), k
    assert m['images'] == n_test and m['CHAIR']['ground_truth'].startswith('reference captions only')
    assert {'CHAIRi', 'CHAIRs'} <= set(m['CHAIR']) and {'chair_i', 'chair_s'} <= set(m['chair_refs'])
    assert ('METEOR' in m) == (coco_caption.toolkit_missing() is None)
    assert 'SPICE' in m or 'SPICE' in m['not_computed']
    # the results file re-scores to the same numbers (what anyone with the official code can do)
    refs = {im['cocoid']: [s['raw'] for s in im['sentences']] for im in json.loads(open(files['karpathy']).read())[
        'images'] if im['split'] == 'test'}
    again, _ = coco_caption.score(refs, {r['image_id']: r['caption'] for r in results}, meteor=False, spice=False)
    assert again['CIDEr'] == pytest.approx(m['CIDEr'], abs=1e-12)
    report = (out / 'report.md').read_text()
    assert '| metric | all images |' in report and '## Gallery' in report and 'Caption length' in report
    row = json.loads((out / 'generations.jsonl').read_text().splitlines()[0])
    assert len(row['references']) == 5 and 'cider_d' in row
    assert (out / 'thumbs').is_dir()


def test_bench_nocaps_scores_each_domain_without_java(bench_runs):
    p, out = bench_runs[0]['nocaps'], bench_runs[1]['nocaps']
    assert_ok(p)
    m = json.loads((out / 'metrics.json').read_text())
    assert m['tokenizer'] == coco_caption.FALLBACK_TOKENIZER
    # without Java on the PATH, METEOR says what is missing first: the toolkit, else Java
    missing = 'pycocoevalcap' if importlib.util.find_spec('pycocoevalcap') is None else 'no Java'
    assert m['not_computed']['METEOR'].startswith(missing) and 'CHAIR' not in m
    doms = [d for d in benchmarks.DOMAINS if d in m]
    assert len(doms) == 3 and sum(m[d]['images'] for d in doms) == m['images'] == 40
    assert all('CIDEr' in m[d] for d in doms)
    report = (out / 'report.md').read_text()
    assert '| metric | all images | in-domain | near-domain | out-domain |' in report


def test_bench_counts_unreadable_and_missing_images_and_defaults_out(bench_runs):
    p, out = bench_runs[0]['flickr30k'], bench_runs[1]['flickr30k']
    assert_ok(p)
    m = json.loads((out / 'metrics.json').read_text())
    assert m['skipped'] == {'missing_image': 1, 'unreadable_image': 1} and m['images'] == 10
    assert 'skipped' in p.stdout
    assert sorted(r['image_id'] for r in json.loads((out / 'results.json').read_text())) == list(range(1002, 1012))


def test_bench_bad_file_is_one_line(bench_runs):
    assert_one_error_line(bench_runs[0]['bad_file'], 'annotation file', 'not found')
    assert_one_error_line(bench_runs[0]['bad_instances'], 'instances file', 'not found')


def test_evaluate_bench_for_training(demo_run, bench_files):
    """What train.py calls at eval time: a subset, metrics back, nothing written, the
    connector's mode as it was."""
    files, images, _ = bench_files
    vlm, tok, _ = sample.from_checkpoint(str(demo_run / 'ckpt.pt'), torch.device('cpu'), torch.float32)
    vlm.train()
    m = benchmarks.evaluate_bench(vlm, tok, 'coco', files['karpathy'], images, num=8, batch_size=4,
                                  max_new_tokens=16)
    assert vlm.training and m['images'] == 8 and 0 <= m['CIDEr'] <= 10 and 'Bleu_4' in m and 'CHAIR' in m
    assert m['not_computed']['METEOR'] == 'not asked for' and m['seconds'] > 0


def test_bench_scoring_benchmark_runs():
    p = subprocess.run([sys.executable, 'bench.py', 'scoring', '--n', '50'], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert_ok(p)
    assert 'CIDEr-D' in p.stdout and '50 images x 5 references' in p.stdout
