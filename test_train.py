"""
Tests of train.py, run as a script on the CPU demo config: an interrupted run (kill -9 or
SIGTERM) resumes on exactly the uninterrupted trajectory, DDP over two processes equals one
process, gradient accumulation equals one big batch, and non-finite steps are skipped, then
stop the run.

$ python -m pytest -q test_train.py          # about a minute on 2 CPU cores
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV, ROOT, assert_ok, assert_one_error_line, popen_script, read_log, run_script, train_args

# -----------------------------------------------------------------------------
# resume == uninterrupted


def by_iter(records):
    """(iter, 'train'|'val') -> record"""
    return {(r['iter'], 'val' if 'val_loss' in r else 'train'): r for r in records}


def assert_same_trajectory(ref, got, first_iter, last_iter):
    ref = by_iter(ref)
    train_iters = [r['iter'] for r in got if 'loss' in r]
    assert train_iters == list(range(first_iter, last_iter + 1)), train_iters
    for r in got:
        a = ref[(r['iter'], 'val' if 'val_loss' in r else 'train')]
        for k in ('loss', 'val_loss', 'grad_norm', 'lr'):
            if k in r:
                assert abs(r[k] - a[k]) <= 1e-6, (r['iter'], k, r[k], a[k])


def test_resume_equals_uninterrupted(synthetic, tmp_path):
    N, K = 30, 10  # iterations; eval (and ckpt.pt) every K
    # golden-set sampling in between must not disturb the trajectory either; the final
    # evaluation report is left out (the demo run makes one) to save a few seconds per run
    common = [f'--max_iters={N}', f'--eval_interval={K}', '--log_interval=1', '--eval_iters=2',
              f'--sample_interval={K}', '--eval_report_num=0']
    outs = {k: tmp_path / k for k in 'ABC'}
    procs = {k: popen_script(train_args(synthetic, outs[k], *common), tmp_path / f'{k}.txt') for k in 'ABC'}
    try:
        # B: SIGKILL once the iteration-K checkpoint exists and a few more steps have run.
        # C: SIGTERM between two checkpoints (after step 3, before the first eval checkpoint).
        pending, t0 = {'B', 'C'}, time.time()
        while pending:
            for k in sorted(pending):
                if procs[k].poll() is not None:
                    pytest.fail(f'run {k} ended (exit {procs[k].returncode}) before it could be interrupted')
            steps = {k: max([r['iter'] for r in read_log(outs[k]) if 'loss' in r], default=0) for k in pending}
            if 'C' in pending and steps['C'] >= 3:
                assert not (outs['C'] / 'ckpt.pt').exists()
                os.kill(procs['C'].pid, signal.SIGTERM)
                pending.discard('C')
            if 'B' in pending and steps['B'] >= K + 2 and (outs['B'] / 'ckpt.pt').exists():
                os.kill(procs['B'].pid, signal.SIGKILL)
                pending.discard('B')
            if time.time() - t0 > 240:
                pytest.fail(f'timed out waiting for runs {pending}')
            time.sleep(0.01)
        assert procs['B'].wait(60) == -signal.SIGKILL
        assert procs['C'].wait(120) == 0, (tmp_path / 'C.txt').read_text()[-2000:]
        assert procs['A'].wait(240) == 0, (tmp_path / 'A.txt').read_text()[-2000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    ref = read_log(outs['A'])
    assert [r['iter'] for r in ref if 'loss' in r] == list(range(1, N + 1))

    # C wrote a checkpoint on SIGTERM at the step it had reached, and said so
    ck = torch.load(outs['C'] / 'ckpt.pt', weights_only=True)
    stopped = ck['iter_num']
    assert 3 <= stopped < K and 'signal received' in (tmp_path / 'C.txt').read_text()
    assert max(r['iter'] for r in read_log(outs['C'])) == stopped

    # a resumed run drops the log records of the steps it redoes (one point per step), so
    # what stays of each log is its records up to the checkpoint's iteration
    resume_at = {'B': torch.load(outs['B'] / 'ckpt.pt', weights_only=True)['iter_num'], 'C': stopped}
    assert resume_at['B'] == K
    kept = {k: [r for r in read_log(outs[k]) if r['iter'] <= resume_at[k]] for k in 'BC'}
    resumed = {k: popen_script(train_args(synthetic, outs[k], *common, '--init_from=resume'), tmp_path / f'{k}2.txt')
               for k in 'BC'}
    for k, p in resumed.items():
        assert p.wait(240) == 0, (tmp_path / f'{k}2.txt').read_text()[-2000:]
    logs = {k: read_log(outs[k]) for k in 'BC'}
    assert all(logs[k][:len(kept[k])] == kept[k] for k in 'BC')
    # B resumes from the iteration-K checkpoint: iterations K+1..N replay exactly
    assert_same_trajectory(ref, logs['B'][len(kept['B']):], K + 1, N)
    assert_same_trajectory(ref, logs['C'][len(kept['C']):], stopped + 1, N)
    # and the final connectors are the same
    fa = torch.load(outs['A'] / 'ckpt.pt', weights_only=True)['connector']
    for k in 'BC':
        fk = torch.load(outs[k] / 'ckpt.pt', weights_only=True)['connector']
        for n in fa:
            torch.testing.assert_close(fk[n], fa[n], atol=1e-6, rtol=0)

# -----------------------------------------------------------------------------
# DDP and gradient accumulation


def test_ddp_two_processes(synthetic, tmp_path):
    """2 ranks x batch_size 8 with gradient_accumulation_steps=2 (one micro-batch per rank per
    step) sees exactly the data of one process with batch_size 8 and 2 accumulation steps:
    rank r takes global micro-batches r, r+2, ... and the single process takes 0, 1, 2, ...
    The single process averages the two micro-batch gradients; DDP must all-reduce (average)
    them across ranks. So the checkpoint rank 0 writes equals the single-process one only if
    the gradients were synchronised every step -- an unsynchronised rank 0 would have trained
    on half the data. Both ranks start from rank 0's weights (DDP broadcasts them) and apply
    the same averaged gradients, so matching rank 0 means the ranks stay identical. Per-step
    grad norms (computed after the all-reduce) must match too."""
    common = ['--max_iters=4', '--eval_interval=4', '--log_interval=1', '--eval_iters=2', '--batch_size=8',
              '--gradient_accumulation_steps=2', '--multi_image_frac=0.0']
    ddp_out, one_out = tmp_path / 'ddp', tmp_path / 'one'
    one = popen_script(train_args(synthetic, one_out, *common), tmp_path / 'one.txt')
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
    for n in b['connector']:
        torch.testing.assert_close(a['connector'][n], b['connector'][n], atol=1e-5, rtol=0)
    ga = [r['grad_norm'] for r in log if 'loss' in r]
    gb = [r['grad_norm'] for r in read_log(one_out) if 'loss' in r]
    assert min(ga) > 0.1  # real updates happened, so equal weights after 4 steps mean something
    assert ga == pytest.approx(gb, abs=1e-5)


def test_gradient_accumulation_equals_one_big_batch(synthetic, tmp_path):
    """batch 16 x accum 1 and batch 8 x accum 2 see the same 16 samples per step (random,
    ungrouped order); the loss is normalised by the caption tokens of the whole step, so the
    updates are the same even though the two halves hold different numbers of tokens."""
    common = ['--max_iters=3', '--eval_interval=3', '--log_interval=1', '--eval_iters=1', '--multi_image_frac=0.0',
              '--group_by_length=False', '--eval_report_num=0', '--sample_interval=0']
    big, small = tmp_path / 'big', tmp_path / 'small'
    pa = popen_script(train_args(synthetic, big, '--batch_size=16', '--gradient_accumulation_steps=1', *common),
                      tmp_path / 'big.txt')
    assert_ok(run_script(train_args(synthetic, small, '--batch_size=8', '--gradient_accumulation_steps=2', *common)))
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
