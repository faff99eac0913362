"""
Tests of train.py, run as a script on the CPU demo config: DDP over two processes equals one
process (updates and val loss), gradient accumulation equals one big batch, grad_clip=0 means
no clipping, non-finite steps are skipped, then stop the run; every bad setting is one line
before any work; a checkpoint write that fails leaves the old checkpoint; damaged images are
counted (between log lines and across a resume) and a golden image that cannot be read is a
warning, not the end of the run. Stopping and resuming: test_resume.py.

$ python -m pytest -q tests/test_train.py          # about a minute and a half on 2 CPU cores
"""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
from evaluation import benchmarks
from conftest import (CFG, ENV, ROOT, assert_ok, assert_one_error_line, image_folder, load_prepared,
                      popen_script, read_log, read_meta, run_script, run_scripts_side_by_side, sha, train_args)

# -----------------------------------------------------------------------------
# DDP and gradient accumulation


def test_ddp_two_processes(synthetic, tmp_path):
    """2 ranks x batch_size 4 with total_batch_size=16 (two micro-batches per rank
    per step: the first without gradient sync, the last with it) sees exactly the data of one
    process with batch_size 4 and 4 accumulation steps: rank r takes global micro-batches r,
    r+2, ... and the single process takes 0, 1, 2, ... The single process averages the four
    micro-batch gradients; DDP must all-reduce them across ranks. So the checkpoint rank 0
    writes equals the single-process one only if the gradients were synchronised every step,
    with every micro-batch's share -- an unsynchronised rank 0 would have trained on half the
    data. Both ranks start from rank 0's weights (DDP broadcasts them) and apply
    the same averaged gradients, so matching rank 0 means the ranks stay identical. Per-step
    grad norms (computed after the all-reduce) must match too. The val batches are split over
    the ranks (3 batches: 2 on rank 0, 1 on rank 1) and the sums all-reduced, so the val losses
    and the caption tokens they are measured on equal the single process's too."""
    common = ['--max_iters=4', '--eval_interval=4', '--log_interval=1', '--eval_iters=3', '--batch_size=4',
              '--total_batch_size=16', '--multi_image_frac=0.0']
    ddp_out, one_out = tmp_path / 'ddp', tmp_path / 'one'
    one = popen_script(train_args(synthetic, one_out, *common, '--eval_report_num=0'), tmp_path / 'one.txt')
    ddp = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          *map(str, train_args(synthetic, ddp_out, *common))],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert one.wait(300) == 0, (tmp_path / 'one.txt').read_text()[-2000:]
    assert_ok(ddp)
    files = sorted(p.name for p in ddp_out.iterdir())
    assert files.count('ckpt.pt') == 1 and not any(f.endswith('.tmp') for f in files), files
    log = read_log(ddp_out)
    assert [r['iter'] for r in log if 'loss' in r] == [1, 2, 3, 4]  # rank 0 logs, once per step
    a = torch.load(ddp_out / 'ckpt.pt', weights_only=True)
    b = torch.load(one_out / 'ckpt.pt', weights_only=True)
    assert len(a['rng']) == 2 and a['iter_num'] == 4  # both ranks' RNG states were gathered
    assert not torch.equal(a['rng'][0]['cpu'], a['rng'][1]['cpu'])  # each rank its own dropout stream
    assert a['global_pos'] == b['global_pos'] == 16  # micro-batches of all ranks: resumable on any world size
    for n in b['connector']:
        torch.testing.assert_close(a['connector'][n], b['connector'][n], atol=1e-5, rtol=0)
    ga = [r['grad_norm'] for r in log if 'loss' in r]
    gb = [r['grad_norm'] for r in read_log(one_out) if 'loss' in r]
    assert min(ga) > 0.1  # real updates happened, so equal weights after 4 steps mean something
    assert ga == pytest.approx(gb, abs=1e-5)
    va = [(r['iter'], r['val_loss'], r['val_tokens']) for r in log if 'val_loss' in r]
    vb = [(r['iter'], r['val_loss'], r['val_tokens']) for r in read_log(one_out) if 'val_loss' in r]
    assert [r[0] for r in va] == [r[0] for r in vb] == [0, 4]
    assert [r[1] for r in va] == pytest.approx([r[1] for r in vb], abs=1e-5)
    assert [r[2] for r in va] == [r[2] for r in vb] and va[0][2] > 0  # each val batch once, over both ranks
    # resumed, each rank continues its own RNG stream (not rank 0's). The last eval also
    # captions the golden set and a benchmark subset, each rank its share: under a short
    # collective timeout no rank may wait while another captions everything
    files = benchmarks.write_synthetic(str(synthetic.parent), str(tmp_path / 'bench'))
    again = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                            *map(str, train_args(synthetic, ddp_out, *common, '--init_from=resume', '--max_iters=5',
                                                 '--sample_interval=5', '--eval_bench=coco', '--eval_bench_num=40',
                                                 f'--eval_bench_ann={files["karpathy"]}', '--ddp_timeout=20',
                                                 f'--eval_bench_images={synthetic.parent / "images"}'))],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert_ok(again)
    c = torch.load(ddp_out / 'ckpt.pt', weights_only=True)
    assert c['iter_num'] == 5 and not torch.equal(c['rng'][0]['cpu'], c['rng'][1]['cpu'])
    golden = [json.loads(line) for line in (ddp_out / 'samples.jsonl').read_text().splitlines()]
    meta = read_meta(synthetic)
    assert [r['id'] for r in golden] == [f'golden/{i}' for i in meta['golden']]  # both ranks' shares, in order
    bench = [r for r in read_log(ddp_out) if 'bench' in r]
    assert len(bench) == 1 and bench[0]['iter'] == 5 and bench[0]['bench_images'] == 40 and 'warning' not in again.stdout


