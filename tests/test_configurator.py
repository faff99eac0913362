"""
Tests of configurator.py: config files and --key=value overrides, checked against the
defaults' keys and types, every mistake a one-line UserError.

$ python -m pytest -q tests/test_configurator.py
"""
import pytest

import configurator
from common import UserError


def defaults():
    return dict(learning_rate=1e-4, batch_size=16, out_dir='out', vision_ln=True, weight_decay=0.01,
                gradient_accumulation_steps=32, _private=1)


def test_unknown_key_names_the_closest():
    with pytest.raises(UserError) as e:
        configurator.configure(defaults(), ['--learnig_rate=1e-3'])
    assert 'learnig_rate' in str(e.value) and "'learning_rate'" in str(e.value)


def test_private_names_are_not_keys():
    with pytest.raises(UserError):
        configurator.configure(defaults(), ['--_private=2'])


def test_a_key_needs_a_value():
    with pytest.raises(UserError):
        configurator.configure(defaults(), ['--batch_size'])


@pytest.mark.parametrize('bad', ['--batch_size=1.5', '--batch_size=True', '--vision_ln=1', '--learning_rate=abc',
                                 '--learning_rate=True'])
def test_wrong_types_are_one_line_errors(bad):
    with pytest.raises(UserError) as e:
        configurator.configure(defaults(), [bad])
    key = bad[2:].split('=')[0]
    assert f"'{key}'" in str(e.value) and '\n' not in str(e.value)


def test_values_take_the_defaults_types():
    g = dict(defaults(), sizes=(1, 2))
    configurator.configure(g, ['--sizes=[3, 4]'])
    assert g['sizes'] == (3, 4)  # a list given for a tuple key becomes a tuple
    g = defaults()
    cfg = configurator.configure(g, ['--learning_rate=1', '--out_dir=2024', '--vision_ln=False'])
    assert g['learning_rate'] == 1.0 and type(g['learning_rate']) is float
    assert g['out_dir'] == '2024' and g['vision_ln'] is False
    assert cfg['learning_rate'] == 1.0 and '_private' not in cfg


def test_a_value_may_hold_equals_signs():
    """Only the first '=' separates key and value: a run name like lr=1e-4 stays whole."""
    g = dict(defaults(), wandb_run_name='')
    configurator.configure(g, ['--wandb_run_name=lr=1e-4,bs=16', '--out_dir=runs/a=b'])
    assert g['wandb_run_name'] == 'lr=1e-4,bs=16' and g['out_dir'] == 'runs/a=b'


def test_file_then_overrides(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text('batch_size = 8\nlearning_rate = 2e-4\nimport math\n_helper = 3\n')
    g = defaults()
    configurator.configure(g, [str(f), '--batch_size=4', '--lr=1e-3'])
    assert g['batch_size'] == 4 and g['learning_rate'] == 1e-3 and g['weight_decay'] == 0.01
    g = defaults()
    configurator.configure(g, [str(f)])
    assert g['batch_size'] == 8 and g['learning_rate'] == 2e-4
    g = defaults()
    configurator.configure(g, ['--lr=1e-4'])
    assert g['learning_rate'] == 1e-4
    g = defaults()
    configurator.configure(g, ['--batch-size=2', '--weight-decay=0.1'])  # dashes spell the same keys
    assert g['batch_size'] == 2 and g['weight_decay'] == 0.1


def test_bad_config_files(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text('batch_sise = 8\n')
    with pytest.raises(UserError) as e:
        configurator.configure(defaults(), [str(bad)])
    assert "'batch_size'" in str(e.value)
    with pytest.raises(UserError):
        configurator.configure(defaults(), [str(tmp_path / 'missing.py')])


@pytest.mark.parametrize('text, line, what', [
    ('batch_size = 8\n\nlearning_rate = (1e-3\n', 3, 'syntax error'),
    ('batch_size = 8\nimport math\n\nlearning_rate = math.log(-1)\n', 4, 'ValueError'),
    ('def lr():\n    return 1 / 0\n\n\nlearning_rate = lr()\n', 2, 'ZeroDivisionError'),
])
def test_a_broken_config_file_is_one_line_with_file_and_line(tmp_path, text, line, what):
    f = tmp_path / 'broken.py'
    f.write_text(text)
    with pytest.raises(UserError) as e:
        configurator.configure(defaults(), [str(f)])
    msg = str(e.value)
    assert msg.startswith(f'{f}:{line}:') and what in msg and '\n' not in msg, msg


def test_a_config_path_that_is_a_directory_or_missing_is_one_line(tmp_path):
    for path, what in ((tmp_path, 'directory'), (tmp_path / 'missing.py', 'not found')):
        with pytest.raises(UserError) as e:
            configurator.configure(defaults(), [str(path)])
        assert str(path) in str(e.value) and what in str(e.value) and '\n' not in str(e.value), str(e.value)
