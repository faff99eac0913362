"""
Tests of stopping and resuming train.py, run as a script on the CPU demo config, with dropout
on (proj_dropout=0.3) so the RNG state matters: a SIGTERM to the whole process group (how
SLURM and systemd stop a job) with loader workers, and a kill -9 of a run on a mixture of two
datasets, both resume on exactly the uninterrupted trajectory, with one log record per step.
Also: the logged lr follows the schedule, a mixture run logs per-source counts and val losses
(the mixed batch order itself: test_mixture.py), and a resume with other data settings is
refused.

$ python -m pytest -q tests/test_resume.py         # under a minute on 2 CPU cores
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

import data
from conftest import CFG, ENV, ROOT, assert_ok, assert_one_error_line, read_log, run_script, sha, train_args
from test_train import run_forked  # short runs side by side, as forks of one interpreter

N, K, S = 30, 10, 5  # iterations; eval (and ckpt.pt) every K; golden samples every S
LR, WARMUP_FRAC, MIN_LR_FRAC = 1e-3, 0.2, 0.1  # 6 warmup steps
COMMON = [f'--max_iters={N}', f'--eval_interval={K}', f'--sample_interval={S}', '--log_interval=1', '--eval_iters=2',
          '--eval_max_new_tokens=8', '--eval_report_num=0', '--proj_dropout=0.3', f'--learning_rate={LR}',
          f'--warmup_frac={WARMUP_FRAC}', f'--min_lr_frac={MIN_LR_FRAC}']


def start(args, log_path):
    """train.py in its own session (process group), as a batch scheduler starts a job."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, stdout=open(log_path, 'w'),
                            stderr=subprocess.STDOUT, start_new_session=True)


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def read_samples(out):
    p = out / 'samples.jsonl'
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def last_step(out):
    return max([r['iter'] for r in read_log(out) if 'loss' in r], default=0)


@pytest.fixture(scope='module')
def second(tmp_path_factory):
    """A second, smaller synthetic dataset (another seed) for mixtures."""
    d = tmp_path_factory.mktemp('second')
    assert_ok(run_script(['prepare_llava.py', '--synthetic', 200, '--data_dir', d, '--val_ratio', 0.1, '--seed', 7,
                          '--no_llm'], timeout=120))  # the mixture trains with the first dataset's LLM
    return d / 'prepared'


