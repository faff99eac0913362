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

from conftest import (TINY_ARGS, TINY_CONFIG, assert_ok, assert_one_error_line, build_tiny, read_log,
                      run_script, run_scripts_side_by_side, sha, train_args)

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
    assert {k: ck['model_args'][k] for k in ('vision', 'tokenizer', 'n_latents')} == \
        {k: TINY_ARGS[k] for k in ('vision', 'tokenizer', 'n_latents')}
    assert ck['model_args']['llm'].endswith('tiny_llm')  # the pretrained tiny LLM, loaded from its folder
    assert set(ck['connector']) == set(build_tiny()[0].connector.state_dict())  # only the connector is saved
    assert (demo_run / 'ckpt_best.pt').exists()

def test_demo_alignment_uses_the_image(demo_run):
    """With the pretrained frozen tiny LLM, the aligned connector's captions cost far less with
    the right image than with another sample's image or with none: the LLM reads the image."""
    m = json.loads((demo_run / 'report' / 'metrics.json').read_text())['val']
    # measured: 0.89 vs 1.23 shuffled and 1.05 without an image after 200 steps (the full
    # demo, 1,000 steps: 0.51 vs 1.73 and 0.96)
    assert m['loss'] < m['loss_shuffled_images'] - 0.2, m
    assert m['loss'] < m['loss_no_image'] - 0.05, m

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

# -----------------------------------------------------------------------------
# The one-shot GPU check, rehearsed on the CPU with the tiny backbones. Its train.py runs are
# the bf16 path a GPU takes (bf16 backbones, compiled blocks, golden sampling, the report, a
# resume), and sample.py then captions and evaluates with their checkpoint, also in bf16.


@pytest.fixture(scope='module')
def gpu_check(tmp_path_factory):
    """`python bench.py gpu --tiny`: every part, on its own LCS-like data, through train.py;
    then side by side, sample.py on an image and sample.py --eval with its bf16 checkpoint.
    (CompletedProcess, out dir, gpu_check.json, {name: CompletedProcess})."""
    out = tmp_path_factory.mktemp('gpu_check')
    p = run_script(['bench.py', 'gpu', '--tiny', '--out_dir', out], timeout=900)
    check = json.loads((out / 'gpu_check.json').read_text())
    img = sorted((out / 'data' / 'images').iterdir())[0]
    done = run_scripts_side_by_side({
        'caption': ['sample.py', '--ckpt', out / 'train' / 'ckpt.pt', '--image', img, '--device=cpu',
                    '--dtype=bfloat16', '--greedy', '--max_new_tokens=8'],
        'eval': ['sample.py', '--ckpt', out / 'train', '--eval', '--device=cpu', '--dtype=bfloat16', '--num=8',
                 '--max_new_tokens=8', '--out', out / 'eval']}) if p.returncode == 0 else {}
    return p, out, check, done


def test_bf16_training_samples_golden_and_writes_the_report(gpu_check):
    p, out, _, _ = gpu_check
    assert_ok(p)
    assert 'frozen (bfloat16' in (out / 'train' / 'train.log').read_text()  # bf16 backbones, as on a GPU
    samples = [json.loads(line) for line in (out / 'train' / 'samples.jsonl').read_text().splitlines()]
    assert {r['iter'] for r in samples} == {4, 8, 12} and all(isinstance(r['generation'], str) for r in samples)
    m = json.loads((out / 'train' / 'report' / 'metrics.json').read_text())
    assert math.isfinite(m['val']['loss']) and m['val']['n_captions'] == 12 and m['llm_untouched']['ok']


def test_bf16_resume_continues(gpu_check):
    _, out, check, _ = gpu_check
    assert check['resume_ok']
    iters = [r['iter'] for r in read_log(out / 'eager') if 'loss' in r]
    assert iters == list(range(2, 17, 2)), iters  # one record per log step, the resumed ones included
    assert torch.load(out / 'eager' / 'ckpt.pt', weights_only=True)['iter_num'] == 16


def test_bf16_sample_and_eval(gpu_check):
    _, out, _, done = gpu_check
    assert_ok(done['caption'])
    assert len([ln for ln in done['caption'].stdout.splitlines() if ln.strip()]) == 1
    assert_ok(done['eval'])
    m = json.loads((out / 'eval' / 'metrics.json').read_text())
    assert m['val']['n_captions'] == 8 and math.isfinite(m['val']['loss'])


def test_gpu_check_times_train_py_compiled_on_realistic_data(gpu_check):
    """The headline numbers are train.py's own: the real run's config with compile=True on
    length-grouped, LCS-like data, with evals, golden sampling and the report; the compiled
    blocks stay compiled (a handful of recompiles at most, no limit hit)."""
    p, out, check, _ = gpu_check
    assert_ok(p)
    assert check['status'] == 'done' and check['train']['ok'] and check['train']['report'], check['train']
    run = check['runs'][0]
    assert run['config'].startswith('batch 4, compile=True') and run['samples_per_s'] > 0 and run['steps'] >= 4
    assert 0 <= run['data_wait'] < 1 and run['recompiles'] is not None and run['recompiles'] <= 2
    assert not check['train']['limit_hit'] and check['train']['evals'] >= 3
    log = read_log(out / 'train')
    assert {r['samples_per_s'] > 0 for r in log if 'loss' in r} == {True} and (out / 'train' / 'samples.jsonl').exists()
    # the data looks like LCS-558K: caption lengths spread (not all one length), images of a few hundred pixels
    meta = json.loads((out / 'data' / 'prepared' / 'meta.json').read_text())
    import numpy as np
    lens = np.load(out / 'data' / 'prepared' / 'train_index.npy')[:, 1]
    assert 12 <= lens.mean() <= 19 and lens.min() >= 5 and lens.max() > 25 and meta['splits']['val'] > 0
    sizes = {Image.open(f).size for f in list((out / 'data' / 'images').iterdir())[:20]}
    assert len(sizes) > 5 and all(256 <= min(s) and max(s) <= 640 for s in sizes)