def test_gradient_accumulation_equals_one_big_batch(synthetic, tmp_path):
    """batch 16 x accum 1 and batch 8 x accum 2 see the same 16 samples per step (random,
    ungrouped order); the loss is normalised by the caption tokens of the whole step, so the
    updates are the same even though the two halves hold different numbers of tokens."""
    common = ['--max_iters=3', '--eval_interval=3', '--log_interval=1', '--eval_iters=1', '--multi_image_frac=0.0',
              '--group_by_length=False', '--eval_report_num=0', '--sample_interval=0']
    big, small = tmp_path / 'big', tmp_path / 'small'
    pa = popen_script(train_args(synthetic, big, '--batch_size=16', '--total_batch_size=16', *common),
                      tmp_path / 'big.txt')
    assert_ok(run_script(train_args(synthetic, small, '--batch_size=8', '--total_batch_size=16', *common)))
    assert pa.wait(300) == 0, (tmp_path / 'big.txt').read_text()[-2000:]
    la = [r['loss'] for r in read_log(big) if 'loss' in r]
    lb = [r['loss'] for r in read_log(small) if 'loss' in r]
    assert la == pytest.approx(lb, abs=1e-5)
    a = torch.load(big / 'ckpt.pt', weights_only=True)['connector']
    b = torch.load(small / 'ckpt.pt', weights_only=True)['connector']
    for n in a:  # Adam amplifies float-order noise where v is tiny: 1e-4, not exact
        torch.testing.assert_close(a[n], b[n], atol=1e-4, rtol=1e-3)

# -----------------------------------------------------------------------------
# non-finite steps


def test_nonfinite_steps_are_skipped_then_stop(synthetic, tmp_path):
    """An exploding run: non-finite steps are skipped and logged; max_nonfinite in a row stop
    the run with one clear line and a checkpoint of the last state."""
    out = tmp_path / 'nf'
    p = run_script(train_args(synthetic, out, '--learning_rate=1e30', '--max_nonfinite=2', '--max_iters=20',
                              '--log_interval=1', '--eval_interval=100', '--eval_report_num=0'))
    line = assert_one_error_line(p, 'non-finite')
    assert 'ckpt_last_good.pt' in line and (out / 'ckpt_last_good.pt').exists()
    skipped = [r for r in read_log(out) if r.get('skipped') == 'non-finite']
    assert len(skipped) == 2
    ck = torch.load(out / 'ckpt_last_good.pt', weights_only=True)
    assert ck['nonfinite_total'] == 2

# -----------------------------------------------------------------------------
# grad_clip