@pytest.fixture(scope='module')
def runs(synthetic, second, tmp_path_factory):
    """Four runs side by side, then two resumes:
    A  one dataset, uninterrupted (the reference)
    C  one dataset, 2 loader workers, SIGTERM to its process group after step 3 (before any
       checkpoint), then resumed
    D  the mixture synthetic:1.0 + second:0.5, uninterrupted
    B  the same mixture, kill -9 once the iteration-K checkpoint exists and a golden sample
       and steps past it were logged, then resumed"""
    tmp = tmp_path_factory.mktemp('resume')
    out = {k: tmp / k for k in 'ABCD'}
    mix = f'{synthetic}:1.0,{second}:0.5'
    args = {'A': train_args(synthetic, out['A'], *COMMON), 'C': train_args(synthetic, out['C'], *COMMON,
                                                                            '--num_workers=2'),
            'D': train_args(mix, out['D'], *COMMON), 'B': train_args(mix, out['B'], *COMMON)}
    procs = {k: start(a, tmp / f'{k}.txt') for k, a in args.items()}
    r = dict(out=out, tmp=tmp, args=args, before={})
    try:
        pending, t0 = {'B', 'C'}, time.time()
        while pending:
            for k in sorted(pending):
                if procs[k].poll() is not None:
                    pytest.fail(f'run {k} ended (exit {procs[k].returncode}) before it could be interrupted:\n'
                                + (tmp / f'{k}.txt').read_text()[-2000:])
            if 'C' in pending and last_step(out['C']) >= 3:
                assert not (out['C'] / 'ckpt.pt').exists()
                os.killpg(procs['C'].pid, signal.SIGTERM)  # the main process and its loader workers
                pending.discard('C')
            if 'B' in pending and last_step(out['B']) >= K + S + 1 and (out['B'] / 'ckpt.pt').exists():
                os.kill(procs['B'].pid, signal.SIGKILL)
                pending.discard('B')
            if time.time() - t0 > 240:
                pytest.fail(f'timed out waiting for runs {pending}')
            time.sleep(0.01)
        assert procs['B'].wait(60) == -signal.SIGKILL
        r['C_exit'] = procs['C'].wait(120)
        r['C_text'] = (tmp / 'C.txt').read_text()
        t1 = time.time()
        while group_alive(procs['C'].pid) and time.time() - t1 < 5:  # its workers, if any were left behind
            time.sleep(0.05)
        r['C_group_left'] = group_alive(procs['C'].pid)
        for k in 'BC':
            ckpt = out[k] / 'ckpt.pt'
            r['before'][k] = (read_log(out[k]), read_samples(out[k]),
                              torch.load(ckpt, weights_only=True)['iter_num'] if ckpt.exists() else None)
        for k in 'BC' if r['C_exit'] == 0 else 'B':
            procs[k + '2'] = start([*args[k], '--init_from=resume'], tmp / f'{k}2.txt')
        r['exit'] = {k: p.wait(240) for k, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None or group_alive(p.pid):
                os.killpg(p.pid, signal.SIGKILL)
    return r


def by_iter(records):
    """(iter, 'train'|'val') -> record"""
    return {(r['iter'], 'val' if 'val_loss' in r else 'train'): r for r in records}


def assert_same_trajectory(ref, got, first_iter):
    """got (the records a resumed run wrote) equals ref's from first_iter to the end: losses,
    grad norms, lr, and per-source counts and val losses for a mixture."""
    ref = by_iter(ref)
    assert [r['iter'] for r in got if 'loss' in r] == list(range(first_iter, N + 1))
    for r in got:
        a = ref[(r['iter'], 'val' if 'val_loss' in r else 'train')]
        for k in ('loss', 'val_loss', 'grad_norm', 'lr'):
            if k in r:
                assert abs(r[k] - a[k]) <= 1e-6, (r['iter'], k, r[k], a[k])
        for k in ('samples_by_source', 'val_loss_by_source'):
            assert r.get(k) == pytest.approx(a.get(k), abs=1e-6), (r['iter'], k)


def assert_exited_0(runs, *names):
    for name in names:
        assert runs['exit'].get(name) == 0, (runs['tmp'] / f'{name}.txt').read_text()[-3000:]


def assert_resumed_on_track(runs, k, ref):
    assert_exited_0(runs, ref, k + '2')
    out, (before, _, at) = runs['out'][k], runs['before'][k]
    kept = [r for r in before if r['iter'] <= at]  # what stays of the log: its records up to the checkpoint
    log = read_log(out)
    assert log[:len(kept)] == kept
    assert_same_trajectory(read_log(runs['out'][ref]), log[len(kept):], at + 1)
    final = torch.load(out / 'ckpt.pt', weights_only=True)['connector']
    for n, v in torch.load(runs['out'][ref] / 'ckpt.pt', weights_only=True)['connector'].items():
        torch.testing.assert_close(final[n], v, atol=1e-6, rtol=0)

# -----------------------------------------------------------------------------
# interrupted == uninterrupted


def test_sigterm_to_the_process_group_checkpoints_and_exits(runs):
    """SIGTERM to the main process and its 2 loader workers at once: the workers must not die
    first and take the run down; the run writes ckpt.pt at the step it reached and exits 0."""
    text = runs['C_text']
    assert runs['C_exit'] == 0 and 'Traceback' not in text, text[-3000:]
    stopped = runs['before']['C'][2]
    assert 3 <= stopped < K and f'signal received: checkpoint written to {runs["out"]["C"] / "ckpt.pt"} at iter ' \
        f'{stopped}' in text
    assert max(r['iter'] for r in runs['before']['C'][0]) == stopped
    assert not runs['C_group_left']  # no worker left behind


def test_sigterm_resume_equals_uninterrupted(runs):
    assert_resumed_on_track(runs, 'C', 'A')


def test_kill9_resume_of_a_mixture_with_dropout_equals_uninterrupted(runs):
    assert runs['before']['B'][2] == K
    assert_resumed_on_track(runs, 'B', 'D')


def test_resumed_logs_have_one_record_per_step(runs):
    """kill -9 after golden samples and steps past the checkpoint: the resumed run redoes
    them, and log.jsonl / samples.jsonl still hold each record once."""
    assert_exited_0(runs, 'B2', 'C2')
    before_log, before_samples, at = runs['before']['B']
    assert max(r['iter'] for r in before_log) > at + S  # there were records to drop
    assert any(r['iter'] > at for r in before_samples)
    for k in 'BC':
        log = read_log(runs['out'][k])
        assert sorted(r['iter'] for r in log if 'loss' in r) == list(range(1, N + 1)), k
        assert sorted(r['iter'] for r in log if 'val_loss' in r) == list(range(0, N + 1, K)), k
        samples = [(r['iter'], r['id']) for r in read_samples(runs['out'][k])]
        assert len(samples) == len(set(samples)) and {i for i, _ in samples} == set(range(S, N + 1, S)), k

# -----------------------------------------------------------------------------
# the schedule


def test_logged_lr_follows_the_schedule(runs):
    """Linear warmup over int(warmup_frac * max_iters) steps, then cosine to min_lr_frac of the
    peak, computed here from the config; the record of step i holds the lr of iteration i-1."""
    warmup = int(WARMUP_FRAC * N)

    def lr(it):
        if it < warmup:
            return LR * (it + 1) / (warmup + 1)
        return LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * (it - warmup) / (N - warmup))))
    assert_exited_0(runs, 'A')
    logged = [(r['iter'], r['lr']) for r in read_log(runs['out']['A']) if 'loss' in r]
    assert [i for i, _ in logged] == list(range(1, N + 1))
    for i, got in logged:
        assert got == pytest.approx(lr(i - 1), rel=1e-9, abs=0), (i, got, lr(i - 1))

