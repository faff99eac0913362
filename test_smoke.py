"""
Smoke tests: the behaviour a user relies on end to end, on tiny random backbones, offline,
on CPU. The other test_<module>.py files test each module; shared fixtures and helpers are in
conftest.py.

$ python -m pytest -q test_smoke.py          # about a minute on 2 CPU cores
$ python -m pytest -q                        # every test, a few minutes

The dataset is the synthetic one the CPU demo uses (prepare_llava.py --synthetic), built once
per session. Scripts (train.py, sample.py) run as subprocesses: the behaviour under test is
the script's: exit codes, checkpoints, log.jsonl, one `error:` line.
"""
import json
import math
import shutil

import pytest
import torch
from PIL import Image

from conftest import (TINY_ARGS, TINY_CONFIG, assert_one_error_line, build_tiny, read_log, run_scripts_side_by_side,
                      sha, train_args)

# -----------------------------------------------------------------------------
# the CPU demo learns


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

# -----------------------------------------------------------------------------
# clear errors, never a traceback, never lost work


@pytest.fixture(scope='module')
def script_errors(demo_run, synthetic, tmp_path_factory):
    """Five mistakes run side by side (each process is short; together they share the cores):
    ({name: CompletedProcess}, folder, {out_dir: checkpoint hash before})."""
    tmp = tmp_path_factory.mktemp('errors')
    ckpt = demo_run / 'ckpt.pt'
    corrupt, other = tmp / 'corrupt', tmp / 'other'
    corrupt.mkdir()
    other.mkdir()
    raw = ckpt.read_bytes()
    (corrupt / 'ckpt.pt').write_bytes(raw[:len(raw) // 2])
    shutil.copy(ckpt, other / 'ckpt.pt')
    before = {d: sha(d / 'ckpt.pt') for d in (corrupt, other)}
    Image.new('RGB', (32, 32), (200, 10, 10)).save(tmp / 'x.png')
    done = run_scripts_side_by_side({
        'missing': ['train.py', TINY_CONFIG, f'--data_dir={tmp / "nope"}', f'--out_dir={tmp / "o"}'],
        'corrupt': train_args(synthetic, corrupt, '--init_from=resume'),
        'latents': train_args(synthetic, other, '--init_from=resume', '--n_latents=8'),
        'typo': ['train.py', TINY_CONFIG, '--learnig_rate=1e-3'],
        'sample': ['sample.py', '--ckpt', corrupt / 'ckpt.pt', '--image', tmp / 'x.png'],
    }, timeout=180)
    return done, tmp, before


def test_missing_data_is_one_line_and_creates_nothing(script_errors):
    done, tmp, _ = script_errors
    assert_one_error_line(done['missing'], 'nope')
    assert not (tmp / 'o').exists()  # failed before creating anything


def test_corrupt_checkpoint_resume_is_one_line(script_errors):
    assert_one_error_line(script_errors[0]['corrupt'], 'ckpt.pt')


def test_resume_with_another_model_config_is_one_line(script_errors):
    assert_one_error_line(script_errors[0]['latents'], 'n_latents')


def test_config_typo_names_the_closest_key(script_errors):
    assert_one_error_line(script_errors[0]['typo'], "'learning_rate'")


def test_sample_with_corrupt_checkpoint_is_one_line(script_errors):
    assert_one_error_line(script_errors[0]['sample'])


def test_failed_runs_leave_the_checkpoint_untouched(script_errors):
    _, _, before = script_errors
    for d, h in before.items():
        assert sha(d / 'ckpt.pt') == h  # the checkpoint is left untouched
        assert not (d / 'log.jsonl').exists()