def test_grad_clip_zero_means_no_clipping(synthetic, tmp_path):
    """grad_clip=0 is "no clipping": the same steps as a clip too large to bite (1e9), while
    a clip that bites (1e-6) changes them."""
    common = ['--max_iters=4', '--eval_interval=4', '--log_interval=1', '--eval_iters=1', '--eval_report_num=0',
              '--sample_interval=0']
    clips = ('0', '1e9', '1e-6')
    done = run_scripts_side_by_side({c: train_args(synthetic, tmp_path / c, f'--grad_clip={c}', *common)
                                     for c in clips})
    loss = {}
    for c in clips:
        assert_ok(done[c])
        loss[c] = [r['loss'] for r in read_log(tmp_path / c) if 'loss' in r]
    assert loss['0'] == loss['1e9'] and len(loss['0']) == 4
    assert loss['1e-6'][0] == loss['0'][0]  # the first step's loss is computed before any update
    assert max(abs(a - b) for a, b in zip(loss['1e-6'][1:], loss['0'][1:])) > 1e-3, loss

# -----------------------------------------------------------------------------
# the run's length, its last eval, the best checkpoint, what is decayed

SHORT = ['--max_iters=-1', '--epochs=1.25', '--max_train_samples=64', '--batch_size=8',
         '--total_batch_size=16',
         '--eval_interval=2', '--log_interval=1', '--eval_iters=2', '--sample_interval=0', '--eval_report_num=0']


@pytest.fixture(scope='module')
def short_run(synthetic, tmp_path_factory):
    """64 samples, 8 x 2 per step: 4 steps an epoch, 1.25 epochs = 5 steps, evals every 2. Then
    a copy resumed to step 9 from a checkpoint whose best val loss (0.0) no eval can beat.
    (out_dir, resumed out_dir, sha256 of the copy's ckpt_best.pt before the resume)."""
    tmp = tmp_path_factory.mktemp('short')
    out, again = tmp / 'out', tmp / 'again'
    assert_ok(run_forked({'first': train_args(synthetic, out, *SHORT)}, tmp)['first'])
    shutil.copytree(out, again)
    ckpt = torch.load(again / 'ckpt.pt', weights_only=True)
    ckpt['best_val_loss'] = 0.0
    torch.save(ckpt, again / 'ckpt.pt')
    best_before = sha(again / 'ckpt_best.pt')
    done = run_forked({'resumed': [*train_args(synthetic, again, *SHORT), '--init_from=resume', '--max_iters=9']}, tmp)
    assert_ok(done['resumed'])
    return out, again, best_before


@pytest.fixture(scope='module')
def eval_runs(synthetic, tmp_path_factory):
    """Side by side: a dataset with no val split (--val_ratio=0) alone and in a mixture, and
    the eval at step 0 with the connector's dropout on and off. {name: (result, out_dir)}."""
    tmp = tmp_path_factory.mktemp('evals')
    import prepare_llava as P
    P.main(['--synthetic=60', f'--data_dir={tmp / "noval"}', '--val_ratio=0', '--llm=none', '--workers=1'])
    noval = tmp / 'noval' / 'prepared'
    run = ['--max_iters=4', '--eval_interval=2', '--log_interval=1', '--eval_iters=2', '--sample_interval=0',
           '--batch_size=8']
    jobs = {'alone': train_args(noval, tmp / 'alone', *run, '--eval_report_num=8', '--eval_max_new_tokens=4'),
            'mixture': train_args(f'{synthetic}:1.0,{noval}:1.0', tmp / 'mixture', *run, '--eval_report_num=0'),
            'dropout': train_args(synthetic, tmp / 'dropout', '--max_iters=0', '--proj_dropout=0.5', '--eval_iters=3',
                                  '--eval_report_num=0'),
            'no_dropout': train_args(synthetic, tmp / 'no_dropout', '--max_iters=0', '--proj_dropout=0.0',
                                     '--eval_iters=3', '--eval_report_num=0')}
    return {k: (p, tmp / k) for k, p in run_forked(jobs, tmp).items()}


def test_no_val_split_means_no_val_loss(eval_runs):
    """A dataset prepared without a val split: said once, no val record (never a loss of 0),
    no ckpt_best.pt, but ckpt.pt at every eval and a report whose val metrics are 'not measured'."""
    p, out = eval_runs['alone']
    assert_ok(p)
    assert p.stdout.count('no val split') == 1 and 'val loss 0.0000' not in p.stdout
    assert not [r for r in read_log(out) if 'val_loss' in r]
    assert (out / 'ckpt.pt').exists() and not (out / 'ckpt_best.pt').exists()
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 4
    m = json.loads((out / 'report' / 'metrics.json').read_text())
    assert m['val']['loss'] is None and 'cider_d' not in m['val']
    assert 'not measured' in (out / 'report' / 'report.md').read_text()


