"""
The few things every script shares: the error type for user mistakes and how scripts print
it, atomic file writes, backbone names, the device / dtype a run uses, and a progress line
for long work.
Nothing here imports torch at module level, so prepare_llava.py starts fast.
"""
import errno
import os
import shutil
import sys
import time


class UserError(Exception):
    """A mistake the user can fix: missing data or weights, a bad setting, an incompatible
    checkpoint, a full disk. Library code raises it (a notebook can catch it with
    `except Exception`); the scripts print it as one 'error: ...' line and exit 1."""


def one_line_errors():
    """Called first by every script: a UserError that reaches the top prints as one line on
    stderr, no traceback; every other exception keeps its traceback (it is a bug)."""
    def hook(kind, value, tb):
        if issubclass(kind, UserError):
            msg = str(value).strip()
            if 'Original Traceback' in msg:  # raised in a DataLoader worker: keep the original message
                msg = msg.splitlines()[-1].split(': ', 1)[-1]
            print(f'error: {msg}', file=sys.stderr, flush=True)
        else:
            sys.__excepthook__(kind, value, tb)
    sys.excepthook = hook


def first_line(e, limit=200):
    """An exception as one short line: its first line, or its type when it has no message. A
    line over `limit` is cut after its first sentence, else at a word, never mid-word."""
    s = str(e).strip()
    if not s:
        return type(e).__name__
    s = s.splitlines()[0]
    if len(s) <= limit:
        return s
    end = s.find('. ', 0, limit)
    if end > 0:
        return s[:end + 1]
    cut = s.rfind(' ', 0, limit - 3)
    return s[:cut if cut > 0 else limit - 3].rstrip(' ,;:') + '...'


# -----------------------------------------------------------------------------
# Atomic writes: a temp file beside the target, fsync, rename. A crash or a full disk in the
# middle leaves the old file intact and no temp file behind.

def space_error(e, path):
    """A UserError for a write that failed because the disk (or quota, or file-size limit)
    is full; None for other failures."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = f'{shutil.disk_usage(folder).free / 2**30:.2f} GiB free there'
        except OSError:
            free = 'free space unknown'
        why = 'file too large for the file-size limit' if e.errno == errno.EFBIG else 'disk full'
        return UserError(f'{why} while writing {path} ({free}); free space (or set another out_dir) and '
                         f'run again - the previous file there is intact')
    return None


def check_out_dir(path, what='out_dir'):
    """One line, before any work, when `path` cannot become a folder to write in: it (or a
    folder above it) is a file, or the first folder that exists is not writable."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UserError(f"{what} '{path}' cannot be a folder: '{p}' is a file; give another {what}")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{what} '{path}': no permission to write in '{p}'; give another {what}")


def atomic_write(path, write):
    """Calls write(f) on a temp file, then renames it over path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        err = space_error(e, path)
        if err is not None:
            raise err from None
        raise


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode('utf-8'))


def atomic_torch_save(obj, path):
    """torch.save, atomically. Serialised to memory first: torch's zip writer turns a failed
    write into an opaque 'unexpected pos' RuntimeError, while a plain file write reports the
    real cause (disk full) that atomic_write can explain."""
    import io
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getbuffer())


def hub_reachable(timeout=3.0):
    """One quick TCP check instead of transformers' minute of retries when offline."""
    if os.environ.get('HF_HUB_OFFLINE', '0').lower() in ('1', 'true', 'yes'):
        return False
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co')).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# -----------------------------------------------------------------------------
# Backbone names. A backbone is named by one string:
#   'Qwen/Qwen3-8B-Base' or '/path/to/dir'   real weights (hub id or local directory)
#   'random:Qwen/Qwen3-8B-Base'               the known architecture with random weights (no download)
#   'random:/path/to/dir'                     architecture from a local config.json, random weights
#   'tiny'                                    a few layers, small widths (CPU demo and tests)
# Here, not in model.py, because images.py needs it too and model.py imports images.py.

def parse_backbone(name):
    """(kind, base) of a backbone name: kind is 'tiny', 'random' or 'pretrained'; base is the
    hub id or directory without the 'random:' prefix."""
    if name == 'tiny':
        return 'tiny', 'tiny'
    if name.startswith('random:'):
        return 'random', name[len('random:'):]
    return 'pretrained', name


# -----------------------------------------------------------------------------
# Device and dtype

DTYPES = ('auto', 'bfloat16', 'float32')


def resolve_device(device='auto', dtype='auto'):
    """(torch.device, torch.dtype) for a run. 'auto': the GPU if there is one; bf16 backbones
    on a GPU, fp32 on a CPU. bf16 can be asked for on a CPU too: it takes exactly the code path
    a GPU run takes (the tests use that)."""
    import torch
    if dtype not in DTYPES:
        hint = ' (fp16 would need loss scaling; bfloat16 is the GPU dtype here)' if dtype == 'float16' else ''
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'{hint}")
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"device '{device}' is not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for but no CUDA GPU is visible; use --device=cpu or auto")
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f'device {device} does not exist: {torch.cuda.device_count()} GPU(s) visible')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise UserError("device 'mps' asked for but MPS is not available; use --device=cpu or auto")
    if dtype == 'auto':
        dtype = 'bfloat16' if device.type == 'cuda' else 'float32'
    return device, getattr(torch, dtype)


def autocast(device, dtype):
    """bf16 autocast around the trainable connector and the loss when the backbones are bf16;
    a no-op for fp32. The frozen backbones are already in `dtype`."""
    import contextlib
    import torch
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# -----------------------------------------------------------------------------
# Progress for long work: rate and ETA, at most every few seconds, on stderr

class Progress:
    def __init__(self, what, total, every=2.0):
        self.what, self.total, self.every = what, total, every
        self.t0 = self.last = time.time()
        self.printed = False

    def __call__(self, done):
        now = time.time()
        if done < self.total and now - self.last < self.every:
            return
        if done >= self.total and not self.printed:
            return  # short work prints nothing
        self.last, self.printed = now, True
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float('inf')
        print(f'{self.what}: {done:,}/{self.total:,} ({rate:,.0f}/s, ETA {eta:.0f}s)', file=sys.stderr, flush=True)
