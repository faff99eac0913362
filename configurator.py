"""
nanoGPT's configurator, made strict, and what turns a user's mistake into one line.

    $ python train.py config/stage1_trial.py --batch_size=32 --lr=1e-4

The config file is plain Python, exec'd first; then each --key=value overrides a global.
Values are parsed with ast.literal_eval (falling back to a plain string), and must have the
type of the default (an int is accepted for a float). An unknown key is an error that names
the closest known key, because a typo that silently does nothing wastes a whole run.

Every mistake a user can fix (a bad setting, missing data or weights, a corrupt checkpoint,
a full disk) is a UserError: library code raises it, and the scripts print it as one
`error: ...` line. Below the configurator: that error type, the checks every script runs
before any work, file writes that fail safely (a crash or a full disk leaves the old file
intact), and the progress line of long work. Nothing here imports torch at module level, so
a script's first error comes fast.
"""
import ast
import contextlib
import difflib
import errno
import os
import shutil
import sys
import time
import traceback


class UserError(Exception):
    """A mistake the user can fix. Library code raises it (a notebook catches it as any
    exception); the scripts print it as one 'error: ...' line and exit 1."""


def one_line_errors():
    """Called first by every script: a UserError that reaches the top prints as one line on
    stderr, no traceback; every other exception keeps its traceback (it is a bug)."""
    def hook(kind, value, tb):
        if issubclass(kind, UserError):
            print(f'error: {error_line(value)}', file=sys.stderr, flush=True)
        elif issubclass(kind, KeyboardInterrupt):
            print(f'error: interrupted{": " + str(value) if str(value) else ""}', file=sys.stderr, flush=True)
        else:
            sys.__excepthook__(kind, value, tb)
    sys.excepthook = hook


def leave(code):
    """Ends the process now, its console flushed, without exit handlers or the interpreter's
    teardown; every file it writes must be closed or flushed first. A DDP rank ends this way:
    torch keeps the gloo process group's threads alive past destroy_process_group (importing
    torch._dynamo after the group was made, as DDP does, holds it), and one still letting go of
    a collective's tensors needs the interpreter: a finalising one aborts the process (SIGABRT,
    'terminate called without an active exception') after the work is done, about one CPU DDP
    run in fifteen."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def error_line(e):
    """The message of a UserError, also when a DataLoader worker raised it (the loader wraps
    it in the worker's traceback)."""
    msg = str(e).strip()
    if 'Original Traceback' in msg:
        msg = msg.splitlines()[-1].split(': ', 1)[-1]
    return msg


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


def require(ok, message):
    """One settings check: a UserError with `message` when ok is False."""
    if not ok:
        raise UserError(message)

# -----------------------------------------------------------------------------
# The configurator

# short spellings people type; mapped to the real key
ALIASES = {'lr': 'learning_rate'}


def _closest(key, keys):
    m = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return f"; did you mean '{m[0]}'?" if m else ''


def _check(key, value, defaults, where):
    if key not in defaults:
        raise UserError(f"unknown config key '{key}' ({where}){_closest(key, list(defaults))}")
    default = defaults[key]
    if default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if type(value) is not type(default):
        raise UserError(f"config key '{key}' expects {type(default).__name__} (default {default!r}), got "
                        f"{type(value).__name__} {value!r} ({where})")
    return value


def config_keys(globs):
    """The overridable globals: public names bound to plain values."""
    return {k: v for k, v in globs.items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}


def _exec_file(path):
    """The globals a config file sets; one line (file:line) if it is not a readable Python file."""
    if not os.path.exists(path):
        raise UserError(f"config file '{path}' not found (configs live in config/)")
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' is a directory, not a Python file (configs live in config/)")
    try:
        with open(path) as f:
            source = f.read()
        scope = {}
        exec(compile(source, path, 'exec'), scope)
    except SyntaxError as e:
        raise UserError(f'{path}:{e.lineno}: syntax error in the config file ({e.msg})') from None
    except Exception as e:
        line = next((fr.lineno for fr in reversed(traceback.extract_tb(e.__traceback__)) if fr.filename == path), '?')
        raise UserError(f'{path}:{line}: the config file raised {type(e).__name__}: {first_line(e, 100)}') from None
    return config_keys(scope)


def configure(globs, argv):
    """Apply config files and --key=value overrides from argv to the dict `globs`.
    Returns the dict of final config values (for logging and checkpoints)."""
    defaults = config_keys(globs)
    for arg in argv:
        if not arg.startswith('--'):
            for k, v in _exec_file(arg).items():
                globs[k] = _check(k, v, defaults, arg)
            continue
        if '=' not in arg:
            raise UserError(f"expected --key=value, got '{arg}'")
        key, val = arg[2:].split('=', 1)
        key = ALIASES.get(key, key).replace('-', '_')
        try:
            value = ast.literal_eval(val)
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            value = val  # a bare string, e.g. --out_dir=out-run2
        if isinstance(defaults.get(key), str) and not isinstance(value, str):
            value = val  # --out_dir=2024 is a string, not an int
        globs[key] = _check(key, value, defaults, f'--{key}')
    return {k: globs[k] for k in defaults}

# -----------------------------------------------------------------------------
# Checks before any work, and writes that fail safely


# What the operating system means when it refuses a write, in words a user acts on
OS_REASONS = {
    errno.ENOSPC: 'disk full', errno.EDQUOT: 'disk quota exceeded',
    errno.EFBIG: 'file too large for the file-size limit',
    errno.ENAMETOOLONG: 'name too long for the file system', errno.EROFS: 'read-only file system',
    errno.ELOOP: 'too many levels of symbolic links', errno.EACCES: 'permission denied',
    errno.EPERM: 'operation not permitted', errno.ENOTDIR: 'a part of the path is a file, not a folder',
    errno.EISDIR: 'it is a folder', errno.EIO: 'input/output error (a failing disk or network file system)',
    errno.EMLINK: 'too many links in the folder above', errno.ENOENT: 'a folder on the way disappeared',
    errno.EEXIST: 'a file of that name is in the way', errno.EMFILE: 'too many open files',
}


def os_error(e, path, what='out_dir', todo=None):
    """One line for an OSError raised while writing `path`: the path, the reason in words and
    what to do. The disk-space reasons also say how much is free there."""
    why = OS_REASONS.get(e.errno) or e.strerror or type(e).__name__
    space = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if space:
        p = os.path.abspath(path)
        while not os.path.isdir(p) and os.path.dirname(p) != p:
            p = os.path.dirname(p)
        try:
            why += f', {shutil.disk_usage(p).free / 2**30:.2f} GiB free there'
        except OSError:
            pass
    todo = todo or ('free space there or ' if space else '') + f'give another {what}'
    return UserError(f"cannot write {what} '{path}': {why} (errno {e.errno}); {todo}")


@contextlib.contextmanager
def os_errors(path, what='out_dir', todo=None):
    """Any refusal of the operating system inside the block becomes os_error's one line."""
    try:
        yield
    except OSError as e:
        raise os_error(e, path, what, todo) from None


def check_out_dir(path, what='out_dir'):
    """One line, before any work, when `path` cannot become a folder to write in: it (or a
    folder above it) is a file, or the operating system refuses to make it or to write a small
    file in it (no space, name too long, read-only, no permission, ...). The probe leaves
    nothing behind: folders it made are removed again, so a later mistake writes nothing."""
    p, missing = os.path.abspath(path), []
    while not os.path.exists(p) and os.path.dirname(p) != p:
        missing.append(p)
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UserError(f"{what} '{path}' cannot be a folder: '{p}' is a file; give another {what}")
    made = []
    with os_errors(path, what):
        try:
            for folder in reversed(missing):
                try:
                    os.mkdir(folder)
                    made.append(folder)
                except FileExistsError:  # another process (a rank of the same run) made it meanwhile
                    pass
            probe = os.path.join(path, f'.write_probe.{os.getpid()}')
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b'x' * 4096)  # a full disk may take the name and refuse the data
                os.fsync(fd)
            finally:
                os.close(fd)
                os.remove(probe)
        finally:
            for folder in reversed(made):
                try:
                    os.rmdir(folder)
                except OSError:  # another process's probe is in it: it stays
                    pass