def test_a_mixture_source_without_val_has_no_val_loss(eval_runs, synthetic):
    p, out = eval_runs['mixture']
    assert_ok(p)
    evals = [r for r in read_log(out) if 'val_loss' in r]
    assert [r['iter'] for r in evals] == [0, 2, 4]
    assert all(list(r['val_loss_by_source']) == [data.source_name(str(synthetic))] for r in evals)
    assert p.stdout.count('no val split in noval') == 1


def test_the_val_loss_is_measured_without_dropout(eval_runs):
    """The connector is in eval mode while the val loss is measured: with proj_dropout=0.5 the
    step-0 val loss and its controls equal those of the same connector without dropout."""
    (p, out), (q, ref) = eval_runs['dropout'], eval_runs['no_dropout']
    assert_ok(p), assert_ok(q)
    a, b = (next(r for r in read_log(o) if 'val_loss' in r) for o in (out, ref))
    for key in ('val_loss', 'val_loss_shuffled', 'val_loss_no_image'):
        assert a[key] == b[key], (key, a, b)


def test_epochs_count_optimizer_steps(short_run):
    log = [r for r in read_log(short_run[0]) if 'loss' in r]
    assert [r['iter'] for r in log] == [1, 2, 3, 4, 5]
    assert log[-1]['epoch'] == pytest.approx(1.25)


def test_the_last_step_is_evaluated_and_saved(short_run):
    """max_iters need not be a multiple of eval_interval: the run still ends with an eval and
    a checkpoint of the final connector."""
    out, again, _ = short_run
    assert [r['iter'] for r in read_log(out) if 'val_loss' in r] == [0, 2, 4, 5]
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 5
    assert [r['iter'] for r in read_log(again) if 'val_loss' in r] == [0, 2, 4, 5, 6, 8, 9]


def test_ckpt_best_holds_the_lowest_val_loss_of_the_run(short_run):
    out, again, best_before = short_run
    val = {r['iter']: r['val_loss'] for r in read_log(out) if 'val_loss' in r}
    best = torch.load(out / 'ckpt_best.pt', weights_only=True)
    at = min((i for i in val if i > 0), key=val.get)
    assert best['iter_num'] == at and best['best_val_loss'] == pytest.approx(min(val.values()))
    # resumed: the evals after it do not beat the best val loss of the run so far, so
    # ckpt_best.pt stays as it was and the checkpoint keeps that best
    assert sha(again / 'ckpt_best.pt') == best_before
    assert torch.load(again / 'ckpt.pt', weights_only=True)['best_val_loss'] == 0.0


