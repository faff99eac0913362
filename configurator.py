"""
nanoGPT's configurator, made strict. Usage from a script whose config lives in
module-level globals:

    $ python train.py config/stage1_trial.py --batch_size=32 --lr=1e-4

The config file is plain Python, exec'd first; then each --key=value overrides a global.
Values are parsed with ast.literal_eval (falling back to a plain string), and must have the
type of the default (an int is accepted for a float). An unknown key is an error that names
the closest known key, because a typo that silently does nothing wastes a whole run.
Every mistake is a UserError: one line, with the file and line number for a broken file.
"""
import ast
import difflib
import os
import traceback

from common import UserError, first_line

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


def require(ok, message):
    """One settings check: a UserError with `message` when ok is False."""
    if not ok:
        raise UserError(message)