def resolve_device(device='auto', dtype='auto'):
    """(torch.device, torch.dtype) for a run, or one line for a device that is not there.
    'auto': the GPU if there is one; bf16 backbones on a GPU, fp32 on a CPU. bf16 can be asked
    for on a CPU too: it takes exactly the code path a GPU run takes (the tests use that)."""
    import torch
    dtypes = ('auto', 'bfloat16', 'float32')
    if dtype not in dtypes:
        hint = ' (fp16 would need loss scaling; bfloat16 is the GPU dtype here)' if dtype == 'float16' else ''
        raise UserError(f"dtype must be one of {', '.join(dtypes)}, got '{dtype}'{hint}")
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


def atomic_write(path, write):
    """Calls write(f) on a temp file beside path, fsyncs it, then renames it over path: a
    crash or a full disk in the middle leaves the old file intact and no temp file behind; a
    refusal of the operating system is os_error's one line."""
    tmp = f'{path}.tmp'
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # one line, and the old file is still there
            raise os_error(e, path, 'file', 'the previous file there is intact; fix the cause (free space, or set '
                                            'another out_dir) and run again') from None
        raise


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode('utf-8'))


def atomic_copy(src, dst):
    """A copy of src at dst, written as atomic_write writes (fsynced, then renamed)."""
    with open(src, 'rb') as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 16 << 20))


def atomic_torch_save(obj, path):
    """torch.save, atomically. Serialised to memory first: torch's zip writer turns a failed
    write into an opaque 'unexpected pos' RuntimeError, while a plain file write reports the
    real cause (disk full) that atomic_write can explain."""
    import io
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getbuffer())


class Progress:
    """Rate and ETA of long work, at most every few seconds, on stderr; short work prints nothing."""

    def __init__(self, what, total, every=2.0):
        self.what, self.total, self.every = what, total, every
        self.t0 = self.last = time.time()
        self.printed = False

    def __call__(self, done):
        now = time.time()
        if done < self.total and now - self.last < self.every:
            return
        if done >= self.total and not self.printed:
            return
        self.last, self.printed = now, True
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float('inf')
        print(f'{self.what}: {done:,}/{self.total:,} ({rate:,.0f}/s, ETA {eta:.0f}s)', file=sys.stderr, flush=True)
