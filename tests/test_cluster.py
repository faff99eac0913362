"""
The multi-GPU run as a cluster runs it, on CPU ranks (gloo) started by the real torchrun: a
scheduler's stop (SIGTERM to torchrun and to every process of the job at once) checkpoints and
resumes on the uninterrupted trajectory; a stop during an eval lands within a batch of it; a
failure on one rank stops every rank promptly with one line; compile=True under DDP with
loader workers stays compiled; a step of total_batch_size samples is the same on 1, 2 or 3
ranks (unevenly split, or with an idle rank) and resumes on another number of ranks; /dev/shm
is checked for every local rank's workers.

$ python -m pytest -q tests/test_cluster.py
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import data
from conftest import ENV, ROOT, assert_ok, assert_one_error_line, read_log, run_ranks, run_script, train_args
from evaluation import benchmarks
from test_train import run_forked


def torchrun(n, args):
    """torchrun --standalone --nproc_per_node=n <args> in its own session (as a job starts),
    its console into a file (a pipe nobody reads would fill and stop the ranks)."""
    log = tempfile.NamedTemporaryFile('w+', suffix='.log', delete=False)
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}',
                          *map(str, args)], cwd=ROOT, env=ENV, start_new_session=True, stdout=log,
                         stderr=subprocess.STDOUT)
    p.log = log
    return p


def finish(p, timeout=300):
    """Waits for a process; its console as stdout (a torchrun's from its file)."""
    if not hasattr(p, 'log'):
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:  # a hung job must not run on beside the next tests
        for pid in job_pids(p):
            os.kill(pid, signal.SIGKILL)
        raise
    p.log.seek(0)
    out = p.log.read()
    p.log.close()
    os.remove(p.log.name)
    return subprocess.CompletedProcess(p.args, p.returncode, out, '')


def job_pids(p):
    """torchrun, its ranks and their loader workers: what a scheduler's stop signals."""
    def children(pid):
        try:
            with open(f'/proc/{pid}/task/{pid}/children') as f:
                return [int(c) for c in f.read().split()]
        except OSError:
            return []
    out, todo = [], [p.pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children(pid)
    return out


def wait_for(out, test, p, timeout=240):
    """Until a record of out_dir's log passes test; fails at once if the process p ended."""
    t0 = time.time()
    while not any(test(r) for r in read_log(out)):
        assert p.poll() is None, finish(p).stdout[-3000:]
        assert time.time() - t0 < timeout, read_log(out)[-3:]
        time.sleep(0.02)


# -----------------------------------------------------------------------------
# a scheduler's stop

STOP = ['--max_iters=150', '--eval_interval=50', '--log_interval=1', '--eval_iters=2', '--batch_size=4',
        '--total_batch_size=8', '--proj_dropout=0.3', '--sample_interval=0', '--eval_report_num=0',
        '--multi_image_frac=0.0']


# The checkpoint a stop writes made slow on purpose (2 s), so that the signals that follow the
# first one arrive while it is being written
SLOW_STOP_SAVE = r'''
import os, runpy, sys, time
sys.path.insert(0, os.getcwd())
import configurator
from evaluation import evaluate
save = configurator.atomic_torch_save
def slow(obj, path):
    if evaluate.stop.is_set():
        time.sleep(2)
    save(obj, path)
configurator.atomic_torch_save = slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def test_a_scheduler_stop_checkpoints_and_resumes_exactly(synthetic, tmp_path):
    """scancel signals every process of the job and torchrun forwards SIGTERM to its ranks once
    more: each rank gets SIGTERM twice or more (its loader workers too), the later ones while
    the checkpoint is being written. That is one stop: the ranks checkpoint at the next step
    and exit; resumed under torchrun, the run ends on the trajectory of an uninterrupted one
    (dropout on: each rank's RNG stream continues too)."""
    wrapper = tmp_path / 'slow_stop_save.py'
    wrapper.write_text(SLOW_STOP_SAVE)
    ref, out = tmp_path / 'ref', tmp_path / 'out'
    one = torchrun(2, train_args(synthetic, ref, *STOP))
    job = torchrun(2, [wrapper, *train_args(synthetic, out, *STOP, '--num_workers=2')])
    wait_for(out, lambda r: r.get('iter', 0) >= 60 and 'loss' in r, job)
    pids = job_pids(job)
    assert len(pids) >= 5, pids  # torchrun, 2 ranks, their workers
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    for pid in pids[1:]:  # the scheduler again (the ranks are writing their checkpoint)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    first = finish(job)
    assert 'signal received: checkpoint written' in first.stdout, first.stdout[-3000:]
    stopped = torch.load(out / 'ckpt.pt', weights_only=True)['iter_num']
    assert 60 <= stopped < 150 and stopped == max(r['iter'] for r in read_log(out) if 'loss' in r)
    again = finish(torchrun(2, [*train_args(synthetic, out, *STOP, '--num_workers=2'), '--init_from=resume']))
    assert again.returncode == 0, again.stdout[-3000:]
    ref_run = finish(one)
    assert ref_run.returncode == 0, ref_run.stdout[-2000:]
    got = {r['iter']: r['loss'] for r in read_log(out) if 'loss' in r}
    want = {r['iter']: r['loss'] for r in read_log(ref) if 'loss' in r}
    assert sorted(got) == sorted(want) == list(range(1, 151))  # one record per step
    assert max(abs(got[i] - want[i]) for i in want) < 1e-4
    a, b = (torch.load(d / 'ckpt.pt', weights_only=True)['connector'] for d in (out, ref))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


# The val set made slow on purpose (a quarter of a second a sample), so that an eval takes
# seconds: a wrapper that patches the dataset, then runs train.py (torchrun runs the wrapper)
SLOW_VAL = r'''
import os, runpy, sys, time
sys.path.insert(0, os.getcwd())  # the repository (the script's own folder is first on the path)
import data
get = data.CaptionDataset.__getitem__
def slow(self, item):
    if not self.replace_bad:  # the val split
        time.sleep(0.25)
    return get(self, item)
data.CaptionDataset.__getitem__ = slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def test_a_stop_during_an_eval_lands_within_a_batch(synthetic, tmp_path):
    """SIGTERM to every rank while the eval at step 10 runs (each val batch takes ~1 s, the eval
    ~8 s): the ranks give it up at the next batch, checkpoint step 10 and exit, well before
    the eval would have ended; the eval is not recorded, and the resumed run does it again."""
    wrapper = tmp_path / 'slow_val.py'
    wrapper.write_text(SLOW_VAL)
    out = tmp_path / 'out'
    args = train_args(synthetic, out, '--max_iters=20', '--eval_interval=10', '--log_interval=1', '--eval_iters=16',
                      '--batch_size=4', '--total_batch_size=8', '--sample_interval=0', '--eval_report_num=0')
    job = torchrun(2, [wrapper, *args])
    wait_for(out, lambda r: r.get('iter') == 10 and 'loss' in r, job)
    t0 = time.time()
    for pid in job_pids(job):
        os.kill(pid, signal.SIGTERM)
    first = finish(job)
    elapsed = time.time() - t0
    eval0 = next(r for r in read_log(out) if r.get('iter') == 0 and 'val_loss' in r)['eval_s']
    assert 'signal received: checkpoint written' in first.stdout and 'at iter 10;' in first.stdout, first.stdout[-2000:]
    assert elapsed < 0.5 * eval0, (elapsed, eval0)  # the eval at 10 (as long as the one at 0) was cut short
    assert [r['iter'] for r in read_log(out) if 'val_loss' in r] == [0]
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 10
    again = finish(torchrun(2, [*args, '--init_from=resume']))
    assert again.returncode == 0, again.stdout[-3000:]
    assert [r['iter'] for r in read_log(out) if 'val_loss' in r] == [0, 10, 20]


def test_a_second_ctrl_c_stops_at_once(synthetic, tmp_path):
    """Ctrl-C twice at once (the terminal's and torchrun's echo of it) is one stop, as SIGTERM:
    a checkpoint, exit 0. A person's second Ctrl-C a second later, while that checkpoint is
    being written (made slow here), stops at once: one line, no checkpoint (and the exit status
    of a process ended by SIGINT, as the shell expects of Ctrl-C)."""
    wrapper = tmp_path / 'slow_save.py'
    wrapper.write_text(SLOW_STOP_SAVE)
    runs = {}
    for name, pause in (('echo', 0.0), ('twice', 1.2)):
        out = tmp_path / name
        p = subprocess.Popen([sys.executable, wrapper, *map(str, train_args(synthetic, out, '--max_iters=100000',
                                                                           '--eval_interval=100000',
                                                                           '--log_interval=1'))],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(out, lambda r: 'loss' in r, p)
        p.send_signal(signal.SIGINT)
        time.sleep(pause)
        p.send_signal(signal.SIGINT)
        runs[name] = (finish(p, 120), out)
    (echo, out), (twice, out2) = runs['echo'], runs['twice']
    assert echo.returncode == 0 and 'signal received' in echo.stdout, echo.stderr[-2000:]
    assert (out / 'ckpt.pt').exists()
    assert twice.returncode != 0 and 'signal received' not in twice.stdout, twice.stdout[-2000:]
    assert [ln for ln in twice.stderr.splitlines() if ln.strip()] == [
        'error: interrupted: a second Ctrl-C stops at once, without a checkpoint']
    assert not (out2 / 'ckpt.pt').exists()

# -----------------------------------------------------------------------------
# a failure on one rank


def test_a_rank_that_cannot_read_the_benchmark_stops_every_rank(synthetic, tmp_path):
    """Node-local copies differ: rank 1's working folder has no benchmark images. Every rank
    checks what it reads at start, and the failure reaches every rank in one collective: both
    stop within seconds (never at the collective timeout), rank 0 with rank 1's one line, and
    nothing is written."""
    files = benchmarks.write_synthetic(str(synthetic.parent), str(tmp_path / 'bench'))
    cwds = [tmp_path / 'node0', tmp_path / 'node1']
    for c in cwds:
        c.mkdir()
    os.symlink(synthetic.parent / 'images', cwds[0] / 'bench_images')
    out = tmp_path / 'out'
    args = [ROOT / a if k == 0 else a for k, a in enumerate(train_args(synthetic, out))]
    t0 = time.time()
    done = run_ranks([*args, '--eval_bench=coco', f'--eval_bench_ann={files["karpathy"]}',
                      '--eval_bench_images=bench_images', '--ddp_timeout=600'], cwds=cwds, timeout=240)
    assert time.time() - t0 < 120
    assert [p.returncode for p in done] == [1, 1], [p.stderr[-1000:] for p in done]
    lines = [ln for ln in done[0].stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and 'error: rank 1: image folder bench_images not found' in lines[0], done[0].stderr[-2000:]
    assert not done[1].stderr.strip(), done[1].stderr[-2000:]
    assert 'Traceback' not in done[0].stderr + done[1].stderr
    assert not out.exists()


def test_nonfinite_steps_stop_every_rank_with_one_line(synthetic, tmp_path):
    """The same decision on every rank (the gradient is all-reduced): all write the last good
    checkpoint together and exit 1, rank 0 with the one line, rank 1 quietly."""
    out = tmp_path / 'nf'
    done = run_ranks(train_args(synthetic, out, '--learning_rate=1e30', '--max_nonfinite=2', '--max_iters=20',
                                '--log_interval=1', '--eval_interval=100', '--eval_report_num=0', '--batch_size=4',
                                '--total_batch_size=8'), timeout=240)
    assert [p.returncode for p in done] == [1, 1], [p.stderr[-1000:] for p in done]
    assert_one_error_line(done[0], 'non-finite steps in a row', 'ckpt_last_good.pt')
    assert not done[1].stderr.strip(), done[1].stderr[-2000:]
    assert torch.load(out / 'ckpt_last_good.pt', weights_only=True)['nonfinite_total'] == 2

# -----------------------------------------------------------------------------
# compile under DDP; any number of ranks


def test_ddp_with_compile_and_loader_workers(synthetic, tmp_path):
    """compile=True under DDP (2 gloo ranks, 2 loader workers each, evals and golden captions
    in between): the blocks stay compiled (the one known recompile), and the run matches the
    eager one."""
    common = ['--max_iters=6', '--eval_interval=3', '--log_interval=3', '--eval_iters=2', '--batch_size=4',
              '--total_batch_size=8', '--sample_interval=3', '--eval_max_new_tokens=4', '--eval_report_num=0',
              '--num_workers=2', '--multi_image_frac=0.0']
    p = finish(torchrun(2, train_args(synthetic, tmp_path / 'compiled', *common, '--compile=True')), 600)
    assert p.returncode == 0, p.stdout[-3000:]
    q = finish(torchrun(2, train_args(synthetic, tmp_path / 'eager', *common)), 300)
    assert q.returncode == 0, q.stdout[-3000:]
    compiled = [r for r in read_log(tmp_path / 'compiled') if 'loss' in r]
    assert [r['recompiles'] for r in compiled] == [1, 1] and 'recompile limit' not in p.stdout
    eager = [r['loss'] for r in read_log(tmp_path / 'eager') if 'loss' in r]
    assert [r['loss'] for r in compiled] == pytest.approx(eager, abs=1e-3)


def test_any_number_of_ranks_runs_the_same_step(synthetic, tmp_path):
    """total_batch_size=16 with batch_size 4 is 4 micro-batches a step, whatever the number of
    ranks: 3 ranks take 2, 1, 1 of them (by global position); then resumed on 2 ranks (2 each),
    the run equals one process's (4 each step). total_batch_size=8 on 3 ranks leaves one rank
    idle each step (it still joins the gradient all-reduce): the same as one process too."""
    common = ['--log_interval=1', '--eval_iters=2', '--batch_size=4', '--sample_interval=0', '--eval_report_num=0',
              '--multi_image_frac=0.0', '--eval_interval=2', '--warmup_frac=0.0', '--min_lr_frac=1.0']  # a constant lr
    runs = {'three': (3, ['--total_batch_size=16', '--max_iters=2']),
            'idle': (3, ['--total_batch_size=8', '--max_iters=3'])}
    jobs = {k: torchrun(n, train_args(synthetic, tmp_path / k, *common, *a)) for k, (n, a) in runs.items()}
    ref = run_forked({'one16': train_args(synthetic, tmp_path / 'one16', *common, '--total_batch_size=16',
                                          '--max_iters=4'),
                      'one8': train_args(synthetic, tmp_path / 'one8', *common, '--total_batch_size=8',
                                         '--max_iters=3')}, tmp_path, alarm=240)
    for k, p in jobs.items():
        done = finish(p)
        assert done.returncode == 0, done.stdout[-3000:]
        assert ('4 micro-batches per step do not split evenly over 3 ranks' in done.stdout) == (k == 'three')
    for p in ref.values():
        assert_ok(p)
    resumed = finish(torchrun(2, [*train_args(synthetic, tmp_path / 'three', *common, '--total_batch_size=16',
                                              '--max_iters=4'), '--init_from=resume']))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    for run, one, steps in (('three', 'one16', 4), ('idle', 'one8', 3)):
        got = {r['iter']: r['loss'] for r in read_log(tmp_path / run) if 'loss' in r}
        want = {r['iter']: r['loss'] for r in read_log(tmp_path / one) if 'loss' in r}
        assert sorted(got) == sorted(want) == list(range(1, steps + 1))
        assert max(abs(got[i] - want[i]) for i in want) < 1e-4, (got, want)
        a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in (run, one))
        assert a['global_pos'] == b['global_pos'] == steps * (16 if run == 'three' else 8) // 4
        assert max(float((a['connector'][k] - b['connector'][k]).abs().max()) for k in a['connector']) < 1e-4


def test_total_batch_size_must_be_whole_micro_batches(synthetic, tmp_path):
    p = run_script(train_args(synthetic, tmp_path / 'out', '--batch_size=16', '--total_batch_size=40'))
    assert_one_error_line(p, 'total_batch_size=40 must be a multiple of batch_size=16', 'total_batch_size=32 or 48')

# -----------------------------------------------------------------------------
# /dev/shm


def test_shm_is_checked_for_every_local_rank(synthetic, tmp_path):
    """8 ranks of a node with 4 loader workers each in a container's 64 MB /dev/shm: one line
    with what to do, before the model is built; 1 rank with 0 workers needs none."""
    free = 'import collections, shutil; shutil.disk_usage = lambda p: collections.namedtuple("u", "total used free")' \
           '(64 << 20, 0, 64 << 20)\nimport os; os.environ["LOCAL_WORLD_SIZE"] = "8"\n'
    done = run_forked({'8x4': train_args(synthetic, tmp_path / 'a', '--num_workers=4', '--batch_size=64',
                                         '--total_batch_size=64'),
                       '8x0': train_args(synthetic, tmp_path / 'b', '--num_workers=0', '--max_iters=0',
                                         '--eval_report_num=0')},
                      tmp_path, pre={'8x4': free, '8x0': free})
    line = assert_one_error_line(done['8x4'], '/dev/shm', '8 rank(s) x 4 loader workers', 'num_workers',
                                 '--ipc=host')
    assert 'model:' not in done['8x4'].stdout, line
    assert_ok(done['8x0'])
    # the real run's sizes: 8 ranks x 8 workers of 32 images of 384 px need several GB, 1 worker a rank far less
    assert data.shm_needed(32, 384, 8, 8) > 4 << 30 > data.shm_needed(32, 384, 1, 8)