# -----------------------------------------------------------------------------
# mixtures


def test_mixture_logs_samples_and_val_loss_by_source(runs, synthetic, second):
    names = {data.source_name(str(synthetic)), data.source_name(str(second))}
    assert len(names) == 2
    assert_exited_0(runs, 'D')
    log = read_log(runs['out']['D'])
    train = [r for r in log if 'loss' in r]
    per_step = CFG['total_batch_size']
    assert all(set(r['samples_by_source']) == names and sum(r['samples_by_source'].values()) == per_step
               for r in train)
    totals = Counter()
    for r in train:
        totals.update(r['samples_by_source'])
    assert all(totals[n] > 0 for n in names), totals  # both datasets were drawn from
    for r in (r for r in log if 'val_loss' in r):
        by = r['val_loss_by_source']
        assert set(by) == names and all(math.isfinite(v) for v in by.values()), r
        assert min(by.values()) - 1e-6 <= r['val_loss'] <= max(by.values()) + 1e-6, r  # token-weighted mean


# -----------------------------------------------------------------------------
# resume with other data settings


def test_resume_with_other_data_settings_is_refused(runs, synthetic, second):
    """batch_size, data_dir and total_batch_size decide what the checkpoint's data
    position means: each change is one line naming the key; the run folder is untouched."""
    assert_exited_0(runs, 'A')
    src = runs['out']['A']
    changes = {'batch_size': '--batch_size=8', 'data_dir': f'--data_dir={second}',
               'total_batch_size': '--total_batch_size=32'}
    dirs = {k: runs['tmp'] / f'refused-{k}' for k in changes}
    for d in dirs.values():
        shutil.copytree(src, d)
    before = {k: {f: sha(d / f) for f in ('ckpt.pt', 'log.jsonl', 'config.json')} for k, d in dirs.items()}
    done = run_forked({k: [*train_args(synthetic, dirs[k], *COMMON), '--init_from=resume', changes[k]]
                       for k in changes}, runs['tmp'])
    for k, p in done.items():
        assert_one_error_line(p, k)
        assert {f: sha(dirs[k] / f) for f in before[k]} == before[k]
