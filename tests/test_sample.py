"""
Tests of sample.py (the command line) and evaluation/evaluate.py (generation, the evaluation report) on
the CPU demo's checkpoint: captions for a synthetic image and for real photos of any mode,
the exported connector, the report written at the end of training against the untrained
baseline, and the report writer itself.

$ python -m pytest -q tests/test_sample.py
"""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import evaluate, report
import sample
from configurator import resolve_device
from conftest import (ASSETS, assert_ok, assert_one_error_line, asset_photos, image_folder, read_meta,
                      run_scripts_side_by_side)
from sources.images import load_image
from evaluation.metrics import score_rows


def _damaged_copy(synthetic, tmp):
    """The synthetic dataset copied with the image of val sample 0 and of one golden sample
    not among the first val samples deleted: (prepared folder, {deleted val indices})."""
    shutil.copytree(synthetic.parent, tmp / 'data', ignore=shutil.ignore_patterns('tiny_llm'))
    prepared = tmp / 'data' / 'prepared'
    meta = read_meta(prepared)
    index, paths = np.load(prepared / 'val_index.npy'), np.load(prepared / 'image_paths.npy')
    gone = {0, meta['golden'][-1]}
    for i in gone:
        (tmp / 'data' / 'images' / paths[index[i, 2]].decode()).unlink()
    return prepared, gone


@pytest.fixture(scope='module')
def sample_scripts(demo_run, synthetic, tmp_path_factory):
    """sample.py runs side by side: captioning one synthetic image, --eval of the untrained
    connector, a folder with unreadable files, mistakes, and --eval --baseline of a dataset
    with missing images. ({name: CompletedProcess}, folder)."""
    tmp = tmp_path_factory.mktemp('sample')
    img = next(image_folder(synthetic).rglob('*.jpg'))
    mixed, broken = tmp / 'mixed', tmp / 'broken'
    mixed.mkdir()
    broken.mkdir()
    for k, f in enumerate(sorted(image_folder(synthetic).rglob('*.jpg'))[:2]):
        shutil.copy(f, mixed / f'good{k}.{"jpg" if k == 0 else "JPG"}')  # extensions in any case
    (mixed / 'bad.png').write_bytes(b'not a png')
    (mixed / 'notes.txt').write_text('not an image, not picked up')
    (broken / 'bad.jpg').write_bytes(b'\xff\xd8 truncated')
    ck = torch.load(demo_run / 'ckpt.pt', weights_only=True)
    torch.save({'connector': ck['connector']}, tmp / 'no_args.pt')
    damaged, _ = _damaged_copy(synthetic, tmp)
    cpu = ['--device', 'cpu', '--max_new_tokens', '12']
    done = run_scripts_side_by_side({
        'caption': ['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--image', img, '--device', 'cpu',
                    '--max_new_tokens', '24'],
        'untrained': ['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--eval', '--untrained', '--num', '40',
                      '--no_llm_check', '--out', tmp / 'untrained', '--device', 'cpu'],
        'mixed_folder': ['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--image', mixed, *cpu],
        'broken_folder': ['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--image', broken, *cpu],
        'ckpt_is_out_dir': ['sample.py', '--ckpt', demo_run, '--image', img, '--greedy', *cpu],
        'greedy_hot': ['sample.py', '--ckpt', demo_run, '--image', img, '--greedy', '--temperature=5', '--seed=2',
                       *cpu],
        'batch_size_0': ['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--image', img, '--batch_size=0'],
        'top_p_0': ['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--image', img, '--top_p=0'],
        'out_is_a_file': ['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--eval', '--out', img],
        'export_below_a_file': ['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--export', img / 'connector'],
        'ckpt_without_keys': ['sample.py', '--ckpt', tmp / 'no_args.pt', '--image', img, *cpu],
        'eval_damaged': ['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--eval', '--baseline', '--data_dir', damaged,
                         '--num', '24', '--no_llm_check', '--out', tmp / 'damaged', *cpu],
    })
    return done, tmp

# -----------------------------------------------------------------------------
# captions


def test_sample_cli_captions_a_synthetic_image(sample_scripts):
    p = sample_scripts[0]['caption']
    assert_ok(p)
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and len(lines[0].split()) >= 2, p.stdout
    assert sum(w.strip('.,:;?!').isalpha() for w in lines[0].split()) >= 2, lines[0]


