"""
nanoGPT's configurator, made strict. Usage from a script whose config lives in
module-level globals:

    $ python train.py config/stage1_trial.py --batch_size=32 --lr=1e-4

The config file is plain Python, exec'd first; then each --key=value overrides a global.
Values are parsed with ast.literal_eval (falling back to a plain string), and must have the
type of the default (an int is accepted for a float). An unknown key is an error that names
the closest known key, because a typo that silently does nothing wastes a whole run.
"""
import ast
import difflib
import os

# short spellings people type; mapped to the real key
ALIASES = {'lr': 'learning_rate'}


def _closest(key, keys):
    m = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return f"; did you mean '{m[0]}'?" if m else ''


def _check(key, value, defaults, where):
    if key not in defaults:
        raise SystemExit(f"error: unknown config key '{key}' ({where}){_closest(key, list(defaults))}")
    default = defaults[key]
    if default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if type(value) is not type(default):
        raise SystemExit(f"error: config key '{key}' expects {type(default).__name__} "
                         f"(default {default!r}), got {type(value).__name__} {value!r} ({where})")
    return value


def config_keys(globs):
    """The overridable globals: public names bound to plain values."""
    return {k: v for k, v in globs.items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}


def configure(globs, argv):
    """Apply config files and --key=value overrides from argv to the dict `globs`.
    Returns the dict of final config values (for logging and checkpoints)."""
    defaults = config_keys(globs)
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.exists(arg):
                raise SystemExit(f"error: config file '{arg}' not found (configs live in config/)")
            scope = {}
            with open(arg) as f:
                exec(f.read(), scope)
            for k, v in config_keys(scope).items():
                globs[k] = _check(k, v, defaults, arg)
            continue
        if '=' not in arg:
            raise SystemExit(f"error: expected --key=value, got '{arg}'")
        key, val = arg[2:].split('=', 1)
        key = ALIASES.get(key, key).replace('-', '_')
        try:
            value = ast.literal_eval(val)
        except (SyntaxError, ValueError):
            value = val  # a bare string, e.g. --out_dir=out-run2
        if isinstance(defaults.get(key), str) and not isinstance(value, str):
            value = val  # --out_dir=2024 is a string, not an int
        globs[key] = _check(key, value, defaults, f'--{key}')
    return {k: globs[k] for k in defaults}