def test_gpu_check_runs_every_part(gpu_check):
    p, out, check, _ = gpu_check
    configs = [r['config'] for r in check['runs']]
    assert any('eager, resumed' in c for c in configs) and check['resume_ok']
    assert any('packed' in c for c in configs) and any('grad_ckpt' in c for c in configs)
    # under torchrun, one rank: DDP around the compiled connector, the gathers, golden samples
    assert any('torchrun 1 rank' in c for c in configs) and check['ddp']['ok'], check['ddp']
    assert 'under torchrun: ok' in p.stdout
    # the data's worst batch (two images, longest captions) at each size, and a safe batch
    assert [r['batch'] for r in check['worst_case']] == [2, 4] and check['safe_batch'] == 4
    # FP8 against bf16, forward and input gradient, per-tensor and per-row scales
    assert {r['gemm'] for r in check['fp8']} == {'forward', 'input grad'}
    assert all(r['ratio_tensor'] > 0 and r['rel_err_row'] < 0.1 for r in check['fp8'])
    # self time: each op's own time, so the profile adds up to about the steps' wall time (one
    # thread), where summing nested ops' total times would count linear > mm > kernel over again
    assert check['profile'] and check['profile_total_ms'] <= 1.5 * check['profile_wall_ms'], check['profile'][:3]
    assert '| train.py run | samples/s |' in p.stdout and 'FP8 per-row' in p.stdout and check['torch']


def test_a_killed_gpu_check_leaves_what_it_measured(gpu_check, tmp_path):
    """gpu_check.json is rewritten after every part: a check killed in the middle (an
    overrun, a scheduler) leaves valid JSON with the numbers measured so far."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ENV, ROOT
    shutil.copytree(gpu_check[1] / 'data', tmp_path / 'data')  # its data: made once per out_dir
    p = subprocess.Popen([sys.executable, 'bench.py', 'gpu', '--tiny', '--parts', 'fp8,worst', '--out_dir',
                          str(tmp_path)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path, t0 = tmp_path / 'gpu_check.json', time.time()
    try:
        while time.time() - t0 < 300:
            out = json.loads(path.read_text()) if path.exists() else {}  # never a torn file: written atomically
            if out.get('fp8'):
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    out = json.loads(path.read_text())
    assert out['status'] == 'running' and out['fp8'][0]['bf16_ms'] > 0 and out['runs'] == []


def test_gpu_check_reruns_only_the_parts_asked_for(gpu_check, tmp_path):
    shutil.copytree(gpu_check[1] / 'data', tmp_path / 'data')
    p = run_script(['bench.py', 'gpu', '--tiny', '--parts', 'packed', '--batch_size', '2', '--out_dir', tmp_path],
                   timeout=300)
    assert_ok(p)
    out = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert [r['config'] for r in out['runs']] == ['batch 2, packed (train.py)'], out['notes']
    assert out['worst_case'] == [] and out['fp8'] == [] and 'train' not in out and out['status'] == 'done'
    assert 'train.py end to end: not run' in p.stdout


def test_gpu_profile_counts_each_kernel_once():
    """On a GPU the profiler lists each kernel as an event of its own and also inside the self
    device time of the op that launched it: only the ops are summed, or the profile adds up to
    more than the steps took (1.5x on an H200)."""
    from types import SimpleNamespace
    from torch.autograd import DeviceType
    from gpu import check

    def ev(key, us, device_type=DeviceType.CPU):
        return SimpleNamespace(key=key, self_device_time_total=us, count=1, device_type=device_type)
    events = [ev('ProfilerStep#2', 0), ev('aten::mm', 600), ev('aten::mul', 300),
              ev('aten::_cudnn_attention_forward', 100), ev('nvjet_sm90_gemm', 600, DeviceType.CUDA),
              ev('elementwise_kernel', 300, DeviceType.CUDA)]
    prof = SimpleNamespace(key_averages=lambda: events)
    ops, total_ms, kernel = check.top_ops(prof, torch.device('cuda'))
    assert total_ms == pytest.approx(1.0) and [o['op'] for o in ops] == ['aten::mm', 'aten::mul',
                                                                         'aten::_cudnn_attention_forward']
    assert ops[0]['share'] == pytest.approx(0.6) and kernel == 'cudnn'
    assert check.attention_kernel(['aten::_scaled_dot_product_flash_attention_for_cpu', 'aten::mm']) == 'flash'
    assert check.attention_kernel(['aten::mm']) == 'no SDPA op seen'


def test_bench_passes_what_follows_double_dash_to_train():
    """`python bench.py align -- --max_iters=800`: argparse alone rejects what follows '--'
    once the first positional has matched; bench.py splits it off for train.py."""
    p = run_script(['bench.py', 'params', '--', '--max_iters=800', '--eval_interval=100'], timeout=300)
    assert_ok(p)
    assert 'FLOPs' in p.stdout, p.stdout[-500:]