def test_an_eval_redone_after_resume_is_logged_once(short_run, synthetic, tmp_path):
    """A preemption checkpoint is written before its step's eval. If a run resumed from one
    logged that eval and was then killed before its next checkpoint, the next resume redoes
    the eval: the old record goes, so the curve has one val point per step."""
    run = tmp_path / 'run'
    shutil.copytree(short_run[0], run)
    ckpt = torch.load(run / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 5 and ckpt['last_eval_iter'] == 5
    ckpt['last_eval_iter'] = 4  # as a preemption checkpoint at step 5 (the eval at 5 came after it)
    torch.save(ckpt, run / 'ckpt.pt')
    done = run_forked({'r': [*train_args(synthetic, run, *SHORT), '--init_from=resume', '--max_iters=5']}, tmp_path)
    assert_ok(done['r'])
    evals = [r for r in read_log(run) if 'val_loss' in r]
    assert [r['iter'] for r in evals] == [0, 2, 4, 5]
    before = {r['iter']: r['val_loss'] for r in read_log(short_run[0]) if 'val_loss' in r}
    assert evals[-1]['val_loss'] == pytest.approx(before[5], abs=1e-4)  # the same connector, evaluated again


def test_log_rates_cover_every_step_and_leave_out_the_evals(synthetic, tmp_path):
    """A log line's time per step, samples/s and data wait are over every step since the line
    before, without the evals and golden sampling in between: side by side, a run that pauses
    for an eval and golden captions in the middle of each log interval logs the same time per
    step as one that never pauses (counting only the steps after the pause would halve it,
    counting the pause would multiply it)."""
    common = ['--max_iters=24', '--log_interval=8', '--eval_iters=4', '--eval_report_num=0', '--batch_size=8',
              '--total_batch_size=8', '--multi_image_frac=0.0', '--group_by_length=False']
    done = run_forked({'pausing': train_args(synthetic, tmp_path / 'pausing', *common, '--eval_interval=4',
                                             '--sample_interval=4'),
                       'plain': train_args(synthetic, tmp_path / 'plain', *common, '--eval_interval=100',
                                           '--sample_interval=0')}, tmp_path, alarm=120)
    for p in done.values():
        assert_ok(p)
    pausing, plain = ([r for r in read_log(tmp_path / k) if 'loss' in r] for k in ('pausing', 'plain'))
    assert [r['iter'] for r in pausing] == [r['iter'] for r in plain] == [8, 16, 24]
    assert len([r for r in read_log(tmp_path / 'pausing') if 'val_loss' in r]) == 7  # 0, 4, ..., 24
    ratio = sorted(a['dt_ms'] / b['dt_ms'] for a, b in zip(pausing, plain))[1]  # the median of the three
    assert 0.6 < ratio < 1.6, [(a['dt_ms'], b['dt_ms']) for a, b in zip(pausing, plain)]
    assert all(0 <= r['data_wait'] <= 1 for r in pausing + plain)


SLOW_LOADER = """
import time, data
collate = data.collate
def slow(*a, **k):  # every batch takes 80 ms more to make, in the main process (no workers)
    time.sleep(0.08)
    return collate(*a, **k)
data.collate = slow
"""


def test_data_wait_tokens_and_eta_are_measured(synthetic, dataset, tmp_path):
    """What the log line's figures are made of, against a run whose loader is made slow on
    purpose (80 ms a batch, side by side with the same run at its own pace): `data` is the
    share of the time spent waiting for batches, `tok/s` the real tokens of the step's batches
    (counted here from the batch order) over the time, `eta` the time per step so far times the
    steps left."""
    common = ['--max_iters=12', '--log_interval=4', '--eval_interval=100', '--eval_iters=1', '--eval_report_num=0',
              '--sample_interval=0', '--batch_size=8', '--total_batch_size=16', '--multi_image_frac=0.0']
    done = run_forked({'slow': train_args(synthetic, tmp_path / 'slow', *common),
                       'plain': train_args(synthetic, tmp_path / 'plain', *common)}, tmp_path,
                      pre={'slow': SLOW_LOADER})
    for p in done.values():
        assert_ok(p)
    slow, plain = ([r for r in read_log(tmp_path / k) if 'loss' in r] for k in ('slow', 'plain'))
    for a, b in zip(slow, plain):
        waited = 2 * 0.08 / (a['dt_ms'] / 1000)  # two batches a step
        assert a['data_wait'] >= 0.9 * waited and a['data_wait'] > b['data_wait'] + 0.3, (a, b)
        assert a['data_wait'] <= 1
    # tokens: the real tokens of every batch of the steps since the line before
    order = iter(data.BatchOrder([dataset], [1.0], 8, 1337))
    mix = data.Mixture([dataset])
    per_step = [sum(len(mix[item]['input_ids']) for _ in range(2) for item in next(order)) for _ in range(12)]
    for r, start in zip(plain, (0, 4, 8)):
        assert r['tokens_per_s'] * r['dt_ms'] * 4 / 1000 == pytest.approx(sum(per_step[start:start + 4]), rel=1e-6)
        assert r['samples_per_s'] * r['dt_ms'] * 4 / 1000 == pytest.approx(4 * 16, rel=1e-6)
    # eta: the time per step so far (the slow run's steps are slow) times the steps left
    for r in slow:
        assert r['eta_s'] == pytest.approx((12 - r['iter']) * r['dt_ms'] / 1000, rel=0.5, abs=0.05)


def test_weight_decay_spares_norms_biases_latents_and_gains(short_run):
    ckpt = torch.load(short_run[0] / 'ckpt.pt', weights_only=True)
    groups = ckpt['optimizer']['param_groups']
    spared = sum(1 for k, v in ckpt['connector'].items() if v.dim() < 2 or k == 'latents')
    assert [g['weight_decay'] for g in groups] == [ckpt['config']['weight_decay'], 0.0]
    assert len(groups[1]['params']) == spared and len(groups[0]['params']) == len(ckpt['connector']) - spared


# -----------------------------------------------------------------------------
# bad settings: one line, before any work

BAD_SETTINGS = {  # name: (overrides, what the line must name)
    'batch_size=-1': (['--batch_size=-1'], 'batch_size'),
    'batch_size=0': (['--batch_size=0'], 'batch_size'),
    'total_batch_size=0': (['--total_batch_size=0'], 'total_batch_size'),
    'total_batch_size=20 (batch_size 16)': (['--total_batch_size=20'], 'multiple of batch_size'),
    'eval_interval=0': (['--eval_interval=0'], 'eval_interval'),
    'log_interval=0': (['--log_interval=0'], 'log_interval'),
    'lr=-1': (['--lr=-1'], 'learning_rate'),
    'dtype=float16': (['--dtype=float16'], 'dtype'),
    'device=cuda': (['--device=cuda'], 'cuda'),
    'resampler_heads=3': (['--resampler_heads=3'], 'resampler_heads'),
    'num_workers=-1': (['--num_workers=-1'], 'num_workers'),
    "out_dir=''": (['--out_dir='], 'out_dir'),
    'out_dir=a file': (['--out_dir={file}'], 'is a file'),  # before the model is built, not a traceback after
    'out_dir=below a file': (['--out_dir={file}/run'], 'is a file'),
    'init_from=bogus': (['--init_from=bogus'], 'init_from'),
    'grad_clip=-1': (['--grad_clip=-1'], 'grad_clip'),
    'multi_image_frac=2': (['--multi_image_frac=2'], 'multi_image_frac'),
    'epochs=0': (['--epochs=0'], 'epochs'),
    'max_iters=-5': (['--max_iters=-5'], 'max_iters'),
    "data_dir='a:0'": (['--data_dir=a:0'], "data_dir: the weight of 'a'"),
    'config file raises at line 2': ([], 'raises.py:2:'),
    # without the flash-attn package (CI, a CPU) or without a GPU: one line, before any loading
    'attn_implementation=flash_attention_2': (['--attn_implementation=flash_attention_2'], 'flash'),
    'slot_token=<|endoftext|>': (['--slot_token=<|endoftext|>'], 'slot_token'),
}


# Each case fails in about a second, nearly all of it importing torch: one interpreter imports
# what train.py imports, then forks a child per case that runs train.py as __main__ with the
# case's argv and ends as the interpreter ends a script (an exception that reaches the top goes
# to sys.excepthook, which train.py sets; exit 1). 18 cases cost about 2 CPU-seconds instead of 25.
# A case that does not fail fast (a setting that is not checked) is stopped by SIGALRM after a minute.
FORKED = r"""
import atexit, json, os, runpy, signal, sys
import data, model, prepare_llava, sample  # noqa: F401 (torch and transformers, imported once before the forks)
children = {}
for name, (argv, log, pre) in json.loads(sys.argv[1]).items():
    pid = os.fork()
    if pid == 0:
        signal.alarm(int(sys.argv[2]))
        os.dup2(os.open(log + '.out', os.O_WRONLY | os.O_CREAT), 1)
        os.dup2(os.open(log + '.err', os.O_WRONLY | os.O_CREAT), 2)
        exec(pre or '', {})  # a job's own setup (a fault to inject), in its own process
        sys.argv, code = argv, 0
        try:
            runpy.run_path(argv[0], run_name='__main__')
        except SystemExit as e:  # sys.exit(n) or sys.exit('message')
            code = e.code
            if not isinstance(code, int) and code is not None:
                print(code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code or 0)
    children[pid] = name
print(json.dumps({children[pid]: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children}))
"""


def run_forked(jobs, tmp, alarm=60, pre=None):
    """{name: script argv} run side by side as forks of one interpreter: {name: CompletedProcess}.
    A job still running after `alarm` seconds is stopped (SIGALRM). pre: {name: Python code the
    job's process runs first}."""
    spec = {k: ([str(a) for a in argv], str(tmp / f'job{i}'), (pre or {}).get(k))
            for i, (k, argv) in enumerate(jobs.items())}
    p = run_script(['-c', FORKED, json.dumps(spec), str(alarm)], timeout=max(240, 2 * alarm))
    assert_ok(p)
    assert not p.stderr, p.stderr[-2000:]  # the imports alone print nothing (a real run would show it)
    codes = json.loads(p.stdout.splitlines()[-1])
    return {k: subprocess.CompletedProcess(argv, codes[k], open(log + '.out').read(), open(log + '.err').read())
            for k, (argv, log, _) in spec.items()}


@pytest.fixture(scope='module')
def bad_setting_runs(synthetic, tmp_path_factory):
    """Every bad setting, run side by side: {name: (result, its out_dir)}."""
    tmp = tmp_path_factory.mktemp('settings')
    (tmp / 'raises.py').write_text('batch_size = 8\nlearning_rate = 1 / 0\n')
    (tmp / 'a_file').write_text('not a folder')
    jobs, outs = {}, {}
    for k, (over, _) in BAD_SETTINGS.items():
        if k == 'device=cuda' and torch.cuda.is_available():
            continue
        outs[k] = tmp / f'out{len(jobs)}'
        over = [o.format(file=tmp / 'a_file') for o in over]
        jobs[k] = [*train_args(synthetic, outs[k], *over), *([tmp / 'raises.py'] if k.startswith('config') else [])]
    return {k: (p, outs[k]) for k, p in run_forked(jobs, tmp).items()}


@pytest.mark.parametrize('name', list(BAD_SETTINGS))
def test_bad_setting_is_one_line_before_any_work(bad_setting_runs, name):
    if name not in bad_setting_runs:
        pytest.skip('a GPU is visible: device=cuda is a valid setting here')
    p, out = bad_setting_runs[name]
    assert_one_error_line(p, BAD_SETTINGS[name][1])
    assert not out.exists()  # nothing was written

# -----------------------------------------------------------------------------
# a checkpoint write that fails


def test_a_failed_checkpoint_write_keeps_the_old_checkpoint(synthetic, tmp_path):
    """train.py under a 1 MiB file-size limit (SIGXFSZ ignored, so the write fails with EFBIG,
    as on a full disk): the checkpoint write at the first eval fails; one line, exit 1, the
    previous ckpt.pt intact and no temp file left."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(b'the previous checkpoint')
    limited = ('import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
               'resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20)); sys.argv = sys.argv[1:]; '
               'runpy.run_path(sys.argv[0], run_name="__main__")')
    p = run_script(['-c', limited, *train_args(synthetic, out, '--max_iters=2', '--eval_interval=2', '--eval_iters=1',
                                               '--eval_report_num=0', '--sample_interval=0')])
    line = assert_one_error_line(p, str(out / 'ckpt.pt'), 'file-size limit')
    assert p.returncode == 1, line
    assert (out / 'ckpt.pt').read_bytes() == b'the previous checkpoint'
    assert not (out / 'ckpt.pt.tmp').exists()

# -----------------------------------------------------------------------------
# damaged images: counted, never the end of the run

LOG_EVERY, REPORT_NUM = 5, 8


@pytest.fixture(scope='module')
def damaged(synthetic, tmp_path_factory):
    """A copy of the synthetic images with 1 train image in 13 deleted or overwritten with junk,
    and one golden val image (among the first REPORT_NUM val samples) deleted. 20 steps, logged
    every LOG_EVERY, golden samples every 5, evals every 7 and the final report; stopped by
    SIGTERM once the eval at step 7 is logged (so between two log lines), then resumed. (first
    run, resumed run, out_dir, golden index, the step the first run stopped at)."""
    tmp = tmp_path_factory.mktemp('damaged')
    images = tmp / 'images'
    shutil.copytree(image_folder(synthetic), images)
    meta, arrays = load_prepared(synthetic)
    paths = [p.decode() for p in arrays['image_paths.npy']]
    for n, i in enumerate(sorted({int(i) for i in arrays['train_index.npy'][::13, 2]})):
        if n % 2:
            (images / paths[i]).unlink()
        else:
            (images / paths[i]).write_bytes(b'not an image')
    golden = next(g for g in meta['golden'] if g < REPORT_NUM)
    (images / paths[int(arrays['val_index.npy'][golden, 2])]).unlink()
    out = tmp / 'out'
    args = train_args(synthetic, out, f'--image_root={images}', f'--log_interval={LOG_EVERY}', '--max_iters=20',
                      '--eval_interval=7', '--eval_iters=2', '--sample_interval=5', '--eval_max_new_tokens=8',
                      f'--eval_report_num={REPORT_NUM}')
    p = popen_script(args, tmp / 'first.txt')
    try:
        t0 = time.time()
        while p.poll() is None and not any(r.get('iter') == 7 and 'val_loss' in r for r in read_log(out)) and \
                time.time() - t0 < 240:
            time.sleep(0.01)
        p.send_signal(signal.SIGTERM)
        p.wait(120)
    finally:
        if p.poll() is None:
            p.kill()
    first = subprocess.CompletedProcess(args, p.returncode, (tmp / 'first.txt').read_text(), '')
    if p.returncode != 0:
        return first, None, out, golden, None
    stopped = torch.load(out / 'ckpt.pt', weights_only=True)['iter_num']
    return first, run_script([*args, '--init_from=resume']), out, golden, stopped


@pytest.fixture(scope='module')
def replacements(damaged, synthetic, dataset):
    """How many replacements each of the 20 steps makes: its batches (the order train.py
    draws) read from the damaged images, counted by the dataset itself."""
    images = str(damaged[2].parent / 'images')
    ds = data.CaptionDataset(data.open_prepared(str(synthetic), images), 'train', dataset.builder, dataset.spec)
    order = iter(data.BatchOrder([ds], [1.0], CFG['batch_size'], 1337, multi_image_frac=CFG['multi_image_frac']))
    mix = data.Mixture([ds])
    return [sum(mix[item]['n_bad'] for item in next(order)) for _ in range(20)]


def test_bad_images_are_counted_between_log_lines(damaged, replacements):
    """bad_images of a log line: the replacements of every step since the previous line, also
    when a preemption checkpoint and a resume came between the two."""
    first, resumed, out, _, stopped = damaged
    assert_ok(first)
    assert_ok(resumed)
    assert stopped % LOG_EVERY, stopped  # the checkpoint is between two log lines
    log = [r for r in read_log(out) if 'loss' in r]
    assert [r['iter'] for r in log] == list(range(LOG_EVERY, 21, LOG_EVERY))
    starts = [0] + [r['iter'] for r in log[:-1]]
    # bad images before a window's last step: a count of the last step only would be wrong
    assert any(sum(replacements[a:r['iter'] - 1]) > 0 for a, r in zip(starts, log)), replacements
    assert [r['bad_images'] for r in log] == [sum(replacements[a:r['iter']]) for a, r in zip(starts, log)]


def test_bad_images_total_is_kept_across_a_resume(damaged, replacements):
    first, resumed, out, _, _ = damaged
    assert_ok(resumed)
    log = [r for r in read_log(out) if 'loss' in r]
    assert [r['bad_images_total'] for r in log] == [sum(replacements[:r['iter']]) for r in log]
    assert torch.load(out / 'ckpt.pt', weights_only=True)['bad_images_total'] == sum(replacements)


def test_bad_images_show_on_the_console(damaged):
    first, resumed, out, _, _ = damaged
    lines = [ln for p in (first, resumed) for ln in p.stdout.splitlines() if ln.startswith('iter ')]
    bad = {r['iter']: r['bad_images'] for r in read_log(out) if 'loss' in r}
    assert len(lines) == len(bad) and any(bad.values())
    for ln in lines:
        n = bad[int(ln.split()[1].split('/')[0])]
        assert (f'bad images {n} ' in ln) == (n > 0), ln


def test_an_unreadable_golden_image_is_a_warning(damaged):
    """Golden sampling (every 5 steps) and the final report skip the unreadable image, say so,
    and count it; the run ends normally."""
    first, resumed, out, golden, _ = damaged
    assert_ok(first)
    assert_ok(resumed)
    for p in (first, resumed):  # the first run sampled at step 5 before it stopped
        assert 'warning: 1 golden samples skipped' in p.stdout, p.stdout[-2000:]
    samples = [json.loads(line) for line in (out / 'samples.jsonl').read_text().splitlines()]
    assert sorted({r['iter'] for r in samples}) == [5, 10, 15, 20]
    assert f'golden/{golden}' not in {r['id'] for r in samples}
    m = json.loads((out / 'report' / 'metrics.json').read_text())
    assert m['val']['skipped_rows'] == 1 and m['val']['skipped_samples'] == 1, m['val']
    assert 'report:' in resumed.stdout
