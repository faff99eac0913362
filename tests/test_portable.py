"""
A prepared dataset can move: prepared from an images folder, from images.zip and from tar
shards under tmp/a, then the whole data folder moved to tmp/b, train.py trains from each
(meta.json keeps the image root relative to the prepared folder). A prepared folder moved
away from its images on its own stops with one line naming image_root, and --image_root
fixes it.

$ python -m pytest -q tests/test_portable.py          # train.py runs side by side: ~30 s on 2 cores
"""
import json
import shutil
import zipfile

import prepare_llava as P
from sources import shards
from conftest import assert_ok, assert_one_error_line, read_log, run_scripts_side_by_side, train_args

N = 64  # records: 3 batches of 16 per epoch after the val split


def short_run(prepared, out, *extra):
    return train_args(prepared, out, '--max_iters=4', '--eval_interval=4', '--eval_report_num=0',
                      '--sample_interval=0', '--eval_iters=2', '--log_interval=1', *extra)


def test_moved_data_folder_trains_from_folder_zip_and_shards(synthetic, tmp_path):
    src = synthetic.parent
    records = json.loads((src / 'synthetic.json').read_text())[:N]
    a = tmp_path / 'a'
    a.mkdir()
    pairs = []
    with zipfile.ZipFile(a / 'images.zip', 'w') as zf:
        for r in records:
            raw = (src / 'images' / r['image']).read_bytes()
            (a / 'images' / r['image']).parent.mkdir(parents=True, exist_ok=True)
            (a / 'images' / r['image']).write_bytes(raw)
            zf.writestr(r['image'], raw)
            pairs.append((raw, r['conversations'][1]['value']))
    (a / P.LLAVA_JSON).write_text(json.dumps(records))
    shards.write_shards(str(a / 'tars'), pairs, per_shard=20)
    common = ['--tokenizer=tiny', '--max_dups=0', '--val_ratio=0.1', '--workers=1']
    P.main(['--data_dir', str(a), '--out_dir', str(a / 'p_folder'), *common])
    P.main(['--data_dir', str(a), '--images', str(a / 'images.zip'), '--out_dir', str(a / 'p_zip'), *common])
    P.main(['--shards', str(a / 'tars'), '--out_dir', str(a / 'p_shards'), *common])
    P.main(['--data_dir', str(a), '--out_dir', str(a / 'p_alone'), *common])
    b = tmp_path / 'b'
    shutil.move(str(a), str(b))
    (tmp_path / 'c').mkdir()
    shutil.move(str(b / 'p_alone'), str(tmp_path / 'c' / 'prepared'))  # away from its images
    alone = tmp_path / 'c' / 'prepared'
    jobs = {kind: short_run(b / f'p_{kind}', tmp_path / f'out_{kind}') for kind in ('folder', 'zip', 'shards')}
    jobs['alone'] = short_run(alone, tmp_path / 'out_alone')
    jobs['alone_fixed'] = short_run(alone, tmp_path / 'out_fixed', f'--image_root={b / "images"}')
    done = run_scripts_side_by_side(jobs, timeout=240)
    assert_one_error_line(done['alone'], 'image_root')
    for kind in ('folder', 'zip', 'shards', 'fixed'):
        assert_ok(done['alone_fixed' if kind == 'fixed' else kind])
        log = read_log(tmp_path / f'out_{kind}')
        steps = [r for r in log if 'loss' in r]
        assert [r['iter'] for r in steps] == [1, 2, 3, 4], kind
        assert all(r['bad_images'] == 0 for r in steps), kind  # every image was found and read
        assert any('val_loss' in r for r in log) and (tmp_path / f'out_{kind}' / 'ckpt.pt').exists(), kind