def test_sample_real_photos_any_mode(demo_run, capsys):
    """One line per file of a directory (a 200-step tiny model may well answer a photo with an
    immediate eos, so only the synthetic image above must get words), then an RGBA and a
    grayscale file as one Template B prompt."""
    folder = ASSETS / 'images'
    files, picks = asset_photos()
    sample.main(['--ckpt', str(demo_run / 'ckpt.pt'), '--image', str(folder), '--device', 'cpu',
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


def test_export_connector_roundtrip(demo_run, synthetic, tmp_path):
    """--export writes safetensors + JSON; the folder loads and captions the same."""
    out = tmp_path / 'export'
    sample.main(['--ckpt', str(demo_run / 'ckpt.pt'), '--export', str(out)])
    assert sorted(p.name for p in out.iterdir()) == ['connector.safetensors', 'connector_config.json']
    img = str(next(image_folder(synthetic).rglob('*.jpg')))
    device, dtype = resolve_device('cpu')
    caps = []
    for src in (demo_run / 'ckpt.pt', out):
        vlm, tok, _ = sample.from_checkpoint(str(src), device, dtype)
        caps.append(evaluate.caption_batch(vlm, tok, [[load_image(img, vlm.image_spec)]], max_new_tokens=12))
    assert caps[0] == caps[1]

def test_a_folder_with_unreadable_files_captions_the_others(sample_scripts):
    p = sample_scripts[0]['mixed_folder']
    assert_ok(p)
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 2 and all('good' in ln.split(':')[0] for ln in lines), p.stdout
    assert any('good1.JPG' in ln for ln in lines)
    assert 'skipped' in p.stderr and 'bad.png' in p.stderr and 'notes.txt' not in p.stdout + p.stderr


def test_a_folder_of_only_unreadable_files_is_one_line(sample_scripts):
    assert_one_error_line(sample_scripts[0]['broken_folder'], 'could be read')


def test_ckpt_may_be_an_out_dir(sample_scripts):
    p = sample_scripts[0]['ckpt_is_out_dir']
    assert_ok(p)
    assert len([ln for ln in p.stdout.splitlines() if ln.strip()]) == 1


def test_greedy_overrides_temperature_and_seed(sample_scripts):
    """--greedy is argmax decoding whatever --temperature and --seed say."""
    greedy, hot = sample_scripts[0]['ckpt_is_out_dir'], sample_scripts[0]['greedy_hot']
    assert_ok(hot)
    assert hot.stdout == greedy.stdout and hot.stdout.strip()


def test_an_out_dir_means_its_latest_checkpoint(tmp_path):
    """--ckpt OUT_DIR is OUT_DIR/ckpt.pt (the latest), not ckpt_best.pt or another file beside
    it; an exported connector folder is taken as it is; a folder with neither is one line."""
    from configurator import UserError
    for name in ('ckpt_best.pt', 'ckpt_last_good.pt', 'ckpt.pt'):
        (tmp_path / name).write_bytes(b'x')
    assert sample.resolve_checkpoint(str(tmp_path)) == os.path.join(str(tmp_path), 'ckpt.pt')
    (tmp_path / 'exported').mkdir()
    (tmp_path / 'exported' / 'connector_config.json').write_text('{}')
    assert sample.resolve_checkpoint(str(tmp_path / 'exported')) == str(tmp_path / 'exported')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='neither a ckpt.pt'):
        sample.resolve_checkpoint(str(tmp_path / 'empty'))


def test_bad_sample_arguments_are_one_line(sample_scripts):
    assert_one_error_line(sample_scripts[0]['batch_size_0'], 'batch_size')
    assert_one_error_line(sample_scripts[0]['top_p_0'], 'top_p')
    assert_one_error_line(sample_scripts[0]['out_is_a_file'], '--out', 'is a file')  # before the model loads
    assert_one_error_line(sample_scripts[0]['export_below_a_file'], '--export', 'is a file')
    assert_one_error_line(sample_scripts[0]['ckpt_without_keys'], 'model_args')

# -----------------------------------------------------------------------------
# the evaluation report


def test_eval_report_of_training(demo_run):
    """The report written at the end of training: files exist, the markdown links resolve,
    the frozen LLM check passes."""
    rep = demo_run / 'report'
    md = (rep / 'report.md').read_text()
    for link in re.findall(r'\]\(([^)]+)\)', md):
        assert (rep / link).exists(), link
    m = json.loads((rep / 'metrics.json').read_text())
    assert m['llm_untouched']['ok'] and m['val']['n_captions'] >= 40 and m['qa']['n_qa'] > 0
    rows = [json.loads(line) for line in (rep / 'generations.jsonl').read_text().splitlines()]
    assert any(r['id'].startswith('golden/') for r in rows) and any('answers' in r for r in rows)


def test_trained_connector_beats_the_untrained_one(demo_run, sample_scripts):
    """sample.py --eval --untrained: the trained connector wins on val loss and CIDEr-D."""
    done, tmp = sample_scripts
    assert_ok(done['untrained'])
    m = json.loads((demo_run / 'report' / 'metrics.json').read_text())
    base = json.loads((tmp / 'untrained' / 'metrics.json').read_text())
    assert base['val']['loss'] > m['val']['loss'] + 1.0
    assert base['val']['cider_d'] < m['val']['cider_d']


def test_unreadable_val_images_are_skipped_and_counted(sample_scripts, synthetic):
    """A val image and a golden image deleted after prepare: the evaluation still finishes,
    the rows are skipped and counted, for the trained and the untrained connector."""
    done, tmp = sample_scripts
    assert_ok(done['eval_damaged'])
    m = json.loads((tmp / 'damaged' / 'metrics.json').read_text())
    assert m['val']['skipped_rows'] == 1 and m['val']['skipped_samples'] == 1 and m['val']['n_captions'] == 23
    assert m['baseline']['val']['skipped_rows'] == 1
    assert 'skipped' in done['eval_damaged'].stdout
    golden = read_meta(synthetic)['golden']
    ids = [json.loads(line)['id'] for line in (tmp / 'damaged' / 'generations.jsonl').read_text().splitlines()]
    assert f'golden/{golden[-1]}' not in ids and 'val/0' not in ids and 'golden/0' not in ids


def test_report_shows_baseline_side_by_side_and_the_loss_curve(sample_scripts):
    done, tmp = sample_scripts
    md = (tmp / 'damaged' / 'report.md').read_text()
    assert '| metric | trained | untrained |' in md
    row = next(ln for ln in md.splitlines() if ln.startswith('| val.loss |'))
    trained, untrained = (float(x) for x in row.strip('|').split('|')[1:3])
    assert untrained > trained + 1.0  # the two columns really are two connectors
    assert '![train and val loss against step, val also with shuffled images and with no image](loss.png)' in md
    with Image.open(tmp / 'damaged' / 'loss.png') as im:
        assert im.size[0] >= 400 and len(np.unique(np.asarray(im.convert('RGB')).reshape(-1, 3), axis=0)) > 10


def test_golden_rows_are_not_duplicated(demo_run, synthetic):
    """The golden samples come from the val split: each is captioned and shown once, and the
    report has no second table of the same rows."""
    rows = [json.loads(line) for line in (demo_run / 'report' / 'generations.jsonl').read_text().splitlines()]
    ids = [r['id'] for r in rows]
    assert len(ids) == len(set(ids))
    golden = {f'{i}' for i in read_meta(synthetic)['golden']}
    shown = [i.split('/')[1] for i in ids if i.startswith(('val/', 'golden/'))]
    assert len(shown) == len(set(shown)) and golden <= set(shown)
    m = json.loads((demo_run / 'report' / 'metrics.json').read_text())
    assert 'golden' not in m  # all golden samples are among the val rows scored once


def test_golden_samples_beyond_num_are_captioned_too(sample_scripts, synthetic):
    """--num 40 scores the first 40 val samples; the golden set spans the whole val split, and
    the golden samples past the first 40 are captioned and scored as well."""
    golden = read_meta(synthetic)['golden']
    assert any(i >= 40 for i in golden)
    out = sample_scripts[1] / 'untrained'
    ids = [json.loads(line)['id'] for line in (out / 'generations.jsonl').read_text().splitlines()]
    assert [i for i in ids if i.startswith('golden/')] == [f'golden/{i}' for i in golden]
    m = json.loads((out / 'metrics.json').read_text())
    assert m['val']['n_captions'] == 40 and m['golden']['n_captions'] == len(golden)


def test_sampling_is_reproducible_from_the_seed(demo_run, synthetic, capsys):
    """Sampled captions (temperature > 0) are a function of --seed: the same seed gives the
    same captions, another seed others, and --num_samples gives different samples."""
    img = str(sorted(image_folder(synthetic).rglob('*.jpg'))[0])

    def captions(seed):
        sample.main(['--ckpt', str(demo_run / 'ckpt.pt'), '--image', img, '--device', 'cpu', '--max_new_tokens', '12',
                     '--temperature', '3', '--num_samples', '3', f'--seed={seed}'])
        return capsys.readouterr().out
    first = captions(3)
    assert len(first.splitlines()) == 3 and captions(3) == first
    assert len(set(first.splitlines())) > 1  # the samples of one run are three draws, not one draw three times
    assert captions(4) != first


def test_write_report(tmp_path):
    img_dir = tmp_path / 'images'
    img_dir.mkdir()
    Image.new('RGB', (640, 480), (200, 30, 30)).save(img_dir / 'red.jpg')
    Image.new('L', (50, 300), 128).save(img_dir / 'grey.png')
    (img_dir / 'broken.jpg').write_bytes(b'not a jpeg')
    rows = [
        {'id': 'r0', 'image': str(img_dir / 'red.jpg'), 'prompt': '<image>\nDescribe the image.',
         'generation': 'A red square.', 'references': ['A red square on a white background.']},
        {'id': 'r|1', 'image': str(img_dir / 'grey.png'), 'prompt': 'p',
         'generation': 'A grey bar with a dog.', 'references': ['A grey rectangle.']},
        {'id': 'r2', 'image': str(img_dir / 'missing.jpg'), 'prompt': 'p',
         'generation': 'Nothing.', 'references': ['A blue circle.']},
        {'id': 'r3', 'image': str(img_dir / 'broken.jpg'), 'prompt': 'p',
         'generation': 'A cat.', 'references': ['A cat.']},
        {'id': 'r4', 'pil': Image.new('RGBA', (300, 300), (0, 0, 255, 128)), 'prompt': 'p',
         'generation': 'A blue circle.', 'references': ['A blue circle.']},
        {'id': 'q0', 'image': [str(img_dir / 'red.jpg'), str(img_dir / 'grey.png')],
         'prompt': 'What is in the image?', 'generation': 'a red square', 'answers': ['red square']},
    ]
    metrics = {'val': score_rows(rows[:5]), 'qa': score_rows(rows[5:]), 'llm_untouched': True}
    out = tmp_path / 'report'
    path = report.write_report(str(out), rows, metrics)
    assert path == str(out / 'report.md')

    lines = (out / 'generations.jsonl').read_text().splitlines()
    assert len(lines) == len(rows)
    first = json.loads(lines[0])
    assert list(first)[:5] == ['id', 'image', 'prompt', 'generation', 'references']
    assert {'bleu4', 'cider_d', 'hallucinated'} <= set(first)
    assert json.loads(lines[1])['hallucinated'] == ['dog']
    assert json.loads(lines[4])['image'] is None and 'pil' not in json.loads(lines[4])
    assert json.loads(lines[5])['exact'] is True

    md = (out / 'report.md').read_text()
    assert 'val.cider_d' in md and 'val.bleu4' in md and 'qa.qa_exact' in md and 'llm_untouched' in md
    assert 'Caption length in words: val.length' in md
    assert 'r\\|1' in md  # a pipe in a cell must not split the table row
    links = re.findall(r'!\[[^\]]*\]\(([^)]+)\)', md)
    # red, grey, the PIL image, and both images of the two-image row; missing/broken skipped
    assert len(links) == 5
    for link in links:
        assert not os.path.isabs(link) and link.startswith('thumbs/')
        with Image.open(out / link) as im:
            assert im.format == 'JPEG' and max(im.size) == 128
    assert sorted(os.listdir(out / 'thumbs')) == sorted(os.path.basename(l) for l in links)
